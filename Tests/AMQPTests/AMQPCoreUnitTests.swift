@testable import AMQP
import Testing

/// The AMQP core's pure parts, without a broker: they run in milliseconds.
@Suite("ConfirmTracker")
struct ConfirmTrackerTests {
    typealias Tracker = ConfirmTracker<String>
    let t0 = ContinuousClock.now

    func tracker(_ names: [String], deadline: ContinuousClock.Instant? = nil) -> Tracker {
        var t = Tracker()
        for n in names { t.published(n, deadline: deadline, returnKey: nil) }
        return t
    }

    @Test func singleAcksInAnyOrder() {
        var t = tracker(["a", "b", "c"])
        #expect(t.acked(2, multiple: false).map(\.0) == ["b"])
        #expect(t.acked(3, multiple: false).map(\.0) == ["c"])
        #expect(t.count == 1)
        #expect(t.acked(1, multiple: false).map { "\($0.0):\($0.1)" } == ["a:confirmed"])
        #expect(t.isEmpty)
    }

    @Test func multipleAckSettlesEverythingUpToTheTag() {
        var t = tracker(["a", "b", "c", "d"])
        _ = t.acked(2, multiple: false)
        #expect(t.acked(3, multiple: true).map(\.0) == ["a", "c"])
        #expect(t.acked(4, multiple: true).map(\.0) == ["d"])
        // Repeated and unknown tags settle nothing (and never twice).
        #expect(t.acked(4, multiple: true).isEmpty)
        #expect(t.acked(99, multiple: false).isEmpty)
        #expect(t.nacked(0, multiple: true).isEmpty)
    }

    @Test func nackFailsOnlyWhatItNames() {
        var t = tracker(["a", "b", "c"])
        let n = t.nacked(2, multiple: true)
        #expect(n.map(\.0) == ["a", "b"])
        #expect(n.allSatisfy { $0.1 == .nacked })
        #expect(t.acked(3, multiple: false).map(\.1) == [.confirmed])
    }

    @Test func returnThenAckIsUnroutableForTheOldestMatchingPublish() {
        var t = Tracker()
        let key = ReturnKey(exchange: "x", routingKey: "nope", body: [1])
        t.published("first", deadline: nil, returnKey: key)
        t.published("second", deadline: nil, returnKey: key)
        t.published("other", deadline: nil, returnKey: ReturnKey(exchange: "x", routingKey: "k", body: [1]))
        let matched = t.returned(key, code: 312, text: "NO_ROUTE")
        #expect(matched)
        let settled = t.acked(3, multiple: true)
        #expect(settled.map(\.0) == ["first", "second", "other"])
        #expect(settled.map(\.1) == [.returned(code: 312, text: "NO_ROUTE"), .confirmed, .confirmed])
        // A return for a publish that is already settled matches nothing.
        let matchedAgain = t.returned(key, code: 312, text: "NO_ROUTE")
        #expect(!matchedAgain)
    }

    @Test func deadlinesExpireAndLateConfirmsAreIgnored() {
        var t = Tracker()
        t.published("soon", deadline: t0 + .seconds(1), returnKey: nil)
        t.published("later", deadline: t0 + .seconds(10), returnKey: nil)
        t.published("never", deadline: nil, returnKey: nil)
        #expect(t.expire(now: t0).isEmpty)
        #expect(t.expire(now: t0 + .seconds(1)) == ["soon"])
        #expect(t.acked(1, multiple: false).isEmpty)  // the late confirm of "soon"
        #expect(t.acked(3, multiple: true).map(\.0) == ["later", "never"])
    }

    @Test func closingCapsDeadlines() {
        var t = Tracker()
        t.published("unbounded", deadline: nil, returnKey: nil)
        t.published("far", deadline: t0 + .seconds(60), returnKey: nil)
        t.published("near", deadline: t0 + .seconds(1), returnKey: nil)
        t.capDeadlines(at: t0 + .seconds(5))
        #expect(t.expire(now: t0 + .seconds(5)).sorted() == ["far", "near", "unbounded"])
    }

    @Test func connectionLossFailsEverythingAndTagsStartAgain() {
        var t = tracker(["a", "b", "c"])
        _ = t.acked(2, multiple: false)
        #expect(t.failAll() == ["a", "c"])
        #expect(t.isEmpty)
        // The next confirm-mode channel numbers from 1; a stale ack of the old channel's tag 3 settles nothing new.
        #expect(t.published("new", deadline: nil, returnKey: nil) == 1)
        #expect(t.acked(3, multiple: false).isEmpty)
        #expect(t.acked(1, multiple: false).map(\.0) == ["new"])
    }
}

@Suite("ConsumerTable")
struct ConsumerTableTests {
    typealias Table = ConsumerTable<String>
    let spec = ConsumerSpec(queue: "q", prefetch: 10, arguments: [:])

    @Test func deliveriesFollowTheChannel() {
        var t = Table()
        t.add(id: 1, spec: spec, sink: "one")
        t.add(id: 2, spec: spec, sink: "two")
        #expect(t.unsubscribed.map(\.id) == [1, 2])
        t.subscribed(id: 1, channel: 3, tag: "ctag-1")
        t.subscribed(id: 2, channel: 4, tag: "ctag-2")
        #expect(t.unsubscribed.isEmpty)
        #expect(t.sink(forChannel: 3) == "one")
        #expect(t.sink(forChannel: 4) == "two")
        #expect(t.sink(forChannel: 5) == nil)
    }

    @Test func cancelKeepsTheChannelForSettlementsCloseDoesNot() {
        var t = Table()
        t.add(id: 1, spec: spec, sink: "one")
        t.subscribed(id: 1, channel: 3, tag: "ctag")
        let c = t.cancel(id: 1)
        #expect(c?.tag == "ctag" && c?.channel == 3)
        #expect(t.sink(forChannel: 3) == nil)  // no more deliveries to it
        #expect(t.isOpen(3))  // but what it holds can be acked
        #expect(t.channelsInUse == [3])
        #expect(t.cancel(id: 1) == nil)  // once
        let closed = t.close(id: 1)
        #expect(closed.consumer == nil && closed.channel == 3)
        #expect(!t.isOpen(3))
    }

    @Test func brokerCancelEndsTheConsumer() {
        var t = Table()
        t.add(id: 1, spec: spec, sink: "one")
        t.subscribed(id: 1, channel: 3, tag: "ctag")
        #expect(t.brokerCancelled(channel: 3)?.id == 1)
        #expect(t.isEmpty)
        #expect(t.brokerCancelled(channel: 3) == nil)
    }

    @Test func aClosedChannelMeansSubscribeAgain() {
        var t = Table()
        t.add(id: 1, spec: spec, sink: "one")
        t.subscribed(id: 1, channel: 3, tag: "ctag")
        #expect(t.channelClosed(3)?.id == 1)
        #expect(t.unsubscribed.map(\.id) == [1])
        #expect(!t.isOpen(3))
    }

    @Test func connectionLossKeepsConsumersForTheNextConnection() {
        var t = Table()
        for id in [3, 1, 2] {
            t.add(id: id, spec: spec, sink: "c\(id)")
            t.subscribed(id: id, channel: UInt16(id + 2), tag: "t\(id)")
        }
        _ = t.cancel(id: 2)
        t.connectionLost()
        #expect(t.unsubscribed.map(\.id) == [1, 3])  // oldest first; the cancelled one is gone
        #expect(t.channelsInUse.isEmpty)
        #expect(t.sink(forChannel: 3) == nil)
        t.subscribed(id: 1, channel: 7, tag: "again")
        #expect(t.sink(forChannel: 7) == "c1")
        #expect(t.removeAll().map(\.id) == [1, 3])
        #expect(t.isEmpty)
    }
}

@Suite("ConnectionStateMachine")
struct ConnectionStateMachineTests {
    let t0 = ContinuousClock.now

    func machine(addresses: Int = 1) -> ConnectionStateMachine {
        ConnectionStateMachine(
            addressCount: addresses, minDelay: .milliseconds(100), maxDelay: .milliseconds(800), jitter: { 1.0 })
    }

    func failed(_ m: inout ConnectionStateMachine, _ now: ContinuousClock.Instant) -> Bool { m.connectFailed(now: now) }
    func connect(_ m: inout ConnectionStateMachine) -> UInt64 { m.connected() }

    @Test func nothingIsDueBeforeStart() {
        var m = machine()
        #expect(m.due(now: t0 + .seconds(60)) == nil)
        m.start(now: t0)
        #expect(m.due(now: t0) == 0)
    }

    @Test func backoffDoublesUpToTheMaximumAndResetsOnSuccess() {
        var m = machine()
        m.start(now: t0)
        var now = t0
        var waits: [Duration] = []
        for _ in 0..<5 {
            #expect(failed(&m, now))
            guard case .waiting(let until) = m.state else { Issue.record("not waiting"); return }
            waits.append(until - now)
            #expect(m.due(now: until - .milliseconds(1)) == nil)
            now = until
            #expect(m.due(now: now) == 0)
        }
        #expect(waits == [.milliseconds(100), .milliseconds(200), .milliseconds(400), .milliseconds(800), .milliseconds(800)])
        #expect(connect(&m) == 1)
        m.lost(now: now)
        #expect(m.state == .waiting(until: now + .milliseconds(100)))
        #expect(failed(&m, now))
        #expect(m.state == .waiting(until: now + .milliseconds(100)))  // the delay started over
    }

    @Test func everyAddressIsTriedBeforeBackingOff() {
        var m = machine(addresses: 3)
        m.start(now: t0)
        #expect(m.due(now: t0) == 0)
        #expect(!failed(&m, t0))
        #expect(m.due(now: t0) == 1)  // the next one at once
        #expect(!failed(&m, t0))
        #expect(m.due(now: t0) == 2)
        #expect(failed(&m, t0))  // a whole round failed: back off
        #expect(m.due(now: t0) == nil)
        #expect(m.due(now: t0 + .milliseconds(100)) == 0)
    }

    @Test func aLostConnectionMovesToTheNextAddress() {
        var m = machine(addresses: 2)
        m.start(now: t0)
        #expect(connect(&m) == 1)
        #expect(m.address == 0)
        m.lost(now: t0)
        #expect(m.due(now: t0 + .milliseconds(100)) == 1)
        #expect(connect(&m) == 2)
        m.lost(now: t0)
        #expect(m.due(now: t0 + .milliseconds(100)) == 0)
    }

    @Test func blockedOnlyWhileOpen() {
        var m = machine()
        m.setBlocked(true)
        #expect(!m.isBlocked)
        m.start(now: t0)
        _ = m.connected()
        m.setBlocked(true)
        #expect(m.isBlocked && m.isOpen)
        m.setBlocked(false)
        #expect(!m.isBlocked)
        m.setBlocked(true)
        m.lost(now: t0)
        #expect(!m.isBlocked)  // a new connection starts unblocked
        _ = m.connected()
        #expect(!m.isBlocked)
    }

    @Test func closing() {
        var m = machine()
        m.start(now: t0)
        _ = m.connected()
        let closed = m.close()
        #expect(closed)
        #expect(m.state == .closing(connected: true))
        let closedAgain = m.close()
        #expect(!closedAgain)
        m.lost(now: t0)
        #expect(m.state == .closing(connected: false))
        #expect(m.due(now: t0 + .seconds(60)) == nil)  // no reconnection while closing
        m.finished()
        #expect(m.state == .closed)

        var idle = machine()
        let idleClosed = idle.close()
        #expect(idleClosed)
        #expect(idle.state == .closing(connected: false))
    }
}

@Suite("AMQPError: failures that may pass by themselves")
struct AMQPErrorPassingTests {
    @Test func aConnectionTheBrokerDroppedMayPass() {
        #expect(AMQPError(.connectionLost, "cluster_not_formed", status: 541).mayPassByItself)
        #expect(AMQPError(.connectionLost, "node stopping", status: 320).mayPassByItself)
        #expect(AMQPError(.connectionLost, "closed").mayPassByItself)
        // librabbitmq: connection closed, socket error, timeout, heartbeat timeout, socket closed.
        for status: Int32 in [-7, -9, -13, -15, -17] {
            #expect(AMQPError(.connectionLost, "broke", status: status).mayPassByItself)
        }
    }

    @Test func whatNeedsAChangeIsReportedAtOnce() {
        #expect(!AMQPError(.connectionLost, "frame error", status: 501).mayPassByItself)
        #expect(!AMQPError(.connectionLost, "not allowed", status: 530).mayPassByItself)
        #expect(!AMQPError(.authenticationFailed, "refused", status: 403).mayPassByItself)
        #expect(!AMQPError(.connectionFailed, "refused", status: -9).mayPassByItself)
        #expect(!AMQPError(.channelClosed, "inequivalent arg", status: 406).mayPassByItself)
        // librabbitmq refusing what we asked it to send: bad AMQP data (a name over 255 bytes),
        // an invalid parameter, a table too big — the same again on every try.
        for status: Int32 in [-2, -10, -11] {
            #expect(!AMQPError(.connectionLost, "refused to encode", status: status).mayPassByItself)
        }
    }
}
