import AsyncHTTPClient
import Foundation
import Histogram
import Synchronization
import WeChat

/// The end-to-end benchmark: an open-loop pusher against the ingress, with the
/// fake API (in the same process) receiving the workers' replies.
///
/// Pushes are scheduled at a fixed rate whatever the answers do (open loop),
/// and latencies are measured from the scheduled time, so a stall shows up in
/// the numbers instead of slowing the load (no coordinated omission).
public struct BenchSettings: Sendable {
    public var rate: Double
    public var duration: Duration
    public var users: Int
    public var text: String
    /// How long to wait for the last replies after the last push.
    public var drainTimeout: Duration

    public init(rate: Double, duration: Duration, users: Int, text: String = "帮助", drainTimeout: Duration = .seconds(30)) {
        self.rate = rate
        self.duration = duration
        self.users = users
        self.text = text
        self.drainTimeout = drainTimeout
    }
}

/// What a bench run measured; `lost` and `duplicated` must be zero on a healthy stack.
public struct BenchReport: Codable, Sendable {
    public struct Latency: Codable, Sendable {
        public var p50: Double
        public var p90: Double
        public var p99: Double
        public var max: Double
        public var count: UInt64
    }

    public var pushed: Int
    public var accepted: Int
    /// Pushes not answered `success`, by kind (`http_503`, `no_answer`, …).
    public var errors: [String: Int]
    public var replies: Int
    /// Of `replies`, those that came in the HTTP response (passive replies, `INGRESS_REPLY_WAIT`).
    public var passiveReplies: Int = 0
    /// Accepted but never replied to.
    public var lost: Int
    /// Replies beyond one per accepted push.
    public var duplicated: Int
    /// custom/send calls the fake API refused during the run, by errcode (45047: the user's
    /// quota was used up because replies lagged behind; 45015: window closed).
    public var refusedByAPI: [String: Int]
    public var seconds: Double
    /// Accepted pushes per second of the pushing phase.
    public var throughput: Double
    /// Ingress response time, ms.
    public var ingressLatencyMs: Latency
    /// From the push's scheduled time to the reply's arrival at the fake API, ms.
    public var pushToReplyMs: Latency
}

public final class BenchRunner: Sendable {
    let settings: BenchSettings
    let pusher: Pusher
    let platform: FakePlatform
    let client: HTTPClient

    private struct State {
        var pushed = 0
        var accepted = 0
        var errors: [String: Int] = [:]
        /// Scheduled times (ms) of accepted pushes, per user, in push order.
        var sentAt: [String: [Int64]] = [:]
        /// Passive replies (in the push's response) per user, ms since the epoch.
        var passiveAt: [String: [Int64]] = [:]
        var passive = 0
        var ingress = Histogram<UInt64>(highestTrackableValue: 3_600_000_000, numberOfSignificantValueDigits: .three)
    }

    private let state = Mutex(State())
    /// MsgIds of this run start here, so that runs never look like retries of each other to the dedup.
    private let msgIDBase = UInt64.random(in: 1...(1 << 40)) << 20

    public init(settings: BenchSettings, pusher: Pusher, platform: FakePlatform, client: HTTPClient) {
        self.settings = settings
        self.pusher = pusher
        self.platform = platform
        self.client = client
    }

    /// Runs the load, waits for the replies, and reports. `progress` gets a line about every second.
    public func run(progress: @escaping @Sendable (String) -> Void) async -> BenchReport {
        platform.clearMessages()
        let refusedBefore = platform.refusals
        let interval = 1.0 / settings.rate
        let total = Int(settings.rate * settings.duration.seconds)
        let start = ContinuousClock.now
        let wallStart = Date()
        let ticker = Task {
            while !Task.isCancelled {
                try? await Task.sleep(for: .seconds(1))
                let s = state.withLock { ($0.pushed, $0.accepted, $0.errors.values.reduce(0, +)) }
                progress(
                    String(
                        format: "t=%.0fs pushed=%d accepted=%d errors=%d replies=%d", (ContinuousClock.now - start).seconds, s.0,
                        s.1, s.2, platform.messages().count))
            }
        }
        await withTaskGroup(of: Void.self) { group in
            for i in 0..<total {
                let offset = Double(i) * interval
                let scheduled = start + .nanoseconds(Int64(offset * 1e9))
                try? await Task.sleep(until: scheduled, clock: .continuous)
                let user = "oBench\(String(format: "%06d", i % settings.users))"
                let scheduledMs = Int64((wallStart.timeIntervalSince1970 + offset) * 1000)
                group.addTask { await self.pushOne(index: i, user: user, scheduled: scheduled, scheduledMs: scheduledMs) }
            }
            await group.waitForAll()
        }
        let pushingSeconds = (ContinuousClock.now - start).seconds
        // Wait for the replies, polling the in-process fake API (bounded by the drain timeout;
        // `waitForMessages` cannot be abandoned at a timeout, so it is not used here).
        let expected = state.withLock { $0.accepted }
        let deadline = ContinuousClock.now + settings.drainTimeout
        while platform.messages().count + state.withLock({ $0.passive }) < expected, ContinuousClock.now < deadline {
            try? await Task.sleep(for: .milliseconds(100))
        }
        ticker.cancel()
        var refused: [String: Int] = [:]
        for (code, n) in platform.refusals where n > refusedBefore[code, default: 0] { refused[String(code)] = n - refusedBefore[code, default: 0] }
        return report(pushingSeconds: pushingSeconds, refused: refused)
    }

    private func pushOne(index: Int, user: String, scheduled: ContinuousClock.Instant, scheduledMs: Int64) async {
        do {
            let xml = try PushBuilder.xml(
                kind: "text", value: settings.text, eventKey: nil, from: user, to: pusher.accountID, msgID: msgIDBase + UInt64(index))
            platform.userPushed(openID: user, msgType: "text", event: nil)
            let result = try await pusher.push(xml, openID: user, client: client)
            let elapsed = ContinuousClock.now - scheduled
            // A passive reply is the answer itself (read as WeChat would: signature, decryption).
            let passive = result.status == 200 && (try? pusher.passiveReply(in: result.body)) != nil
            let answeredMs = Int64(Date().timeIntervalSince1970 * 1000)
            state.withLock { s in
                s.pushed += 1
                _ = s.ingress.record(UInt64(max(0, elapsed.microseconds)))
                if result.status == 200, result.body == "success" || passive {
                    s.accepted += 1
                    s.sentAt[user, default: []].append(scheduledMs)
                    if passive {
                        s.passive += 1
                        s.passiveAt[user, default: []].append(answeredMs)
                    }
                } else {
                    s.errors["http_\(result.status)", default: 0] += 1
                }
            }
        } catch {
            state.withLock { s in
                s.pushed += 1
                s.errors["no_answer", default: 0] += 1
            }
        }
    }

    private func report(pushingSeconds: Double, refused: [String: Int]) -> BenchReport {
        let replies = platform.messages()
        var byUser: [String: [Int64]] = [:]
        for r in replies where r.api == "custom" { byUser[r.touser, default: []].append(r.receivedAtMs) }
        return state.withLock { s in
            var lost = 0, duplicated = 0
            var e2e = Histogram<UInt64>(highestTrackableValue: 3_600_000_000, numberOfSignificantValueDigits: .three)
            for (user, sent) in s.sentAt {
                // Both channels, in the order the replies came.
                let got = ((byUser[user] ?? []) + (s.passiveAt[user] ?? [])).sorted()
                lost += max(0, sent.count - got.count)
                duplicated += max(0, got.count - sent.count)
                // Replies to one user come in push order: the i-th reply answers the i-th push.
                for (pushedAt, repliedAt) in zip(sent, got) { _ = e2e.record(UInt64(max(0, repliedAt - pushedAt) * 1000)) }
            }
            for (user, got) in byUser where s.sentAt[user] == nil { duplicated += got.count }
            return BenchReport(
                pushed: s.pushed, accepted: s.accepted, errors: s.errors, replies: replies.count + s.passive, passiveReplies: s.passive, lost: lost,
                duplicated: duplicated, refusedByAPI: refused, seconds: pushingSeconds, throughput: Double(s.accepted) / pushingSeconds,
                ingressLatencyMs: Self.latency(s.ingress), pushToReplyMs: Self.latency(e2e))
        }
    }

    private static func latency(_ h: Histogram<UInt64>) -> BenchReport.Latency {
        guard h.totalCount > 0 else { return BenchReport.Latency(p50: 0, p90: 0, p99: 0, max: 0, count: 0) }
        func ms(_ us: UInt64) -> Double { Double(us) / 1000 }
        return BenchReport.Latency(
            p50: ms(h.valueAtPercentile(50)), p90: ms(h.valueAtPercentile(90)), p99: ms(h.valueAtPercentile(99)),
            max: ms(h.max), count: h.totalCount)
    }
}

extension Duration {
    var microseconds: Int64 {
        let (s, attos) = components
        return s * 1_000_000 + attos / 1_000_000_000_000
    }
}
