import Foundation
import Synchronization
import WeChat

/// The state of the fake WeChat platform: credentials, issued tokens and tickets,
/// what each user did (for the 48-hour window and the quota), what was sent, and
/// injected faults. Rules follow docs/wechat-protocol.md §6–§8.
///
/// Thread-safe; time comes from `now`, so tests move the clock instead of sleeping.
public final class FakePlatform: Sendable {
    public struct Settings: Sendable {
        public var appID: String
        public var secret: String
        /// Lifetime of tokens and tickets (WeChat: 7200 s).
        public var tokenLifetime: Duration = .seconds(7200)
        /// How long a `/cgi-bin/token` token stays valid after a newer one is issued (WeChat: ~5 min).
        public var overlap: Duration = .seconds(300)
        /// The customer-service window after a user's message, and its quota.
        public var messageWindow: Duration = .seconds(48 * 3600)
        public var messageQuota: Int = 5
        /// After a follow, QR scan or menu click: a shorter window and quota.
        public var eventWindow: Duration = .seconds(60)
        public var eventQuota: Int = 3

        public init(appID: String, secret: String) {
            self.appID = appID
            self.secret = secret
        }
    }

    /// Faults to inject (`POST /sim/faults` or flags).
    public struct Faults: Codable, Sendable, Equatable {
        /// Fraction (0…1) of API calls answered `{"errcode": -1}`.
        public var errorRate: Double = 0
        /// Added to every API call, in milliseconds.
        public var latencyMs: Int = 0
        /// Fraction (0…1) of API calls whose connection is dropped without an answer.
        public var dropRate: Double = 0
        /// Every API call with a token answers 42001 (expired) until turned off.
        public var expireTokens: Bool = false
        /// custom/send answers 45009 (daily quota exceeded).
        public var quotaExhausted: Bool = false
        /// The next `failNextCount` calls of custom/send answer this errcode (e.g. -1, 40001), then normal service resumes.
        public var failNextWith: Int = 0
        public var failNextCount: Int = 0
        /// The next `gatewayErrorsAfterSend` calls of custom/send are carried out (the message
        /// is sent) and then answered HTTP 504, as a gateway that timed out on WeChat's answer.
        public var gatewayErrorsAfterSend: Int = 0

        public init() {}

        /// Every field is optional in JSON: `{"errorRate": 0.1}` sets just that.
        public init(from decoder: any Decoder) throws {
            let c = try decoder.container(keyedBy: CodingKeys.self)
            errorRate = try c.decodeIfPresent(Double.self, forKey: .errorRate) ?? 0
            latencyMs = try c.decodeIfPresent(Int.self, forKey: .latencyMs) ?? 0
            dropRate = try c.decodeIfPresent(Double.self, forKey: .dropRate) ?? 0
            expireTokens = try c.decodeIfPresent(Bool.self, forKey: .expireTokens) ?? false
            quotaExhausted = try c.decodeIfPresent(Bool.self, forKey: .quotaExhausted) ?? false
            failNextWith = try c.decodeIfPresent(Int.self, forKey: .failNextWith) ?? 0
            failNextCount = try c.decodeIfPresent(Int.self, forKey: .failNextCount) ?? 0
            gatewayErrorsAfterSend = try c.decodeIfPresent(Int.self, forKey: .gatewayErrorsAfterSend) ?? 0
        }
    }

    /// A message accepted by the fake API, as `GET /sim/messages` returns it.
    public struct Recorded: Codable, Sendable, Equatable {
        public var seq: Int
        /// `custom`, `template` or `typing`.
        public var api: String
        public var touser: String
        public var msgtype: String
        /// The text of a text message (for quick assertions).
        public var content: String?
        /// The request body as sent.
        public var body: String
        /// Receive time, milliseconds since the Unix epoch.
        public var receivedAtMs: Int64
    }

    /// What a pushed message opens: the 48-hour window or the short one after an event.
    public enum Trigger: String, Codable, Sendable {
        case message, event
    }

    private struct Token {
        var value: String
        var expires: Date
        /// Set when superseded: valid until then.
        var supersededUntil: Date?
    }

    private struct User {
        var subscribed = true
        var windowStart: Date?
        var trigger: Trigger = .message
        var sentInWindow = 0
    }

    private struct State {
        var tokens: [String: Token] = [:]
        var latestToken: String?
        var stableToken: Token?
        var ticket: Token?
        var users: [String: User] = [:]
        var recorded: [Recorded] = []
        var seq = 0
        var faults = Faults()
        var menu: String?
        var waiters: [(touser: String?, count: Int, continuation: CheckedContinuation<[Recorded], Never>)] = []
        var sendCalls = 0
        var arrivals = 0
        var arrivalWaiters: [(count: Int, continuation: CheckedContinuation<Void, Never>)] = []
        var refusals: [Int: Int] = [:]
        var tokenCalls = 0
        var stableTokenCalls = 0
        /// Users whose custom/send calls wait at the gate (tests), and the calls waiting there.
        var held: Set<String> = []
        var atGate: [(touser: String, continuation: CheckedContinuation<Void, Never>)] = []
        var arrivedAtGate: [String: Int] = [:]
    }

    public let settings: Settings
    private let state = Mutex(State())
    private let clock: @Sendable () -> Date

    public init(settings: Settings, now: @escaping @Sendable () -> Date = { Date() }) {
        self.settings = settings
        self.clock = now
    }

    public var now: Date { clock() }

    // MARK: - Faults

    public var faults: Faults {
        get { state.withLock { $0.faults } }
        set { state.withLock { $0.faults = newValue } }
    }

    // MARK: - Credentials

    /// WeChat's error for bad credentials, or nil.
    public func checkCredentials(appID: String?, secret: String?) -> APIErrorResponse? {
        guard let appID, appID == settings.appID else {
            return APIErrorResponse(errcode: WeChatErrorCode.invalidAppID, errmsg: "invalid appid")
        }
        guard let secret, secret == settings.secret else {
            return APIErrorResponse(errcode: WeChatErrorCode.invalidAppSecret, errmsg: "invalid appsecret")
        }
        return nil
    }

    /// `/cgi-bin/token`: a new token; the previous one keeps working for the overlap.
    public func issueToken() -> AccessTokenResponse {
        let now = clock()
        return state.withLock { s in
            s.tokenCalls += 1
            if let latest = s.latestToken, var old = s.tokens[latest] {
                old.supersededUntil = now.addingTimeInterval(settings.overlap.seconds)
                s.tokens[latest] = old
            }
            let value = Self.randomToken()
            s.tokens[value] = Token(value: value, expires: now.addingTimeInterval(settings.tokenLifetime.seconds))
            s.latestToken = value
            return AccessTokenResponse(accessToken: value, expiresIn: Int(settings.tokenLifetime.seconds))
        }
    }

    /// `/cgi-bin/stable_token`: the same token while valid (renewed in its last 5 minutes);
    /// `forceRefresh` replaces it at once. Independent of `/cgi-bin/token`.
    public func issueStableToken(forceRefresh: Bool) -> AccessTokenResponse {
        let now = clock()
        return state.withLock { s in
            s.stableTokenCalls += 1
            if !forceRefresh, let t = s.stableToken, t.expires.timeIntervalSince(now) > 300 {
                return AccessTokenResponse(accessToken: t.value, expiresIn: Int(t.expires.timeIntervalSince(now)))
            }
            let t = Token(value: Self.randomToken(), expires: now.addingTimeInterval(settings.tokenLifetime.seconds))
            s.stableToken = t
            return AccessTokenResponse(accessToken: t.value, expiresIn: Int(settings.tokenLifetime.seconds))
        }
    }

    /// How many times each token endpoint was called (tests count upstream calls with it).
    package var tokenCalls: (token: Int, stableToken: Int) { state.withLock { ($0.tokenCalls, $0.stableTokenCalls) } }

    /// Whether this platform issued `token` (an access_token or a stable token), valid or not:
    /// with several accounts, the fake API finds an API call's account by its token.
    public func issued(_ token: String) -> Bool {
        state.withLock { s in s.tokens[token] != nil || s.stableToken?.value == token }
    }

    /// Checks an `access_token`: nil when valid, else 41001 (missing), 40014 (never issued),
    /// 42001 (expired), 40001 (superseded and past the overlap).
    public func checkToken(_ token: String?) -> APIErrorResponse? {
        guard let token, !token.isEmpty else {
            return APIErrorResponse(errcode: 41001, errmsg: "access_token missing")
        }
        let now = clock()
        return state.withLock { s in
            if s.faults.expireTokens {
                return APIErrorResponse(errcode: WeChatErrorCode.accessTokenExpired, errmsg: "access_token expired")
            }
            let t: Token? = s.tokens[token] ?? (s.stableToken?.value == token ? s.stableToken : nil)
            guard let t else {
                return APIErrorResponse(errcode: WeChatErrorCode.invalidAccessToken, errmsg: "invalid access_token")
            }
            if let until = t.supersededUntil, now >= until {
                return APIErrorResponse(
                    errcode: WeChatErrorCode.invalidCredential, errmsg: "invalid credential, access_token is invalid or not latest")
            }
            if now >= t.expires {
                return APIErrorResponse(errcode: WeChatErrorCode.accessTokenExpired, errmsg: "access_token expired")
            }
            return nil
        }
    }

    /// `/cgi-bin/ticket/getticket?type=jsapi`.
    public func issueTicket() -> TicketResponse {
        let now = clock()
        return state.withLock { s in
            // Like stable_token: the same ticket while valid, renewed in its last 5 minutes.
            if let t = s.ticket, t.expires.timeIntervalSince(now) > 300 {
                return TicketResponse(ticket: t.value, expiresIn: Int(t.expires.timeIntervalSince(now)))
            }
            let t = Token(value: Self.randomToken(), expires: now.addingTimeInterval(settings.tokenLifetime.seconds))
            s.ticket = t
            return TicketResponse(ticket: t.value, expiresIn: Int(settings.tokenLifetime.seconds))
        }
    }

    // MARK: - Users and the customer-service window

    /// Records that a user pushed something: a message opens the 48-hour window, a
    /// follow, scan or menu click the short one; unsubscribe marks the user gone.
    public func userPushed(openID: String, msgType: String, event: String?) {
        let now = clock()
        state.withLock { s in
            var u = s.users[openID] ?? User()
            if msgType == "event" {
                switch event {
                case "unsubscribe":
                    u.subscribed = false
                case "subscribe", "SCAN", "CLICK", "scancode_push", "scancode_waitmsg":
                    u.subscribed = true
                    u.windowStart = now
                    u.trigger = .event
                    u.sentInWindow = 0
                default:
                    break
                }
            } else {
                u.subscribed = true
                u.windowStart = now
                u.trigger = .message
                u.sentInWindow = 0
            }
            s.users[openID] = u
        }
    }

    /// Accepts or refuses a customer-service message to `openID` and records it.
    public func sendCustomerService(_ message: CustomerServiceMessage, body: String) -> APIErrorResponse {
        let now = clock()
        let answer = decideSend(message, body: body, now: now)
        if answer.errcode != 0 { state.withLock { $0.refusals[answer.errcode, default: 0] += 1 } }
        return answer
    }

    /// Whether the answer to a send just carried out is to be lost at a gateway (504), per
    /// ``Faults/gatewayErrorsAfterSend``; counts it down.
    public func takeGatewayErrorAfterSend() -> Bool {
        state.withLock { s in
            guard s.faults.gatewayErrorsAfterSend > 0 else { return false }
            s.faults.gatewayErrorsAfterSend -= 1
            return true
        }
    }

    /// custom/send calls refused so far by the send rules (window, quota, unsubscribed, 45009, failNext), by errcode.
    public var refusals: [Int: Int] { state.withLock { $0.refusals } }

    private func decideSend(_ message: CustomerServiceMessage, body: String, now: Date) -> APIErrorResponse {
        state.withLock { s in
            s.sendCalls += 1
            if s.faults.failNextCount > 0 {
                s.faults.failNextCount -= 1
                return APIErrorResponse(errcode: s.faults.failNextWith, errmsg: "injected fault")
            }
            if s.faults.quotaExhausted {
                return APIErrorResponse(errcode: WeChatErrorCode.dailyQuotaExceeded, errmsg: "reach max api daily quota limit")
            }
            guard var u = s.users[message.toUser], let start = u.windowStart else {
                return APIErrorResponse(errcode: WeChatErrorCode.outsideWindow, errmsg: "response out of time limit or subscription is canceled")
            }
            guard u.subscribed else {
                return APIErrorResponse(errcode: WeChatErrorCode.userNotSubscribed, errmsg: "require subscribe")
            }
            let (window, quota) = u.trigger == .message
                ? (settings.messageWindow, settings.messageQuota) : (settings.eventWindow, settings.eventQuota)
            guard now.timeIntervalSince(start) < window.seconds else {
                return APIErrorResponse(errcode: WeChatErrorCode.outsideWindow, errmsg: "response out of time limit or subscription is canceled")
            }
            guard u.sentInWindow < quota else {
                return APIErrorResponse(errcode: WeChatErrorCode.customerServiceCountExhausted, errmsg: "customer service message count exceeded")
            }
            u.sentInWindow += 1
            s.users[message.toUser] = u
            var content: String?
            if case .text(let c) = message.content { content = c }
            record(&s, api: "custom", touser: message.toUser, msgtype: message.content.msgType, content: content, body: body, now: now)
            return APIErrorResponse(errcode: 0, errmsg: "ok")
        }
    }

    public func record(api: String, touser: String, msgtype: String, body: String) -> Int {
        let now = clock()
        return state.withLock { s in
            record(&s, api: api, touser: touser, msgtype: msgtype, content: nil, body: body, now: now)
            return s.seq
        }
    }

    private func record(
        _ s: inout State, api: String, touser: String, msgtype: String, content: String?, body: String, now: Date
    ) {
        s.seq += 1
        s.recorded.append(
            Recorded(
                seq: s.seq, api: api, touser: touser, msgtype: msgtype, content: content, body: body,
                receivedAtMs: Int64(now.timeIntervalSince1970 * 1000)))
        let recorded = s.recorded
        s.waiters.removeAll { w in
            let mine = w.touser.map { u in recorded.filter { $0.touser == u } } ?? recorded
            guard mine.count >= w.count else { return false }
            w.continuation.resume(returning: mine)
            return true
        }
    }

    /// Waits until at least `count` messages are recorded (for `touser`, or in all), and returns them.
    /// Wakes on each recording — no polling.
    public func waitForMessages(touser: String? = nil, count: Int) async -> [Recorded] {
        await withCheckedContinuation { (c: CheckedContinuation<[Recorded], Never>) in
            state.withLock { s in
                let mine = touser.map { u in s.recorded.filter { $0.touser == u } } ?? s.recorded
                if mine.count >= count {
                    c.resume(returning: mine)
                } else {
                    s.waiters.append((touser, count, c))
                }
            }
        }
    }

    /// Notes that an API call arrived (before any injected latency or drop).
    public func noteArrival() {
        state.withLock { s in
            s.arrivals += 1
            let n = s.arrivals
            s.arrivalWaiters.removeAll { w in
                guard n >= w.count else { return false }
                w.continuation.resume()
                return true
            }
        }
    }

    /// Returns once `count` API calls have arrived (for tests: "a send is in flight now").
    package func waitForArrivals(_ count: Int) async {
        await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
            state.withLock { s in
                if s.arrivals >= count { c.resume() } else { s.arrivalWaiters.append((count, c)) }
            }
        }
    }

    /// API calls that arrived so far (for tests: wait for `arrivalCount + n`).
    package var arrivalCount: Int { state.withLock { $0.arrivals } }

    /// Makes every custom/send call to `touser` wait (before it is decided) until ``release(touser:)``:
    /// a send that is in flight for as long as a test needs.
    package func hold(touser: String) {
        state.withLock { _ = $0.held.insert(touser) }
    }

    /// Lets the calls to `touser` waiting at the gate, and every later one, through.
    package func release(touser: String) {
        state.withLock { s in
            s.held.remove(touser)
            s.atGate.removeAll { w in
                guard w.touser == touser else { return false }
                w.continuation.resume()
                return true
            }
        }
    }

    /// Called by the fake API for each custom/send: returns at once unless `touser` is held.
    package func passGate(touser: String) async {
        await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
            state.withLock { s in
                guard s.held.contains(touser) else { return c.resume() }
                s.atGate.append((touser, c))
                s.arrivedAtGate[touser, default: 0] += 1
            }
        }
    }

    /// custom/send calls to `touser` that reached the gate while it was held, so far.
    package func heldCount(touser: String) -> Int {
        state.withLock { $0.arrivedAtGate[touser, default: 0] }
    }

    /// How many times custom/send was called, answered or not.
    public var sendCalls: Int { state.withLock { $0.sendCalls } }

    /// Recorded messages in arrival order, optionally for one user.
    public func messages(touser: String? = nil) -> [Recorded] {
        state.withLock { s in touser.map { u in s.recorded.filter { $0.touser == u } } ?? s.recorded }
    }

    /// How many messages were recorded (for one user, or in all), without copying them.
    public func count(touser: String? = nil) -> Int {
        state.withLock { s in touser.map { u in s.recorded.lazy.filter { $0.touser == u }.count } ?? s.recorded.count }
    }

    public func clearMessages() { state.withLock { $0.recorded.removeAll() } }

    public var menu: String? {
        get { state.withLock { $0.menu } }
        set { state.withLock { $0.menu = newValue } }
    }

    private static func randomToken() -> String {
        let alphabet = Array("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
        return String((0..<136).map { _ in alphabet.randomElement() ?? "A" })
    }
}

extension Duration {
    var seconds: Double { Double(components.seconds) + Double(components.attoseconds) / 1e18 }
}
