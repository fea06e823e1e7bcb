import Foundation
import Logging

// What the connection thread does for callers and for frames from the broker: topology,
// publishing with confirms, consuming and settling. Everything here runs on that thread.

extension ConnectionCore {
    // MARK: - Frames from the broker

    func handle(_ incoming: Wire.Incoming, on wire: Wire) {
        switch incoming {
        case .ack(let ch, let tag, let multiple):
            if ch == Self.publishChannel { settled(confirms.acked(tag, multiple: multiple)) }
        case .nack(let ch, let tag, let multiple):
            if ch == Self.publishChannel { settled(confirms.nacked(tag, multiple: multiple)) }
        case .deliver(let d):
            deliver(d, on: wire)
        case .returned(let ch, let code, let text, let key):
            if ch == Self.publishChannel, !confirms.returned(key, code: code, text: text) {
                logger.warning("AMQP returned message matched no pending publish", metadata: ["amqp.routing_key": "\(key.routingKey)"])
            }
        case .consumerCancelled(let ch):
            // The broker cancelled a consumer (its queue was deleted, or a failover).
            if let c = consumers.brokerCancelled(channel: ch) {
                logger.warning("AMQP consumer cancelled by the broker", metadata: ["amqp.queue": "\(c.spec.queue)"])
                c.sink.finish(throwing: AMQPError(.channelClosed, "the broker cancelled the consumer of '\(c.spec.queue)'"))
            }
        case .channelClosed(let ch, let error):
            channelClosed(ch, error)
        case .blocked(let reason):
            logger.warning("AMQP connection blocked by the broker (resource alarm): failing publishes until it lifts", metadata: ["reason": "\(reason)"])
            machine.setBlocked(true)
            mailbox.setBlocked(true)
            // Not written yet, and the broker reads nothing now: they fail at once, unsent.
            resume(outbox.removeAll().map(\.reply), throwing: blocked())
        case .unblocked:
            logger.info("AMQP connection unblocked")
            machine.setBlocked(false)
            mailbox.setBlocked(false)
        case .other(let method, let ch):
            if method != 0 { logger.debug("AMQP ignoring method", metadata: ["amqp.method": "\(method)", "amqp.channel": "\(ch)"]) }
        }
    }

    private func channelClosed(_ ch: UInt16, _ error: AMQPError) {
        logger.warning(
            "AMQP channel closed by the broker",
            metadata: ["amqp.channel": "\(ch)", "amqp.reply_code": "\(error.status ?? 0)", "amqp.reply_text": "\(error.message)"])
        if ch == Self.publishChannel {
            // Publishes on it have an unknown fate; the next publish opens it again.
            resume(confirms.failAll(), throwing: error)
            knownExchanges = Set(topology.exchanges.map(\.name)).union([""])
        } else if let c = consumers.channelClosed(ch) {
            // Unacknowledged deliveries were requeued by the broker; subscribe again once.
            do {
                try onWire { try subscribe(c.id, c.spec, on: $0) }
            } catch {
                _ = consumers.close(id: c.id)
                c.sink.finish(throwing: error)
            }
        }
    }

    func blocked() -> AMQPError {
        AMQPError(.flowControl, "the broker blocked publishing (a memory or disk alarm); nothing was sent")
    }

    // MARK: - Topology

    /// Records declarations to be made on every (re)connection.
    func rememberTopology(_ t: AMQPTopology) {
        topology.merge(t)
        knownExchanges.formUnion(t.exchanges.map(\.name))
    }

    func declare(_ t: AMQPTopology, remember: Bool = true, _ done: Reply<Void>) {
        do {
            try onWire { try declare(t, on: $0) }
            if remember { rememberTopology(t) }
            done.resume()
        } catch {
            done.resume(throwing: error)
        }
    }

    func declare(_ t: AMQPTopology, on w: Wire) throws {
        let ch = Self.controlChannel
        for e in t.exchanges {
            try ensureOpen(ch, on: w)
            try w.declare(e, channel: ch)
        }
        for q in t.queues {
            try ensureOpen(ch, on: w)
            try w.declare(q, channel: ch)
        }
        for b in t.bindings {
            try ensureOpen(ch, on: w)
            try w.declare(b, channel: ch)
        }
    }

    private func ensureOpen(_ ch: UInt16, on w: Wire) throws {
        if !w.openChannels.contains(ch) { try w.openChannel(ch) }
    }

    func queueInfo(_ name: String, _ done: Reply<AMQPQueueInfo>) {
        done.resume(with: Result {
            try onWire { w in
                try ensureOpen(Self.controlChannel, on: w)
                return try w.queueInfo(name, channel: Self.controlChannel)
            }
        })
    }

    /// Purges (`deleteQueue == false`) or deletes a queue; returns the number of messages removed.
    func removeMessages(queue: String, deleteQueue: Bool, _ done: Reply<Int>) {
        done.resume(with: Result {
            let n = try onWire { w in
                try ensureOpen(Self.controlChannel, on: w)
                return try w.removeMessages(queue: queue, delete: deleteQueue, channel: Self.controlChannel)
            }
            if deleteQueue {
                topology.queues.removeAll { $0.name == queue }
                topology.bindings.removeAll { $0.queue == queue }
            }
            return n
        })
    }

    func deleteExchange(_ name: String, _ done: Reply<Void>) {
        done.resume(with: Result {
            try onWire { w in
                try ensureOpen(Self.controlChannel, on: w)
                try w.deleteExchange(name, channel: Self.controlChannel)
            }
            topology.exchanges.removeAll { $0.name == name }
            topology.bindings.removeAll { $0.exchange == name }
            knownExchanges.remove(name)
        })
    }

    // MARK: - Publishing

    func publish(
        _ message: AMQPMessage, exchange: String, routingKey: String, mandatory: Bool,
        deadline: ContinuousClock.Instant?, wireSize: Int, _ done: Reply<Void>
    ) {
        guard wire != nil, !machine.isClosingOrClosed else { return done.resume(throwing: notConnected()) }
        if machine.isBlocked { return done.resume(throwing: blocked()) }
        if !knownExchanges.contains(exchange) {
            // Checked on the control channel: a missing exchange would close the shared
            // publish channel, failing every publish in flight with this one.
            do {
                try onWire { w in
                    try ensureOpen(Self.controlChannel, on: w)
                    try w.checkExchange(exchange, channel: Self.controlChannel)
                }
                knownExchanges.insert(exchange)
            } catch let e as AMQPError where e.code == .channelClosed && e.status == 404 {
                return done.resume(throwing: AMQPError(.exchangeNotFound, "exchange '\(exchange)' does not exist; nothing was published", status: 404))
            } catch {
                return done.resume(throwing: error)
            }
        }
        outbox.append(
            .init(
                message: message, exchange: exchange, routingKey: routingKey, mandatory: mandatory, deadline: deadline,
                reply: done, wireSize: wireSize))
        flushOutbox()
    }

    /// Writes queued publishes while the socket's send buffer has room for them.
    func flushOutbox() {
        while let next = outbox.first, let w = wire {
            guard w.canWrite(next.wireSize) else { break }
            if !w.openChannels.contains(Self.publishChannel) {
                do {
                    try onWire { w in
                        try w.openChannel(Self.publishChannel)
                        try w.confirmSelect(Self.publishChannel)
                    }
                } catch {
                    // A dead wire already failed the whole outbox (connectionLost); a channel
                    // error fails only the publish that needed the channel.
                    guard wire != nil, !outbox.isEmpty else { return }
                    resume([outbox.removeFirst().reply], throwing: error as? AMQPError ?? AMQPError(.channelClosed, "\(error)"))
                    continue
                }
            }
            let e = outbox.removeFirst()
            do {
                try w.publish(channel: Self.publishChannel, exchange: e.exchange, routingKey: e.routingKey, mandatory: e.mandatory, message: e.message)
            } catch {
                e.reply.resume(throwing: error)
                connectionLost(error)
                return
            }
            confirms.published(
                e.reply, deadline: e.deadline,
                returnKey: e.mandatory ? ReturnKey(exchange: e.exchange, routingKey: e.routingKey, body: e.message.body) : nil)
        }
        mailbox.setInFlight(confirms.count + outbox.count)
    }

    private func settled(_ outcomes: [(Reply<Void>, ConfirmTracker<Reply<Void>>.Outcome)]) {
        // The gauge is updated before callers resume, so a caller never sees its own publish counted.
        mailbox.setInFlight(confirms.count + outbox.count)
        for (reply, outcome) in outcomes {
            switch outcome {
            case .confirmed: reply.resume()
            case .nacked: reply.resume(throwing: AMQPError(.nacked, "the broker rejected the message (basic.nack)"))
            case .returned(let code, let text):
                reply.resume(throwing: AMQPError(.unroutable, "message was returned as unroutable: \(text)", status: Int32(code)))
            case .timedOut: reply.resume(throwing: AMQPError(.confirmTimeout, "no confirm from the broker in time"))
            }
        }
    }

    func sweepDeadlines(now: ContinuousClock.Instant) {
        guard !confirms.isEmpty || !outbox.isEmpty, now >= nextDeadlineSweep else { return }
        nextDeadlineSweep = now + .milliseconds(5)
        let late = confirms.expire(now: now)
        if !late.isEmpty { settled(late.map { ($0, .timedOut) }) }
        let unsent = outbox.expire(now: now)
        if !unsent.isEmpty {
            resume(unsent.map(\.reply), throwing: AMQPError(.confirmTimeout, "the socket had no room to send the message in time (the broker is not reading); nothing was sent"))
        }
    }

    // MARK: - Consuming

    func addConsumer(id: Int, spec: ConsumerSpec, sink: Sink, _ done: Reply<Void>) {
        do {
            consumers.add(id: id, spec: spec, sink: sink)
            try onWire { try subscribe(id, spec, on: $0) }
            done.resume()
        } catch {
            _ = consumers.close(id: id)
            done.resume(throwing: error)
        }
    }

    func subscribe(_ id: Int, _ spec: ConsumerSpec, on w: Wire) throws {
        let inUse = consumers.channelsInUse.union(w.openChannels)
        while inUse.contains(nextChannel) || nextChannel < 3 { nextChannel = nextChannel &+ 1 }
        let ch = nextChannel
        nextChannel = nextChannel &+ 1
        try w.openChannel(ch)
        let tag = try w.consume(spec, channel: ch)
        consumers.subscribed(id: id, channel: ch, tag: tag)
    }

    /// Stops deliveries to a consumer (`basic.cancel`); its channel stays open so
    /// that deliveries already handed out can still be settled.
    func cancelConsumer(id: Int, _ done: CheckedContinuation<Void, Never>?) {
        defer { done?.resume() }
        guard let c = consumers.cancel(id: id) else { return }
        if let ch = c.channel { _ = try? onWire { try $0.cancel(tag: c.tag, channel: ch) } }
        c.sink.finish()
    }

    /// Closes the consumer's channel: the broker requeues every delivery not yet settled, in
    /// order, for the next consumer.
    ///
    /// No `basic.cancel` first: the consumer must stay registered until the channel is
    /// gone, or a single-active-consumer queue would activate the next consumer while
    /// this one's unacknowledged deliveries are still out, and hand it later messages first.
    func closeConsumer(id: Int, _ done: CheckedContinuation<Void, Never>) {
        let (c, channel) = consumers.close(id: id)
        c?.sink.finish()
        if let channel { _ = try? onWire { try $0.closeChannel(channel) } }
        done.resume()
    }

    private func deliver(_ d: Wire.Delivery, on wire: Wire) {
        guard let sink = consumers.sink(forChannel: d.channel) else {
            // A delivery racing a cancel: give it back at once.
            if wire.openChannels.contains(d.channel) {
                _ = try? onWire { try $0.settle(channel: d.channel, tag: d.tag, .reject(requeue: true)) }
            }
            return
        }
        sink.yield(delivery(d, on: wire))
    }

    private func delivery(_ d: Wire.Delivery, on wire: Wire) -> AMQPDelivery {
        AMQPDelivery(
            message: d.message, exchange: d.exchange, routingKey: d.routingKey, redelivered: d.redelivered,
            deliveryTag: d.tag, channel: d.channel, channelEpoch: wire.epoch(of: d.channel), generation: generation,
            connection: owner)
    }

    func get(queue: String, _ done: Reply<AMQPDelivery?>) {
        done.resume(with: Result {
            try onWire { w in
                try ensureOpen(Self.controlChannel, on: w)
                return try w.get(queue: queue, channel: Self.controlChannel).map { delivery($0, on: w) }
            }
        })
    }

    /// Sends an ack, nack or reject. A delivery of a connection that has since broken, or of
    /// a channel that has since closed (and maybe opened again, numbering its deliveries
    /// afresh), is not settled: the broker already requeued it.
    func settle(_ d: AMQPDelivery, _ how: Wire.Settlement) {
        guard let wire, d.generation == generation, wire.openChannels.contains(d.channel),
            wire.epoch(of: d.channel) == d.channelEpoch
        else {
            logger.debug("AMQP dropping a settlement for a stale delivery", metadata: ["amqp.delivery_tag": "\(d.deliveryTag)"])
            return
        }
        do {
            try wire.settle(channel: d.channel, tag: d.deliveryTag, how)
        } catch {
            connectionLost(error)
        }
    }
}
