import Foundation
import Logging
import ServiceLifecycle
import Synchronization

/// An AMQP 0-9-1 connection to RabbitMQ over librabbitmq, with an async API.
///
/// One connection carries a control channel (declarations), a publishing
/// channel in confirm mode shared by all publishers, and one channel per
/// consumer. It reconnects by itself with exponential backoff, declares its
/// topology again and resumes its consumers; publishes in flight when the
/// connection breaks fail with ``AMQPError/Code/connectionLost`` (written, fate
/// unknown) or ``AMQPError/Code/notConnected`` (not yet written) so callers
/// can answer quickly, and new publishes work again once it is back. While the
/// broker blocks publishing (a memory or disk alarm), publishes fail at once with
/// ``AMQPError/Code/flowControl`` and ``isReady`` is false.
///
/// Inside, a pure state machine (``ConnectionStateMachine``) and two trackers
/// (``ConfirmTracker``, ``ConsumerTable``) decide; the connection's thread
/// (``ConnectionCore``) carries their decisions out through ``Wire``, the one
/// object that calls librabbitmq.
///
/// ```swift
/// let amqp = try await AMQPConnection.connect(
///     configuration: try AMQPConfiguration(url: "amqp://guest:guest@127.0.0.1:5672/%2F"),
///     topology: topology, logger: logger)
/// try await amqp.publish(AMQPMessage("<xml/>"), exchange: "wechat.inbound", routingKey: "text")
/// ```
///
/// - Important: Each connection owns one thread on which every librabbitmq call
///   runs; no C call happens on Swift's cooperative pool or a NIO event loop.
///   Call ``close()`` (or run the connection as a `Service`) when done: the
///   thread, and so the connection, lives until then.
public final class AMQPConnection: Sendable {
    public let configuration: AMQPConfiguration
    let logger: Logger
    let mailbox: Mailbox
    /// For ``connect(configuration:topology:patience:logger:)``: report the first failure instead of
    /// retrying, except a set-up the broker dropped, tried again for this long (nil: retry everything).
    let firstConnectPatience: Duration?

    /// Creates a connection that connects in the background and retries until it succeeds.
    ///
    /// Use ``waitUntilConnected()`` to wait for the first connection, and ``isConnected``
    /// for readiness checks. Declarations in `topology` are made on every (re)connection.
    public convenience init(configuration: AMQPConfiguration, topology: AMQPTopology = AMQPTopology(), logger: Logger)
        throws
    {
        try self.init(configuration: configuration, topology: topology, logger: logger, firstConnectPatience: nil)
        start(waiter: nil)
    }

    private init(configuration: AMQPConfiguration, topology: AMQPTopology, logger: Logger, firstConnectPatience: Duration?)
        throws
    {
        self.configuration = configuration
        self.logger = logger
        self.mailbox = try Mailbox()
        self.firstConnectPatience = firstConnectPatience
        try topology.validate()
        if !topology.isEmpty {
            // Recorded before the first connection so that it is part of every (re)declaration.
            _ = mailbox.submit { core in core.rememberTopology(topology) }
        }
    }

    /// Connects, declares `topology`, and returns the connection; fails with a clear
    /// error (bad credentials, refused connection, conflicting declaration) instead of retrying.
    /// After this first success the connection reconnects by itself.
    ///
    /// - Parameter patience: a set-up the broker accepted and then dropped for a reason of its
    ///   own (a quorum queue whose cluster did not form in time: `541 INTERNAL_ERROR`; a node
    ///   stopping: `320 CONNECTION_FORCED`; a broken socket) is tried again, with the usual
    ///   backoff, until this long after the first attempt; then its error is reported.
    public static func connect(
        configuration: AMQPConfiguration, topology: AMQPTopology = AMQPTopology(), patience: Duration = .seconds(60),
        logger: Logger
    ) async throws -> AMQPConnection {
        let connection = try AMQPConnection(
            configuration: configuration, topology: topology, logger: logger, firstConnectPatience: patience)
        try await withCheckedThrowingContinuation { (c: CheckedContinuation<Void, any Error>) in
            connection.start(waiter: c)
        }
        return connection
    }

    private func start(waiter: CheckedContinuation<Void, any Error>?) {
        _ = mailbox.submit { core in core.startConnecting(waiter: waiter) }
        let thread = Thread { [self] in
            let core = ConnectionCore(owner: self)
            core.runLoop()
        }
        thread.name = "amqp-\(configuration.connectionName ?? configuration.host)"
        thread.start()
    }

    /// Whether the connection is up right now.
    public var isConnected: Bool { mailbox.isConnected }

    /// Which connection is live: it grows with every (re)connection (0 while none is).
    public var generation: UInt64 { mailbox.generation }

    /// Whether the broker blocks publishing on this connection right now (`connection.blocked`:
    /// a memory or disk alarm).
    public var isBlocked: Bool { mailbox.isBlocked }

    /// Whether a publish can go through now (for readiness probes): connected and not blocked.
    public var isReady: Bool { mailbox.isConnected && !mailbox.isBlocked }

    /// Publishes awaiting the broker's confirm right now (for metrics).
    public var confirmsInFlight: Int { mailbox.confirmsInFlight }

    /// Waits until the connection is up.
    /// - Throws: ``AMQPError/Code/closed`` if the connection is closed first.
    ///
    /// Cancelling the waiting task ends the wait with `CancellationError` (so a service
    /// can shut down while the broker is unreachable).
    public func waitUntilConnected() async throws {
        if mailbox.isConnected { return }
        let id = ConsumerIDs.next()
        try await withTaskCancellationHandler {
            try await run { core, c in core.waitConnected(c, id: id) }
        } onCancel: { [mailbox] in
            _ = mailbox.submit { core in core.cancelConnectWaiter(id) }
        }
    }

    /// Declares exchanges, queues and bindings now, and again after every reconnection.
    ///
    /// If the broker drops the connection in the middle of it for a reason of its own (a quorum
    /// queue whose cluster did not form in time: `541 INTERNAL_ERROR`; a node stopping; a broken
    /// socket or an RPC timeout), this waits for the reconnection and declares again, until
    /// `patience` runs out; then it throws that error. Only a declaration that succeeded is
    /// remembered (one that keeps failing must not keep every reconnection failing). A
    /// conflicting declaration fails at once, and so does a first call made while the connection
    /// is down (``AMQPError/Code/notConnected``) or what AMQP cannot carry
    /// (``AMQPError/Code/invalidMessage``). Cancelling the task ends a wait for the reconnection.
    /// The last try may start just before the patience runs out, so the whole can take up to
    /// one `rpcTimeout` longer.
    public func declare(_ topology: AMQPTopology, patience: Duration = .seconds(60)) async throws {
        try topology.validate()
        let deadline = ContinuousClock.now + patience
        var pause = Duration.milliseconds(500)  // between tries, doubling: a broker that drops us at once is not hammered
        var again = false
        while true {
            do {
                return try await run { core, c in core.declare(topology, c) }
            } catch let e as AMQPError where e.mayPassByItself || (again && e.code == .notConnected) {
                again = true  // lost again between the reconnection and this try: wait again
                guard ContinuousClock.now + pause < deadline else { throw e }
                try await Task.sleep(for: pause)
                pause = min(pause * 2, .seconds(8))
                guard try await waitUntilConnected(before: deadline) else { throw e }
                logger.info("declaring again after the broker dropped the connection", metadata: ["error": "\(e.message)"])
            }
        }
    }

    /// Waits until the connection is up (true) or `deadline` passes (false).
    private func waitUntilConnected(before deadline: ContinuousClock.Instant) async throws -> Bool {
        try await withThrowingTaskGroup(of: Bool.self) { group in
            group.addTask {
                try await self.waitUntilConnected()
                return true
            }
            group.addTask {
                try await Task.sleep(until: deadline)
                return false
            }
            defer { group.cancelAll() }
            return try await group.next() ?? false
        }
    }

    /// Declares on the current connection only, never again after a reconnection: for an
    /// exclusive queue, which lives and dies with one connection. (Declared again under the same
    /// name, it could be refused with `RESOURCE_LOCKED` while the broker has not yet noticed that
    /// the old connection is gone — and a refused declaration fails the whole reconnection.)
    /// A consumer of such a queue ends after a reconnection (its queue is gone).
    public func declareForThisConnection(_ topology: AMQPTopology) async throws {
        try topology.validate()
        try await run { core, c in core.declare(topology, remember: false, c) }
    }

    /// Publishes a message on the shared confirm-mode channel and waits for the broker's confirm.
    ///
    /// Many publishes may be in flight at once; each caller waits only for its own confirm.
    /// - Parameters:
    ///   - mandatory: when `true` (the default), a message that no queue receives fails
    ///     with ``AMQPError/Code/unroutable`` instead of vanishing.
    ///   - confirmTimeout: fail with ``AMQPError/Code/confirmTimeout`` if no confirm arrives in time.
    /// - Throws: ``AMQPError``: `notConnected` at once while the connection is down;
    ///   `flowControl` at once while the broker blocks publishing or
    ///   ``AMQPConfiguration/maxPendingPublishes`` are waiting; `invalidMessage` and
    ///   `exchangeNotFound` for this message alone; `connectionLost`, `nacked`,
    ///   `unroutable`, `channelClosed`, `confirmTimeout`.
    public func publish(
        _ message: AMQPMessage, exchange: String, routingKey: String, mandatory: Bool = true,
        confirmTimeout: Duration? = nil
    ) async throws {
        try message.validate(exchange: exchange, routingKey: routingKey)
        guard message.body.count <= configuration.maxMessageSize else {
            throw AMQPError(
                .invalidMessage, "the body is \(message.body.count) bytes; the limit is \(configuration.maxMessageSize)")
        }
        // The properties travel in one frame: larger ones would fail half-written and take the connection down.
        let propertiesSize = message.properties.estimatedSize
        guard propertiesSize <= Int(configuration.frameMax) - 1024 else {
            throw AMQPError(
                .invalidMessage, "the properties and headers take about \(propertiesSize) bytes; one frame holds \(configuration.frameMax)")
        }
        let wireSize = message.body.count + exchange.utf8.count + routingKey.utf8.count + propertiesSize
        guard mailbox.isConnected else {
            throw AMQPError(.notConnected, "not connected to \(configuration.redactedURL)")
        }
        if mailbox.isBlocked {
            throw AMQPError(.flowControl, "the broker blocked publishing (a memory or disk alarm); nothing was sent")
        }
        let waiting = mailbox.publishes.wrappingAdd(1, ordering: .relaxed).newValue
        defer { mailbox.publishes.wrappingSubtract(1, ordering: .relaxed) }
        guard waiting <= configuration.maxPendingPublishes else {
            throw AMQPError(
                .flowControl, "\(configuration.maxPendingPublishes) publishes are waiting for the broker already; nothing was sent")
        }
        let deadline = confirmTimeout.map { ContinuousClock.now + $0 }
        try await run { core, c in
            core.publish(
                message, exchange: exchange, routingKey: routingKey, mandatory: mandatory, deadline: deadline,
                wireSize: wireSize, c)
        }
    }

    /// Starts consuming from `queue` with manual acknowledgement.
    ///
    /// - Parameter prefetch: at most this many unacknowledged deliveries are outstanding (basic.qos).
    /// - Returns: a sequence of deliveries. It survives reconnections (the consumer is
    ///   re-subscribed; deliveries from before the break can no longer be acknowledged and
    ///   will be redelivered). It ends after ``AMQPConsumer/cancel()`` or ``close()``.
    public func consume(queue: String, prefetch: UInt16 = 100, arguments: AMQPTable = [:]) async throws
        -> AMQPConsumer
    {
        let id = ConsumerIDs.next()
        let (stream, continuation) = AsyncThrowingStream<AMQPDelivery, any Error>.makeStream()
        let spec = ConsumerSpec(queue: queue, prefetch: prefetch, arguments: arguments)
        continuation.onTermination = { [mailbox] _ in
            _ = mailbox.submit { core in core.cancelConsumer(id: id, nil) }
        }
        try await run { core, c in core.addConsumer(id: id, spec: spec, sink: continuation, c) }
        return AMQPConsumer(stream: stream, id: id, connection: self)
    }

    /// Fetches one message with `basic.get` (manual ack), or `nil` when the queue is empty.
    public func get(queue: String) async throws -> AMQPDelivery? {
        try await run { core, c in core.get(queue: queue, c) }
    }

    /// The counters of an existing queue (passive declaration).
    public func queueInfo(_ queue: String) async throws -> AMQPQueueInfo {
        try await run { core, c in core.queueInfo(queue, c) }
    }

    /// Removes all ready messages from a queue; returns how many.
    @discardableResult
    public func purge(queue: String) async throws -> Int {
        try await run { core, c in core.removeMessages(queue: queue, deleteQueue: false, c) }
    }

    /// Deletes a queue (and forgets it for re-declaration); returns how many messages it held.
    @discardableResult
    public func deleteQueue(_ queue: String) async throws -> Int {
        try await run { core, c in core.removeMessages(queue: queue, deleteQueue: true, c) }
    }

    /// Deletes an exchange (and forgets it for re-declaration).
    public func deleteExchange(_ exchange: String) async throws {
        try await run { core, c in core.deleteExchange(exchange, c) }
    }

    /// Closes the connection: cancels consumers, waits (up to the connect timeout) for
    /// confirms in flight, then closes the socket and ends the connection's thread. A
    /// connection still logging in or declaring its topology is cut short at once.
    public func close() async {
        await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
            if !mailbox.submit({ core in core.close(c) }) { c.resume() }
            mailbox.requestClose()  // after the submit: the thread, woken, finds the close waiting
        }
    }

    /// Queues an ack/nack/reject for the connection thread without waiting for it:
    /// settlements need no reply from the broker, and waiting would cost a thread
    /// hand-off per message. The mailbox is FIFO, so a later ``close()`` sends them first.
    func settle(_ delivery: AMQPDelivery, _ how: Wire.Settlement) throws {
        guard delivery.generation == mailbox.generation else {
            throw AMQPError(
                .staleDelivery,
                "delivery \(delivery.deliveryTag) came on a connection that has since broken; the broker will redeliver it")
        }
        guard mailbox.submit({ core in core.settle(delivery, how) }) else {
            throw AMQPError(.closed, "the connection was closed")
        }
    }

    func closeConsumer(id: Int) async {
        await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
            if !mailbox.submit({ core in core.closeConsumer(id: id, c) }) { c.resume() }
        }
    }

    func cancelConsumer(id: Int) async {
        await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
            if !mailbox.submit({ core in core.cancelConsumer(id: id, c) }) { c.resume() }
        }
    }

    /// Runs `body` on the connection thread and awaits the continuation it resumes.
    private func run<T: Sendable>(
        _ body: @escaping @Sendable (ConnectionCore, CheckedContinuation<T, any Error>) -> Void
    ) async throws -> T {
        try await withCheckedThrowingContinuation { (c: CheckedContinuation<T, any Error>) in
            if !mailbox.submit({ core in body(core, c) }) {
                c.resume(throwing: AMQPError(.closed, "the connection was closed"))
            }
        }
    }
}

extension AMQPConnection: Service {
    /// Keeps the connection until graceful shutdown (or cancellation), then closes it.
    ///
    /// Add it to a `ServiceGroup` before the services that publish or consume, so it stops after them.
    public func run() async throws {
        try? await gracefulShutdown()
        await close()
    }
}

private enum ConsumerIDs {
    private static let counter = Atomic<Int>(0)
    static func next() -> Int { counter.wrappingAdd(1, ordering: .relaxed).newValue }
}
