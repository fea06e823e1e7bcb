import AsyncHTTPClient
import Foundation
import NIOCore
import Redis
import Synchronization
import RelayContract

/// A credential with its expiry, as stored in Redis (JSON) and served by tokend.
public struct StoredCredential: Codable, Sendable, Equatable {
    /// The access_token or jsapi_ticket.
    public var value: String
    /// Unix seconds.
    public var expiresAt: Int64
    /// When it was fetched, Unix seconds.
    public var fetchedAt: Int64

    enum CodingKeys: String, CodingKey { case value, expiresAt = "expires_at", fetchedAt = "fetched_at" }

    public init(value: String, expiresAt: Int64, fetchedAt: Int64) {
        self.value = value
        self.expiresAt = expiresAt
        self.fetchedAt = fetchedAt
    }

    public func isValid(at now: Int64) -> Bool { now < expiresAt }
}

/// What workers use to get the access_token: one Redis GET behind a short
/// in-process cache, and a request to tokend to refresh a token the API rejected.
public final class TokenClient: Sendable {
    public let keys: TokenKeys
    private let redis: any RedisCommands
    private let tokendURL: String?
    private let tokendSecret: String?
    private let http: HTTPClient
    private let cacheFor: Duration
    private let tokendTimeout: Duration
    private let cache = Mutex<(credential: StoredCredential, until: ContinuousClock.Instant)?>(nil)

    /// - Parameters:
    ///   - tokendURL: tokend's base URL; when nil a rejected token is only re-read from Redis.
    ///   - cacheFor: how long a value read from Redis is reused without asking again.
    ///   - tokendTimeout: the deadline of a refresh request to tokend.
    public init(
        redis: any RedisCommands, keys: TokenKeys, tokendURL: String?, tokendSecret: String?, http: HTTPClient = .shared,
        cacheFor: Duration = .seconds(5), tokendTimeout: Duration = .seconds(10)
    ) {
        self.tokendTimeout = tokendTimeout
        self.redis = redis
        self.keys = keys
        self.tokendURL = tokendURL
        self.tokendSecret = tokendSecret
        self.http = http
        self.cacheFor = cacheFor
    }

    /// The current access_token.
    /// - Throws: ``TokenError`` when none is stored (tokend not running or failing).
    public func accessToken() async throws -> String {
        let now = ContinuousClock.now
        if let c = cache.withLock({ $0 }), c.until > now, c.credential.isValid(at: Int64(Date().timeIntervalSince1970)) {
            return c.credential.value
        }
        return try await reload().value
    }

    /// Reads the token from Redis, bypassing the cache.
    @discardableResult
    public func reload() async throws -> StoredCredential {
        guard let bytes = try await redis.get(keys.accessToken),
            let credential = try? JSONDecoder().decode(StoredCredential.self, from: Data(bytes))
        else {
            throw TokenError(message: "no access_token in Redis at \(keys.accessToken): is wechat-tokend running?")
        }
        guard credential.isValid(at: Int64(Date().timeIntervalSince1970)) else {
            throw TokenError(message: "the access_token in Redis has expired: is wechat-tokend refreshing?")
        }
        cache.withLock { $0 = (credential, ContinuousClock.now + cacheFor) }
        return credential
    }

    /// Reports that the API rejected `stale` (40001/40014/42001) and returns the token to retry with.
    ///
    /// With tokend: asks it to compare-and-refresh (only one upstream call however many
    /// callers report the same stale token). Without: re-reads Redis.
    public func tokenRejected(_ stale: String) async throws -> String {
        cache.withLock { $0 = nil }
        guard let tokendURL else { return try await reload().value }
        var request = HTTPClientRequest(url: "\(tokendURL)/v1/accounts/\(keys.appID)/access-token/refresh")
        request.method = .POST
        request.headers.add(name: "Content-Type", value: "application/json")
        if let tokendSecret { request.headers.add(name: "Authorization", value: "Bearer \(tokendSecret)") }
        request.body = .bytes(ByteBuffer(bytes: try JSONEncoder().encode(["stale_token": stale])))
        let response = try await http.execute(request, timeout: .nanoseconds(Int64(tokendTimeout.components.seconds) * 1_000_000_000 + tokendTimeout.components.attoseconds / 1_000_000_000))
        let body = try await response.body.collect(upTo: 1 << 16)
        guard response.status == .ok,
            let answer = try? JSONDecoder().decode(AccessTokenAnswer.self, from: Data(body.readableBytesView))
        else {
            throw TokenError(message: "tokend refused the refresh: HTTP \(response.status.code)")
        }
        cache.withLock { $0 = (StoredCredential(value: answer.accessToken, expiresAt: answer.expiresAt, fetchedAt: 0), ContinuousClock.now + cacheFor) }
        return answer.accessToken
    }
}

/// tokend's answer for `GET /v1/access-token` and the refresh.
public struct AccessTokenAnswer: Codable, Sendable, Equatable {
    public var accessToken: String
    public var expiresAt: Int64

    enum CodingKeys: String, CodingKey { case accessToken = "access_token", expiresAt = "expires_at" }

    public init(accessToken: String, expiresAt: Int64) {
        self.accessToken = accessToken
        self.expiresAt = expiresAt
    }
}

public struct TokenError: Error, CustomStringConvertible, Sendable {
    public var message: String
    public init(message: String) { self.message = message }
    public var description: String { message }
}
