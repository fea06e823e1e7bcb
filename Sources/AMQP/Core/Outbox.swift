/// Publishes accepted by the connection thread but not yet written to the socket, in order.
///
/// A publish waits here while the socket's send buffer has no room for it (the broker is
/// reading slowly, or not at all under flow control), so the thread never starts a write
/// that could block; it fails here if its deadline passes or the broker blocks the
/// connection — in both cases nothing was sent.
struct Outbox {
    struct Entry {
        var message: AMQPMessage
        var exchange: String
        var routingKey: String
        var mandatory: Bool
        var deadline: ContinuousClock.Instant?
        var reply: ConnectionCore.Reply<Void>
        /// A generous estimate of the frames' size on the wire: method, header with properties,
        /// body (computed once, by the caller that validated the message).
        var wireSize: Int
    }

    private var entries: [Entry] = []
    private var head = 0

    var count: Int { entries.count - head }
    var isEmpty: Bool { head == entries.count }
    var first: Entry? { isEmpty ? nil : entries[head] }

    mutating func append(_ e: Entry) { entries.append(e) }

    mutating func removeFirst() -> Entry {
        let e = entries[head]
        head += 1
        if head == entries.count {
            entries.removeAll(keepingCapacity: true)
            head = 0
        } else if head >= 1024, head * 2 >= entries.count {
            entries.removeFirst(head)
            head = 0
        }
        return e
    }

    mutating func removeAll() -> [Entry] {
        let all = Array(entries[head...])
        entries.removeAll(keepingCapacity: true)
        head = 0
        return all
    }

    /// Removes the entries whose deadline passed.
    mutating func expire(now: ContinuousClock.Instant) -> [Entry] {
        guard !isEmpty else { return [] }
        var kept: [Entry] = []
        var expired: [Entry] = []
        for e in entries[head...] {
            if let d = e.deadline, d <= now { expired.append(e) } else { kept.append(e) }
        }
        guard !expired.isEmpty else { return [] }
        entries = kept
        head = 0
        return expired
    }

    mutating func capDeadlines(at limit: ContinuousClock.Instant) {
        for i in head..<entries.count where entries[i].deadline.map({ $0 > limit }) ?? true {
            entries[i].deadline = limit
        }
    }
}

extension AMQPProperties {
    /// A generous estimate of the content header frame's size (properties and headers).
    var estimatedSize: Int {
        let strings = [contentType, contentEncoding, correlationID, replyTo, expiration, messageID, type, userID, appID]
        var n = 128 + strings.reduce(0) { $0 + ($1?.utf8.count ?? 0) + 1 }
        for (k, v) in headers { n += k.utf8.count + 1 + v.estimatedSize }
        return n
    }
}

extension AMQPFieldValue {
    /// Roughly how many bytes the value takes in a field table.
    var estimatedSize: Int {
        switch self {
        case .string(let s): return s.utf8.count + 5
        case .bytes(let b): return b.count + 5
        case .table(let t): return t.reduce(5) { $0 + $1.key.utf8.count + 1 + $1.value.estimatedSize }
        case .array(let a): return a.reduce(5) { $0 + $1.estimatedSize }
        default: return 9
        }
    }
}
