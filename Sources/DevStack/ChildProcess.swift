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
package final class ChildProcess: Sendable {
    package let name: String
    package let logPath: String
    private let executable: String
    private let arguments: [String]
    private let environment: [String: String]
    private let directory: String
    private let spawned = Latch<Int32>()
    private let end = Latch<Termination>()
    /// Signals asked for, delivered by the task that watches the process (while it is not reaped).
    private let signals: (stream: AsyncStream<Int32>, continuation: AsyncStream<Int32>.Continuation)

    package init(name: String, executable: String, arguments: [String], environment: [String: String], directory: String, logPath: String) {
        self.name = name
        self.executable = executable
        self.arguments = arguments
        self.environment = environment
        self.directory = directory
        self.logPath = logPath
        signals = AsyncStream.makeStream(of: Int32.self)
    }

    /// Spawns the process and returns once it has ended (after ``stop(grace:)`` or by itself).
    package func run() async {
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
        signals.continuation.finish()
    }

    /// Until the process exits: delivers the signals asked for with ``signal(_:)``.
    private func watch(_ id: ProcessIdentifier, send: @escaping @Sendable (Subprocess.Signal) -> Void) async {
        await withTaskGroup(of: Void.self) { group in
            group.addTask { await Self.exit(of: id.processDescriptor) }
            group.addTask { [signals] in
                for await signal in signals.stream { send(Subprocess.Signal(rawValue: signal)) }
            }
            await group.next()  // the exit (the signal stream ends only after it)
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
    package func pid() async -> Int32? {
        let pid = await spawned.wait(cancellable: false) ?? -1
        return pid > 0 ? pid : nil
    }

    /// How it ended, once it has.
    package var termination: Termination? { end.value }

    /// Returns how the process ended, once it has; `nil` if the calling task is cancelled first.
    package func exited() async -> Termination? { await end.wait() }

    /// How it ended, if it does within `bound`.
    package func exited(within bound: Duration) async -> Termination? {
        await withTaskGroup(of: Termination?.self) { group in
            group.addTask { await self.exited() }
            group.addTask {
                try? await Task.sleep(for: bound)
                return nil
            }
            defer { group.cancelAll() }
            return await group.next() ?? nil
        }
    }

    /// Sends `signal` (SIGSTOP, SIGCONT, SIGKILL, …) while the process runs; nothing once it ended.
    package func signal(_ signal: Int32) { signals.continuation.yield(signal) }

    /// SIGTERM, then SIGKILL if it has not ended within `grace`; returns how it ended, and
    /// whether it had to be killed.
    package func stop(grace: Duration) async -> (Termination, killed: Bool) {
        signal(SIGCONT)  // a stopped process cannot act on SIGTERM
        signal(SIGTERM)
        if let t = await exited(within: grace) { return (t, false) }
        signal(SIGKILL)
        return (await end.wait(cancellable: false) ?? .notStarted("unknown"), true)
    }

    /// The last lines of its log.
    package func logTail() -> String { tailOfFile(logPath) }
}

/// The last `lines` lines of the file at `path` (empty if it cannot be read).
func tailOfFile(_ path: String, _ lines: Int = 20) -> String {
    guard let text = try? String(contentsOfFile: path, encoding: .utf8) else { return "" }
    return text.split(separator: "\n", omittingEmptySubsequences: false).suffix(lines).joined(separator: "\n")
}

/// Runs the children (and other work that must not be cut short by a stop) as tasks of one
/// task group, ``run()``, owned by whoever outlives them all: the children are started and
/// stopped by others, but never outlive it.
package final class ProcessHost: Sendable {
    private let jobs: AsyncStream<@Sendable () async -> Void>
    private let input: AsyncStream<@Sendable () async -> Void>.Continuation

    package init() { (jobs, input) = AsyncStream.makeStream() }

    /// Runs the jobs until ``finish()``; returns once every job has ended.
    package func run() async {
        await withDiscardingTaskGroup { group in
            for await job in jobs { group.addTask { await job() } }
        }
    }

    /// No more jobs.
    package func finish() { input.finish() }

    /// Starts `child` as a job; returns its pid once spawned (`nil` if it could not start).
    package func start(_ child: ChildProcess) async -> Int32? {
        input.yield { await child.run() }
        return await child.pid()
    }

    /// Runs `operation` as a job (never cancelled by the caller's cancellation) and waits for
    /// its result even if the calling task is cancelled meanwhile.
    package func shielded<T: Sendable>(_ operation: @escaping @Sendable () async throws -> T) async throws -> T {
        let result = Latch<Result<T, any Error>>()
        input.yield {
            do {
                result.fire(.success(try await operation()))
            } catch {
                result.fire(.failure(error))
            }
        }
        guard let outcome = await result.wait(cancellable: false) else { throw CancellationError() }
        return try outcome.get()
    }
}
