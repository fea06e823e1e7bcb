import Foundation
import Glibc
import UnixSignals
import Synchronization

/// The local stack's supervisor (`wechat-dev`, run by `ops/dev`): RabbitMQ and Redis (its
/// own, or reused), the fake WeChat API, tokend, two ingress replicas behind nginx and two
/// workers; a demo push; then it runs until it is told to stop.
///
/// Every way it can end stops everything it started, in reverse order, and nothing else:
/// - SIGINT (Ctrl-C; the children have process groups of their own, so only the supervisor
///   gets it), SIGTERM and SIGHUP (the terminal closed): exit status 128 + the signal.
/// - A dead output pipe (`ops/dev | tee log` with `tee` gone): SIGPIPE is ignored and
///   failed writes are dropped, so the stop runs to its end.
/// - A child that exits during start-up or later, or anything else failing: exit status 1.
/// A second signal during the stop is reported and otherwise ignored (the stop is bounded:
/// 20 s per child before SIGKILL).
public enum DevStack {
    /// Runs the stack; returns the process's exit status.
    public static func run(environment: [String: String], ownDirectory: String) async -> Int32 {
        signal(SIGPIPE, SIG_IGN)
        let settings: DevSettings
        do {
            settings = try DevSettings(environment: environment, ownDirectory: ownDirectory)
        } catch {
            Console.say("error: \(error)")
            return 2
        }
        // Trapped before anything starts, and until the stop has finished.
        let signals = await UnixSignalsSequence(trapping: .sigint, .sigterm, .sighup)
        let supervisor = Supervisor(settings: settings)
        let stopAsked = Latch<UnixSignal>()
        return await withTaskGroup(of: Int32?.self) { group in
            group.addTask {
                for await signal in signals {
                    let first = stopAsked.fire(signal)
                    Console.say(first ? "\(signal) received; stopping" : "\(signal) received again; still stopping")
                }
                return nil
            }
            group.addTask {
                let failure = await run(supervisor, until: stopAsked)
                await supervisor.shutdown()
                supervisor.host.finish()
                if let signal = stopAsked.value { return 128 + signal.rawValue }
                if let failure { Console.say("error: \(failure)") }
                return 1
            }
            // The children and shielded commands: tasks of this group, which outlives them all.
            group.addTask {
                await supervisor.host.run()
                return nil
            }
            var status: Int32 = 1
            while let next = await group.next() {
                guard let next else { continue }
                status = next
                group.cancelAll()  // the signal watcher
            }
            return status
        }
    }

    /// Runs the start-up and the watch until one fails (its message) or a stop is asked for (`nil`).
    private static func run(_ supervisor: Supervisor, until stopAsked: Latch<UnixSignal>) async -> String? {
        await withTaskGroup(of: String??.self) { group in
            group.addTask {
                do {
                    try await supervisor.startAndRun()
                    return .some(nil)
                } catch is CancellationError {
                    return .some(nil)
                } catch {
                    return .some("\(error)")
                }
            }
            group.addTask { await stopAsked.wait() == nil ? nil : .some(nil) }
            defer { group.cancelAll() }
            return (await group.next() ?? nil) ?? nil
        }
    }
}

/// A one-way event carrying the value it was first fired with, awaited by anyone (cancellably).
final class Latch<Value: Sendable>: Sendable {
    private let state = Mutex<(value: Value?, waiters: [Int: CheckedContinuation<Value?, Never>], next: Int)>((nil, [:], 0))

    /// Fires with `value` unless already fired; returns whether this call fired it.
    @discardableResult
    func fire(_ value: Value) -> Bool {
        let waiters = state.withLock { s -> [CheckedContinuation<Value?, Never>]? in
            guard s.value == nil else { return nil }
            s.value = value
            defer { s.waiters.removeAll() }
            return Array(s.waiters.values)
        }
        for w in waiters ?? [] { w.resume(returning: value) }
        return waiters != nil
    }

    /// The value it was fired with, if it was.
    var value: Value? { state.withLock { $0.value } }

    /// The value once fired; `nil` if the calling task is cancelled first (or `cancellable` is
    /// false: then it waits for the value whatever happens).
    func wait(cancellable: Bool = true) async -> Value? {
        let id = state.withLock { s -> Int in
            defer { s.next += 1 }
            return s.next
        }
        let register = { (c: CheckedContinuation<Value?, Never>) in
            let now = self.state.withLock { s -> Value?? in
                if let v = s.value { return .some(v) }
                if cancellable, Task.isCancelled { return .some(nil) }
                s.waiters[id] = c
                return .none
            }
            if let now { c.resume(returning: now) }
        }
        guard cancellable else { return await withCheckedContinuation(register) }
        return await withTaskCancellationHandler {
            await withCheckedContinuation(register)
        } onCancel: {
            state.withLock { $0.waiters.removeValue(forKey: id) }?.resume(returning: nil)
        }
    }
}
