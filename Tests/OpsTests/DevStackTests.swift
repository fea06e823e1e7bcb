import DevStack
import Foundation
import Glibc
import Synchronization
import TestSupport
import Testing

/// The run command, `ops/dev` (its supervisor is `wechat-dev`, Sources/DevStack), with the
/// executables this test run built: every way it can end stops everything it started — the
/// processes it printed as started and its own brokers — and nothing else (a sentinel
/// process survives each run). One test per ending: Ctrl-C (SIGINT to its process group, as
/// a terminal sends it), SIGTERM, SIGHUP, a dead output pipe, a child crashing at start.
/// Serialized: each run starts a whole stack (and most their own RabbitMQ).
@Suite("ops/dev", .serialized, .enabled(if: TestServices.environment["WR_BIN_DIR"] != nil || TestServices.isCI), .timeLimit(.minutes(10)))
struct DevStackTests {
    static let account = ["WECHAT_APPID=wxd0e1f2a3b4c5d6e7", "WECHAT_TOKEN=devtoken", "WECHAT_AES_KEY=abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG"]

    func binaries() throws -> String {
        try #require(TestServices.environment["WR_BIN_DIR"], "ops/test exports WR_BIN_DIR")
    }

    /// Ctrl-C, with brokers of its own: the demo reply, two more messages through nginx (both
    /// ingress replicas and nginx log them, nginx never the signed query), then SIGINT to the
    /// process group → exit 130, every child exited 0, everything gone.
    @Test func ctrlCStopsEverythingItStarted() async throws {
        try await withDevRun { run in
            try await run.waitForLine("ready; Ctrl-C stops everything")
            #expect(run.output.contains("demo │ reply (text, via the customer-service API): 您好!输入“菜单”查看功能列表"))
            let endpoint = try #require(run.value(after: "  WeChat endpoint  "))
            let api = try #require(run.value(after: "  fake WeChat API  "))
            #expect(run.output.contains("logs             \(run.directory)/logs"))
            let user = "oDevCheck\(UInt32.random(in: 0 ... .max))"
            func send(_ arguments: [String]) async throws -> String {
                try await runCommand(
                    "/usr/bin/env",
                    Self.account + [try binaries() + "/wechat-sim", "send", "--url", endpoint, "--api", api, "--openid", user] + arguments + ["--wait-reply"],
                    includeStandardError: true)
            }
            #expect(try await send(["text", "菜单"]).contains("功能列表"))
            #expect(try await send(["text", "1", "--mode", "compatible"]).contains("您已发送2条消息"))
            for log in ["ingress-1", "ingress-2"] {
                #expect(((try? String(contentsOfFile: "\(run.directory)/logs/\(log).log", encoding: .utf8)) ?? "").isEmpty == false, "no log of \(log)")
            }
            let access = try String(contentsOfFile: "\(run.directory)/logs/nginx-access.log", encoding: .utf8)
            #expect(access.components(separatedBy: "POST /wechat").count - 1 >= 3, "\(access)")
            #expect(!access.contains("signature="))
            let started = try run.startedProcesses(ownBrokers: true)
            #expect(started.count == 9, "7 processes of the stack and 2 brokers: \(started)")

            run.signalGroup(SIGINT)
            #expect(try await run.exitStatus() == 130)
            try await run.waitForLine("stopped; logs are in")
            let exits = try #require(run.value(after: "ops/dev: exit statuses: "))
            for name in ["nginx", "worker-2", "worker-1", "ingress-2", "ingress-1", "tokend", "sim"] {
                #expect(exits.contains("\(name)=0"), "\(name) did not exit cleanly: \(exits)")
            }
            // The stop order: the public side first, the fake WeChat last.
            #expect(run.output.contains("stopping nginx worker-2 worker-1 ingress-2 ingress-1 tokend sim"))
            try run.expectAllGone(started, ownBrokers: true)
        }
    }

    /// SIGTERM to the supervisor alone, with the test run's brokers (AMQP_URL, REDIS_URL):
    /// used, and still running afterwards. With `DEV_DECIDE=1` (`ops/dev --decide`) and
    /// `DEV_PASSIVE=1` (`ops/dev --passive`): the demo reply comes from the simulator's toy
    /// decision service, in the HTTP response (passive-first).
    @Test(.enabled(if: TestServices.amqpEnabled && TestServices.redisEnabled))
    func sigtermWithReusedBrokersLeavesThemRunning() async throws {
        let amqpURL = try TestServices.amqpURL()
        let redisURL = try TestServices.redisURL()
        try await withDevRun(reuse: (amqpURL, redisURL), extra: ["DEV_DECIDE=1", "DEV_PASSIVE=1"]) { run in
            try await run.waitForLine("ready; Ctrl-C stops everything")
            #expect(run.output.contains("demo │ reply (text, passive: in the HTTP response): 回声(第1句): 帮助"))
            #expect(run.output.contains("reusing the RabbitMQ and Redis"))
            #expect(!FileManager.default.fileExists(atPath: run.directory + "/services"))
            let started = try run.startedProcesses(ownBrokers: false)
            #expect(started.count == 7)
            run.signalSupervisor(SIGTERM)
            #expect(try await run.exitStatus() == 143)
            try run.expectAllGone(started, ownBrokers: false)
            #expect(canConnect(port: try port(of: amqpURL)), "the reused RabbitMQ is gone")
            #expect(canConnect(port: try port(of: redisURL)), "the reused Redis is gone")
        }
    }

    /// SIGHUP (the terminal closed) to the process group.
    @Test func sighupStopsEverything() async throws {
        try await withDevRun { run in
            try await run.waitForLine("ready; Ctrl-C stops everything")
            let started = try run.startedProcesses(ownBrokers: true)
            run.signalGroup(SIGHUP)
            #expect(try await run.exitStatus() == 129)
            try run.expectAllGone(started, ownBrokers: true)
        }
    }

    /// `ops/dev 2>&1 | tee log`, and Ctrl-C kills `tee` too: the supervisor's output pipe has
    /// no reader while it stops. (The bash supervisor died of SIGPIPE here, leaving RabbitMQ,
    /// epmd and Redis running.)
    @Test func aDeadOutputPipeDoesNotCutTheStopShort() async throws {
        try await withDevRun(closeOutputAfter: "ready; Ctrl-C stops everything") { run in
            try await run.waitForLine("ready; Ctrl-C stops everything")
            let started = try run.startedProcesses(ownBrokers: true)
            try await run.waitUntilOutputClosed()
            run.signalGroup(SIGINT)
            #expect(try await run.exitStatus() == 130)
            try run.expectAllGone(started, ownBrokers: true)
        }
    }

    /// A child that exits during start-up (here every worker: its executable is a script that
    /// fails): what was started is stopped, the brokers too, exit status 1, and the output
    /// names the child and shows its log.
    @Test func aChildCrashingAtStartStopsEverything() async throws {
        let fake = try Repo.temporaryDirectory()
        defer { try? FileManager.default.removeItem(at: fake) }
        let bin = try binaries()
        for exe in ["wechat-ingress", "wechat-tokend", "wechat-sim", "wechat-dev"] {
            try FileManager.default.createSymbolicLink(atPath: fake.path + "/" + exe, withDestinationPath: bin + "/" + exe)
        }
        let worker = fake.path + "/wechat-worker"
        try "#!/bin/sh\necho 'worker: cannot start (test)' >&2\nexit 3\n".write(toFile: worker, atomically: true, encoding: .utf8)
        try FileManager.default.setAttributes([.posixPermissions: 0o755], ofItemAtPath: worker)
        try await withDevRun(binaries: fake.path) { run in
            #expect(try await run.exitStatus() == 1)
            try await run.waitForLine("stopped; logs are in")
            #expect(run.output.contains("worker-1 exited during start-up (3)") || run.output.contains("worker-2 exited during start-up (3)"), "\(run.output)")
            #expect(run.output.contains("worker: cannot start (test)"))
            let started = try run.startedProcesses(ownBrokers: false)
            #expect(started.count >= 4, "sim, tokend and the ingress replicas were started: \(started)")
            try run.expectAllGone(started, ownBrokers: true)
        }
    }

    /// Runs `ops/dev` in a process group of its own (as a shell runs a foreground job), with
    /// a sentinel process it must leave alone; kills whatever is left if `body` fails.
    func withDevRun(
        reuse: (String, String)? = nil, binaries: String? = nil, closeOutputAfter: String? = nil, extra: [String] = [],
        _ body: (DevRun) async throws -> Void
    ) async throws {
        let work = try Repo.temporaryDirectory()
        var environment = ["DEV_BIN_DIR=\(try binaries ?? self.binaries())", "DEV_PORT=0", "DEV_DIR=\(work.path)/run"] + extra
        if let (amqp, redis) = reuse {
            environment += ["AMQP_URL=\(amqp)", "REDIS_URL=\(redis)"]
        } else {
            environment = ["-u", "AMQP_URL", "-u", "REDIS_URL"] + environment  // the test run's brokers are not for this run
        }
        let sentinel = try spawn("/bin/sleep", ["600"], environment: [])
        let run = try DevRun(directory: "\(work.path)/run", environment: environment, closeOutputAfter: closeOutputAfter)
        defer {
            kill(-run.pid, SIGKILL)
            if FileManager.default.fileExists(atPath: run.directory + "/services/state") {
                _ = try? spawnAndWait(Repo.path("ops/services"), ["stop", run.directory + "/services"])
            }
            kill(sentinel, SIGKILL)
            var status: Int32 = 0
            waitpid(sentinel, &status, 0)
            try? FileManager.default.removeItem(at: work)
        }
        do {
            try await body(run)
        } catch {
            Issue.record("ops/dev printed:\n\(run.output)")
            throw error
        }
        #expect(kill(sentinel, 0) == 0, "ops/dev stopped a process it did not start")
    }
}

/// The supervisor's settings: a bad variable is a clear error before anything starts.
@Suite("ops/dev settings")
struct DevSettingsTests {
    func settings(_ environment: [String: String]) throws -> DevSettings {
        let bin = try Repo.temporaryDirectory()
        defer { try? FileManager.default.removeItem(at: bin) }  // only checked at init
        for exe in ["wechat-ingress", "wechat-worker", "wechat-tokend", "wechat-sim"] {
            _ = FileManager.default.createFile(atPath: bin.path + "/" + exe, contents: Data("#!/bin/sh\n".utf8), attributes: [.posixPermissions: 0o755])
        }
        return try DevSettings(environment: ["DEV_REPO": Repo.root.path].merging(environment) { $1 }, ownDirectory: bin.path)
    }

    @Test func defaultsAndReuse() throws {
        let s = try settings([:])
        #expect(s.port == 8080 && s.logLevel == "info" && s.reuse == nil)
        #expect(s.directory.hasPrefix(Repo.root.path + "/.build-dev/"))
        #expect(try settings(["AMQP_URL": "amqp://h"]).reuse == nil, "both brokers or neither")
        #expect(try settings(["AMQP_URL": "amqp://h", "REDIS_URL": "redis://h"]).reuse?.redisURL == "redis://h")
        #expect(try settings(["DEV_PORT": "0", "DEV_DIR": "x/y"]).directory == Repo.root.path + "/x/y")
        #expect(try settings(["DEV_DECIDE": "1"]).decide && !s.decide)
        #expect(throws: DevSettings.Invalid.self) { try settings(["DEV_DECIDE": "yes"]) }
        #expect(try settings(["DEV_PASSIVE": "1"]).passive && !s.passive)
        #expect(throws: DevSettings.Invalid.self) { try settings(["DEV_PASSIVE": "2"]) }
    }

    @Test(arguments: ["-1", "65536", "80a", "", "99999999999999999999"])
    func aBadPortIsRefused(port: String) {
        #expect(throws: DevSettings.Invalid.self) { try settings(["DEV_PORT": port]) }
    }

    @Test func missingExecutablesAndANonRepositoryAreRefused() throws {
        #expect(throws: DevSettings.Invalid.self) { try settings(["DEV_BIN_DIR": "/nonexistent"]) }
        #expect(throws: DevSettings.Invalid.self) { try settings(["DEV_REPO": "/tmp"]) }
    }
}

/// One `ops/dev` process (its own process group), its output collected by a thread.
final class DevRun: Sendable {
    let pid: pid_t
    let directory: String
    private let state = Mutex<(output: String, outputClosed: Bool, exit: Int32?)>(("", false, nil))

    init(directory: String, environment: [String], closeOutputAfter: String?) throws {
        self.directory = directory
        var fds: [Int32] = [0, 0]
        guard pipe(&fds) == 0 else { throw POSIXError(.EMFILE) }
        let (readEnd, writeEnd) = (fds[0], fds[1])
        pid = try spawn(
            "/usr/bin/env", environment + [Repo.path("ops/dev")], environment: nil, output: writeEnd, closing: readEnd, ownGroup: true)
        close(writeEnd)
        Thread.detachNewThread { [self] in
            var buffer = [UInt8](repeating: 0, count: 4096)
            var text = ""
            while true {
                let n = buffer.withUnsafeMutableBytes { read(readEnd, $0.baseAddress, $0.count) }
                if n < 0, errno == EINTR { continue }
                if n <= 0 { break }
                text += String(decoding: buffer[0..<n], as: UTF8.self)
                state.withLock { $0.output = text }
                // The reader of the pipe goes away (as `tee` does on Ctrl-C).
                if let closeOutputAfter, text.contains(closeOutputAfter) { break }
            }
            close(readEnd)
            state.withLock { $0.outputClosed = true }
        }
        Thread.detachNewThread { [self] in
            var status: Int32 = 0
            while waitpid(pid, &status, 0) < 0, errno == EINTR {}
            let code = (status & 0x7f) == 0 ? (status >> 8) & 0xff : 128 + (status & 0x7f)
            state.withLock { $0.exit = code }
        }
    }

    var output: String { state.withLock { $0.output } }

    /// Waits (bounded) until a line of the output contains `text`.
    func waitForLine(_ text: String, within seconds: Int = 300) async throws {
        try await eventually("ops/dev to print '\(text)'", within: seconds) {
            let (output, closed) = state.withLock { ($0.output, $0.outputClosed) }
            if output.contains(text) { return true }
            if closed { throw Ended(output: output) }
            return false
        }
    }

    struct Ended: Error, CustomStringConvertible {
        let output: String
        var description: String { "ops/dev's output ended first:\n\(output)" }
    }

    func waitUntilOutputClosed() async throws {
        try await eventually("the output pipe's reader to go") { state.withLock { $0.outputClosed } }
    }

    /// The rest of the first line that starts with `prefix`, up to the next run of spaces.
    func value(after prefix: String) -> String? {
        guard let line = output.split(separator: "\n").first(where: { $0.hasPrefix(prefix) }) else { return nil }
        let rest = line.dropFirst(prefix.count)
        return prefix.hasSuffix(": ") ? String(rest) : rest.split(separator: " ").first.map(String.init)
    }

    /// The processes ops/dev said it started, plus its own brokers' (from their pid files).
    func startedProcesses(ownBrokers: Bool) throws -> [String: pid_t] {
        var started: [String: pid_t] = [:]
        for line in output.split(separator: "\n") where line.hasPrefix("ops/dev: started ") {
            let words = line.split(separator: " ")
            if words.count >= 5, let pid = pid_t(words[4].trimmingCharacters(in: CharacterSet.decimalDigits.inverted)) {
                started[String(words[2])] = pid
            }
        }
        if ownBrokers {
            for broker in ["redis", "rabbitmq"] {
                let text = try String(contentsOfFile: "\(directory)/services/\(broker)/pid", encoding: .utf8)
                guard let pid = Int32(text.trimmingCharacters(in: .whitespacesAndNewlines)) else {
                    throw ServiceScriptError(message: "no process id in \(broker)/pid: \(text)")
                }
                started[broker] = pid
            }
        }
        return started
    }

    func signalGroup(_ signal: Int32) { kill(-pid, signal) }
    func signalSupervisor(_ signal: Int32) { kill(pid, signal) }

    /// Its exit status (128 + signal when killed by one); bounded by the stop's own bounds.
    func exitStatus() async throws -> Int32 {
        try await eventually("ops/dev to exit", within: 240) { state.withLock { $0.exit } != nil }
        return state.withLock { $0.exit } ?? -1
    }

    /// Every started process is gone, no process mentions the run's folder, and our own
    /// brokers' data is removed.
    func expectAllGone(_ started: [String: pid_t], ownBrokers: Bool) throws {
        for (name, pid) in started {
            #expect(!isRunning(pid), "\(name) (pid \(pid)) is still running")
        }
        let mentioning = try FileManager.default.contentsOfDirectory(atPath: "/proc").compactMap { entry -> String? in
            guard let p = Int32(entry), let data = FileManager.default.contents(atPath: "/proc/\(entry)/cmdline") else { return nil }
            let command = String(decoding: data.map { $0 == 0 ? 32 : $0 }, as: UTF8.self)
            return command.contains(directory) && p != getpid() ? "\(p): \(command)" : nil
        }
        #expect(mentioning.isEmpty, "processes mentioning \(directory) still run: \(mentioning)")
        if ownBrokers {
            #expect(!FileManager.default.fileExists(atPath: directory + "/services"), "the brokers' data directory was not removed")
        }
    }
}

/// Starts `executable` as a shell would: no blocked signals, default actions for the ones a
/// test runner may block or ignore; optionally in a process group of its own and with both
/// output streams to `output`.
func spawn(
    _ executable: String, _ arguments: [String], environment: [String]?, output: Int32? = nil, closing: Int32? = nil, ownGroup: Bool = false
) throws -> pid_t {
    var actions = posix_spawn_file_actions_t()
    posix_spawn_file_actions_init(&actions)
    defer { posix_spawn_file_actions_destroy(&actions) }
    posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
    if let output {
        posix_spawn_file_actions_adddup2(&actions, output, 1)
        posix_spawn_file_actions_adddup2(&actions, output, 2)
        posix_spawn_file_actions_addclose(&actions, output)
    } else {
        posix_spawn_file_actions_addopen(&actions, 1, "/dev/null", O_WRONLY, 0)
    }
    if let closing { posix_spawn_file_actions_addclose(&actions, closing) }
    var attributes = posix_spawnattr_t()
    posix_spawnattr_init(&attributes)
    defer { posix_spawnattr_destroy(&attributes) }
    var none = sigset_t()
    sigemptyset(&none)
    posix_spawnattr_setsigmask(&attributes, &none)
    var defaults = sigset_t()
    sigemptyset(&defaults)
    for s in [SIGINT, SIGTERM, SIGHUP, SIGPIPE] { sigaddset(&defaults, s) }
    posix_spawnattr_setsigdefault(&attributes, &defaults)
    var flags = Int32(POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF)
    if ownGroup {
        flags |= Int32(POSIX_SPAWN_SETPGROUP)
        posix_spawnattr_setpgroup(&attributes, 0)
    }
    posix_spawnattr_setflags(&attributes, Int16(flags))
    let argv = ([executable] + arguments).map { strdup($0) } + [nil]
    defer { for a in argv { free(a) } }
    var pid: pid_t = 0
    let rc: Int32
    if let environment {
        let envp = environment.map { strdup($0) } + [nil]
        defer { for e in envp { free(e) } }
        // `env` adds these to the inherited environment.
        rc = posix_spawn(&pid, executable, &actions, &attributes, argv, envp)
    } else {
        rc = posix_spawn(&pid, executable, &actions, &attributes, argv, environ)
    }
    guard rc == 0 else { throw POSIXError(POSIXErrorCode(rawValue: rc) ?? .EINVAL) }
    return pid
}

/// Runs a command to its end (for clean-up), returning its raw wait status.
func spawnAndWait(_ executable: String, _ arguments: [String]) throws -> Int32 {
    let pid = try spawn(executable, arguments, environment: nil)
    var status: Int32 = 0
    while waitpid(pid, &status, 0) < 0, errno == EINTR {}
    return status
}

/// The port of a URL such as `amqp://user:pass@127.0.0.1:5672/%2F`.
func port(of url: String) throws -> Int {
    let hostPort = url.split(separator: "@").last.map(String.init) ?? url
    let afterScheme = hostPort.components(separatedBy: "://").last ?? hostPort
    let authority = afterScheme.split(separator: "/").first.map(String.init) ?? afterScheme
    return try #require(authority.split(separator: ":").last.flatMap { Int($0) })
}

/// Whether `pid` is a live process (a zombie waiting for its parent counts as gone).
func isRunning(_ pid: pid_t) -> Bool {
    guard kill(pid, 0) == 0 else { return false }
    guard let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
          let close = stat.lastIndex(of: ")") else { return true }
    return !stat[stat.index(after: close)...].trimmingCharacters(in: .whitespaces).hasPrefix("Z")
}
