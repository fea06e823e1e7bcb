/// Publisher confirms on one confirm-mode channel, as a value: which publish each
/// delivery tag is, which acks and nacks (single or `multiple`) settle which publishes,
/// which `basic.return` belongs to which publish, and which deadlines have passed.
///
/// Pure: it never talks to the broker and never resumes anything. Each call returns the
/// waiters it settled, with their outcome, and the caller resumes them — so the rules are
/// unit-tested without a broker, and a waiter is settled exactly once by construction.
struct ConfirmTracker<Waiter> {
    /// How a publish ended.
    enum Outcome: Equatable {
        case confirmed
        case nacked
        /// Acked after the broker returned it as unroutable (`mandatory`).
        case returned(code: UInt16, text: String)
        case timedOut
    }

    private struct Entry {
        var waiter: Waiter
        var deadline: ContinuousClock.Instant?
        var returnKey: ReturnKey?
        var returned: (code: UInt16, text: String)?
    }

    /// The tag the next publish gets (tags start at 1 on each confirm-mode channel).
    private(set) var nextTag: UInt64 = 1
    /// Every tag below this one is settled.
    private var lowestUnsettled: UInt64 = 1
    private var entries: [UInt64: Entry] = [:]

    /// Publishes awaiting their confirm.
    var count: Int { entries.count }
    var isEmpty: Bool { entries.isEmpty }

    /// Records a publish just written; returns its delivery tag.
    /// - Parameter returnKey: for mandatory publishes, to match a `basic.return`.
    @discardableResult
    mutating func published(_ waiter: Waiter, deadline: ContinuousClock.Instant?, returnKey: ReturnKey?) -> UInt64 {
        let tag = nextTag
        nextTag += 1
        entries[tag] = Entry(waiter: waiter, deadline: deadline, returnKey: returnKey)
        return tag
    }

    /// `basic.ack`: settles `tag`, or every tag up to it when `multiple`.
    mutating func acked(_ tag: UInt64, multiple: Bool) -> [(Waiter, Outcome)] {
        settle(tag, multiple: multiple) { e in
            e.returned.map { .returned(code: $0.code, text: $0.text) } ?? .confirmed
        }
    }

    /// `basic.nack`: the broker did not take the message(s).
    mutating func nacked(_ tag: UInt64, multiple: Bool) -> [(Waiter, Outcome)] {
        settle(tag, multiple: multiple) { _ in .nacked }
    }

    /// `basic.return`: marks the oldest unsettled publish with this key as returned; its
    /// ack follows. Returns false when no publish matches (a return after its deadline).
    mutating func returned(_ key: ReturnKey, code: UInt16, text: String) -> Bool {
        var tag = lowestUnsettled
        while tag < nextTag {
            if var e = entries[tag], e.returned == nil, e.returnKey == key {
                e.returned = (code, text)
                entries[tag] = e
                return true
            }
            tag += 1
        }
        return false
    }

    /// Removes and returns the publishes whose deadline is at or before `now`.
    /// A confirm arriving for them later is ignored.
    mutating func expire(now: ContinuousClock.Instant) -> [Waiter] {
        var expired: [Waiter] = []
        for (tag, e) in entries {
            if let d = e.deadline, d <= now {
                entries[tag] = nil
                expired.append(e.waiter)
            }
        }
        if !expired.isEmpty { advanceLowest() }
        return expired
    }

    /// Moves every deadline later than `limit` to `limit` (a closing connection waits no longer).
    mutating func capDeadlines(at limit: ContinuousClock.Instant) {
        for (tag, e) in entries where e.deadline.map({ $0 > limit }) ?? true {
            entries[tag]?.deadline = limit
        }
    }

    /// The channel or connection is gone: every unsettled publish fails (its fate is unknown),
    /// and the next confirm-mode channel numbers its publishes from 1 again.
    mutating func failAll() -> [Waiter] {
        let all = entries.keys.sorted().compactMap { entries[$0]?.waiter }
        entries.removeAll()
        nextTag = 1
        lowestUnsettled = 1
        return all
    }

    private mutating func settle(_ tag: UInt64, multiple: Bool, _ outcome: (Entry) -> Outcome) -> [(Waiter, Outcome)] {
        guard tag > 0, tag < nextTag else { return [] }  // a tag we never issued: ignore it
        var settled: [(Waiter, Outcome)] = []
        if multiple {
            if tag >= lowestUnsettled {
                for t in lowestUnsettled...tag {
                    if let e = entries.removeValue(forKey: t) { settled.append((e.waiter, outcome(e))) }
                }
            }
        } else if let e = entries.removeValue(forKey: tag) {
            settled.append((e.waiter, outcome(e)))
        }
        advanceLowest()
        return settled
    }

    private mutating func advanceLowest() {
        if entries.isEmpty {
            lowestUnsettled = nextTag
            return
        }
        while lowestUnsettled < nextTag, entries[lowestUnsettled] == nil { lowestUnsettled += 1 }
    }
}

/// What identifies a returned message: publishes on a channel are routed in order,
/// so a return belongs to the oldest unsettled publish with the same key.
struct ReturnKey: Equatable {
    var exchange: String
    var routingKey: String
    var body: [UInt8]
}
