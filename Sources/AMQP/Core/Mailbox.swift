import Glibc
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
        /// Set by ``requestClose()``; a set-up that begins after it is refused.
        var closeRequested = false
        /// A duplicate of the socket of a connection being set up (login, channels,
        /// declarations), while its blocking calls run; -1 otherwise.
        var settingUp: Int32 = -1
    }

    private let state = Mutex(State())
    private let wakeRead: Int32
    private let wakeWrite: Int32
    private let connected = Atomic<Bool>(false)
    private let blocked = Atomic<Bool>(false)
    /// Publishes handed over and not yet answered (bounds the hand-off).
    let publishes = Atomic<Int>(0)
    private let inFlight = Atomic<Int>(0)
    /// The generation of the live connection, 0 while disconnected.
    private let liveGeneration = Atomic<UInt64>(0)

    init() throws {
        var fds: [Int32] = [-1, -1]
        guard pipe(&fds) == 0 else {
            throw AMQPError(.connectionFailed, "cannot create the wake-up pipe (errno \(errno))")
        }
        for fd in fds {
            _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK)
            _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
        }
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
        if wake {
            var b: UInt8 = 1
            _ = write(wakeWrite, &b, 1)  // EAGAIN: a wake-up is already pending
        }
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
        // On the stack: this runs once per turn of the connection's loop.
        let wake = withUnsafeTemporaryAllocation(of: pollfd.self, capacity: 2) { fds -> Bool in
            fds[0] = pollfd(fd: wakeRead, events: Int16(POLLIN), revents: 0)
            fds[1] = pollfd(fd: socket, events: Int16(POLLIN), revents: 0)
            let r = poll(fds.baseAddress, socket >= 0 ? 2 : 1, timeoutMs)
            return r > 0 && fds[0].revents != 0
        }
        state.withLock { $0.sleeping = false }
        if wake {
            withUnsafeTemporaryAllocation(byteCount: 64, alignment: 1) { buf in
                while read(wakeRead, buf.baseAddress, buf.count) > 0 {}
            }
        }
    }

    // MARK: - Interrupting a set-up

    // A set-up is a series of blocking calls, each bounded by the RPC timeout (30 s by
    // default): a close would wait behind all of them before the thread could read it. The
    // thread lends out a duplicate of the socket's descriptor (`dup(2)`) while it sets up, so
    // that a close can `shutdown(2)` the socket: the blocked call returns with an error at
    // once, and the thread then reads the close. A duplicate, because librabbitmq closes its
    // own descriptor by itself on an RPC timeout: the duplicate keeps the number from being
    // reused by anything else until the thread closes it (under the lock) when it takes the
    // socket back. Only the kernel socket is touched from the other thread, never
    // librabbitmq's state.

    /// Lends out the socket of a connection about to be set up; `false` if a close was
    /// already asked for (then the set-up is not to begin).
    func beginSetUp(socket: Int32) -> Bool {
        state.withLock { s in
            guard !s.closeRequested else { return false }
            s.settingUp = socket >= 0 ? dup(socket) : -1
            return true
        }
    }

    /// Takes the socket back (before the connection uses it as its own or closes it).
    func endSetUp() {
        state.withLock { s in
            if s.settingUp >= 0 { _ = Glibc.close(s.settingUp) }
            s.settingUp = -1
        }
    }

    /// A close was asked for: a set-up in progress is cut short.
    func requestClose() {
        state.withLock { s in
            s.closeRequested = true
            if s.settingUp >= 0 { _ = shutdown(s.settingUp, Int32(SHUT_RDWR)) }
        }
    }

    /// Whether ``requestClose()`` was called (a failed set-up is then no news).
    var isCloseRequested: Bool { state.withLock { $0.closeRequested } }

    func markFinished() { state.withLock { $0.finished = true } }

    func setConnected(_ value: Bool, generation: UInt64) {
        liveGeneration.store(value ? generation : 0, ordering: .releasing)
        connected.store(value, ordering: .releasing)
    }
    var generation: UInt64 { liveGeneration.load(ordering: .acquiring) }
    var isConnected: Bool { connected.load(ordering: .acquiring) }

    func setBlocked(_ value: Bool) { blocked.store(value, ordering: .releasing) }
    var isBlocked: Bool { blocked.load(ordering: .acquiring) }

    func setInFlight(_ value: Int) { inFlight.store(value, ordering: .relaxed) }
    var confirmsInFlight: Int { inFlight.load(ordering: .relaxed) }
}
