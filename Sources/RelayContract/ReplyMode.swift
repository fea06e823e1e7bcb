/// How a worker's replies go out (`WORKER_REPLY_MODE`; docs/worker.md, "Passive replies"). Shared
/// with the ingress, which reads the variable too (the default of accounts without `reply_mode`).
public enum ReplyMode: String, Sendable, CaseIterable {
    /// Through the customer-service API only (the default).
    case customerService = "customer-service"
    /// Offered to the ingress that waits for the push (`INGRESS_REPLY_WAIT`); through the API
    /// when the ingress did not take it.
    case passiveFirst = "passive-first"
    /// Offered to the ingress only, again on WeChat's retries of the push; never the API. A reply
    /// no push took is dropped and counted.
    case passiveOnly = "passive-only"
}
