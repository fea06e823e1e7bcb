/// What a consumer asked for; kept across reconnections to subscribe again.
struct ConsumerSpec: Equatable, Sendable {
    var queue: String
    var prefetch: UInt16
    var arguments: AMQPTable
}

/// The consumers of one connection and their channels, as a value.
///
/// A consumer is registered once and outlives connections: after a loss its channel is
/// forgotten and it waits to be subscribed again on the next connection. Cancelling
/// (`basic.cancel`) keeps its channel open so that deliveries already handed out can
/// still be settled; closing forgets the channel (the broker requeues what was not settled).
///
/// Pure: the caller performs what the answers say (subscribe, cancel, close a channel,
/// finish a stream) and reports back.
struct ConsumerTable<Sink> {
    struct Consumer {
        let id: Int
        let spec: ConsumerSpec
        let sink: Sink
        /// The channel in the current connection; nil until subscribed.
        var channel: UInt16?
        var tag: String = ""
    }

    private var active: [Int: Consumer] = [:]
    private var byChannel: [UInt16: Int] = [:]
    /// Channels of cancelled consumers, still open for settlements, by consumer id.
    private var lingering: [Int: UInt16] = [:]

    var isEmpty: Bool { active.isEmpty }
    /// The active consumers' ids, oldest first.
    var ids: [Int] { active.keys.sorted() }
    var count: Int { active.count }

    /// Registers a consumer (not subscribed yet).
    mutating func add(id: Int, spec: ConsumerSpec, sink: Sink) {
        active[id] = Consumer(id: id, spec: spec, sink: sink)
    }

    /// The consumer is subscribed on `channel` with the broker's consumer tag.
    mutating func subscribed(id: Int, channel: UInt16, tag: String) {
        guard active[id] != nil else { return }
        active[id]?.channel = channel
        active[id]?.tag = tag
        byChannel[channel] = id
    }

    /// Active consumers without a channel, oldest first: to subscribe on this connection.
    var unsubscribed: [Consumer] {
        active.values.filter { $0.channel == nil }.sorted { $0.id < $1.id }
    }

    /// Where a delivery on `channel` goes: the active consumer's sink, or nil (a delivery
    /// racing a cancel, to be given back).
    func sink(forChannel channel: UInt16) -> Sink? {
        byChannel[channel].flatMap { active[$0]?.sink }
    }

    /// Whether settlements on `channel` can still be sent (an active or cancelled consumer's).
    func isOpen(_ channel: UInt16) -> Bool {
        byChannel[channel] != nil || lingering.values.contains(channel)
    }

    /// `basic.cancel` from the application: the consumer leaves; its channel stays open.
    /// Returns it (to send the cancel if subscribed, and finish its stream), or nil if unknown.
    mutating func cancel(id: Int) -> Consumer? {
        guard let c = active.removeValue(forKey: id) else { return nil }
        if let ch = c.channel {
            byChannel[ch] = nil
            lingering[id] = ch
        }
        return c
    }

    /// Closes the consumer's channel: returns the consumer if it was active (to finish its
    /// stream) and the channel to close, if one is open.
    mutating func close(id: Int) -> (consumer: Consumer?, channel: UInt16?) {
        let c = active.removeValue(forKey: id)
        var channel = lingering.removeValue(forKey: id)
        if let ch = c?.channel {
            byChannel[ch] = nil
            channel = ch
        }
        return (c, channel)
    }

    /// The broker cancelled the consumer on `channel` (its queue was deleted): it ends; its
    /// channel stays open for settlements until the consumer is closed.
    mutating func brokerCancelled(channel: UInt16) -> Consumer? {
        guard let id = byChannel.removeValue(forKey: channel) else { return nil }
        lingering[id] = channel
        return active.removeValue(forKey: id)
    }

    /// The broker closed `channel`: its consumer (if active) must subscribe again;
    /// a cancelled consumer's channel is simply gone.
    mutating func channelClosed(_ channel: UInt16) -> Consumer? {
        if let id = lingering.first(where: { $0.value == channel })?.key { lingering[id] = nil }
        guard let id = byChannel.removeValue(forKey: channel) else { return nil }
        active[id]?.channel = nil
        active[id]?.tag = ""
        return active[id]
    }

    /// The connection is gone: every channel with it. Active consumers wait for the next one.
    mutating func connectionLost() {
        byChannel.removeAll()
        lingering.removeAll()
        for id in active.keys {
            active[id]?.channel = nil
            active[id]?.tag = ""
        }
    }

    /// Removes every consumer (the connection is closing for good); returns them.
    mutating func removeAll() -> [Consumer] {
        let all = active.values.sorted { $0.id < $1.id }
        active.removeAll()
        byChannel.removeAll()
        lingering.removeAll()
        return all
    }

    /// Channels in use by consumers (active or cancelled), for channel allocation.
    var channelsInUse: Set<UInt16> { Set(byChannel.keys).union(lingering.values) }
}
