import CoreMetrics
import Foundation
import Logging
import Prometheus
import Redis
import RelayContract
import RelayCore
import Synchronization

/// One Official Account as a worker serves it: its sessions and records, its rules and
/// decision service, its sender (its own access_token), its send-rate limiter and quota, and
/// its pause after an alert (48001, 45009, …: one account's failure pauses that account only).
public final class WorkerAccount: Sendable {
    public let appID: String
    public let store: SessionStore
    let rules: ReplyRules
    let decisionService: DecisionService?
    let sender: Sender
    public let replyMode: ReplyMode
    /// The account's sends a second, shared by every worker (nil: no limit).
    public let limiter: SendRateLimiter?
    /// WeChat's daily customer-service quota for the account (for the metrics and alert).
    public let dailyQuota: Int
    /// What the account was built from (a reload keeps an account whose settings did not change).
    let settings: WorkerAccountSettings?
    private let paused = Mutex<Date?>(nil)
    /// The Beijing day of the count `quotaUsed` shows.
    private let quotaDayShown = Mutex<String?>(nil)
    let replies, quotaExhausted: CoreMetrics.Counter
    let quotaUsed: CoreMetrics.Gauge
    let rateWait: CoreMetrics.Timer

    public init(
        appID: String, store: SessionStore, sender: Sender, rules: ReplyRules, decisionService: DecisionService? = nil,
        replyMode: ReplyMode = .customerService, limiter: SendRateLimiter? = nil, dailyQuota: Int = 500_000,
        metrics: WorkerMetrics, settings: WorkerAccountSettings? = nil
    ) {
        self.appID = appID
        self.store = store
        self.sender = sender
        self.rules = rules
        self.decisionService = decisionService
        self.replyMode = replyMode
        self.limiter = limiter
        self.dailyQuota = dailyQuota
        self.settings = settings
        let f = PrometheusMetricsFactory(registry: metrics.registry)
        let account = [("appid", appID)]
        replies = CoreMetrics.Counter(label: "wechat_worker_account_replies_total", dimensions: account, factory: f)
        quotaExhausted = CoreMetrics.Counter(label: "wechat_worker_quota_exhausted_total", dimensions: account, factory: f)
        quotaUsed = CoreMetrics.Gauge(label: "wechat_worker_quota_used", dimensions: account, factory: f)
        rateWait = CoreMetrics.Timer(label: "wechat_worker_rate_wait_seconds", dimensions: account, factory: f)
        CoreMetrics.Gauge(label: "wechat_worker_quota_limit", dimensions: account, factory: f).record(dailyQuota)
    }

    /// Whether sends are paused after an alert (48001, 45009, …).
    var isPaused: Bool { paused.withLock { $0 }.map { $0 > Date() } ?? false }

    func pause(for seconds: TimeInterval) { paused.withLock { $0 = Date().addingTimeInterval(seconds) } }

    /// Takes over `other`'s pause (the same account rebuilt by a reload with other settings).
    func inheritPause(from other: WorkerAccount) {
        let until = other.paused.withLock { $0 }
        paused.withLock { $0 = until }
    }

    /// Before `/metrics` is rendered: a count of an earlier day (this worker sent nothing for
    /// the account since WeChat's midnight) shows 0, not yesterday's total.
    func refreshQuotaGauge(now: Date = Date()) {
        let today = QuotaDay.today(now)
        let stale = quotaDayShown.withLock { day -> Bool in
            guard let shown = day, shown != today else { return false }
            day = today
            return true
        }
        if stale { quotaUsed.record(0) }
    }

    /// A send WeChat accepted, counted today (`today`: the account's total, from the finished
    /// mark's script; 0 when the mark was already there).
    func countSend(today: Int64) {
        replies.increment()
        guard today > 0 else { return }
        quotaDayShown.withLock { $0 = QuotaDay.today() }
        quotaUsed.record(today)
    }
}

/// The day WeChat's daily quota counts in: Beijing time (UTC+8, when the quota resets), as
/// `yyyymmdd`; the text is made once a day, not per send.
enum QuotaDay {
    private static let cache = Mutex<(day: Int64, text: String)?>(nil)

    static func today(_ date: Date = Date()) -> String {
        let day = (Int64(date.timeIntervalSince1970) + 8 * 3600).quotientAndRemainder(dividingBy: 86_400).quotient
        if let c = cache.withLock({ $0 }), c.day == day { return c.text }
        var calendar = Calendar(identifier: .gregorian)
        calendar.timeZone = TimeZone(secondsFromGMT: 8 * 3600) ?? .gmt
        let c = calendar.dateComponents([.year, .month, .day], from: date)
        let text = String(format: "%04d%02d%02d", c.year ?? 0, c.month ?? 0, c.day ?? 0)
        cache.withLock { $0 = (day, text) }
        return text
    }
}

/// The per-account settings a worker derives from its configuration: the account's own keys
/// in `WECHAT_ACCOUNTS_FILE` where set, else the worker's variables.
public struct WorkerAccountSettings: Sendable, Equatable {
    public var appID: String
    /// The rules file's text (nil: the worker's rules), which ``rules`` was parsed from.
    public var rulesText: String?
    public var rules: ReplyRules
    public var decideURL: String?
    public var replyMode: ReplyMode
    /// Sends a second (0: no limit) and the burst above it.
    public var sendRate: Double
    public var sendBurst: Int
    public var dailyQuota: Int

    public static func == (a: Self, b: Self) -> Bool {
        (a.appID, a.rulesText, a.decideURL, a.replyMode) == (b.appID, b.rulesText, b.decideURL, b.replyMode)
            && (a.sendRate, a.sendBurst, a.dailyQuota) == (b.sendRate, b.sendBurst, b.dailyQuota)
    }
}

/// A send-rate limit shared by every worker of an account: GCRA in Redis (one script per send,
/// with Redis's clock, so workers on hosts whose clocks differ agree).
///
/// ``reserve()`` always takes a slot and says how long to wait for it: slots are handed out in
/// the order they are asked for, so a waiting message waits exactly as long as the rate
/// requires (no retry loop that another worker could keep winning). A reserved slot that is not
/// used (the worker stopped meanwhile) only lowers the rate.
public struct SendRateLimiter: Sendable {
    let redis: RedisPool
    let key: String
    /// Microseconds between sends, and how far ahead of schedule a burst may go.
    let interval: Int64
    let tolerance: Int64

    public init(redis: RedisPool, key: String, rate: Double, burst: Int) {
        self.redis = redis
        self.key = key
        // Configurations allow 0.001…100,000 a second and bursts up to 100,000: at most 10⁹ µs
        // apart and 10¹⁴ µs ahead, exact in Lua's doubles (below 2⁵³). Clamped here as well.
        let perSecond = min(max(rate, 0.001), 1_000_000)
        interval = max(1, Int64((1_000_000 / perSecond).rounded()))
        tolerance = Int64(min(max(0, burst - 1), 100_000)) * interval
    }

    /// Reserves the next slot; returns how long until it (zero: send now).
    public func reserve() async throws -> Duration {
        let reply = try await redis.eval(Self.script, keys: [key], arguments: [.init("\(interval)"), .init("\(tolerance)")])
        guard let micros = reply.int else { throw RedisError(.protocolError, "unexpected answer from the rate limiter") }
        return .microseconds(max(0, micros))
    }

    /// KEYS[1] holds the theoretical arrival time (µs since the epoch, Redis's clock).
    static let script = RedisScript(
        """
        local t = redis.call('TIME')
        local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
        local interval = tonumber(ARGV[1])
        local tolerance = tonumber(ARGV[2])
        local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
        if tat < now then tat = now end
        local nextTat = tat + interval
        redis.call('SET', KEYS[1], string.format('%d', nextTat), 'PX', math.floor((nextTat - now) / 1000) + 1000)
        local wait = tat - tolerance - now
        if wait < 0 then wait = 0 end
        return wait
        """)
}
