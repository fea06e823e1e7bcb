import CoreMetrics
import Metrics
import Prometheus
import Synchronization
import RelayCore

/// The ingress's metrics, in a Prometheus registry of its own (so tests can
/// build several apps in one process). Handles are made once, not per request.
public struct IngressMetrics: Sendable {
    /// How a request ended; the `outcome` label of `wechat_ingress_requests_total`.
    public enum Outcome: String, Sendable, CaseIterable {
        case accepted, verified, forbidden, badRequest = "bad_request", tooLarge = "too_large", unavailable
        /// A path `/wechat/<appid>` of no configured account (404).
        case unknownAccount = "unknown_account"
    }

    public let registry: PrometheusCollectorRegistry
    private let requests: [Outcome: CoreMetrics.Counter]
    private let publishLatency: CoreMetrics.Timer
    private let bodySizes: CoreMetrics.Recorder
    private let inFlight: CoreMetrics.Gauge
    /// Publishes tried again within the confirm deadline (a nack, no connection, a lost confirm):
    /// `wechat_ingress_publish_retries_total`.
    let republished: CoreMetrics.Counter
    /// Pushes that waited for a passive reply (`INGRESS_REPLY_WAIT`), by how the wait ended:
    /// `wechat_ingress_passive_total{outcome="replied"|"timed_out"}`; offers that came too late
    /// (declined) are `outcome="late_offer"`.
    let passiveReplied, passiveTimedOut, passiveLateOffer: CoreMetrics.Counter
    /// How long a push waited for its passive reply: `wechat_ingress_reply_wait_seconds`.
    let replyWait: CoreMetrics.Timer

    public init(registry: PrometheusCollectorRegistry = PrometheusCollectorRegistry()) {
        self.registry = registry
        let factory = PrometheusMetricsFactory(registry: registry)
        var requests: [Outcome: CoreMetrics.Counter] = [:]
        for outcome in Outcome.allCases {
            requests[outcome] = CoreMetrics.Counter(
                label: "wechat_ingress_requests_total", dimensions: [("outcome", outcome.rawValue)], factory: factory)
        }
        self.requests = requests
        publishLatency = CoreMetrics.Timer(label: "wechat_ingress_publish_seconds", factory: factory)
        bodySizes = CoreMetrics.Recorder(label: "wechat_ingress_body_bytes", dimensions: [], aggregate: true, factory: factory)
        inFlight = CoreMetrics.Gauge(label: "amqp_confirms_in_flight", factory: factory)
        republished = CoreMetrics.Counter(label: "wechat_ingress_publish_retries_total", factory: factory)
        func passive(_ outcome: String) -> CoreMetrics.Counter {
            CoreMetrics.Counter(label: "wechat_ingress_passive_total", dimensions: [("outcome", outcome)], factory: factory)
        }
        passiveReplied = passive("replied")
        passiveTimedOut = passive("timed_out")
        passiveLateOffer = passive("late_offer")
        replyWait = CoreMetrics.Timer(label: "wechat_ingress_reply_wait_seconds", factory: factory)
    }

    func count(_ outcome: Outcome) { requests[outcome]?.increment() }

    /// Pushes accepted per account: `wechat_ingress_accepted_total{appid}`.
    func accepted(appID: String) {
        let counter = perAccount.withLock { m in
            if let c = m[appID] { return c }
            let c = CoreMetrics.Counter(
                label: "wechat_ingress_accepted_total", dimensions: [("appid", appID)], factory: PrometheusMetricsFactory(registry: registry))
            m[appID] = c
            return c
        }
        counter.increment()
    }
    private let perAccount = LockedValue<[String: CoreMetrics.Counter]>([:])
    func published(after d: Duration) { publishLatency.recordNanoseconds(d.wholeNanoseconds) }
    func body(_ bytes: Int) { bodySizes.record(bytes) }

    /// Renders the Prometheus text format, with the confirms-in-flight gauge read now.
    func render(confirmsInFlight: Int) -> String {
        inFlight.record(confirmsInFlight)
        return registry.emitToString()
    }
}
