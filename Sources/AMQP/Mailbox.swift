import CRabbitMQ
import Synchronization

/// The hand-off between callers on any thread and a connection's own thread.
///
/// Callers append closures; the connection thread takes them all at once
/// between polls of its socket. A wake-up pipe interrupts the poll, but only
/// when the thread is actually asleep, so a burst of publishes costs one
/// wake-up, not one per message.
final class Mailbox: Sendable {
    typealias Work = @Sendable (ConnectionCore) -> Void

    private struct State: Sendable {
        var queue: [Work] = []
        var sleeping = false
        var finished = false
    }

    private let state = Mutex(State())
    private let wakeRead: Int32
    private let wakeWrite: Int32
    private let connected = Atomic<Bool>(false)
    private let inFlight = Atomic<Int>(0)
    /// The generation of the live connection, 0 while disconnected.
    private let liveGeneration = Atomic<UInt64>(0)

    init() throws {
        var fds: [Int32] = [-1, -1]
        let r = wr_wake_pipe(&fds)
        guard r == 0 else { throw AMQPError(.connectionFailed, "cannot create the wake-up pipe (errno \(-r))") }
        wakeRead = fds[0]
        wakeWrite = fds[1]
    }

    deinit {
        close(wakeRead)
        close(wakeWrite)
    }

    /// Queues work for the connection thread; `false` once the connection has finished.
    func submit(_ work: @escaping Work) -> Bool {
        let (accepted, wake) = state.withLock { s -> (Bool, Bool) in
            guard !s.finished else { return (false, false) }
            s.queue.append(work)
            let wake = s.sleeping
            s.sleeping = false
            return (true, wake)
        }
        if wake { wr_wake(wakeWrite) }
        return accepted
    }

    func takeAll() -> [Work] {
        state.withLock { s in
            let q = s.queue
            s.queue.removeAll(keepingCapacity: true)
            return q
        }
    }

    /// Blocks the connection thread until the socket is readable, work arrives, or the timeout passes.
    func sleep(socket: Int32, timeoutMs: Int32) {
        let mayBlock = state.withLock { s -> Bool in
            if !s.queue.isEmpty { return false }
            s.sleeping = true
            return true
        }
        guard mayBlock else { return }
        let r = wr_poll2(socket, wakeRead, timeoutMs)
        state.withLock { $0.sleeping = false }
        if r > 0, r & 2 != 0 { wr_drain(wakeRead) }
    }

    func markFinished() { state.withLock { $0.finished = true } }

    func setConnected(_ value: Bool, generation: UInt64) {
        liveGeneration.store(value ? generation : 0, ordering: .releasing)
        connected.store(value, ordering: .releasing)
    }
    var generation: UInt64 { liveGeneration.load(ordering: .acquiring) }
    var isConnected: Bool { connected.load(ordering: .acquiring) }

    func setInFlight(_ value: Int) { inFlight.store(value, ordering: .relaxed) }
    var confirmsInFlight: Int { inFlight.load(ordering: .relaxed) }
}
