import AMQP
import AsyncHTTPClient
import CoreMetrics
import Foundation
import Logging
import Prometheus
import Redis
import RelayCore
import ServiceLifecycle
import Synchronization
import TokenClient
import WeChat
import RelayContract
import RelayAMQP

/// Logic that rules cannot express. Handlers run before the rules, in order;
/// the first that returns a decision wins, `nil` passes the message on.
///
/// ```swift
/// struct EchoHandler: MessageHandler {
///     func decide(_ message: InboundMessage, session: SessionSnapshot) async throws -> ReplyRules.Decision? {
///         guard case .text(let content) = message.kind, content.hasPrefix("echo ") else { return nil }
///         return .init(reply: .text(to: message.fromUserName, String(content.dropFirst(5))), setState: nil)
///     }
/// }
/// ```
/// Decisions must depend only on the message and the snapshot: a redelivered
/// message is decided again from the same snapshot.
public protocol MessageHandler: Sendable {
    func decide(_ message: InboundMessage, session: SessionSnapshot) async throws -> ReplyRules.Decision?
}

/// The back-off of a message's retries, and the delay queues of earlier versions.
///
/// Retries wait in the worker, holding their user's place (docs/worker.md, "Order through
/// retries"); ``delays`` are their back-off. The delay queues are still declared so that
/// retries an earlier version published drain back into the shards (they dead-letter to
/// the inbound exchange with their shard routing key); nothing is published to them now.
///
/// The delay queues are quorum queues with at-least-once dead-lettering (RabbitMQ 3.10+):
/// classic dead-lettering is at-most-once, so a node crashing as a retry expired would
/// drop it. At-least-once dead-lettering requires `x-overflow: reject-publish`.
public struct RetryTopology: Sendable {
    public let base: WeChatTopology
    /// Delays before the 1st, 2nd and 3rd retry; after that the message is dead-lettered.
    /// (While Redis or tokend is unreachable a message waits the last delay, as often as needed.)
    public var delays: [Duration]

    /// 1 s, 5 s, 30 s.
    public static let defaultDelays: [Duration] = [.seconds(1), .seconds(5), .seconds(30)]

    public init(base: WeChatTopology, delays: [Duration] = RetryTopology.defaultDelays) {
        precondition(!delays.isEmpty)
        self.base = base
        self.delays = delays
    }

    public func exchange(_ i: Int) -> String { "\(base.prefix).retry.\(i)" }
    public func queue(_ i: Int) -> String { "\(base.prefix).retry.\(i).q" }

    public var topology: AMQPTopology {
        var t = base.inbound
        for (i, d) in delays.enumerated() {
            t.exchanges.append(.init(exchange(i), type: "fanout"))
            t.queues.append(
                .init(
                    queue(i), kind: .quorum, deadLetterExchange: base.inboundExchange, messageTTL: d.wholeNanoseconds / 1_000_000,
                    arguments: ["x-dead-letter-strategy": .string("at-least-once"), "x-overflow": .string("reject-publish")]))
            t.bindings.append(.init(queue: queue(i), exchange: exchange(i)))
        }
        return t
    }
}

/// Header names the worker adds.
public enum WorkerHeader {
    public static let retryCount = "x-retry-count"
    public static let reason = "x-relay-reason"
    public static let originalRoutingKey = "x-original-routing-key"
    /// On a dead letter whose user's later messages went on without it: `skipped`.
    public static let order = "x-relay-order"
}

/// What a worker does with a message whose earlier send may have reached WeChat
/// (`WORKER_UNCERTAIN_SEND`): the send API has no idempotency key, so one of the two.
public enum UncertainSend: String, Sendable {
    /// Send it (again): a duplicate is better than silence. The default.
    case resend
    /// Count it as answered and go on.
    case skip
}

/// The worker's metrics.
public struct WorkerMetrics: Sendable {
    public let registry: PrometheusCollectorRegistry
    let consumed, replied, duplicates, retried, deadLettered, skipped, noReply, replayedQuery, uncertain, fenced, markRetries, heartbeatFailures:
        CoreMetrics.Counter
    let sendLatency, endToEnd: CoreMetrics.Timer
    /// `wechat_worker_replies_total{channel="passive"|"customer_service"}`: replies that went out, by channel.
    let repliedPassively, repliedViaAPI: CoreMetrics.Counter
    /// `wechat_worker_passive_total{outcome=…}`: `missed` (an offer not taken, or no ingress
    /// waiting), `dropped` (passive-only: no push took it, after WeChat's last retry),
    /// `undeliverable` (passive-only: a reply with no passive form), `reoffered` (a reply taken
    /// passively offered again to WeChat's retry of its push), `reoffer_skipped` (not offered
    /// again: a later message of the user was answered since).
    let passiveMissed, passiveDropped, passiveUndeliverable, passiveReoffered, passiveReofferSkipped: CoreMetrics.Counter

    public init(registry: PrometheusCollectorRegistry = PrometheusCollectorRegistry()) {
        self.registry = registry
        let f = PrometheusMetricsFactory(registry: registry)
        func counter(_ outcome: String) -> CoreMetrics.Counter {
            CoreMetrics.Counter(label: "wechat_worker_messages_total", dimensions: [("outcome", outcome)], factory: f)
        }
        consumed = CoreMetrics.Counter(label: "wechat_worker_consumed_total", factory: f)
        replied = counter("replied")
        duplicates = counter("duplicate")
        retried = counter("retried")
        deadLettered = counter("dead_lettered")
        skipped = counter("skipped_window")
        noReply = counter("no_reply")
        replayedQuery = counter("replayed_query")
        uncertain = counter("uncertain")
        fenced = counter("fenced")
        markRetries = CoreMetrics.Counter(label: "wechat_worker_mark_retries_total", factory: f)
        heartbeatFailures = CoreMetrics.Counter(label: "wechat_worker_heartbeat_failures_total", factory: f)
        sendLatency = CoreMetrics.Timer(label: "wechat_worker_send_seconds", factory: f)
        endToEnd = CoreMetrics.Timer(label: "wechat_worker_end_to_end_seconds", factory: f)
        repliedPassively = CoreMetrics.Counter(label: "wechat_worker_replies_total", dimensions: [("channel", "passive")], factory: f)
        repliedViaAPI = CoreMetrics.Counter(label: "wechat_worker_replies_total", dimensions: [("channel", "customer_service")], factory: f)
        func passive(_ outcome: String) -> CoreMetrics.Counter {
            CoreMetrics.Counter(label: "wechat_worker_passive_total", dimensions: [("outcome", outcome)], factory: f)
        }
        passiveMissed = passive("missed")
        passiveDropped = passive("dropped")
        passiveUndeliverable = passive("undeliverable")
        passiveReoffered = passive("reoffered")
        passiveReofferSkipped = passive("reoffer_skipped")
    }
}

/// Consumes the shard queues and turns messages into replies.
///
/// It uses two broker connections, as RabbitMQ advises: `amqp` consumes and acknowledges,
/// `publisher` publishes retries and dead letters. On one connection, a retry published
/// while the broker blocks publishing (a resource alarm) would block the acks behind it,
/// and nothing would drain.
public final class Worker: Sendable {
    /// Consumes the shard queues (and acknowledges).
    public let amqp: AMQPConnection
    /// Publishes retries and dead letters.
    public let publisher: AMQPConnection
    public let retry: RetryTopology
    public let metrics: WorkerMetrics
    let handlers: [any MessageHandler]
    /// The accounts served, by AppID (replaced whole by ``reload(_:)``), and the one a message
    /// without an AppID (published before accounts existed) belongs to.
    private let accounts: Mutex<(live: [String: WorkerAccount], retired: [String: (account: WorkerAccount, until: ContinuousClock.Instant)])>
    private let defaultAppID: String
    /// How long an account removed by a reload still serves the messages already accepted for it.
    static let retiredAccountGrace: Duration = .seconds(600)
    /// The default account's store (its deployment-wide keys: the membership, the fences).
    public let store: SessionStore
    public let concurrency: Int
    let logger: Logger
    /// This worker's identity in the membership and on its claims.
    public let id = UUID().uuidString
    /// `WORKER_UNCERTAIN_SEND`.
    public let uncertainSend: UncertainSend
    /// How long a claim holds other workers off: well past the sender's timeout.
    let claimLease: Duration
    /// `WORKER_REPLY_MODE` (each account may set its own).
    public let replyMode: ReplyMode
    /// The passive-reply handshake (when an account, or the worker's default, is in a passive mode).
    let offers: PassiveOffers?
    /// How long a hand-over (and the shutdown) waits for the jobs in hand before cancelling them.
    let handoverDeadline: Duration
    private let consuming = Atomic<Int>(0)
    private let owned = Mutex<Set<Int>>([])
    private let ownershipWaiters = Mutex<[(count: Int, continuation: CheckedContinuation<Void, Never>)]>([])
    private let hasDeadRunner = Atomic<Bool>(false)
    private let history = Mutex<[Int]>([])
    private let timing = Mutex<(interval: Duration, ttl: Duration)>((.seconds(2), .seconds(10)))
    /// Set once the worker is shutting down: in-process retries (the finished-mark) give up after a few more tries.
    let stopping = Flag()

    /// A worker of one account (the single-account variables' shape).
    public convenience init(
        amqp: AMQPConnection, publisher: AMQPConnection, store: SessionStore, sender: Sender, rules: ReplyRules, handlers: [any MessageHandler] = [],
        decisionService: DecisionService? = nil,
        topology: WeChatTopology, concurrency: Int, metrics: WorkerMetrics, logger: Logger,
        retryDelays: [Duration] = RetryTopology.defaultDelays, uncertainSend: UncertainSend = .resend,
        claimLease: Duration = .seconds(30), handoverDeadline: Duration = .seconds(20), replyMode: ReplyMode = .customerService,
        limiter: SendRateLimiter? = nil
    ) {
        let account = WorkerAccount(
            appID: store.appID, store: store, sender: sender, rules: rules, decisionService: decisionService, replyMode: replyMode,
            limiter: limiter, metrics: metrics)
        self.init(
            amqp: amqp, publisher: publisher, accounts: [account], handlers: handlers, topology: topology, concurrency: concurrency,
            metrics: metrics, logger: logger, retryDelays: retryDelays, uncertainSend: uncertainSend, claimLease: claimLease,
            handoverDeadline: handoverDeadline, replyMode: replyMode)
    }

    /// A worker of several accounts (the first one also takes messages that carry no AppID).
    /// - Parameter replyMode: with any passive mode here, the worker sets up the passive-reply
    ///   handshake (so that a reload may turn an account passive); accounts choose their own.
    public init(
        amqp: AMQPConnection, publisher: AMQPConnection, accounts: [WorkerAccount], handlers: [any MessageHandler] = [],
        topology: WeChatTopology, concurrency: Int, metrics: WorkerMetrics, logger: Logger,
        retryDelays: [Duration] = RetryTopology.defaultDelays, uncertainSend: UncertainSend = .resend,
        claimLease: Duration = .seconds(30), handoverDeadline: Duration = .seconds(20), replyMode: ReplyMode = .customerService
    ) {
        precondition(!accounts.isEmpty, "a worker serves at least one account")
        self.amqp = amqp
        self.publisher = publisher
        self.accounts = Mutex((Dictionary(accounts.map { ($0.appID, $0) }) { first, _ in first }, [:]))
        self.defaultAppID = accounts[0].appID
        self.store = accounts[0].store
        self.handlers = handlers
        self.retry = RetryTopology(base: topology, delays: retryDelays)
        self.concurrency = max(1, concurrency)
        self.metrics = metrics
        self.logger = logger
        self.uncertainSend = uncertainSend
        self.claimLease = claimLease
        self.handoverDeadline = handoverDeadline
        let passive = replyMode != .customerService || accounts.contains { $0.replyMode != .customerService }
        self.replyMode = passive && replyMode == .customerService ? .passiveFirst : replyMode
        offers =
            !passive
            ? nil : PassiveOffers(consuming: amqp, publisher: publisher, prefix: topology.prefix, logger: logger)
    }

    /// The account a delivery belongs to (its `app-id`; none: the first account), or nil when
    /// that account is not configured (here, yet: the ingress may have reloaded first).
    func account(for delivery: AMQPDelivery) -> WorkerAccount? {
        let appID = delivery.message.properties.appID ?? defaultAppID
        return accounts.withLock { a in
            if let live = a.live[appID] { return live }
            guard let retired = a.retired[appID], retired.until > .now else { return nil }
            return retired.account
        }
    }

    /// The accounts served now, sorted by AppID.
    public var servedAccounts: [WorkerAccount] { accounts.withLock { Array($0.live.values) }.sorted { $0.appID < $1.appID } }

    /// Replaces the accounts (a reload of `WECHAT_ACCOUNTS_FILE`). A message in hand finishes
    /// with the account it started with. An account removed keeps serving the messages already
    /// accepted for it (the ingress answers its path 404 once it reloaded) for
    /// ``retiredAccountGrace``; after that, and for an account not configured here at all (a
    /// worker that has not reloaded yet, while the ingress has), a message waits through the
    /// retries (1 s, 5 s, 30 s) and is then dead-lettered, replayable once the account is back —
    /// never dropped. An account in a passive mode needs a worker started with the handshake
    /// (any passive mode configured).
    public func reload(_ next: [WorkerAccount]) throws {
        if offers == nil, let passive = next.first(where: { $0.replyMode != .customerService }) {
            throw ConfigurationError(
                variable: "WECHAT_ACCOUNTS_FILE",
                reason: "\(passive.appID): reply_mode \(passive.replyMode.rawValue) needs a worker started with a passive mode (restart it)")
        }
        let live = Dictionary(next.map { ($0.appID, $0) }) { first, _ in first }
        accounts.withLock { a in
            let now = ContinuousClock.now
            // An account rebuilt with other settings keeps its pause after an alert (45009, 48001).
            for (appID, account) in live {
                if let old = a.live[appID] ?? a.retired[appID]?.account, old !== account { account.inheritPause(from: old) }
            }
            var retired = a.retired.filter { $0.value.until > now && live[$0.key] == nil }
            for (appID, account) in a.live where live[appID] == nil {
                retired[appID] = (account, now + Self.retiredAccountGrace)
            }
            a = (live, retired)
        }
    }

    /// An account kept across a reload when its settings did not change (its pause, its token cache).
    public func existingAccount(_ appID: String, settings: WorkerAccountSettings) -> WorkerAccount? {
        accounts.withLock { $0.live[appID] }.flatMap { $0.settings == settings ? $0 : nil }
    }

    /// Whether the worker is taking part (for `/readyz`): connected, running its shard
    /// assignment, a live consumer for every shard it owns, and in the passive modes its
    /// verdict queue consumed (without it no offer can be made).
    public var isConsuming: Bool {
        amqp.isConnected && consuming.load(ordering: .relaxed) > 0 && !hasDeadRunner.load(ordering: .relaxed)
            && offers?.isReady ?? true
    }

    /// The shards this worker consumes right now.
    public var ownedShards: Set<Int> { owned.withLock { $0 } }

    /// Returns once this worker consumes exactly `count` shards (after a rebalance).
    public func waitUntilOwning(_ count: Int) async {
        await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
            let now = owned.withLock { $0.count }
            if now == count { c.resume() } else { ownershipWaiters.withLock { $0.append((count, c)) } }
        }
    }

    /// How many shards this worker owned after each change (for tests).
    package var ownershipHistory: [Int] { history.withLock { $0 } }

    private func setOwned(_ shards: Set<Int>) {
        let changed = owned.withLock { o -> Bool in
            defer { o = shards }
            return o != shards
        }
        if changed { history.withLock { $0.append(shards.count) } }
        let ready = ownershipWaiters.withLock { w -> [CheckedContinuation<Void, Never>] in
            let hit = w.filter { $0.count == shards.count }.map(\.continuation)
            w.removeAll { $0.count == shards.count }
            return hit
        }
        for c in ready { c.resume() }
    }

    /// The membership heartbeat's timing (tests shorten it).
    package var membershipTiming: (interval: Duration, ttl: Duration) {
        get { timing.withLock { $0 } }
        set { timing.withLock { $0 = newValue } }
    }

    /// Consumes its share of the shards until cancelled or graceful shutdown, rebalancing
    /// as workers come and go; then leaves the membership, hands every shard back
    /// (finishing the jobs already started, all shards at once; deliveries not yet started go back with the channels) and returns.
    ///
    /// The heartbeat runs in a task of its own, so a slow handover (a send in flight
    /// on a shard being released) never makes this worker look dead to the others.
    public func run() async throws {
        // Waits (up to a minute) through a broker that drops the connection while declaring; a
        // graceful shutdown ends the wait.
        try await cancelWhenGracefulShutdown { try await self.amqp.declare(self.retry.topology) }
        // The verdict queue of the passive-reply handshake lives as long as this run.
        let verdicts = offers.map { offers in Task { await offers.consumeVerdicts() } }
        defer { verdicts?.cancel() }
        let limiter = Limiter(permits: concurrency)
        var configured = Membership(redis: store.redis, key: store.keys.workers, id: id)
        (configured.interval, configured.ttl) = membershipTiming
        let membership = configured
        let view = LockedValue<[String]?>(nil)
        let interval = membership.interval
        consuming.store(1, ordering: .relaxed)
        defer { consuming.store(0, ordering: .relaxed) }
        stopping.clear()
        // `stopping` is set the moment shutdown starts (not when the loop notices), so that a
        // send's mark that keeps failing cannot hold a hand-over, and with it the shutdown, forever.
        let stopping = self.stopping
        await withTaskCancellationHandler {
            await withGracefulShutdownHandler {
                await self.assign(membership: membership, view: view, interval: interval, limiter: limiter)
            } onGracefulShutdown: {
                stopping.set()
            }
        } onCancel: {
            stopping.set()
        }
    }

    private func assign(membership: Membership, view: LockedValue<[String]?>, interval: Duration, limiter: Limiter) async {
        var runners: [Int: ShardRunner] = [:]
        // Every shard's runner is a task of this group; the heartbeat is a group of its own,
        // stopped first on shutdown (a ZADD in flight could re-add us after the ZREM).
        await withDiscardingTaskGroup { shards in
            await withTaskGroup(of: Void.self) { heartbeat in
                heartbeat.addTask { [logger, metrics] in
                    while !Task.isCancelled {
                        do {
                            let members = try await membership.heartbeat()
                            view.set(members)
                        } catch {
                            metrics.heartbeatFailures.increment()
                            logger.warning("membership heartbeat failed: keeping the current shards", metadata: ["error": "\(error)"])
                        }
                        try? await Task.sleep(for: membership.interval)
                    }
                }
                var first = true
                var tick = 0
                while !Task.isCancelled, !Task.isShuttingDownGracefully {
                    if !first { try? await cancelWhenGracefulShutdown { try await Task.sleep(for: interval / 4) } }
                    first = false
                    guard !Task.isShuttingDownGracefully, let members = view.get() else { continue }
                    let wanted = Membership.shards(for: membership.id, members: members, count: retry.base.shardCount)
                    logger.trace("assignment tick", metadata: ["worker.members": "\(members.count)", "worker.wanted": "\(wanted.sorted())"])
                    // Replace consumers that ended (the broker cancelled them, or a re-subscribe failed).
                    // Every few ticks, also ask the broker: a shard queue of ours with no consumer at all
                    // (deleted and declared again without a cancel reaching us) gets a new one.
                    tick += 1
                    if tick % 4 == 0 {
                        for (shard, runner) in runners where runner.isAlive {
                            // Only a definite answer counts: a failed check is not "no consumer".
                            if let info = try? await amqp.queueInfo(retry.base.shardQueue(shard)), info.consumerCount == 0 {
                                runner.markEnded()
                            }
                        }
                    }
                    for (shard, runner) in runners where !runner.isAlive {
                        logger.warning("shard consumer ended; starting a new one", metadata: ["worker.shard": "\(shard)"])
                        await runner.release(deadline: handoverDeadline)
                        runners[shard] = nil
                    }
                    let leaving = runners.filter { !wanted.contains($0.key) }
                    await release(Array(leaving.values))
                    for shard in leaving.keys {
                        runners[shard] = nil
                        logger.info("shard handed over", metadata: ["worker.shard": "\(shard)"])
                    }
                    for shard in wanted.sorted() where runners[shard] == nil {
                        do {
                            let runner = try await ShardRunner(shard: shard, worker: self, limiter: limiter)
                            runners[shard] = runner
                            shards.addTask { await runner.run() }
                        } catch {
                            logger.error("cannot consume shard", metadata: ["worker.shard": "\(shard)", "error": "\(error)"])
                        }
                    }
                    hasDeadRunner.store(wanted.contains { runners[$0]?.isAlive != true }, ordering: .relaxed)
                    setOwned(Set(runners.keys))
                }
                heartbeat.cancelAll()
            }
            // Shutting down: leave the membership first, so that the others take the shards
            // as soon as this worker's channels close; then hand every shard back at once.
            await membership.leave()
            stopping.set()
            await release(Array(runners.values))
            runners.removeAll()
            setOwned([])
        }
    }

    private func release(_ runners: [ShardRunner]) async {
        await withTaskGroup(of: Void.self) { group in
            for r in runners { group.addTask { await r.release(deadline: self.handoverDeadline) } }
        }
    }

    /// What one attempt at a message came to.
    enum Step {
        /// Finished (acked, or given back): the user's next message may go.
        case done
        /// Try again after a back-off, holding the user's place; `counts` is false for an
        /// outage of ours (Redis, tokend), which never uses up the message's retries.
        case retry(String, counts: Bool)
    }

    /// Handles one delivery to a final outcome, in its user's turn.
    ///
    /// A message that must be retried waits here, holding its user's place: the user's later
    /// messages wait behind it (other users go on), and its delivery stays unacknowledged, so
    /// if this worker dies or hands the shard over, the broker gives it to the next consumer
    /// *before* the user's later messages. After ``RetryTopology/delays`` it is dead-lettered
    /// (marked `x-relay-order: skipped`) and the user's later messages go on.
    func process(_ delivery: AMQPDelivery, on shard: ShardRunner) async {
        // It may have waited behind its user's earlier messages while its connection broke:
        // the broker has it back (and may have handed it to another worker already).
        guard !delivery.isStale else {
            return logger.debug("skipping a delivery of a broken connection; the broker redelivers it")
        }
        // Handing the shard over (or stopping): a job that has not started leaves its delivery
        // unacknowledged; closing the channel gives every such delivery back at once, in the
        // order they came (a retry that was waiting first). Processing it here could overtake
        // that retry at the next consumer; a `nack` one by one is redelivered to this same
        // consumer until its channel closes, and comes back out of order.
        if shard.draining.isSet || stopping.isSet {
            return logger.debug("handing over: a delivery not yet started goes back with the channel")
        }
        metrics.consumed.increment()
        let message: InboundMessage
        do {
            message = try InboundMessage(xml: delivery.message.body)
        } catch {
            await deadLetter(delivery, reason: "malformed message: \(error)")
            return
        }
        var retries = 0
        var outageWaits = 0
        while true {
            await shard.limiter.acquire()
            // A job cancelled by a hand-over's deadline while it waited for a permit does nothing:
            // its delivery goes back unacknowledged.
            if Task.isCancelled {
                shard.limiter.release()
                return
            }
            let step: Step
            let account = account(for: delivery)
            do {
                if let account {
                    step = try await handle(message, delivery, shard, account)
                } else {
                    step = .retry("no account \(delivery.message.properties.appID ?? "-") is configured (WECHAT_ACCOUNTS_FILE)", counts: true)
                }
            } catch let error as AMQPError where error.code == .staleDelivery {
                // The connection it came on broke while it was processed: the broker has put it
                // back and delivers it again; the message record makes that a duplicate if it was answered.
                logger.debug("delivery of a broken connection; the broker redelivers it", metadata: ["wechat.dedup_key": "\(message.dedupID)"])
                step = .done
            } catch let error as RedisError where error.isRetriable {
                // Redis is unreachable, or answered "try later" (LOADING, READONLY, BUSY, …): not
                // this message's fault, so it waits as long as the outage lasts, without using up its retries.
                step = .retry("Redis unavailable: \(error)", counts: false)
            } catch let error as DecisionServiceError where error.isOutage {
                // The decision service cannot be reached: an outage, waited out like Redis's.
                step = .retry("\(error)", counts: false)
            } catch {
                step = .retry("processing failed: \(error)", counts: true)
            }
            shard.limiter.release()
            guard case .retry(let reason, let counts) = step else { return }
            if counts { retries += 1 }
            if retries > retry.delays.count {
                await deadLetter(delivery, reason: "gave up after \(retries - 1) retries: \(reason)", skippedInOrder: true)
                try? await account?.store.releaseClaim(message, worker: id)
                return
            }
            metrics.retried.increment()
            // An outage of ours is waited out from 1 s, doubling up to the longest delay.
            let longest = retry.delays[retry.delays.count - 1]
            var delay = counts ? retry.delays[retries - 1] : min(longest, .seconds(1) * (1 << min(outageWaits, 16)))
            if !counts { outageWaits += 1 }
            if delay <= .zero { delay = .milliseconds(100) }
            logger.info(
                "retrying in the worker; the user's later messages wait",
                metadata: ["wechat.dedup_key": "\(message.dedupID)", "attempt": "\(retries)", "reason": "\(reason)"])
            guard await shard.pause(delay, for: delivery) else {
                // Handing over or stopping: left unacknowledged, it goes back when the channel closes,
                // at the head of its user's line.
                return logger.info("retry handed back with the shard (hand-over or shutdown)", metadata: ["wechat.dedup_key": "\(message.dedupID)"])
            }
        }
    }

    private func handle(_ message: InboundMessage, _ delivery: AMQPDelivery, _ shard: ShardRunner, _ account: WorkerAccount) async throws -> Step {
        let store = account.store
        let passiveMode = isPassive(account)
        let now = Int64(Date().timeIntervalSince1970)
        let signedQuery = delivery.message.properties.headers[WeChatTopology.Header.signedQuery]?.stringValue
        let fence = try await shard.fence(for: delivery)
        let observation = try await store.observe(message, now: now, signedQuery: signedQuery, fence: fence)
        if observation.fenced { return fenced(message, delivery, shard) }
        if observation.replayedQuery {
            metrics.replayedQuery.increment()
            logger.warning(
                "message refused: its signed query was already used by another message (a replayed URL)",
                metadata: ["wechat.openid": "\(LogSafe.escape(message.fromUserName))", "wechat.dedup_key": "\(message.dedupID)"])
            try delivery.ack()
            return .done
        }
        if observation.replied {
            if observation.repliedPassively, let reply = observation.decision?.reply, let content = PassiveOffers.content(for: reply) {
                if observation.laterFinished {
                    // A later message of this user was answered since: a reply now would come out of order.
                    metrics.passiveReofferSkipped.increment()
                    logger.warning(
                        "WeChat pushed a message answered passively again, but the user's later message was answered since: not offered again (order)",
                        metadata: ["wechat.dedup_key": "\(message.dedupID)"])
                } else {
                    await reofferPassively(content, message, delivery, shard, account)
                }
            }
            metrics.duplicates.increment()
            logger.debug("duplicate dropped", metadata: ["wechat.dedup_key": "\(message.dedupID)"])
            try await store.confirmFinished(message)
            try delivery.ack()
            return .done
        }
        if !observation.isNew, observation.decision == nil { metrics.duplicates.increment() }
        var decision: ReplyRules.Decision
        // A new decision that is about to be sent is committed and claimed in one round trip.
        var preclaimed: (claim: SessionStore.Claim, start: ContinuousClock.Instant)?
        if let stored = observation.decision {
            decision = stored
        } else {
            decision = try await decide(message, observation.snapshot, account)
            // Claimed at once when it is about to go out: by the API (unless a rate limit may
            // make it wait first: then right before the send), or offered passively.
            let offered = passiveMode && decision.reply.flatMap(PassiveOffers.content(for:)) != nil
            if decision.reply != nil,
                offered || (account.limiter == nil && !account.isPaused && observation.snapshot.sendWouldFail(now: now) == nil)
            {
                let start = ContinuousClock.now
                let (stored, claim) = try await store.commitAndClaim(decision, for: message, worker: id, fence: fence, lease: claimLease)
                // Stale: nothing was committed; nothing may be marked, acked or dead-lettered either.
                if claim == .fenced { return fenced(message, delivery, shard) }
                decision = stored
                preclaimed = (claim, start)
            } else {
                do {
                    decision = try await store.commit(decision, for: message, fence: fence)
                } catch is SessionStore.FencedOut {
                    return fenced(message, delivery, shard)
                }
            }
        }
        guard let reply = decision.reply else {
            metrics.noReply.increment()
            try await store.markReplied(message, sent: false)  // also drops a claim taken above
            try delivery.ack()
            return .done
        }
        // In the passive modes, a reply with a passive form is offered to the waiting ingress
        // first; the checks of the API (paused sends, the window) apply only if it goes there.
        let passive = passiveMode ? PassiveOffers.content(for: reply) : nil
        if account.replyMode == .passiveOnly, passive == nil {
            metrics.passiveUndeliverable.increment()
            logger.warning(
                "reply has no passive form and WORKER_REPLY_MODE is passive-only: not sent",
                metadata: ["wechat.dedup_key": "\(message.dedupID)", "wechat.msg_type": "\(reply.content.msgType)"])
            try await store.markReplied(message, sent: false)  // also drops a claim taken above
            try delivery.ack()
            return .done
        }
        if passive == nil, account.isPaused {
            // Only a clean claim is given back: one taken over from a sender that stopped
            // ("uncertain") stays, so that a replay still finds the send uncertain.
            if preclaimed?.claim == .claimed { try await store.releaseClaim(message, worker: id) }
            await deadLetter(delivery, reason: "sending paused after an alert; replay when fixed")
            return .done
        }
        if passive == nil, let why = observation.snapshot.sendWouldFail(now: now) {
            metrics.skipped.increment()
            logger.info("reply skipped", metadata: ["wechat.openid": "\(message.fromUserName)", "reason": "\(why)"])
            try await store.markReplied(message, sent: false)
            try delivery.ack()
            return .done
        }
        // At most one sender at a time: claim it (with our fence) right before the send.
        var start = ContinuousClock.now
        var claimWasUncertain = false
        /// Claims the message (or takes the claim made with the commit): nil once it is ours
        /// (`start` and `claimWasUncertain` set), else the step that ends the message here.
        func claimForSend() async throws -> Step? {
            claiming: while true {
                // Counted from before the claim: a pause between Redis granting it and us reading the
                // answer must count against it.
                let claim: SessionStore.Claim
                if let first = preclaimed {
                    (claim, start) = first
                    preclaimed = nil
                } else {
                    start = ContinuousClock.now
                    claim = try await store.claim(message, worker: id, fence: fence, lease: claimLease)
                }
                switch claim {
                case .claimed:
                    break claiming
                case .uncertain:
                    // Counted once per message here (a claim we keep and take again is ours, not news).
                    if !claimWasUncertain {
                        claimWasUncertain = true
                        metrics.uncertain.increment()
                        logger.warning(
                            "an earlier send of this message may have reached WeChat (its sender stopped before recording it)",
                            metadata: ["wechat.dedup_key": "\(message.dedupID)", "worker.uncertain_send": "\(uncertainSend.rawValue)"])
                    }
                    if uncertainSend == .skip {
                        try await store.markReplied(message, sent: true)
                        try delivery.ack()
                        return .done
                    }
                    break claiming
                case .busy(let ms):
                    // Another worker is sending it (a hand-over raced us, or it paused): wait for its claim to resolve.
                    logger.info("another worker holds this message's claim; waiting", metadata: ["wechat.dedup_key": "\(message.dedupID)"])
                    // Without a permit meanwhile: a stopped peer's claims must not hold other users up.
                    shard.limiter.release()
                    let waited = await shard.pause(.milliseconds(min(max(ms, 10), 1000)), for: delivery)
                    await shard.limiter.acquire()
                    guard waited else { return .done }
                case .finished:
                    metrics.duplicates.increment()
                    try delivery.ack()
                    return .done
                case .fenced:
                    return fenced(message, delivery, shard)
                }
            }
            return nil
        }
        // The account's send-rate limit: a slot is reserved and waited for (holding the user's
        // place, not a permit) before the claim, so that the claim's lease is not spent waiting.
        if passive == nil, account.limiter != nil {
            // A claim taken with the commit (another worker's decision was stored first, and ours
            // had a passive form where the stored one has none): its result is handled now (an
            // uncertain one counted and decided), then a clean claim is given back for the wait
            // and an uncertain one kept (a death meanwhile leaves it uncertain); the claim is
            // taken again after the wait.
            if preclaimed != nil {
                if let step = try await claimForSend() { return step }
                if !claimWasUncertain { try await store.releaseClaim(message, worker: id) }
            }
            guard try await awaitSendSlot(account, shard, delivery) else {
                return .done  // handed over or stopping: the delivery goes back with the channel
            }
            // The wait may have been long: an alert meanwhile (45009, 48001) paused the account.
            if account.isPaused {
                await deadLetter(delivery, reason: "sending paused after an alert; replay when fixed")
                return .done
            }
        }
        if let step = try await claimForSend() { return step }
        if let passive {
            switch try await offerPassively(passive, message, delivery, shard, account, fence: fence, claimedAt: start) {
            case .finished(let step): return step
            case .viaAPI: break
            }
            // passive-first: not taken, so the API sends it, under the same claim.
            if account.isPaused {
                if !claimWasUncertain { try await store.releaseClaim(message, worker: id) }
                await deadLetter(delivery, reason: "sending paused after an alert; replay when fixed")
                return .done
            }
            if let why = observation.snapshot.sendWouldFail(now: Int64(Date().timeIntervalSince1970)) {
                metrics.skipped.increment()
                logger.info("reply skipped", metadata: ["wechat.openid": "\(message.fromUserName)", "reason": "\(why)"])
                try await store.markReplied(message, sent: false)
                try delivery.ack()
                return .done
            }
        }
        // passive-first's fall-back to the API, under the claim of the offer: the account's rate
        // applies. A slot that is not free now is waited for without the claim (a clean one is
        // given back; an uncertain one is kept, so that a death meanwhile still leaves it
        // uncertain), and the message is claimed again after: the lease is not spent waiting.
        if passive != nil, let limiter = account.limiter {
            let wait = try await limiter.reserve()
            account.rateWait.recordNanoseconds(wait.wholeNanoseconds)
            if wait > .zero {
                if !claimWasUncertain { try await store.releaseClaim(message, worker: id) }
                guard await waitWithoutPermit(wait, shard, delivery) else { return .done }
                if let step = try await claimForSend() { return step }
            }
        }
        // The last check before the request goes out: a claim older than half its lease (this
        // process was paused, or the token took long) may have passed to another worker.
        let lease = claimLease
        let claimedAt = start
        let outcome = await account.sender.send(reply) { ContinuousClock.now - claimedAt < lease / 2 && !Task.isCancelled }
        metrics.sendLatency.recordNanoseconds((ContinuousClock.now - start).wholeNanoseconds)
        switch outcome {
        case .sent:
            // WeChat accepted the reply: from here on it must never be sent again, so a Redis
            // error while recording it is retried here, never turned into a retry of the message.
            account.countSend(today: await markSent(message, account))
            countReplied(delivery, passively: false)
            try delivery.ack()
            return .done
        case .uncertain(let why):
            metrics.uncertain.increment()
            logger.warning(
                "no answer to a send: WeChat may have sent it",
                metadata: ["wechat.dedup_key": "\(message.dedupID)", "reason": "\(why)", "worker.uncertain_send": "\(uncertainSend.rawValue)"])
            if uncertainSend == .skip {
                await markSent(message, account)
                try delivery.ack()
                return .done
            }
            try await store.releaseClaim(message, worker: id)  // counted once; the retry is an ordinary claim
            return .retry(why, counts: true)
        case .retryLater(let why):
            try await store.releaseClaim(message, worker: id)
            return .retry(why, counts: true)
        case .unavailable(let why):
            // No token (tokend or its Redis is down): an outage of ours, not this message's fault.
            try await store.releaseClaim(message, worker: id)
            return .retry(why, counts: false)
        case .permanent(let code, let why):
            logger.warning("reply refused for good", metadata: ["wechat.openid": "\(message.fromUserName)", "wechat.errcode": "\(code)", "reason": "\(why)"])
            try await store.markReplied(message, sent: false)
            try delivery.ack()
            return .done
        case .alert(let code, let why):
            logger.critical(
                "WeChat refuses to send for this account; pausing its sends for 5 minutes (other accounts go on)",
                metadata: ["wechat.appid": "\(account.appID)", "wechat.errcode": "\(code)", "reason": "\(why)"])
            if code == WeChatErrorCode.dailyQuotaExceeded { account.quotaExhausted.increment() }
            account.pause(for: 300)
            try await store.releaseClaim(message, worker: id)
            await deadLetter(delivery, reason: "errcode \(code): \(why)")
            return .done
        }
    }

    /// A reply went out: counted by channel, with its time from the ingress's receipt.
    private func countReplied(_ delivery: AMQPDelivery, passively: Bool) {
        metrics.replied.increment()
        (passively ? metrics.repliedPassively : metrics.repliedViaAPI).increment()
        if let received = delivery.message.properties.headers[WeChatTopology.Header.receivedAtMs]?.intValue {
            metrics.endToEnd.recordMilliseconds(Int64(Date().timeIntervalSince1970 * 1000) - received)
        }
    }

    /// Whether this delivery's account may get a passive reply (the handshake is set up and the
    /// account is in a passive mode).
    private func isPassive(_ account: WorkerAccount) -> Bool { offers != nil && account.replyMode != .customerService }

    /// Waits for a slot of the account's send-rate limit (``SendRateLimiter``), holding the
    /// user's place (the delivery) but not a permit, so that other users and accounts go on.
    /// Returns false when the wait was cut by a hand-over or shutdown. No claim may be held
    /// (it is taken after the wait, so that its lease is not spent waiting).
    private func awaitSendSlot(_ account: WorkerAccount, _ shard: ShardRunner, _ delivery: AMQPDelivery) async throws -> Bool {
        guard let limiter = account.limiter else { return true }
        let wait = try await limiter.reserve()
        account.rateWait.recordNanoseconds(wait.wholeNanoseconds)
        guard wait > .zero else { return true }
        return await waitWithoutPermit(wait, shard, delivery)
    }

    /// Waits holding the user's place (the delivery) but not a permit; false when a hand-over
    /// or shutdown cut the wait (the delivery then goes back with the channel).
    private func waitWithoutPermit(_ wait: Duration, _ shard: ShardRunner, _ delivery: AMQPDelivery) async -> Bool {
        shard.limiter.release()
        let waited = await shard.pause(wait, for: delivery)
        await shard.limiter.acquire()
        return waited
    }

    /// Our fencing token is stale: another worker consumes the shard (this one was paused or
    /// cut off past the broker's heartbeat). Nothing is sent or changed; the delivery is left
    /// alone (its connection is gone, or will close, and the broker has the message).
    private func fenced(_ message: InboundMessage, _ delivery: AMQPDelivery, _ shard: ShardRunner) -> Step {
        metrics.fenced.increment()
        logger.warning(
            "fenced out: another worker consumes this shard now; not processing",
            metadata: ["wechat.dedup_key": "\(message.dedupID)"])
        // On a connection that still works the fence can only be lost (Redis failed over and lost
        // the token, or another worker was briefly active on this subscription): this runner is
        // done; the next tick replaces it, its deliveries go back in order and the new one takes
        // a new token.
        if !delivery.isStale { shard.markEnded() }
        return .done
    }

    /// How a passive attempt ended: the message is finished (a step to return), or the reply
    /// goes through the API now (passive-first, not taken).
    enum PassiveEnd {
        case finished(Step)
        case viaAPI
    }

    /// WeChat pushes a message at most three times (the first push and two retries).
    static let pushesPerMessage = 3
    /// How long past the ingress's deadline an offer's verdict is awaited (its clock may differ
    /// from ours, and the verdict travels after the response is written).
    static let verdictMargin: Duration = .seconds(2)

    /// Offers the reply, under this worker's claim, to the ingress waiting for the latest copy
    /// of the push (docs/worker.md, "Passive replies"). Taken: marked sent, acked. Not taken:
    /// passive-first hands it to the API (same claim); passive-only gives the claim back and
    /// waits for WeChat's retry of the push, offering again, and drops the reply (counted) when
    /// no push took it. No verdict (the ingress died or a connection broke mid-handshake) is an
    /// uncertain send: `skip` counts it sent; `resend` sends it by the API (passive-first) or to
    /// the next retry (passive-only: WeChat retries only a push it got no answer to).
    private func offerPassively(
        _ content: PassiveReply.Content, _ message: InboundMessage, _ delivery: AMQPDelivery, _ shard: ShardRunner,
        _ account: WorkerAccount, fence: SessionStore.Fence, claimedAt: ContinuousClock.Instant
    ) async throws -> PassiveEnd {
        guard let offers else { return .viaAPI }
        let store = account.store
        let replyMode = account.replyMode
        let key = ShardRunner.copyKey(delivery) ?? message.dedupID
        var claimedAt = claimedAt
        while true {
            let copy = shard.latestCopy(key) ?? delivery
            let target = PassiveTarget(copy)
            var uncertainKept = false
            var why = "the push was not waited for (the ingress's INGRESS_REPLY_WAIT is 0)"
            // The verdict is awaited until the ingress's deadline and a margin (its clock may
            // differ a little from ours), within the first half of the claim's lease; an offer
            // with less time than that left is not made (it could be taken after we stopped waiting).
            let budget = claimLease / 2 - (ContinuousClock.now - claimedAt)
            let bound = target.map { Duration.milliseconds($0.msLeft()) + Self.verdictMargin } ?? .zero
            if let target, target.msLeft() > 50, bound <= budget {
                let xml = Array(
                    PassiveReply(replyingTo: message, createTime: Int64(Date().timeIntervalSince1970), content: content).xml.utf8)
                let outcome = await offers.offer(xml, to: target, bound: bound)
                switch outcome {
                case .taken:
                    await markSent(message, account, viaAPI: false, passive: true)
                    account.replies.increment()
                    countReplied(delivery, passively: true)
                    // WeChat's retry came while the verdict was awaited: the push that took the
                    // reply was given up on (the ingress took it late), so the retry gets it too.
                    if let newer = shard.latestCopy(key), let retry = PassiveTarget(newer), retry.requestID != target.requestID {
                        await reofferPassively(content, message, newer, shard, account)
                    }
                    try delivery.ack()
                    return .finished(.done)
                case .declined(let reason):
                    // Cut by a hand-over's deadline or shutdown: nothing went out; the claim is given
                    // back and the delivery goes back unacknowledged.
                    if Task.isCancelled {
                        try? await store.releaseClaim(message, worker: id)
                        return .finished(.done)
                    }
                    why = reason
                case .unknown(let reason):
                    // Cut by a hand-over's deadline or shutdown: the claim stays (its expiry makes the
                    // next owner treat the send as uncertain), the delivery goes back unacknowledged.
                    if Task.isCancelled { return .finished(.done) }
                    metrics.uncertain.increment()
                    logger.warning(
                        "no verdict for a passive reply: the ingress may have written it",
                        metadata: ["wechat.dedup_key": "\(message.dedupID)", "reason": "\(reason)", "worker.uncertain_send": "\(uncertainSend.rawValue)"])
                    if uncertainSend == .skip {
                        await markSent(message, account, viaAPI: false)
                        try delivery.ack()
                        return .finished(.done)
                    }
                    // resend: by the API (passive-first), or to WeChat's next push (passive-only,
                    // keeping the claim, so that a death meanwhile still leaves the send uncertain).
                    if replyMode == .passiveFirst { return .viaAPI }
                    uncertainKept = true
                }
            } else if target != nil {
                why = target.map { $0.msLeft() > 50 } == true
                    ? "the claim's lease leaves too little time to wait for the verdict (WORKER_CLAIM_LEASE)"
                    : "the ingress stopped waiting before the reply was decided"
            }
            if !uncertainKept {
                metrics.passiveMissed.increment()
                logger.info("passive reply not taken", metadata: ["wechat.dedup_key": "\(message.dedupID)", "reason": "\(why)"])
            }
            if replyMode == .passiveFirst { return .viaAPI }
            // passive-only: nothing went out (or, uncertain, it keeps its claim); WeChat's retry is awaited.
            if !uncertainKept { try await store.releaseClaim(message, worker: id) }
            let held = shard.copyCount(key)
            // WeChat retries about 5 s after a push it got no answer to; the retry's ingress waits again.
            let retryDue = (target.map { max($0.msLeft(), 0) } ?? 0) + 7_000
            guard held < Self.pushesPerMessage, target != nil,
                await shard.nextCopy(key, of: delivery, beyond: held, upTo: .milliseconds(retryDue)) != nil
            else {
                if shard.draining.isSet || stopping.isSet || delivery.isStale { return .finished(.done) }  // goes back with the channel
                metrics.passiveDropped.increment()
                logger.warning(
                    "passive reply dropped: no push of the message took it (passive-only)",
                    metadata: ["wechat.dedup_key": "\(message.dedupID)", "wechat.pushes": "\(held)"])
                try await store.markReplied(message, sent: false)
                try delivery.ack()
                return .finished(.done)
            }
            claimedAt = ContinuousClock.now
            switch try await store.claim(message, worker: id, fence: fence, lease: claimLease) {
            case .claimed, .uncertain: continue
            case .finished:
                try delivery.ack()
                return .finished(.done)
            case .fenced: return .finished(fenced(message, delivery, shard))
            case .busy: return .finished(.retry("another worker holds this message's claim", counts: false))
            }
        }
    }

    /// A push whose reply went out passively came again: WeChat pushes a message again only when
    /// it got no answer within its 5 s, so the response that carried the reply reached a request
    /// WeChat had already given up on (an overloaded ingress can take an offer that late). The
    /// reply is offered to this push's ingress; nothing else changes (the message stays finished:
    /// no API send, no claim — two workers re-offering to one request get one taken, one declined).
    private func reofferPassively(
        _ content: PassiveReply.Content, _ message: InboundMessage, _ delivery: AMQPDelivery, _ shard: ShardRunner, _ account: WorkerAccount
    ) async {
        guard let offers else { return }
        let copy = ShardRunner.copyKey(delivery).flatMap(shard.latestCopy) ?? delivery
        guard let target = PassiveTarget(copy), target.msLeft() > 50 else { return }
        let xml = Array(PassiveReply(replyingTo: message, createTime: Int64(Date().timeIntervalSince1970), content: content).xml.utf8)
        let outcome = await offers.offer(xml, to: target, bound: .milliseconds(target.msLeft()) + Self.verdictMargin)
        metrics.passiveReoffered.increment()
        logger.warning(
            "WeChat pushed a message answered passively again (it did not get the answer in time); offered the reply again",
            metadata: ["wechat.dedup_key": "\(message.dedupID)", "outcome": "\(outcome)"])
    }

    /// Records a sent reply, retrying until Redis answers (with backoff up to 2 s); once the
    /// worker is shutting down it gives up after a few more tries and logs the message as
    /// at risk of a second send (only WeChat's retry of the same push could then repeat it).
    /// - Parameter viaAPI: false for a passive reply, which uses none of the customer-service quota.
    /// - Returns: the account's customer-service sends today when this mark counted one (else 0).
    @discardableResult
    private func markSent(_ message: InboundMessage, _ account: WorkerAccount, viaAPI: Bool = true, passive: Bool = false) async -> Int64 {
        var delay: Duration = .milliseconds(50)
        var triesWhileStopping = 0
        while true {
            do {
                return try await account.store.markReplied(message, sent: viaAPI, passive: passive)
            } catch {
                metrics.markRetries.increment()
                if stopping.isSet || Task.isCancelled {
                    triesWhileStopping += 1
                    if triesWhileStopping > 5 {
                        logger.error(
                            "cannot record a sent reply before shutdown; a retry of this push by WeChat would be answered again",
                            metadata: ["wechat.dedup_key": "\(message.dedupID)", "error": "\(error)"])
                        return 0
                    }
                }
                logger.warning("cannot record a sent reply yet; retrying", metadata: ["wechat.dedup_key": "\(message.dedupID)", "error": "\(error)"])
                try? await Task.sleep(for: delay)
                delay = min(delay * 2, .seconds(2))
            }
        }
    }

    /// Swift handlers first, in order; then the rules (the first that matches); then the
    /// decision service, when one is configured (docs/worker.md, "Deciding a reply").
    private func decide(_ message: InboundMessage, _ snapshot: SessionSnapshot, _ account: WorkerAccount) async throws -> ReplyRules.Decision {
        for h in handlers {
            if let d = try await h.decide(message, session: snapshot) { return d }
        }
        guard let service = account.decisionService else { return try account.rules.decide(message, session: snapshot) }
        if let d = try account.rules.decideIfMatched(message, session: snapshot) { return d }
        return try await service.decide(message, session: snapshot)
    }

    /// Acks the original of a message just republished to the dead letters.
    /// If its connection broke meanwhile, the broker redelivers the original too; the message
    /// record makes the second one a duplicate once the first is answered.
    private func ackAfterRepublish(_ d: AMQPDelivery) {
        do {
            try d.ack()
        } catch {
            logger.warning("republished, but the original's connection broke: the broker redelivers it too", metadata: ["error": "\(error)"])
        }
    }

    /// Publishes the message to the dead-letter exchange with the reason, then acks it.
    /// - Parameter skippedInOrder: its user's later messages go on without it (its retries ran
    ///   out): recorded on the dead letter as `x-relay-order: skipped`.
    func deadLetter(_ d: AMQPDelivery, reason: String, skippedInOrder: Bool = false) async {
        guard !d.isStale else { return logger.debug("not dead-lettering a delivery of a broken connection; the broker redelivers it") }
        var copy = d.message
        copy.properties.headers[WorkerHeader.reason] = .string(reason)
        copy.properties.headers[WorkerHeader.originalRoutingKey] = .string(d.routingKey)
        if skippedInOrder { copy.properties.headers[WorkerHeader.order] = .string("skipped") }
        do {
            try await publisher.publish(copy, exchange: retry.base.deadLetterExchange, routingKey: d.routingKey, confirmTimeout: .seconds(10))
        } catch {
            logger.error("cannot dead-letter; requeueing", metadata: ["error": "\(error)"])
            await pauseBeforeRequeue(error)
            try? d.nack(requeue: true)
            return
        }
        metrics.deadLettered.increment()
        logger.warning("dead-lettered", metadata: ["reason": "\(reason)"])
        ackAfterRepublish(d)
    }

    /// While the broker refuses publishes (an alarm, or the publishing connection is down), a
    /// message given back at once would come straight back: wait a moment first (it keeps its
    /// place in the queue meanwhile; other users' messages go on).
    private func pauseBeforeRequeue(_ error: any Error) async {
        guard let e = error as? AMQPError, e.code == .flowControl || e.code == .notConnected else { return }
        try? await Task.sleep(for: .seconds(1))
    }
}
