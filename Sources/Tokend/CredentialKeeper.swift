import Foundation
import Logging
import Redis
import RelayCore
import TokenClient
import WeChat

/// Why a credential was refreshed (the `reason` label of `tokend_refreshes_total`).
public enum RefreshReason: String, Sendable {
    /// None was stored yet.
    case missing
    /// Less than the margin of its lifetime was left.
    case proactive
    /// A caller reported it rejected (`POST /v1/access-token/refresh`).
    case passive
}

/// An error from the WeChat API, with the code's disposition.
public struct UpstreamError: Error, Sendable, CustomStringConvertible {
    public var errcode: Int
    public var errmsg: String
    public var disposition: APIErrorDisposition { APIErrorDisposition(errcode: errcode) }
    public var description: String { "WeChat API error \(errcode): \(errmsg)" }
}

/// Something that happened to a credential; tests await these instead of sleeping (package
/// API: for this repository's tests, not a promise to users).
package struct RefreshEvent: Sendable {
    package var kind: String
    package var reason: RefreshReason
    /// A short fingerprint of the new value (never the value itself).
    package var fingerprint: String
    package var expiresAt: Int64
}

/// Keeps one credential (the access_token or the jsapi_ticket) fresh in Redis.
///
/// - Within a process, concurrent refreshes share one upstream call.
/// - Across replicas, a Redis lock (`SET NX PX`, released only by its owner) lets
///   one refresh at a time; the others wait for it and read the result.
/// - Compare-and-refresh: a passive refresh happens only while the stale value
///   is still the stored one, and the new value replaces the old one with a
///   Lua compare-and-set after it was fetched, so readers never see a gap.
public actor CredentialKeeper {
    public let kind: String
    public let key: String
    let redis: RedisPool
    let margin: Duration
    let logger: Logger
    let fetch: @Sendable (_ reason: RefreshReason, _ stale: String?) async throws -> (value: String, expiresIn: Int)
    let onEvent: @Sendable (RefreshEvent) -> Void

    private var inflight: Task<StoredCredential, any Error>?
    /// The last upstream failure, for readiness; cleared by a success.
    public private(set) var lastError: UpstreamError?
    /// Seconds since the Unix epoch (a virtual clock in tests).
    let now: @Sendable () -> Int64
    /// Set when a proactive refresh got the stored value back (`stable_token` renews only in
    /// its last ``renewalWindow`` seconds): no proactive upstream call before this time.
    private var quietUntil: Int64?
    /// Callers waiting for a refresh someone else started.
    private var joiners = 0

    /// Whether a caller is waiting for a refresh another caller started (for tests).
    package var hasWaiters: Bool { joiners > 0 }

    /// WeChat's `stable_token` (and the ticket endpoint) hand out the same value until its
    /// last five minutes; asking earlier is wasted.
    public static let renewalWindow: Int64 = 300

    private static let compareAndSet = RedisScript(
        """
        local cur = redis.call('GET', KEYS[1])
        local curValue = ''
        if cur then curValue = cjson.decode(cur).value end
        if curValue ~= ARGV[1] then return 0 end
        redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
        return 1
        """)
    private static let releaseLock = RedisScript(
        """
        if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
        return 0
        """)

    package init(
        kind: String, key: String, redis: RedisPool, margin: Duration, logger: Logger,
        fetch: @escaping @Sendable (RefreshReason, String?) async throws -> (value: String, expiresIn: Int),
        onEvent: @escaping @Sendable (RefreshEvent) -> Void,
        now: @escaping @Sendable () -> Int64 = { Int64(Date().timeIntervalSince1970) }
    ) {
        self.now = now
        self.kind = kind
        self.key = key
        self.redis = redis
        self.margin = margin
        self.logger = logger
        self.fetch = fetch
        self.onEvent = onEvent
    }

    /// The stored credential, or nil.
    public func current() async throws -> StoredCredential? {
        guard let bytes = try await redis.get(key) else { return nil }
        return try? JSONDecoder().decode(StoredCredential.self, from: Data(bytes))
    }

    /// Refreshes if needed and returns the credential to use.
    ///
    /// - Parameters:
    ///   - stale: for a passive refresh, the value the API rejected; nothing is fetched
    ///     unless it is still the stored value.
    /// Readers (``RefreshReason/missing``) get a valid stored credential without an upstream call.
    /// A passive request that joins a refresh already in flight (or waits for another
    /// replica's) compares again with `stale` afterwards, and refreshes if the rejected value
    /// is still the current one.
    public func refresh(_ reason: RefreshReason, stale: String? = nil) async throws -> StoredCredential {
        // A reader with a valid stored value neither joins a refresh (nor inherits its error) nor waits.
        if reason == .missing, let c = try await current(), c.isValid(at: now()) { return c }
        while let running = inflight {
            joiners += 1
            let result: StoredCredential
            do {
                result = try await running.value
                joiners -= 1
            } catch {
                joiners -= 1
                throw error
            }
            if reason != .passive || result.value != stale { return result }
            // The value the caller saw rejected came back: refresh again, ourselves.
            if inflight == running { break }
        }
        let task = Task { try await self.refreshNow(reason, stale: stale) }
        inflight = task
        defer { if inflight == task { inflight = nil } }
        return try await task.value
    }

    /// When the proactive refresher should look again: `margin` before expiry, or later
    /// while the upstream is known to hand out the same value (see ``quietUntil``).
    public func nextCheck(for c: StoredCredential) -> Int64 {
        let due = c.expiresAt - Int64(margin.secondsValue)
        guard let quiet = quietUntil else { return due }
        return max(due, quiet)
    }

    private func refreshNow(_ reason: RefreshReason, stale: String?) async throws -> StoredCredential {
        if let settled = try await alreadyFresh(reason, stale: stale) { return settled }
        let owner = UUID().uuidString
        let lockKey = key + ":refresh_lock"
        let acquired = try await redis.set(lockKey, to: owner, expiration: .milliseconds(30_000), condition: .ifAbsent)
        guard acquired else {
            // Another replica is refreshing: wait for it to finish, then use what it stored —
            // unless this is a passive refresh and the rejected value is still the stored one.
            let deadline = ContinuousClock.now + .seconds(30)
            while try await redis.get(lockKey) != nil, ContinuousClock.now < deadline {
                try await Task.sleep(for: .milliseconds(20))
            }
            if let c = try await current(), c.isValid(at: now()), reason != .passive || c.value != stale { return c }
            if try await redis.get(lockKey) == nil {
                return try await refreshNow(reason, stale: stale)
            }
            throw UpstreamError(errcode: -1, errmsg: "another tokend replica did not finish refreshing the \(kind)")
        }
        do {
            let result = try await refreshLocked(reason, stale: stale)
            _ = try? await redis.eval(Self.releaseLock, keys: [lockKey], arguments: [.init(owner)])
            return result
        } catch {
            _ = try? await redis.eval(Self.releaseLock, keys: [lockKey], arguments: [.init(owner)])
            throw error
        }
    }

    /// The stored credential if no refresh is needed for this request.
    private func alreadyFresh(_ reason: RefreshReason, stale: String?) async throws -> StoredCredential? {
        let now = now()
        guard let c = try await current(), c.isValid(at: now) else { return nil }
        switch reason {
        case .passive:
            // Someone already replaced the rejected value: compare-and-refresh says no.
            return c.value != stale ? c : nil
        case .missing:
            // A reader: a valid stored value is the answer; only the refresher renews early.
            return c
        case .proactive:
            return now < nextCheck(for: c) ? c : nil
        }
    }

    private func refreshLocked(_ reason: RefreshReason, stale: String?) async throws -> StoredCredential {
        // Checked again under the lock: a replica may have refreshed just before.
        if let settled = try await alreadyFresh(reason, stale: stale) { return settled }
        let before = try await current()
        let fetched: (value: String, expiresIn: Int)
        do {
            fetched = try await fetch(reason, stale)
            lastError = nil
        } catch let e as UpstreamError {
            lastError = e
            throw e
        }
        let now = now()
        if reason == .proactive, let before, fetched.value == before.value {
            // The same value came back (stable_token before its renewal point): that is a
            // success; the next proactive call waits for the renewal point, not the margin.
            let expiresAt = now + Int64(fetched.expiresIn)
            // Past the renewal point already: the value is renewed when it expires at the latest.
            quietUntil = expiresAt - Self.renewalWindow > now ? expiresAt - Self.renewalWindow : min(expiresAt, now + 30)
            logger.debug("upstream returned the stored value; next check at its renewal point", metadata: ["tokend.kind": "\(kind)"])
            return StoredCredential(value: before.value, expiresAt: min(before.expiresAt, expiresAt), fetchedAt: before.fetchedAt)
        }
        quietUntil = nil
        let record = StoredCredential(value: fetched.value, expiresAt: now + Int64(fetched.expiresIn), fetchedAt: now)
        let json = String(decoding: try JSONEncoder().encode(record), as: UTF8.self)
        // Keep it in Redis a little past its expiry so that readers see "expired", not "missing".
        let stored = try await redis.eval(
            Self.compareAndSet, keys: [key], arguments: [.init(before?.value ?? ""), .init(json), .init(fetched.expiresIn + 60)])
        guard stored.int == 1 else {
            // Replaced under us (the lock expired?): use what is there now.
            if let c = try await current() { return c }
            throw UpstreamError(errcode: -1, errmsg: "the \(kind) changed while refreshing")
        }
        let event = RefreshEvent(kind: kind, reason: reason, fingerprint: secretFingerprint(fetched.value), expiresAt: record.expiresAt)
        logger.notice(
            "refreshed",
            metadata: [
                "tokend.kind": "\(kind)", "tokend.reason": "\(reason.rawValue)", "tokend.fingerprint": "\(event.fingerprint)",
                "tokend.expires_at": "\(record.expiresAt)",
            ])
        onEvent(event)
        return record
    }

    static func wallClock() -> Int64 { Int64(Date().timeIntervalSince1970) }
}
