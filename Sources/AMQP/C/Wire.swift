import CRabbitMQ
import Foundation

/// One librabbitmq connection: with ``CArena`` and ``CDecode``, the only code that calls
/// librabbitmq.
///
/// It owns the C connection state from creation to ``destroy()`` — which is idempotent, and
/// also runs from `deinit` — so the state is freed exactly once whatever fails where. A
/// connection-level failure marks the wire ``isDead``; the owner then drops it. Channel-level
/// failures answer the broker's `channel.close` here and leave the connection usable.
///
/// - Important: Confined to the connection's thread, like the C state it wraps.
final class Wire {
    private var state: amqp_connection_state_t?
    private let arena = CArena()
    /// Channels open on this connection.
    private(set) var openChannels = Set<UInt16>()
    /// How many times each channel was opened: a delivery tag is only meaningful on the
    /// opening of its channel that delivered it.
    private var epochs: [UInt16: UInt64] = [:]

    /// The current opening of `channel` (0 if never opened).
    func epoch(of channel: UInt16) -> UInt64 { epochs[channel] ?? 0 }
    /// Set once the connection failed; every later call fails with it.
    private(set) var deathError: AMQPError?
    var isDead: Bool { deathError != nil || state == nil }

    /// Where the TCP connection goes (for errors).
    private let place: String

    /// Opens a TCP connection to `host:port` (bounded by the connect timeout); throws a clear
    /// error with nothing left allocated. ``login(_:)`` comes next.
    init(host: String, port: Int, configuration c: AMQPConfiguration) throws {
        place = host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)"
        guard let state = amqp_new_connection() else {
            throw AMQPError(.connectionFailed, "amqp_new_connection failed (out of memory)")
        }
        self.state = state
        guard let socket = amqp_tcp_socket_new(state) else {
            destroy()
            throw AMQPError(.connectionFailed, "amqp_tcp_socket_new failed")
        }
        var tv = timeval(duration: c.connectTimeout)
        let opened = host.withCString { amqp_socket_open_noblock(socket, $0, Int32(port), &tv) }
        if opened != Status.ok {
            destroy()
            throw AMQPError(.connectionFailed, "cannot connect to \(place): \(Status.describe(opened))", status: opened)
        }
    }

    /// Logs in (bounded by the RPC timeout); throws a clear error (bad credentials or virtual
    /// host, or why the connection failed). On failure the caller destroys the wire: it may
    /// have lent the socket out (``Mailbox/beginSetUp(socket:)``) and must take it back first.
    func login(_ c: AMQPConfiguration) throws {
        guard let state else { throw AMQPError(.connectionFailed, "login to \(place): the connection is gone") }
        var rpc = timeval(duration: c.rpcTimeout)
        _ = amqp_set_rpc_timeout(state, &rpc)
        _ = amqp_set_handshake_timeout(state, &rpc)  // the login too (librabbitmq's default is 12 s)
        defer { arena.reset() }
        var capabilities: AMQPTable = [
            "capabilities": .table([
                "publisher_confirms": true, "consumer_cancel_notify": true, "basic.nack": true,
                "authentication_failure_close": true, "connection.blocked": true,
            ])
        ]
        if let name = c.connectionName { capabilities["connection_name"] = .string(name) }
        var props = arena.table(capabilities)
        let reply = wr_amqp_login_plain(
            state, arena.cString(c.virtualHost), 0, c.frameMax, Int32(c.heartbeat.components.seconds), &props,
            arena.cString(c.user), arena.cString(c.password))
        if reply.reply_type != AMQP_RESPONSE_NORMAL {
            throw Self.loginError(reply, place: place, configuration: c)
        }
    }

    deinit { destroy() }

    /// Frees the C state (closing the socket). Safe to call any number of times.
    func destroy() {
        guard let s = state else { return }
        state = nil
        openChannels.removeAll()
        amqp_destroy_connection(s)
    }

    /// Says `connection.close` (waiting at most `timeout` for the broker's answer, so that a
    /// hung broker cannot stretch a shutdown), then frees everything.
    func closeGracefully(timeout: Duration) {
        if let s = state, deathError == nil {
            var tv = timeval(duration: timeout)
            _ = amqp_set_rpc_timeout(s, &tv)
            _ = amqp_connection_close(s, AMQP_REPLY_SUCCESS)
        }
        destroy()
    }

    /// The socket to poll for input (-1 once destroyed).
    var socket: Int32 { state.map { amqp_get_sockfd($0) } ?? -1 }

    /// Whether frames are already buffered (then polling the socket would wait needlessly).
    var hasBufferedInput: Bool {
        guard let s = state else { return false }
        return amqp_frames_enqueued(s) != 0 || amqp_data_in_buffer(s) != 0
    }

    /// Bytes that may still be written before asking the kernel again (saves two system
    /// calls per publish while the buffer is far from full).
    private var writeCredit = 0

    /// Whether `bytes` more can be written without the write blocking, counting them as
    /// written: the kernel's send buffer (of which about half carries data) has room. With
    /// nothing unsent any size may go (the broker reads what it can); while the broker reads
    /// nothing (flow control) the buffer fills and this says no, instead of a write that blocks.
    func canWrite(_ bytes: Int) -> Bool {
        if bytes <= writeCredit {
            writeCredit -= bytes
            return true
        }
        let fd = socket
        guard fd >= 0 else { return false }
        let unsent = Int(wr_unsent_bytes(fd))
        let room = Int(wr_send_buffer_size(fd)) / 2 - max(0, unsent)
        guard unsent <= 0 || bytes <= room else { return false }
        writeCredit = max(0, room - bytes)
        return true
    }

    // MARK: - Synchronous methods (one RPC each, bounded by the RPC timeout)

    func openChannel(_ ch: UInt16) throws {
        let s = try live()
        _ = amqp_channel_open(s, ch)
        try check(amqp_get_rpc_reply(s), channel: ch, "channel.open")
        openChannels.insert(ch)
        epochs[ch, default: 0] += 1
    }

    /// Closes a channel (the broker requeues its unsettled deliveries).
    func closeChannel(_ ch: UInt16) throws {
        guard openChannels.remove(ch) != nil else { return }
        let s = try live()
        try check(amqp_channel_close(s, ch, AMQP_REPLY_SUCCESS), channel: ch, "channel.close")
    }

    func confirmSelect(_ ch: UInt16) throws {
        let s = try live()
        _ = amqp_confirm_select(s, ch)
        try check(amqp_get_rpc_reply(s), channel: ch, "confirm.select")
    }

    func declare(_ e: AMQPTopology.Exchange, channel ch: UInt16) throws {
        let s = try live()
        defer { arena.reset() }
        _ = amqp_exchange_declare(
            s, ch, arena.bytes(e.name), arena.bytes(e.type), 0, e.durable ? 1 : 0, e.autoDelete ? 1 : 0,
            e.internal ? 1 : 0, arena.table(e.arguments))
        try check(amqp_get_rpc_reply(s), channel: ch, "exchange.declare '\(e.name)'")
    }

    func declare(_ q: AMQPTopology.Queue, channel ch: UInt16) throws {
        let s = try live()
        defer { arena.reset() }
        _ = amqp_queue_declare(
            s, ch, arena.bytes(q.name), 0, q.durable ? 1 : 0, q.exclusive ? 1 : 0, q.autoDelete ? 1 : 0,
            arena.table(q.arguments))
        try check(amqp_get_rpc_reply(s), channel: ch, "queue.declare '\(q.name)'")
    }

    func declare(_ b: AMQPTopology.Binding, channel ch: UInt16) throws {
        let s = try live()
        defer { arena.reset() }
        _ = amqp_queue_bind(
            s, ch, arena.bytes(b.queue), arena.bytes(b.exchange), arena.bytes(b.routingKey), arena.table(b.arguments))
        try check(amqp_get_rpc_reply(s), channel: ch, "queue.bind '\(b.queue)' to '\(b.exchange)'")
    }

    /// Passive `exchange.declare`: throws `channelClosed` (404) if the exchange does not exist.
    func checkExchange(_ name: String, channel ch: UInt16) throws {
        let s = try live()
        defer { arena.reset() }
        _ = amqp_exchange_declare(s, ch, arena.bytes(name), arena.bytes("direct"), 1, 0, 0, 0, amqp_empty_table)
        try check(amqp_get_rpc_reply(s), channel: ch, "exchange.declare(passive) '\(name)'")
    }

    /// Passive `queue.declare`: the queue's counters.
    func queueInfo(_ name: String, channel ch: UInt16) throws -> AMQPQueueInfo {
        let s = try live()
        defer { arena.reset() }
        let ok = amqp_queue_declare(s, ch, arena.bytes(name), 1, 0, 0, 0, amqp_empty_table)
        try check(amqp_get_rpc_reply(s), channel: ch, "queue.declare(passive) '\(name)'")
        guard let ok else { throw AMQPError(.protocolError, "queue.declare-ok missing") }
        return AMQPQueueInfo(
            name: name, messageCount: Int(ok.pointee.message_count), consumerCount: Int(ok.pointee.consumer_count))
    }

    /// Purges or deletes a queue; the number of messages removed.
    func removeMessages(queue: String, delete: Bool, channel ch: UInt16) throws -> Int {
        let s = try live()
        defer { arena.reset() }
        if delete {
            let ok = amqp_queue_delete(s, ch, arena.bytes(queue), 0, 0)
            try check(amqp_get_rpc_reply(s), channel: ch, "queue.delete '\(queue)'")
            return Int(ok?.pointee.message_count ?? 0)
        }
        let ok = amqp_queue_purge(s, ch, arena.bytes(queue))
        try check(amqp_get_rpc_reply(s), channel: ch, "queue.purge '\(queue)'")
        return Int(ok?.pointee.message_count ?? 0)
    }

    func deleteExchange(_ name: String, channel ch: UInt16) throws {
        let s = try live()
        defer { arena.reset() }
        _ = amqp_exchange_delete(s, ch, arena.bytes(name), 0)
        try check(amqp_get_rpc_reply(s), channel: ch, "exchange.delete '\(name)'")
    }

    /// `basic.qos` + `basic.consume` with manual acks; the consumer tag.
    func consume(_ spec: ConsumerSpec, channel ch: UInt16) throws -> String {
        let s = try live()
        defer { arena.reset() }
        _ = amqp_basic_qos(s, ch, 0, spec.prefetch, 0)
        try check(amqp_get_rpc_reply(s), channel: ch, "basic.qos")
        let ok = amqp_basic_consume(s, ch, arena.bytes(spec.queue), amqp_empty_bytes, 0, 0, 0, arena.table(spec.arguments))
        try check(amqp_get_rpc_reply(s), channel: ch, "basic.consume '\(spec.queue)'")
        return ok?.pointee.consumer_tag.string ?? ""
    }

    func cancel(tag: String, channel ch: UInt16) throws {
        let s = try live()
        defer { arena.reset() }
        _ = amqp_basic_cancel(s, ch, arena.bytes(tag))
        try check(amqp_get_rpc_reply(s), channel: ch, "basic.cancel")
    }

    /// `basic.get`: one message, or nil when the queue is empty.
    func get(queue: String, channel ch: UInt16) throws -> Delivery? {
        let s = try live()
        defer { arena.reset() }
        let reply = amqp_basic_get(s, ch, arena.bytes(queue), 0)
        try check(reply, channel: ch, "basic.get '\(queue)'")
        guard reply.reply.id == Method.basicGetOk, let d = reply.reply.decoded else { return nil }
        let ok = d.assumingMemoryBound(to: amqp_basic_get_ok_t.self).pointee
        let (exchange, key) = (ok.exchange.string, ok.routing_key.string)
        let message = try readMessage(channel: ch, "reading basic.get content")
        return Delivery(
            channel: ch, tag: ok.delivery_tag, redelivered: ok.redelivered != 0, exchange: exchange, routingKey: key,
            message: message)
    }

    // MARK: - Asynchronous methods (written, no reply awaited)

    /// Writes a `basic.publish` with its content. Throws `connectionLost` (the wire is dead).
    func publish(
        channel ch: UInt16, exchange: String, routingKey: String, mandatory: Bool, message: AMQPMessage
    ) throws {
        let s = try live()
        defer { arena.reset() }
        var props = arena.properties(message.properties)
        let status = message.body.withUnsafeBytes { raw in
            amqp_basic_publish(
                s, ch, arena.bytes(exchange), arena.bytes(routingKey), mandatory ? 1 : 0, 0, &props,
                amqp_bytes_t(len: raw.count, bytes: UnsafeMutableRawPointer(mutating: raw.baseAddress)))
        }
        if status != Status.ok { throw die(AMQPError(.connectionLost, "publish failed: \(Status.describe(status))", status: status)) }
    }

    enum Settlement: Sendable { case ack, nack(requeue: Bool), reject(requeue: Bool) }

    func settle(channel ch: UInt16, tag: UInt64, _ how: Settlement) throws {
        let s = try live()
        let status: Int32
        switch how {
        case .ack: status = amqp_basic_ack(s, ch, tag, 0)
        case .nack(let requeue): status = amqp_basic_nack(s, ch, tag, 0, requeue ? 1 : 0)
        case .reject(let requeue): status = amqp_basic_reject(s, ch, tag, requeue ? 1 : 0)
        }
        if status != Status.ok { throw die(AMQPError(.connectionLost, "ack failed: \(Status.describe(status))", status: status)) }
    }

    // MARK: - Incoming

    /// What the broker sent, decoded and copied out of librabbitmq's buffers.
    struct Delivery {
        var channel: UInt16
        var tag: UInt64
        var redelivered: Bool
        var exchange: String
        var routingKey: String
        var message: AMQPMessage
    }

    enum Incoming {
        case ack(channel: UInt16, tag: UInt64, multiple: Bool)
        case nack(channel: UInt16, tag: UInt64, multiple: Bool)
        case deliver(Delivery)
        case returned(channel: UInt16, code: UInt16, text: String, key: ReturnKey)
        case consumerCancelled(channel: UInt16)
        /// The broker closed the channel (close-ok already sent).
        case channelClosed(channel: UInt16, error: AMQPError)
        case blocked(reason: String)
        case unblocked
        case other(method: UInt32, channel: UInt16)
    }

    /// The next frame if one is buffered or readable now; nil if none. Throws (and the wire
    /// is dead) when the connection broke or the broker closed it.
    func poll() throws -> Incoming? {
        let s = try live()
        var frame = amqp_frame_t()
        var tv = timeval(tv_sec: 0, tv_usec: 0)
        let status = amqp_simple_wait_frame_noblock(s, &frame, &tv)
        if status == Status.timeout {
            amqp_maybe_release_buffers(s)
            return nil
        }
        guard status == Status.ok else {
            throw die(AMQPError(.connectionLost, "connection lost: \(Status.describe(status))", status: status))
        }
        guard frame.frame_type == UInt8(AMQP_FRAME_METHOD), let decoded = frame.payload.method.decoded else {
            return .other(method: 0, channel: frame.channel)
        }
        let ch = frame.channel
        switch frame.payload.method.id {
        case Method.basicAck:
            let m = decoded.assumingMemoryBound(to: amqp_basic_ack_t.self).pointee
            return .ack(channel: ch, tag: m.delivery_tag, multiple: m.multiple != 0)
        case Method.basicNack:
            let m = decoded.assumingMemoryBound(to: amqp_basic_nack_t.self).pointee
            return .nack(channel: ch, tag: m.delivery_tag, multiple: m.multiple != 0)
        case Method.basicDeliver:
            let m = decoded.assumingMemoryBound(to: amqp_basic_deliver_t.self).pointee
            let (tag, redelivered, exchange, key) = (m.delivery_tag, m.redelivered != 0, m.exchange.string, m.routing_key.string)
            guard let message = try readContent(channel: ch, "reading a delivery") else {
                return .channelClosed(channel: ch, error: AMQPError(.channelClosed, "the channel closed while a delivery was read"))
            }
            return .deliver(.init(channel: ch, tag: tag, redelivered: redelivered, exchange: exchange, routingKey: key, message: message))
        case Method.basicReturn:
            let m = decoded.assumingMemoryBound(to: amqp_basic_return_t.self).pointee
            let (code, text, exchange, key) = (m.reply_code, m.reply_text.string, m.exchange.string, m.routing_key.string)
            guard let message = try readContent(channel: ch, "reading a returned message") else {
                return .channelClosed(channel: ch, error: AMQPError(.channelClosed, "the channel closed while a returned message was read"))
            }
            return .returned(channel: ch, code: code, text: text, key: .init(exchange: exchange, routingKey: key, body: message.body))
        case Method.basicCancel:
            return .consumerCancelled(channel: ch)
        case Method.channelClose:
            let m = decoded.assumingMemoryBound(to: amqp_channel_close_t.self).pointee
            let error = AMQPError(.channelClosed, "channel closed by the broker: \(m.reply_text.string)", status: Int32(m.reply_code))
            sendChannelCloseOk(ch)
            return .channelClosed(channel: ch, error: error)
        case Method.connectionClose:
            let m = decoded.assumingMemoryBound(to: amqp_connection_close_t.self).pointee
            let error = AMQPError(
                .connectionLost, "broker closed the connection: \(m.reply_text.string)", status: Int32(m.reply_code))
            var ok = amqp_connection_close_ok_t()
            _ = amqp_send_method(s, 0, Method.connectionCloseOk, &ok)
            throw die(error)
        case Method.connectionBlocked:
            let m = decoded.assumingMemoryBound(to: amqp_connection_blocked_t.self).pointee
            return .blocked(reason: m.reason.string)
        case Method.connectionUnblocked:
            return .unblocked
        case let id:
            return .other(method: id, channel: ch)
        }
    }

    // MARK: - Internals

    private func live() throws -> amqp_connection_state_t {
        if let deathError { throw deathError }
        guard let s = state else { throw AMQPError(.connectionLost, "the connection is gone") }
        return s
    }

    /// Marks the wire dead (the owner drops it) and returns the error to throw.
    private func die(_ error: AMQPError) -> AMQPError {
        if deathError == nil { deathError = error }
        openChannels.removeAll()
        return error
    }

    private func readMessage(channel ch: UInt16, _ what: String) throws -> AMQPMessage {
        let s = try live()
        var message = amqp_message_t()
        try check(amqp_read_message(s, ch, &message, 0), channel: ch, what)
        defer { amqp_destroy_message(&message) }
        return AMQPMessage(body: message.body.array, properties: CDecode.properties(message.properties))
    }

    /// A message's content after its method frame; nil when the broker closed the channel
    /// instead (answered; the connection lives). Throws when the connection died.
    private func readContent(channel ch: UInt16, _ what: String) throws -> AMQPMessage? {
        do {
            return try readMessage(channel: ch, what)
        } catch let e as AMQPError where !isDead && e.code == .channelClosed {
            return nil
        }
    }

    private func sendChannelCloseOk(_ ch: UInt16) {
        openChannels.remove(ch)
        guard let s = state else { return }
        var ok = amqp_channel_close_ok_t()
        _ = amqp_send_method(s, ch, Method.channelCloseOk, &ok)
    }

    /// Turns a synchronous reply into success or an error: a channel-level error answers
    /// `channel.close` and leaves the connection usable; anything else kills the wire.
    private func check(_ reply: amqp_rpc_reply_t, channel: UInt16, _ what: String) throws {
        switch reply.reply_type {
        case AMQP_RESPONSE_NORMAL:
            return
        case AMQP_RESPONSE_SERVER_EXCEPTION:
            if reply.reply.id == Method.channelClose, let d = reply.reply.decoded {
                let close = d.assumingMemoryBound(to: amqp_channel_close_t.self).pointee
                let error = AMQPError(.channelClosed, "\(what): \(close.reply_text.string)", status: Int32(close.reply_code))
                sendChannelCloseOk(channel)
                throw error
            }
            if reply.reply.id == Method.connectionClose, let d = reply.reply.decoded, let s = state {
                let close = d.assumingMemoryBound(to: amqp_connection_close_t.self).pointee
                let error = AMQPError(
                    .connectionLost, "\(what): broker closed the connection: \(close.reply_text.string)",
                    status: Int32(close.reply_code))
                var ok = amqp_connection_close_ok_t()
                _ = amqp_send_method(s, 0, Method.connectionCloseOk, &ok)
                throw die(error)
            }
            throw die(AMQPError(.protocolError, "\(what): unexpected server method \(reply.reply.id)"))
        case AMQP_RESPONSE_LIBRARY_EXCEPTION:
            throw die(AMQPError(.connectionLost, "\(what): \(Status.describe(reply.library_error))", status: reply.library_error))
        default:
            throw die(AMQPError(.connectionLost, "\(what): no reply"))
        }
    }
}
