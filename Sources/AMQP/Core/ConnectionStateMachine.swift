/// The lifecycle of one AMQP connection, as a value: waiting to connect → open (possibly
/// blocked by the broker's flow control) → closing → closed, with reconnection over one or
/// more broker addresses and exponential backoff.
///
/// Pure: it decides *when* and *where* to connect and what each event means; the
/// connection thread performs the attempt and reports the result.
///
/// Reconnection: after a failed attempt the next address is tried at once, until every
/// address failed in this round; then the round waits the backoff delay (doubling up to the
/// maximum, with ±20% jitter). After an established connection is lost, the next address is
/// tried after the minimum delay (a cluster node going away is a reconnection elsewhere).
struct ConnectionStateMachine {
    enum State: Equatable {
        /// Created; nothing is due until ``ConnectionStateMachine/start(now:)``.
        case idle
        /// Disconnected; the next attempt (to ``ConnectionStateMachine/address``) is due at `until`.
        case waiting(until: ContinuousClock.Instant)
        /// Connected. `blocked`: the broker sent `connection.blocked` (a resource alarm);
        /// it reads nothing we publish until `connection.unblocked`.
        case open(generation: UInt64, blocked: Bool)
        /// `close()` was called; confirms in flight drain (if connected) before the socket closes.
        case closing(connected: Bool)
        case closed
    }

    let addressCount: Int
    let minDelay: Duration
    let maxDelay: Duration
    private let jitter: () -> Double

    private(set) var state: State
    /// Connections established so far; deliveries carry it to recognise stale ones.
    private(set) var generation: UInt64 = 0
    /// The address of the next (or current) connection, an index into the configured list.
    private(set) var address = 0
    private var delay: Duration
    private var failuresThisRound = 0

    init(
        addressCount: Int, minDelay: Duration, maxDelay: Duration,
        jitter: @escaping () -> Double = { Double.random(in: 0.8...1.2) }
    ) {
        self.addressCount = max(1, addressCount)
        self.minDelay = minDelay
        self.maxDelay = max(minDelay, maxDelay)
        self.jitter = jitter
        self.delay = minDelay
        self.state = .idle
    }

    /// The first attempt is due now.
    mutating func start(now: ContinuousClock.Instant) {
        if state == .idle { state = .waiting(until: now) }
    }

    var isOpen: Bool {
        if case .open = state { return true }
        return false
    }

    var isBlocked: Bool {
        if case .open(_, let blocked) = state { return blocked }
        return false
    }

    var isClosingOrClosed: Bool {
        switch state {
        case .closing, .closed: return true
        case .idle, .waiting, .open: return false
        }
    }

    /// The address to try now, if an attempt is due.
    func due(now: ContinuousClock.Instant) -> Int? {
        if case .waiting(let until) = state, now >= until { return address }
        return nil
    }

    /// How long the thread may sleep before an attempt is due (nil: no attempt pending).
    func untilDue(now: ContinuousClock.Instant) -> Duration? {
        if case .waiting(let until) = state { return max(.zero, until - now) }
        return nil
    }

    /// The attempt succeeded: open, with a new generation; the backoff starts over.
    mutating func connected() -> UInt64 {
        generation += 1
        delay = minDelay
        failuresThisRound = 0
        state = .open(generation: generation, blocked: false)
        return generation
    }

    /// The attempt failed: the next address, at once or after the round's backoff.
    /// Returns true when this completed a round in which every address failed.
    @discardableResult
    mutating func connectFailed(now: ContinuousClock.Instant) -> Bool {
        guard case .waiting = state else { return false }
        failuresThisRound += 1
        address = (address + 1) % addressCount
        if failuresThisRound < addressCount {
            state = .waiting(until: now)
            return false
        }
        failuresThisRound = 0
        state = .waiting(until: now + delay * jitter())
        delay = min(delay * 2, maxDelay)
        return true
    }

    /// An open connection broke (or a closing one: then there is nothing left to drain).
    mutating func lost(now: ContinuousClock.Instant) {
        switch state {
        case .open:
            address = (address + 1) % addressCount
            failuresThisRound = 0
            state = .waiting(until: now + minDelay * jitter())
        case .closing:
            state = .closing(connected: false)
        case .idle, .waiting, .closed:
            break
        }
    }

    /// `connection.blocked` / `connection.unblocked` from the broker.
    mutating func setBlocked(_ blocked: Bool) {
        if case .open(let g, _) = state { state = .open(generation: g, blocked: blocked) }
    }

    /// The application closes the connection. Returns false if it was already closing or closed.
    mutating func close() -> Bool {
        switch state {
        case .open: state = .closing(connected: true)
        case .idle, .waiting: state = .closing(connected: false)
        case .closing, .closed: return false
        }
        return true
    }

    /// The socket is closed and every waiter answered.
    mutating func finished() { state = .closed }
}
