import CRabbitMQ
import Foundation
import Logging

/// AMQP method ids (class << 16 | method), from the AMQP 0-9-1 spec.
enum Method {
    static let connectionClose: UInt32 = 0x000A_0032
    static let connectionCloseOk: UInt32 = 0x000A_0033
    static let connectionBlocked: UInt32 = 0x000A_003C
    static let connectionUnblocked: UInt32 = 0x000A_003D
    static let channelClose: UInt32 = 0x0014_0028
    static let channelCloseOk: UInt32 = 0x0014_0029
    static let basicCancel: UInt32 = 0x003C_001E
    static let basicReturn: UInt32 = 0x003C_0032
    static let basicDeliver: UInt32 = 0x003C_003C
    static let basicGetOk: UInt32 = 0x003C_0047
    static let basicAck: UInt32 = 0x003C_0050
    static let basicNack: UInt32 = 0x003C_0078
}

/// The librabbitmq status codes we branch on.
enum Status {
    static let ok = AMQP_STATUS_OK.rawValue
    static let timeout = AMQP_STATUS_TIMEOUT.rawValue

    static func describe(_ code: Int32) -> String {
        guard let s = amqp_error_string2(code) else { return "librabbitmq status \(code)" }
        return String(cString: s)
    }
}

/// A publish waiting for the broker's confirm.
struct PendingConfirm {
    var continuation: CheckedContinuation<Void, any Error>
    var deadline: ContinuousClock.Instant?
    /// Kept for mandatory publishes only, to match a `basic.return` to its message.
    var returnKey: ReturnKey?
    var returned: (code: UInt16, text: String)?
}

struct ReturnKey: Equatable {
    var exchange: String
    var routingKey: String
    var body: [UInt8]
}

/// A consumer registered on the connection; survives reconnections.
final class ConsumerRecord {
    let id: Int
    let queue: String
    let prefetch: UInt16
    let arguments: AMQPTable
    let continuation: AsyncThrowingStream<AMQPDelivery, any Error>.Continuation
    /// The channel in the current connection generation (0 while not subscribed).
    var channel: UInt16 = 0
    var tag: String = ""
    var cancelled = false

    init(
        id: Int, queue: String, prefetch: UInt16, arguments: AMQPTable,
        continuation: AsyncThrowingStream<AMQPDelivery, any Error>.Continuation
    ) {
        self.id = id
        self.queue = queue
        self.prefetch = prefetch
        self.arguments = arguments
        self.continuation = continuation
    }
}

/// The state of one AMQP connection, confined to the connection's own thread.
///
/// - Important: Every method runs on the thread started by ``AMQPConnection``;
///   librabbitmq's connection state is not thread-safe and never leaves it.
///   Work from other threads arrives as closures through ``Mailbox``.
final class ConnectionCore {
    static let controlChannel: UInt16 = 1
    static let publishChannel: UInt16 = 2

    let configuration: AMQPConfiguration
    let logger: Logger
    let mailbox: Mailbox
    /// The public handle; deliveries carry it so that they can be acknowledged.
    /// The thread (and so this core) lives until the connection is closed.
    let owner: AMQPConnection

    private var conn: amqp_connection_state_t?
    private(set) var generation: UInt64 = 0
    private var topology = AMQPTopology()
    private let arena = CArena()
    private var openChannels = Set<UInt16>()
    private var nextChannel: UInt16 = 3

    private var nextPublishTag: UInt64 = 1
    private var lowestUnsettled: UInt64 = 1
    private var pending: [UInt64: PendingConfirm] = [:]
    private var nextDeadlineSweep = ContinuousClock.now

    private var consumers: [Int: ConsumerRecord] = [:]
    private var consumersByChannel: [UInt16: ConsumerRecord] = [:]
    /// Each consumer's channel in this connection, kept after a cancel so that `close` can close it.
    private var channelOf: [Int: UInt16] = [:]

    private var reconnectDelay: Duration
    private var nextReconnect: ContinuousClock.Instant?
    private var closing = false
    private(set) var finished = false
    private var closeWaiters: [CheckedContinuation<Void, Never>] = []
    private var connectWaiters: [(id: Int?, continuation: CheckedContinuation<Void, any Error>)] = []
    /// Waiters whose task was cancelled before their wait reached this thread.
    private var cancelledWaiters = Set<Int>()
    private var lastConnectError: AMQPError?

    init(owner: AMQPConnection) {
        self.owner = owner
        self.configuration = owner.configuration
        self.logger = owner.logger
        self.mailbox = owner.mailbox
        self.reconnectDelay = configuration.minReconnectDelay
    }

    // MARK: - The thread's loop

    /// Runs until the connection is closed. Never returns early.
    func runLoop() {
        while !finished {
            for work in mailbox.takeAll() { work(self) }
            if finished { break }
            if conn != nil {
                processIncoming()
            } else if let due = nextReconnect, ContinuousClock.now >= due, !closing {
                attemptConnect()
            }
            sweepDeadlines()
            if closing, pending.isEmpty || conn == nil { finishClose() }
            if finished { break }
            mailbox.sleep(socket: conn.map { amqp_get_sockfd($0) } ?? -1, timeoutMs: pollTimeoutMs())
        }
    }

    private func pollTimeoutMs() -> Int32 {
        if let conn, amqp_frames_enqueued(conn) != 0 || amqp_data_in_buffer(conn) != 0 { return 0 }
        var ms: Int64 = 100
        if conn == nil, let due = nextReconnect {
            let left = ContinuousClock.now.duration(to: due)
            ms = min(ms, max(0, left.milliseconds))
        }
        if !pending.isEmpty { ms = min(ms, 10) }
        return Int32(ms)
    }

    // MARK: - Connecting

    /// Starts the first connection attempt now.
    func startConnecting(waiter: CheckedContinuation<Void, any Error>?) {
        if let waiter { connectWaiters.append((nil, waiter)) }
        nextReconnect = ContinuousClock.now
    }

    /// Adds a caller to be told when a connection is up (or fails for good).
    func waitConnected(_ waiter: CheckedContinuation<Void, any Error>, id: Int? = nil) {
        if let id, conn != nil || closing || finished { cancelledWaiters.remove(id) }
        if conn != nil { waiter.resume(); return }
        if closing || finished { waiter.resume(throwing: AMQPError(.closed, "the connection was closed")); return }
        if let id, cancelledWaiters.remove(id) != nil { waiter.resume(throwing: CancellationError()); return }
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

    private func attemptConnect() {
        do {
            try establish()
            reconnectDelay = configuration.minReconnectDelay
            nextReconnect = nil
            lastConnectError = nil
            let waiters = connectWaiters
            connectWaiters.removeAll()
            for w in waiters { w.continuation.resume() }
        } catch {
            let err = error as? AMQPError ?? AMQPError(.connectionFailed, "\(error)")
            if lastConnectError?.message != err.message {  // once per distinct failure, not per attempt
                logger.warning(
                    "AMQP connection attempt failed",
                    metadata: ["amqp.url": "\(configuration.redactedURL)", "error": "\(err)"])
            }
            lastConnectError = err
            if generation == 0, !connectWaiters.isEmpty, owner.failFirstConnect {
                // `AMQPConnection.connect` asked for a clear error instead of retrying forever.
                let waiters = connectWaiters
                connectWaiters.removeAll()
                for w in waiters { w.continuation.resume(throwing: err) }
                closing = true
                finishClose()
                return
            }
            let jitter = Double.random(in: 0.8...1.2)
            nextReconnect = ContinuousClock.now + reconnectDelay * jitter
            reconnectDelay = min(reconnectDelay * 2, configuration.maxReconnectDelay)
        }
    }

    private func establish() throws {
        guard let state = amqp_new_connection() else {
            throw AMQPError(.connectionFailed, "amqp_new_connection failed (out of memory)")
        }
        var ok = false
        defer { if !ok { amqp_destroy_connection(state) } }
        guard let socket = amqp_tcp_socket_new(state) else {
            throw AMQPError(.connectionFailed, "amqp_tcp_socket_new failed")
        }
        var tv = timeval(duration: configuration.connectTimeout)
        let where_ = "\(configuration.host):\(configuration.port)"
        let openStatus = configuration.host.withCString { host in
            amqp_socket_open_noblock(socket, host, Int32(configuration.port), &tv)
        }
        if openStatus != Status.ok {
            throw AMQPError(
                .connectionFailed, "cannot connect to \(where_): \(Status.describe(openStatus))", status: openStatus)
        }
        _ = amqp_set_rpc_timeout(state, &tv)

        arena.reset()
        defer { arena.reset() }
        var clientProperties: AMQPTable = [
            "capabilities": .table([
                "publisher_confirms": true, "consumer_cancel_notify": true, "basic.nack": true,
                "authentication_failure_close": true, "connection.blocked": true,
            ])
        ]
        if let name = configuration.connectionName { clientProperties["connection_name"] = .string(name) }
        var props = arena.table(clientProperties)
        let heartbeat = Int32(configuration.heartbeat.components.seconds)
        let reply = wr_amqp_login_plain(
            state, arena.cString(configuration.virtualHost), 0, configuration.frameMax, heartbeat, &props,
            arena.cString(configuration.user), arena.cString(configuration.password))
        if reply.reply_type != AMQP_RESPONSE_NORMAL {
            throw loginError(reply, where_: where_)
        }
        conn = state
        openChannels = []
        nextChannel = 3
        do {
            try openChannel(Self.controlChannel)
            try openChannel(Self.publishChannel)
            _ = amqp_confirm_select(state, Self.publishChannel)
            try check(amqp_get_rpc_reply(state), channel: Self.publishChannel, "confirm.select")
            nextPublishTag = 1
            lowestUnsettled = 1
            try declareNow(topology)
            generation += 1
            for record in consumers.values.sorted(by: { $0.id < $1.id }) where !record.cancelled {
                try subscribe(record)
            }
        } catch {
            conn = nil
            throw error
        }
        ok = true
        mailbox.setConnected(true, generation: generation)
        logger.info(
            "AMQP connected",
            metadata: ["amqp.url": "\(configuration.redactedURL)", "amqp.generation": "\(generation)"])
    }

    private func loginError(_ reply: amqp_rpc_reply_t, where_: String) -> AMQPError {
        switch reply.reply_type {
        case AMQP_RESPONSE_SERVER_EXCEPTION:
            if reply.reply.id == Method.connectionClose, let d = reply.reply.decoded {
                let close = d.assumingMemoryBound(to: amqp_connection_close_t.self).pointee
                let text = close.reply_text.string
                if close.reply_code == 403 {
                    return AMQPError(
                        .authenticationFailed,
                        "broker at \(where_) refused user '\(configuration.user)': \(text)", status: 403)
                }
                if close.reply_code == 530 {
                    return AMQPError(
                        .authenticationFailed,
                        "user '\(configuration.user)' may not use virtual host '\(configuration.virtualHost)': \(text)",
                        status: 530)
                }
                return AMQPError(.connectionFailed, "broker closed the connection: \(text)", status: Int32(close.reply_code))
            }
            return AMQPError(.connectionFailed, "broker refused the connection at \(where_)")
        case AMQP_RESPONSE_LIBRARY_EXCEPTION:
            let code = reply.library_error
            if code == AMQP_STATUS_CONNECTION_CLOSED.rawValue || code == AMQP_STATUS_SOCKET_CLOSED.rawValue {
                return AMQPError(
                    .authenticationFailed,
                    "broker at \(where_) closed the connection during login (bad credentials or virtual host?)",
                    status: code)
            }
            return AMQPError(.connectionFailed, "login to \(where_) failed: \(Status.describe(code))", status: code)
        default:
            return AMQPError(.connectionFailed, "login to \(where_) failed")
        }
    }

    // MARK: - Channels and RPC replies

    private func openChannel(_ channel: UInt16) throws {
        guard let conn else { throw notConnected() }
        _ = amqp_channel_open(conn, channel)
        try check(amqp_get_rpc_reply(conn), channel: channel, "channel.open")
        openChannels.insert(channel)
    }

    private func allocateChannel() -> UInt16 {
        while openChannels.contains(nextChannel) || nextChannel < 3 {
            nextChannel = nextChannel &+ 1
        }
        let c = nextChannel
        nextChannel = nextChannel &+ 1
        return c
    }

    /// Turns a synchronous reply into success or an error, keeping channel and
    /// connection state consistent (answering close-ok, marking the loss).
    private func check(_ reply: amqp_rpc_reply_t, channel: UInt16, _ what: String) throws {
        switch reply.reply_type {
        case AMQP_RESPONSE_NORMAL:
            return
        case AMQP_RESPONSE_SERVER_EXCEPTION:
            if reply.reply.id == Method.channelClose, let d = reply.reply.decoded {
                let close = d.assumingMemoryBound(to: amqp_channel_close_t.self).pointee
                let text = close.reply_text.string
                sendChannelCloseOk(channel)
                throw AMQPError(.channelClosed, "\(what): \(text)", status: Int32(close.reply_code))
            }
            if reply.reply.id == Method.connectionClose, let d = reply.reply.decoded {
                let close = d.assumingMemoryBound(to: amqp_connection_close_t.self).pointee
                let text = close.reply_text.string
                if let conn {
                    var ok = amqp_connection_close_ok_t()
                    _ = amqp_send_method(conn, 0, Method.connectionCloseOk, &ok)
                }
                let err = AMQPError(.connectionLost, "\(what): broker closed the connection: \(text)", status: Int32(close.reply_code))
                connectionLost(err)
                throw err
            }
            throw AMQPError(.protocolError, "\(what): unexpected server method \(reply.reply.id)")
        case AMQP_RESPONSE_LIBRARY_EXCEPTION:
            let err = AMQPError(
                .connectionLost, "\(what): \(Status.describe(reply.library_error))", status: reply.library_error)
            connectionLost(err)
            throw err
        default:
            let err = AMQPError(.connectionLost, "\(what): no reply")
            connectionLost(err)
            throw err
        }
    }

    private func sendChannelCloseOk(_ channel: UInt16) {
        openChannels.remove(channel)
        guard let conn else { return }
        var ok = amqp_channel_close_ok_t()
        _ = amqp_send_method(conn, channel, Method.channelCloseOk, &ok)
    }

    private func ensureOpen(_ channel: UInt16) throws {
        if !openChannels.contains(channel) { try openChannel(channel) }
    }

    private func notConnected() -> AMQPError {
        if closing || finished { return AMQPError(.closed, "the connection was closed") }
        let why = lastConnectError.map { ": \($0.message)" } ?? ""
        return AMQPError(.notConnected, "not connected to \(configuration.redactedURL)\(why)")
    }

    // MARK: - Topology

    /// Records declarations to be made on every (re)connection.
    func rememberTopology(_ t: AMQPTopology) { topology.merge(t) }

    func declare(_ t: AMQPTopology, _ done: CheckedContinuation<Void, any Error>) {
        do {
            guard conn != nil else { throw notConnected() }
            try declareNow(t)
            topology.merge(t)
            done.resume()
        } catch {
            done.resume(throwing: error)
        }
    }

    private func declareNow(_ t: AMQPTopology) throws {
        guard let conn else { throw notConnected() }
        let ch = Self.controlChannel
        for e in t.exchanges {
            try ensureOpen(ch)
            arena.reset()
            _ = amqp_exchange_declare(
                conn, ch, arena.bytes(e.name), arena.bytes(e.type), 0, e.durable ? 1 : 0, e.autoDelete ? 1 : 0,
                e.internal ? 1 : 0, arena.table(e.arguments))
            try check(amqp_get_rpc_reply(conn), channel: ch, "exchange.declare '\(e.name)'")
        }
        for q in t.queues {
            try ensureOpen(ch)
            arena.reset()
            _ = amqp_queue_declare(
                conn, ch, arena.bytes(q.name), 0, q.durable ? 1 : 0, q.exclusive ? 1 : 0, q.autoDelete ? 1 : 0,
                arena.table(q.arguments))
            try check(amqp_get_rpc_reply(conn), channel: ch, "queue.declare '\(q.name)'")
        }
        for b in t.bindings {
            try ensureOpen(ch)
            arena.reset()
            _ = amqp_queue_bind(
                conn, ch, arena.bytes(b.queue), arena.bytes(b.exchange), arena.bytes(b.routingKey),
                arena.table(b.arguments))
            try check(amqp_get_rpc_reply(conn), channel: ch, "queue.bind '\(b.queue)' to '\(b.exchange)'")
        }
        arena.reset()
    }

    func queueInfo(_ name: String, _ done: CheckedContinuation<AMQPQueueInfo, any Error>) {
        do {
            guard let conn else { throw notConnected() }
            try ensureOpen(Self.controlChannel)
            arena.reset()
            let ok = amqp_queue_declare(conn, Self.controlChannel, arena.bytes(name), 1, 0, 0, 0, amqp_empty_table)
            try check(amqp_get_rpc_reply(conn), channel: Self.controlChannel, "queue.declare(passive) '\(name)'")
            guard let ok else { throw AMQPError(.protocolError, "queue.declare-ok missing") }
            done.resume(
                returning: AMQPQueueInfo(
                    name: name, messageCount: Int(ok.pointee.message_count),
                    consumerCount: Int(ok.pointee.consumer_count)))
        } catch {
            done.resume(throwing: error)
        }
    }

    /// Purges (`deleteQueue == false`) or deletes a queue; returns the number of messages removed.
    func removeMessages(queue: String, deleteQueue: Bool, _ done: CheckedContinuation<Int, any Error>) {
        do {
            guard let conn else { throw notConnected() }
            try ensureOpen(Self.controlChannel)
            arena.reset()
            var count = 0
            if deleteQueue {
                let ok = amqp_queue_delete(conn, Self.controlChannel, arena.bytes(queue), 0, 0)
                try check(amqp_get_rpc_reply(conn), channel: Self.controlChannel, "queue.delete '\(queue)'")
                count = Int(ok?.pointee.message_count ?? 0)
                topology.queues.removeAll { $0.name == queue }
                topology.bindings.removeAll { $0.queue == queue }
            } else {
                let ok = amqp_queue_purge(conn, Self.controlChannel, arena.bytes(queue))
                try check(amqp_get_rpc_reply(conn), channel: Self.controlChannel, "queue.purge '\(queue)'")
                count = Int(ok?.pointee.message_count ?? 0)
            }
            done.resume(returning: count)
        } catch {
            done.resume(throwing: error)
        }
    }

    func deleteExchange(_ name: String, _ done: CheckedContinuation<Void, any Error>) {
        do {
            guard let conn else { throw notConnected() }
            try ensureOpen(Self.controlChannel)
            arena.reset()
            _ = amqp_exchange_delete(conn, Self.controlChannel, arena.bytes(name), 0)
            try check(amqp_get_rpc_reply(conn), channel: Self.controlChannel, "exchange.delete '\(name)'")
            topology.exchanges.removeAll { $0.name == name }
            topology.bindings.removeAll { $0.exchange == name }
            done.resume()
        } catch {
            done.resume(throwing: error)
        }
    }

    // MARK: - Publishing

    func publish(
        _ message: AMQPMessage, exchange: String, routingKey: String, mandatory: Bool,
        deadline: ContinuousClock.Instant?, _ done: CheckedContinuation<Void, any Error>
    ) {
        guard let conn, !closing else {
            done.resume(throwing: notConnected())
            return
        }
        if !openChannels.contains(Self.publishChannel) {
            do {
                try openChannel(Self.publishChannel)
                _ = amqp_confirm_select(conn, Self.publishChannel)
                try check(amqp_get_rpc_reply(conn), channel: Self.publishChannel, "confirm.select")
                nextPublishTag = 1
                lowestUnsettled = 1
            } catch {
                done.resume(throwing: error)
                return
            }
        }
        arena.reset()
        var props = arena.properties(message.properties)
        let status = message.body.withUnsafeBytes { raw in
            amqp_basic_publish(
                conn, Self.publishChannel, arena.bytes(exchange), arena.bytes(routingKey), mandatory ? 1 : 0, 0,
                &props, amqp_bytes_t(len: raw.count, bytes: UnsafeMutableRawPointer(mutating: raw.baseAddress)))
        }
        arena.reset()
        if status != Status.ok {
            let err = AMQPError(.connectionLost, "publish failed: \(Status.describe(status))", status: status)
            done.resume(throwing: err)
            connectionLost(err)
            return
        }
        let tag = nextPublishTag
        nextPublishTag += 1
        pending[tag] = PendingConfirm(
            continuation: done, deadline: deadline,
            returnKey: mandatory ? ReturnKey(exchange: exchange, routingKey: routingKey, body: message.body) : nil)
        mailbox.setInFlight(pending.count)
    }

    private func settle(upTo tag: UInt64, multiple: Bool, nacked: Bool) {
        let range = multiple ? lowestUnsettled...max(lowestUnsettled, tag) : tag...tag
        var settled: [PendingConfirm] = []
        for t in range {
            if let p = pending.removeValue(forKey: t) { settled.append(p) }
        }
        if multiple || tag == lowestUnsettled {
            while lowestUnsettled < nextPublishTag, pending[lowestUnsettled] == nil { lowestUnsettled += 1 }
        }
        // The gauge is updated before callers resume, so a caller never sees its own publish counted.
        mailbox.setInFlight(pending.count)
        for p in settled {
            if nacked {
                p.continuation.resume(throwing: AMQPError(.nacked, "the broker rejected the message (basic.nack)"))
            } else if let r = p.returned {
                p.continuation.resume(
                    throwing: AMQPError(.unroutable, "message was returned as unroutable: \(r.text)", status: Int32(r.code)))
            } else {
                p.continuation.resume()
            }
        }
    }

    private func failAllPending(_ error: AMQPError) {
        guard !pending.isEmpty else { return }
        let all = pending
        pending.removeAll()
        lowestUnsettled = nextPublishTag
        mailbox.setInFlight(0)
        for (_, p) in all { p.continuation.resume(throwing: error) }
    }

    private func sweepDeadlines() {
        guard !pending.isEmpty else { return }
        let now = ContinuousClock.now
        guard now >= nextDeadlineSweep else { return }
        nextDeadlineSweep = now + .milliseconds(5)
        var expired: [PendingConfirm] = []
        for (tag, p) in pending {
            if let d = p.deadline, d <= now, let p = pending.removeValue(forKey: tag) { expired.append(p) }
        }
        guard !expired.isEmpty else { return }
        while lowestUnsettled < nextPublishTag, pending[lowestUnsettled] == nil { lowestUnsettled += 1 }
        mailbox.setInFlight(pending.count)
        for p in expired {
            p.continuation.resume(throwing: AMQPError(.confirmTimeout, "no confirm from the broker in time"))
        }
    }

    // MARK: - Consuming

    func addConsumer(_ record: ConsumerRecord, _ done: CheckedContinuation<Void, any Error>) {
        do {
            guard conn != nil else { throw notConnected() }
            try subscribe(record)
            consumers[record.id] = record
            done.resume()
        } catch {
            done.resume(throwing: error)
        }
    }

    private func subscribe(_ record: ConsumerRecord) throws {
        guard let conn else { throw notConnected() }
        let ch = allocateChannel()
        try openChannel(ch)
        _ = amqp_basic_qos(conn, ch, 0, record.prefetch, 0)
        try check(amqp_get_rpc_reply(conn), channel: ch, "basic.qos")
        arena.reset()
        let ok = amqp_basic_consume(
            conn, ch, arena.bytes(record.queue), amqp_empty_bytes, 0, 0, 0, arena.table(record.arguments))
        try check(amqp_get_rpc_reply(conn), channel: ch, "basic.consume '\(record.queue)'")
        record.tag = ok?.pointee.consumer_tag.string ?? ""
        record.channel = ch
        consumersByChannel[ch] = record
        channelOf[record.id] = ch
        arena.reset()
    }

    /// Stops deliveries to a consumer (`basic.cancel`); its channel stays open so
    /// that deliveries already handed out can still be acknowledged.
    func cancelConsumer(id: Int, _ done: CheckedContinuation<Void, Never>?) {
        defer { done?.resume() }
        guard let record = consumers.removeValue(forKey: id), !record.cancelled else { return }
        record.cancelled = true
        if let conn, record.channel != 0, openChannels.contains(record.channel) {
            arena.reset()
            _ = amqp_basic_cancel(conn, record.channel, arena.bytes(record.tag))
            _ = try? check(amqp_get_rpc_reply(conn), channel: record.channel, "basic.cancel")
            arena.reset()
        }
        record.continuation.finish()
    }

    /// Cancels a consumer and closes its channel: the broker requeues every delivery
    /// not yet acknowledged, in order, for the next consumer.
    ///
    /// No `basic.cancel` first: the consumer must stay registered until the channel is
    /// gone, or a single-active-consumer queue would activate the next consumer while
    /// this one's unacknowledged deliveries are still out, and hand it later messages first.
    func closeConsumer(id: Int, _ done: CheckedContinuation<Void, Never>) {
        if let record = consumers.removeValue(forKey: id) {
            record.cancelled = true
            record.continuation.finish()
        }
        if let ch = channelOf.removeValue(forKey: id), let conn, openChannels.contains(ch) {
            openChannels.remove(ch)
            consumersByChannel.removeValue(forKey: ch)
            _ = amqp_channel_close(conn, ch, AMQP_REPLY_SUCCESS)
        }
        done.resume()
    }

    private func deliver(channel: UInt16, method: amqp_basic_deliver_t) {
        guard let conn else { return }
        var message = amqp_message_t()
        let reply = amqp_read_message(conn, channel, &message, 0)
        guard reply.reply_type == AMQP_RESPONSE_NORMAL else {
            _ = try? check(reply, channel: channel, "reading a delivery")
            return
        }
        defer { amqp_destroy_message(&message) }
        guard let record = consumersByChannel[channel], !record.cancelled else {
            // A delivery racing a cancel: give it back at once (on a closed channel the broker already has it back).
            if openChannels.contains(channel) { _ = amqp_basic_reject(conn, channel, method.delivery_tag, 1) }
            return
        }
        let delivery = AMQPDelivery(
            message: AMQPMessage(body: message.body.array, properties: CDecode.properties(message.properties)),
            exchange: method.exchange.string, routingKey: method.routing_key.string,
            redelivered: method.redelivered != 0, deliveryTag: method.delivery_tag,
            channel: channel, generation: generation, connection: owner)
        record.continuation.yield(delivery)
    }

    func get(queue: String, _ done: CheckedContinuation<AMQPDelivery?, any Error>) {
        do {
            guard let conn else { throw notConnected() }
            let ch = Self.controlChannel
            try ensureOpen(ch)
            arena.reset()
            let reply = amqp_basic_get(conn, ch, arena.bytes(queue), 0)
            try check(reply, channel: ch, "basic.get '\(queue)'")
            guard reply.reply.id == Method.basicGetOk, let d = reply.reply.decoded else {
                done.resume(returning: nil)
                return
            }
            let ok = d.assumingMemoryBound(to: amqp_basic_get_ok_t.self).pointee
            var message = amqp_message_t()
            let read = amqp_read_message(conn, ch, &message, 0)
            try check(read, channel: ch, "reading basic.get content")
            defer { amqp_destroy_message(&message) }
            done.resume(
                returning: AMQPDelivery(
                    message: AMQPMessage(body: message.body.array, properties: CDecode.properties(message.properties)),
                    exchange: ok.exchange.string, routingKey: ok.routing_key.string, redelivered: ok.redelivered != 0,
                    deliveryTag: ok.delivery_tag, channel: ch, generation: generation, connection: owner))
        } catch {
            done.resume(throwing: error)
        }
    }

    enum Settlement { case ack, nack(requeue: Bool), reject(requeue: Bool) }

    /// Sends an ack, nack or reject. The caller already checked the generation;
    /// if the connection broke since, the broker redelivers the message anyway.
    func settle(_ d: AMQPDelivery, _ how: Settlement) {
        guard let conn, d.generation == generation, openChannels.contains(d.channel) else {
            logger.debug("AMQP dropping a settlement for a stale delivery", metadata: ["amqp.delivery_tag": "\(d.deliveryTag)"])
            return
        }
        let status: Int32
        switch how {
        case .ack: status = amqp_basic_ack(conn, d.channel, d.deliveryTag, 0)
        case .nack(let requeue): status = amqp_basic_nack(conn, d.channel, d.deliveryTag, 0, requeue ? 1 : 0)
        case .reject(let requeue): status = amqp_basic_reject(conn, d.channel, d.deliveryTag, requeue ? 1 : 0)
        }
        if status != Status.ok {
            connectionLost(AMQPError(.connectionLost, "ack failed: \(Status.describe(status))", status: status))
        }
    }

    // MARK: - Incoming frames

    private func processIncoming() {
        var budget = 4096
        while budget > 0, let conn {
            budget -= 1
            var frame = amqp_frame_t()
            var tv = timeval(tv_sec: 0, tv_usec: 0)
            let status = amqp_simple_wait_frame_noblock(conn, &frame, &tv)
            if status == Status.timeout { break }
            if status != Status.ok {
                connectionLost(
                    AMQPError(.connectionLost, "connection lost: \(Status.describe(status))", status: status))
                return
            }
            handle(frame)
        }
        if let conn { amqp_maybe_release_buffers(conn) }
    }

    private func handle(_ frame: amqp_frame_t) {
        guard frame.frame_type == UInt8(AMQP_FRAME_METHOD) else { return }
        let channel = frame.channel
        let id = frame.payload.method.id
        guard let decoded = frame.payload.method.decoded else { return }
        switch id {
        case Method.basicAck:
            let m = decoded.assumingMemoryBound(to: amqp_basic_ack_t.self).pointee
            if channel == Self.publishChannel { settle(upTo: m.delivery_tag, multiple: m.multiple != 0, nacked: false) }
        case Method.basicNack:
            let m = decoded.assumingMemoryBound(to: amqp_basic_nack_t.self).pointee
            if channel == Self.publishChannel { settle(upTo: m.delivery_tag, multiple: m.multiple != 0, nacked: true) }
        case Method.basicDeliver:
            deliver(channel: channel, method: decoded.assumingMemoryBound(to: amqp_basic_deliver_t.self).pointee)
        case Method.basicReturn:
            handleReturn(channel: channel, decoded.assumingMemoryBound(to: amqp_basic_return_t.self).pointee)
        case Method.basicCancel:
            // The broker cancelled a consumer (its queue was deleted, or a failover).
            if let record = consumersByChannel[channel], !record.cancelled {
                logger.warning("AMQP consumer cancelled by the broker", metadata: ["amqp.queue": "\(record.queue)"])
                record.cancelled = true
                consumers.removeValue(forKey: record.id)
                record.continuation.finish(
                    throwing: AMQPError(.channelClosed, "the broker cancelled the consumer of '\(record.queue)'"))
            }
        case Method.channelClose:
            let m = decoded.assumingMemoryBound(to: amqp_channel_close_t.self).pointee
            channelClosedByBroker(channel, code: m.reply_code, text: m.reply_text.string)
        case Method.connectionClose:
            let m = decoded.assumingMemoryBound(to: amqp_connection_close_t.self).pointee
            if let conn {
                var ok = amqp_connection_close_ok_t()
                _ = amqp_send_method(conn, 0, Method.connectionCloseOk, &ok)
            }
            connectionLost(
                AMQPError(
                    .connectionLost, "broker closed the connection: \(m.reply_text.string)", status: Int32(m.reply_code)))
        case Method.connectionBlocked:
            logger.warning("AMQP connection blocked by the broker (resource alarm)")
        case Method.connectionUnblocked:
            logger.info("AMQP connection unblocked")
        default:
            logger.debug("AMQP ignoring method", metadata: ["amqp.method": "\(id)", "amqp.channel": "\(channel)"])
        }
    }

    private func handleReturn(channel: UInt16, _ m: amqp_basic_return_t) {
        guard let conn else { return }
        var message = amqp_message_t()
        let reply = amqp_read_message(conn, channel, &message, 0)
        guard reply.reply_type == AMQP_RESPONSE_NORMAL else {
            _ = try? check(reply, channel: channel, "reading a returned message")
            return
        }
        defer { amqp_destroy_message(&message) }
        let key = ReturnKey(exchange: m.exchange.string, routingKey: m.routing_key.string, body: message.body.array)
        // Publishes on a channel are routed in order, so the returned message is
        // the oldest unconfirmed one with the same exchange, key and body.
        var tag = lowestUnsettled
        while tag < nextPublishTag {
            if var p = pending[tag], p.returned == nil, p.returnKey == key {
                p.returned = (m.reply_code, m.reply_text.string)
                pending[tag] = p
                return
            }
            tag += 1
        }
        logger.warning("AMQP returned message matched no pending publish", metadata: ["amqp.routing_key": "\(key.routingKey)"])
    }

    private func channelClosedByBroker(_ channel: UInt16, code: UInt16, text: String) {
        sendChannelCloseOk(channel)
        logger.warning(
            "AMQP channel closed by the broker",
            metadata: ["amqp.channel": "\(channel)", "amqp.reply_code": "\(code)", "amqp.reply_text": "\(text)"])
        let err = AMQPError(.channelClosed, "channel closed by the broker: \(text)", status: Int32(code))
        if channel == Self.publishChannel {
            failAllPending(err)
            nextPublishTag = 1
            lowestUnsettled = 1
        } else if let record = consumersByChannel.removeValue(forKey: channel), !record.cancelled {
            // Unacknowledged deliveries were requeued by the broker; subscribe again once.
            do {
                try subscribe(record)
            } catch {
                record.cancelled = true
                consumers.removeValue(forKey: record.id)
                record.continuation.finish(throwing: error)
            }
        }
    }

    private func connectionLost(_ error: AMQPError) {
        guard let state = conn else { return }
        conn = nil
        mailbox.setConnected(false, generation: 0)
        logger.error(
            "AMQP connection lost", metadata: ["amqp.url": "\(configuration.redactedURL)", "error": "\(error.message)"])
        amqp_destroy_connection(state)
        openChannels = []
        consumersByChannel = [:]
        channelOf = [:]
        for record in consumers.values { record.channel = 0 }
        failAllPending(error)
        lastConnectError = error
        if !closing {
            nextReconnect = ContinuousClock.now + reconnectDelay
        }
    }

    // MARK: - Closing

    func close(_ done: CheckedContinuation<Void, Never>) {
        if finished { done.resume(); return }
        closeWaiters.append(done)
        guard !closing else { return }
        closing = true
        nextReconnect = nil
        for id in Array(consumers.keys) { cancelConsumer(id: id, nil) }
        let waiters = connectWaiters
        connectWaiters.removeAll()
        for w in waiters { w.continuation.resume(throwing: AMQPError(.closed, "the connection was closed")) }
        // The loop finishes once every pending confirm has settled or timed out.
        let drain = ContinuousClock.now + configuration.connectTimeout
        for (tag, p) in pending {
            if let d = p.deadline, d <= drain { continue }
            pending[tag]?.deadline = drain
        }
    }

    private func finishClose() {
        if let state = conn {
            conn = nil
            _ = amqp_connection_close(state, AMQP_REPLY_SUCCESS)
            amqp_destroy_connection(state)
        }
        mailbox.setConnected(false, generation: 0)
        failAllPending(AMQPError(.closed, "the connection was closed"))
        for record in consumers.values { record.continuation.finish() }
        consumers.removeAll()
        finished = true
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
