import Logging
import ServiceLifecycle
import Synchronization

/// Redis for a whole process: commands from any number of concurrent callers go over a few
/// shared, automatically pipelined ``RedisConnection``s; a caller that needs a connection to
/// itself (a blocking command, `WATCH`/`MULTI`) borrows one with ``withConnection(_:)``.
///
/// Shared connections connect on first use and again after they broke, so commands work
/// again by themselves after Redis comes back. Borrowed connections are made on demand up to
/// `size`; when all are busy, borrowers wait in line (exhaustion waits rather than fails).
///
/// Run the pool as a `Service` (or call ``close()``) to close its connections.
public final class RedisPool: Sendable, RedisCommands {
    public let configuration: RedisConfiguration
    public let size: Int
    private let logger: Logger

    private struct Waiter {
        let id: Int
        /// Resumed with a connection, or with `nil`: a slot to make a new connection in.
        let continuation: CheckedContinuation<RedisConnection?, any Error>
    }

    private struct State {
        var idle: [RedisConnection] = []
        var total = 0
        var waiters: [Waiter] = []
        var nextWaiter = 0
        var closed = false
    }

    private let state = Mutex(State())
    /// The connections ``send(_:)`` and ``pipeline(_:)`` share, taken in turn.
    private let shared: [RedisConnection]
    private let nextShared = Atomic<Int>(0)

    /// - Parameters:
    ///   - size: the most borrowed (``withConnection(_:)``) connections open at once.
    ///   - shared: how many pipelined connections carry ``send(_:)`` and ``pipeline(_:)``
    ///     (Redis runs commands one at a time: two keep one round trip on the wire while
    ///     the other's replies are read).
    public init(configuration: RedisConfiguration, size: Int = 16, shared: Int = 2, logger: Logger) {
        precondition(size > 0 && shared > 0, "a Redis pool needs at least one connection")
        self.configuration = configuration
        self.size = size
        self.logger = logger
        self.shared = (0..<shared).map { _ in RedisConnection(configuration: configuration) }
    }

    /// A pool dropped without ``close()`` still ends its connections' threads.
    deinit { close() }

    /// Borrows a connection for the duration of `body`.
    ///
    /// - Important: Do not keep the connection past the closure. The connection reconnects
    ///   by itself if it broke (or Redis closed it while idle), so connection state such as
    ///   `WATCH` does not survive a failure between two commands: check `EXEC`'s answer.
    public func withConnection<T: Sendable>(_ body: (RedisConnection) async throws -> T) async throws -> T {
        let connection = try await lease()
        do {
            let result = try await body(connection)
            giveBack(connection)
            return result
        } catch {
            giveBack(connection)
            throw error
        }
    }

    public func send(_ arguments: [RedisArgument]) async throws -> RedisReply {
        try await sharedConnection().send(arguments)
    }

    public func pipeline(_ commands: [[RedisArgument]]) async throws -> [RedisReply] {
        try await sharedConnection().pipeline(commands)
    }

    /// As ``RedisCommands/eval(_:keys:arguments:replicas:timeout:)``, on a borrowed connection:
    /// `WAIT` blocks the connection it runs on, which must not hold up the shared ones' other
    /// callers. Fewer replicas than asked, under Sentinel, also makes that connection ask the
    /// sentinels again before its next command (a primary the sentinels have given up on no
    /// longer gets its replicas' acknowledgements).
    public func eval(
        _ script: RedisScript, keys: [String] = [], arguments: [RedisArgument] = [], replicas: Int, timeout: Duration
    ) async throws -> (reply: RedisReply, acknowledged: Int) {
        try await withConnection { connection in
            let result = try await connection.eval(script, keys: keys, arguments: arguments, replicas: replicas, timeout: timeout)
            if result.acknowledged < replicas, case .sentinel = configuration.endpoint { connection.reconnectBeforeNextUse() }
            return result
        }
    }

    private func sharedConnection() throws -> RedisConnection {
        if state.withLock({ $0.closed }) { throw RedisError(.closed, "the Redis pool is closed") }
        let i = nextShared.wrappingAdd(1, ordering: .relaxed).oldValue
        return shared[Int(UInt(bitPattern: i) % UInt(shared.count))]
    }

    /// Connections open right now (shared ones connected, and borrowed ones).
    public var openConnections: Int { state.withLock { $0.total } + shared.filter(\.isConnected).count }

    /// Callers waiting for a connection right now (for metrics).
    public var waitingCallers: Int { state.withLock { $0.waiters.count } }

    private func lease() async throws -> RedisConnection {
        enum Next { case use(RedisConnection), create, wait }
        while true {
            let next: Next = try state.withLock { s in
                if s.closed { throw RedisError(.closed, "the Redis pool is closed") }
                if let c = s.idle.popLast() { return .use(c) }
                if s.total < size {
                    s.total += 1
                    return .create
                }
                return .wait
            }
            switch next {
            case .use(let c):
                if c.isBroken {
                    discard(c)
                    continue
                }
                return c
            case .create:
                return try await create()
            case .wait:
                if let c = try await waitInLine() {
                    if c.isBroken {
                        discard(c)
                        continue
                    }
                    return c
                }
                return try await create()  // we were handed a free slot
            }
        }
    }

    /// Makes a connection in a slot already counted in `total`.
    private func create() async throws -> RedisConnection {
        do {
            return try await RedisConnection.connect(configuration)
        } catch {
            releaseSlot()
            throw error
        }
    }

    private func waitInLine() async throws -> RedisConnection? {
        let id = state.withLock { s in
            s.nextWaiter += 1
            return s.nextWaiter
        }
        return try await withTaskCancellationHandler {
            try await withCheckedThrowingContinuation { (c: CheckedContinuation<RedisConnection?, any Error>) in
                let alreadyCancelled = state.withLock { s -> Bool in
                    if Task.isCancelled { return true }
                    if s.closed {
                        c.resume(throwing: RedisError(.closed, "the Redis pool is closed"))
                        return false
                    }
                    s.waiters.append(Waiter(id: id, continuation: c))
                    return false
                }
                if alreadyCancelled { c.resume(throwing: CancellationError()) }
            }
        } onCancel: {
            let w = state.withLock { s -> Waiter? in
                guard let i = s.waiters.firstIndex(where: { $0.id == id }) else { return nil }
                return s.waiters.remove(at: i)
            }
            w?.continuation.resume(throwing: CancellationError())
        }
    }

    private func giveBack(_ connection: RedisConnection) {
        if connection.isBroken {
            discard(connection)
            return
        }
        let handOff = state.withLock { s -> Waiter? in
            if s.closed { return nil }
            if !s.waiters.isEmpty { return s.waiters.removeFirst() }
            s.idle.append(connection)
            return nil
        }
        if let handOff {
            handOff.continuation.resume(returning: connection)
        } else if state.withLock({ $0.closed }) {
            connection.close()
        }
    }

    private func discard(_ connection: RedisConnection) {
        connection.close()
        releaseSlot()
    }

    /// Frees a slot; the first waiter, if any, gets it to make a new connection.
    private func releaseSlot() {
        let waiter = state.withLock { s -> Waiter? in
            if !s.waiters.isEmpty, !s.closed { return s.waiters.removeFirst() }  // slot passes on; total unchanged
            s.total -= 1
            return nil
        }
        waiter?.continuation.resume(returning: nil)
    }

    /// Closes idle connections (borrowed ones close when given back) and fails waiting callers.
    public func close() {
        let (idle, waiters) = state.withLock { s in
            s.closed = true
            let r = (s.idle, s.waiters)
            s.total -= s.idle.count
            s.idle = []
            s.waiters = []
            return r
        }
        for c in idle + shared { c.close() }
        for w in waiters { w.continuation.resume(throwing: RedisError(.closed, "the Redis pool is closed")) }
    }
}

extension RedisPool: Service {
    /// Keeps the pool open until graceful shutdown, then closes it.
    public func run() async throws {
        try? await gracefulShutdown()
        close()
    }
}
