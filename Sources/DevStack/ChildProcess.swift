import Foundation
import Glibc
import Subprocess
import SystemPackage

/// How a process ended (or that it could not start).
public enum Termination: Sendable, Equatable, CustomStringConvertible {
    case exited(Int32)
    case signalled(Int32)
    case notStarted(String)

    init(_ status: TerminationStatus) {
        switch status {
        case .exited(let code): self = .exited(code)
        case .signaled(let signal): self = .signalled(signal)
        }
    }

    public var description: String {
        switch self {
        case .exited(let code): return "\(code)"
        case .signalled(let signal): return "signal \(signal)"
        case .notStarted(let why): return "not started: \(why)"
        }
    }
}

/// A long-running process of the stack, run with swift-subprocess: output (both streams) to
/// a log file, input `/dev/null`, and a session of its own, so that a terminal's Ctrl-C or
/// hang-up reaches the supervisor alone, which then stops the children in order.
///
/// Its whole life is ``run()``, a task of the supervisor's process group: the process is
/// spawned, watched (its pidfd, on a thread of its own) and signalled only inside
/// swift-subprocess's `run` body, that is while it has not been reaped, so a signal can
/// never reach another process that got its pid.
final class ChildProcess: Sendable {
    let name: String
    let logPath: String
    private let executable: String
    private let arguments: [String]
    private let environment: [String: String]
    private let directory: String
    private let spawned = Latch<Int32>()
    private let stopAsked = Latch<Duration>()
    private let end = Latch<Termination>()
    private let killed = Latch<Bool>()

    init(name: String, executable: String, arguments: [String], environment: [String: String], directory: String, logPath: String) {
        self.name = name
        self.executable = executable
        self.arguments = arguments
        self.environment = environment
        self.directory = directory
        self.logPath = logPath
    }

    /// Spawns the process and returns once it has ended (after ``stop(grace:)`` or by itself).
    func run() async {
        do {
            let out = try FileDescriptor.open(logPath, .writeOnly, options: [.append, .create], permissions: [.ownerReadWrite, .groupRead, .otherRead])
            let err = try FileDescriptor.open(logPath, .writeOnly, options: [.append, .create], permissions: [.ownerReadWrite, .groupRead, .otherRead])
            var options = PlatformOptions()
            options.createSession = true
            let result = try await Subprocess.run(
                .path(FilePath(executable)), arguments: Arguments(arguments),
                environment: .custom(Dictionary(uniqueKeysWithValues: environment.map { (Environment.Key(stringLiteral: $0.key), $0.value) })),
                workingDirectory: FilePath(directory), platformOptions: options,
                input: .none, output: .fileDescriptor(out, closeAfterSpawningProcess: true),
                error: .fileDescriptor(err, closeAfterSpawningProcess: true)
            ) { execution in
                spawned.fire(execution.processIdentifier.value)
                await watch(execution.processIdentifier, send: { try? execution.send(signal: $0) })
            }
            end.fire(Termination(result.terminationStatus))
        } catch {
            end.fire(.notStarted("\(error)"))
        }
        spawned.fire(-1)  // no-op when it was spawned; wakes a waiter when it was not
    }

    /// Until the process exits: on a stop request, SIGTERM, then SIGKILL after the grace period.
    private func watch(_ id: ProcessIdentifier, send: @escaping @Sendable (Subprocess.Signal) -> Void) async {
        await withTaskGroup(of: Void.self) { group in
            group.addTask { await Self.exit(of: id.processDescriptor) }
            group.addTask { [stopAsked, killed] in
                guard let grace = await stopAsked.wait() else { return }
                send(.terminate)
                try? await Task.sleep(for: grace)
                if Task.isCancelled { return }
                killed.fire(true)
                send(.kill)
            }
            await group.next()  // the exit: stop waiting for a stop
            group.cancelAll()
        }
    }

    /// Returns once the process behind `pidfd` has exited (it is reaped afterwards, by
    /// swift-subprocess). The wait is a blocking poll, so it runs on a thread of its own.
    private static func exit(of pidfd: Int32) async {
        await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
            Thread.detachNewThread {
                var fds = pollfd(fd: pidfd, events: Int16(POLLIN), revents: 0)
                while poll(&fds, 1, -1) < 0, errno == EINTR {}
                c.resume()
            }
        }
    }

    /// Its pid once spawned (`nil` if it could not be).
    func pid() async -> Int32? {
        let pid = await spawned.wait(cancellable: false) ?? -1
        return pid > 0 ? pid : nil
    }

    /// How it ended, once it has.
    var termination: Termination? { end.value }

    /// Returns how the process ended, once it has; `nil` if the calling task is cancelled first.
    func exited() async -> Termination? { await end.wait() }

    /// Asks it to stop (SIGTERM, SIGKILL after `grace`) and returns how it ended, and whether
    /// it had to be killed.
    func stop(grace: Duration) async -> (Termination, killed: Bool) {
        stopAsked.fire(grace)
        let termination = await end.wait(cancellable: false) ?? .notStarted("unknown")
        return (termination, killed.value ?? false)
    }

    /// The last lines of its log.
    func logTail() -> String { tailOfFile(logPath) }
}

/// The last `lines` lines of the file at `path` (empty if it cannot be read).
func tailOfFile(_ path: String, _ lines: Int = 20) -> String {
    guard let text = try? String(contentsOfFile: path, encoding: .utf8) else { return "" }
    return text.split(separator: "\n", omittingEmptySubsequences: false).suffix(lines).joined(separator: "\n")
}
