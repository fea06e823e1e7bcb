import Foundation
import Logging

/// The connection thread's state: the run loop, and the glue between the pure parts
/// (``ConnectionStateMachine``, ``ConfirmTracker``, ``ConsumerTable``) and the one
/// object that talks to librabbitmq (``Wire``).
///
/// - Important: Every method runs on the thread started by ``AMQPConnection``; work from
///   other threads arrives as closures through ``Mailbox``. A `Wire` is dropped in exactly
///   one place (``connectionLost(_:)``, or ``finishClose()``), and frees its C state itself.
final class ConnectionCore {
    typealias Reply<T> = CheckedContinuation<T, any Error>
    typealias Sink = AsyncThrowingStream<AMQPDelivery, any Error>.Continuation

    static let controlChannel: UInt16 = 1
    static let publishChannel: UInt16 = 2

    let configuration: AMQPConfiguration
    let logger: Logger
    let mailbox: Mailbox
    /// The public handle; deliveries carry it so that they can be settled.
    let owner: AMQPConnection

    var machine: ConnectionStateMachine
    var wire: Wire?
    var topology = AMQPTopology()
    var confirms = ConfirmTracker<Reply<Void>>()
    var outbox = Outbox()
    var consumers = ConsumerTable<Sink>()
    /// Exchanges known to exist (declared by us, or checked): a publish to any other is
    /// checked first, so that a missing exchange fails that publish alone instead of
    /// closing the shared publish channel under every publish in flight.
    var knownExchanges: Set<String> = [""]
    var nextChannel: UInt16 = 3
    var nextDeadlineSweep = ContinuousClock.now

    private var closeWaiters: [CheckedContinuation<Void, Never>] = []
    private var connectWaiters: [(id: Int?, continuation: Reply<Void>)] = []
    /// Waiters whose task was cancelled before their wait reached this thread.
    private var cancelledWaiters = Set<Int>()
    private var lastConnectError: AMQPError?
    /// The most telling failure of the current round over the addresses (a refused login
    /// says more than another address's refused connection).
    private var roundError: AMQPError?
    /// When the first connection attempt began: ``AMQPConnection/connect(configuration:topology:patience:logger:)``
    /// tries set-ups the broker dropped again until its patience from then runs out.
    private var firstAttempt: ContinuousClock.Instant?
    /// In the current round: a failure that may pass by itself (``AMQPError/mayPassByItself``),
    /// and one that needs a change (a refused login, a conflicting declaration). `connect` tries a
    /// round again only with the first and without the second, whatever the addresses' order.
    private var roundMayPass: AMQPError?
    private var roundNeedsChange = false

    init(owner: AMQPConnection) {
        self.owner = owner
        self.configuration = owner.configuration
        self.logger = owner.logger
        self.mailbox = owner.mailbox
        self.machine = ConnectionStateMachine(
            addressCount: configuration.addresses.count, minDelay: configuration.minReconnectDelay,
            maxDelay: configuration.maxReconnectDelay)
    }

    var generation: UInt64 { machine.generation }

    // MARK: - The thread's loop

    /// Runs until the connection is closed.
    func runLoop() {
        while machine.state != .closed {
            for work in mailbox.takeAll() { work(self) }
            let now = ContinuousClock.now
            if wire != nil {
                readIncoming()
                flushOutbox()
            } else if let address = machine.due(now: now) {
                attemptConnect(address: address)
            }
            sweepDeadlines(now: now)
            if case .closing = machine.state, wire == nil || (confirms.isEmpty && outbox.isEmpty) { finishClose() }
            if machine.state == .closed { break }
            mailbox.sleep(socket: wire?.socket ?? -1, timeoutMs: pollTimeoutMs(now: now))
        }
    }

    private func pollTimeoutMs(now: ContinuousClock.Instant) -> Int32 {
        if wire?.hasBufferedInput == true { return 0 }
        var ms: Int64 = 100
        if let left = machine.untilDue(now: now) { ms = min(ms, left.milliseconds) }
        if !outbox.isEmpty { ms = min(ms, 2) }  // waiting for room in the socket's send buffer
        if !confirms.isEmpty { ms = min(ms, 10) }
        return Int32(max(0, ms))
    }

    /// Reads what the broker sent, up to a budget per turn so that the mailbox is served too.
    private func readIncoming() {
        var budget = 4096
        while budget > 0, let wire {
            budget -= 1
            do {
                guard let incoming = try wire.poll() else { return }
                handle(incoming, on: wire)
            } catch {
                connectionLost(error)
                return
            }
        }
    }

    // MARK: - Connecting

    /// Starts the first connection attempt now.
    func startConnecting(waiter: Reply<Void>?) {
        if let waiter { connectWaiters.append((nil, waiter)) }
        machine.start(now: .now)
    }

    /// Adds a caller to be told when a connection is up (or fails for good).
    func waitConnected(_ waiter: Reply<Void>, id: Int? = nil) {
        if let id, wire != nil || machine.isClosingOrClosed { cancelledWaiters.remove(id) }
        if wire != nil { return waiter.resume() }
        if machine.isClosingOrClosed { return waiter.resume(throwing: AMQPError(.closed, "the connection was closed")) }
        if let id, cancelledWaiters.remove(id) != nil { return waiter.resume(throwing: CancellationError()) }
        connectWaiters.append((id, waiter))
    }

    /// The task waiting as `id` was cancelled: it stops waiting (with `CancellationError`).
    func cancelConnectWaiter(_ id: Int) {
        guard let i = connectWaiters.firstIndex(where: { $0.id == id }) else {
            cancelledWaiters.insert(id)
            return
        }
        connectWaiters.remove(at: i).continuation.resume(throwing: CancellationError())
    }

    private func attemptConnect(address: Int) {
        let (host, port) = configuration.addresses[address]
        if firstAttempt == nil { firstAttempt = .now }
        do {
            let w = try Wire(host: host, port: port, configuration: configuration)
            do {
                // Lent out while the blocking set-up runs, so that a close can cut it short.
                guard mailbox.beginSetUp(socket: w.socket) else { throw AMQPError(.closed, "the connection was closed") }
                try w.login(configuration)
                try setUp(w)
                mailbox.endSetUp()
            } catch {
                mailbox.endSetUp()
                w.destroy()  // only after the socket is taken back
                throw error
            }
            wire = w
            let generation = machine.connected()
            mailbox.setConnected(true, generation: generation)
            lastConnectError = nil
            roundError = nil
            (roundMayPass, roundNeedsChange) = (nil, false)
            logger.info(
                "AMQP connected",
                metadata: ["amqp.url": "\(configuration.redactedURL(address: address))", "amqp.generation": "\(generation)"])
            let waiters = connectWaiters
            connectWaiters.removeAll()
            for w in waiters { w.continuation.resume() }
        } catch {
            // The half-set-up wire is gone with this scope (it frees its own C state);
            // consumers subscribed on it wait for the next one.
            consumers.connectionLost()
            let err = error as? AMQPError ?? AMQPError(.connectionFailed, "\(error)")
            if mailbox.isCloseRequested {
                logger.debug("AMQP connection set-up ended by a close", metadata: ["error": "\(err)"])
            } else if lastConnectError?.message != err.message {  // once per distinct failure, not per attempt
                logger.warning(
                    "AMQP connection attempt failed",
                    metadata: ["amqp.url": "\(configuration.redactedURL(address: address))", "error": "\(err)"])
            }
            lastConnectError = err
            if roundError == nil || (err.code == .authenticationFailed && roundError?.code != .authenticationFailed) {
                roundError = err
            }
            if err.mayPassByItself { roundMayPass = err }
            if err.code == .authenticationFailed || err.code == .channelClosed { roundNeedsChange = true }
            let roundFailed = machine.connectFailed(now: .now)
            let mayPass = roundMayPass != nil && !roundNeedsChange
            // Given up after retrying: the failure that kept it retrying says most.
            let reported = (mayPass ? roundMayPass : nil) ?? roundError ?? err
            if roundFailed { (roundError, roundMayPass, roundNeedsChange) = (nil, nil, false) }
            if roundFailed, machine.generation == 0, !connectWaiters.isEmpty, let patience = owner.firstConnectPatience,
                !(mayPass && ContinuousClock.now - (firstAttempt ?? .now) < patience)
            {
                // `AMQPConnection.connect` asked for a clear error instead of retrying forever
                // (after every address was tried once; a set-up the broker dropped is tried
                // again within its patience).
                let waiters = connectWaiters
                connectWaiters.removeAll()
                for w in waiters { w.continuation.resume(throwing: reported) }
                _ = machine.close()
                finishClose()
            }
        }
    }

    /// Opens the fixed channels, declares the topology and re-subscribes the consumers on a
    /// new wire, before it becomes the connection.
    private func setUp(_ w: Wire) throws {
        try w.openChannel(Self.controlChannel)
        try w.openChannel(Self.publishChannel)
        try w.confirmSelect(Self.publishChannel)
        try declare(topology, on: w)
        consumers.connectionLost()
        nextChannel = 3
        for c in consumers.unsubscribed {
            do {
                try subscribe(c.id, c.spec, on: w)
            } catch let e as AMQPError where e.code == .channelClosed {
                // The queue is gone (or refuses us): this consumer ends, the connection goes on.
                _ = consumers.close(id: c.id)
                c.sink.finish(throwing: e)
            }
        }
    }

    /// The one place a live wire is dropped: everything that depended on it fails or waits.
    func connectionLost(_ error: any Error) {
        guard let w = wire else { return }
        wire = nil
        w.destroy()
        let err = error as? AMQPError ?? AMQPError(.connectionLost, "\(error)")
        machine.lost(now: .now)
        mailbox.setConnected(false, generation: 0)
        mailbox.setBlocked(false)
        logger.error("AMQP connection lost", metadata: ["amqp.url": "\(configuration.redactedURL)", "error": "\(err.message)"])
        consumers.connectionLost()
        resume(confirms.failAll(), throwing: err)
        // Not written: they definitely did not reach the broker.
        resume(outbox.removeAll().map(\.reply), throwing: AMQPError(.notConnected, "connection lost before the publish was sent: \(err.message)"))
        lastConnectError = err
    }

    func notConnected() -> AMQPError {
        if machine.isClosingOrClosed { return AMQPError(.closed, "the connection was closed") }
        let why = lastConnectError.map { ": \($0.message)" } ?? ""
        return AMQPError(.notConnected, "not connected to \(configuration.redactedURL)\(why)")
    }

    /// Runs `body` on the live wire; if it kills the wire, the connection is lost here.
    func onWire<T>(_ body: (Wire) throws -> T) throws -> T {
        guard let wire else { throw notConnected() }
        do {
            return try body(wire)
        } catch {
            if wire.isDead { connectionLost(error) }
            throw error
        }
    }

    func resume(_ waiters: [Reply<Void>], throwing error: AMQPError) {
        mailbox.setInFlight(confirms.count + outbox.count)
        for w in waiters { w.resume(throwing: error) }
    }

    // MARK: - Closing

    func close(_ done: CheckedContinuation<Void, Never>) {
        if machine.state == .closed { return done.resume() }
        closeWaiters.append(done)
        guard machine.close() else { return }
        // Cancelled, not closed: deliveries in hand can still be settled while the close drains.
        for id in consumers.ids { cancelConsumer(id: id, nil) }
        let waiters = connectWaiters
        connectWaiters.removeAll()
        for w in waiters { w.continuation.resume(throwing: AMQPError(.closed, "the connection was closed")) }
        // The loop finishes once every publish has settled or timed out.
        let drain = ContinuousClock.now + configuration.connectTimeout
        confirms.capDeadlines(at: drain)
        outbox.capDeadlines(at: drain)
    }

    func finishClose() {
        if let w = wire {
            wire = nil
            w.closeGracefully(timeout: configuration.connectTimeout)
        }
        mailbox.setConnected(false, generation: 0)
        let closed = AMQPError(.closed, "the connection was closed")
        resume(confirms.failAll() + outbox.removeAll().map(\.reply), throwing: closed)
        for c in consumers.removeAll() { c.sink.finish() }
        machine.finished()
        mailbox.markFinished()
        for w in mailbox.takeAll() { w(self) }  // answer whatever raced the close
        let waiters = closeWaiters
        closeWaiters.removeAll()
        for w in waiters { w.resume() }
        logger.debug("AMQP connection closed", metadata: ["amqp.url": "\(configuration.redactedURL)"])
    }
}

extension timeval {
    init(duration: Duration) {
        let (s, attos) = duration.components
        self.init(tv_sec: Int(s), tv_usec: Int(attos / 1_000_000_000_000))
    }
}

extension Duration {
    var milliseconds: Int64 {
        let (s, attos) = components
        return s * 1000 + attos / 1_000_000_000_000_000
    }
}
