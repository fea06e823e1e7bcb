import AMQP
import Foundation
import Hummingbird
import Logging
import NIOCore
import RelayCore
import WeChat
import RelayContract
import Synchronization

/// A request the ingress refuses: the HTTP status of docs/CONTRACT.md and the
/// reason that goes into the log line (never a secret or a body).
struct Rejection: Error {
    let status: HTTPResponse.Status
    let outcome: IngressMetrics.Outcome
    let reason: String

    static func forbidden(_ reason: String) -> Rejection { Rejection(status: .forbidden, outcome: .forbidden, reason: reason) }
    static func badRequest(_ reason: String) -> Rejection { Rejection(status: .badRequest, outcome: .badRequest, reason: reason) }
}

/// The ingress's request handling: verification, decryption, parsing, and the
/// durable publish to RabbitMQ before `success`. No business logic and no
/// Redis, so replicas scale behind a load balancer.
public struct IngressHandler: Sendable {
    public let configuration: IngressConfiguration
    public let amqp: AMQPConnection
    public let metrics: IngressMetrics
    /// The passive-reply handshake, when `INGRESS_REPLY_WAIT` is above 0: run it as a service
    /// next to the HTTP server (it consumes this process's reply queue).
    public let passive: PassiveReplies?
    let logger: Logger
    /// Seconds since the Unix epoch; replaceable in tests.
    let now: @Sendable () -> Int64
    /// At most 20 rejection log lines at once, refilled at 5 a second.
    let rejectionLog = LogRateLimiter(burst: 20, perSecond: 5)
    /// The accounts served now, by AppID (replaced whole by ``reload(_:)``).
    private let accounts: LockedValue<[String: IngressAccount]>

    public init(
        configuration: IngressConfiguration, amqp: AMQPConnection, metrics: IngressMetrics, logger: Logger,
        now: @escaping @Sendable () -> Int64 = { Int64(Date().timeIntervalSince1970) }
    ) {
        self.configuration = configuration
        self.amqp = amqp
        self.metrics = metrics
        self.logger = logger
        self.now = now
        accounts = LockedValue(Dictionary(configuration.accounts.map { ($0.appID, $0) }) { first, _ in first })
        passive =
            configuration.replyWait > .zero || configuration.accounts.contains(where: { $0.replyWait > .zero })
            ? PassiveReplies(
                amqp: amqp, prefix: configuration.topology.prefix, logger: logger, onDeclined: { metrics.passiveLateOffer.increment() })
            : nil
    }

    // MARK: - Accounts

    /// The account a path serves: `/wechat/<appid>` names it; `/wechat` (nil) is the only account.
    public func account(_ appID: String?) -> IngressAccount? {
        accounts.withLock { a in
            guard let appID else { return a.count == 1 ? a.first?.value : nil }
            return a[appID]
        }
    }

    /// Replaces the accounts (a reload of `WECHAT_ACCOUNTS_FILE`): a request already being
    /// handled finishes with the account it started with; an account removed answers 404 from now on.
    public func reload(_ configuration: AccountsConfiguration) throws {
        let wait = self.configuration.replyWait
        let built = try configuration.accounts.map { try IngressAccount($0, defaultWait: wait, defaultMode: self.configuration.replyMode) }
        if passive == nil, let waiting = built.first(where: { $0.replyWait > .zero }) {
            throw ConfigurationError(
                variable: "WECHAT_ACCOUNTS_FILE",
                reason: "\(waiting.appID) waits for passive replies, but this ingress was started without (restart it)")
        }
        accounts.withLock { $0 = Dictionary(built.map { ($0.appID, $0) }) { first, _ in first } }
    }

    /// 404 for a path of no configured account.
    func unknownAccount(_ request: Request) -> Response {
        reject(Rejection(status: .notFound, outcome: .unknownAccount, reason: "no such account on this path"), request)
    }

    // MARK: - GET /wechat: URL verification

    func verify(_ request: Request, account: IngressAccount) -> Response {
        let q = request.uri.queryParameters
        do {
            try checkSignature(q, account)
            guard let echostr = q.get("echostr") else { throw Rejection.badRequest("verification without echostr") }
            metrics.count(.verified)
            logger.info("URL verification answered")
            return Self.text(.ok, echostr)
        } catch let r as Rejection {
            return reject(r, request)
        } catch {
            return reject(.badRequest("\(error)"), request)
        }
    }

    // MARK: - POST /wechat: a pushed message

    func receive(_ request: Request, account: IngressAccount) async -> Response {
        let q = request.uri.queryParameters
        let receivedAt = Date()
        let arrived = ContinuousClock.now
        do {
            try checkSignature(q, account)
            let body = try await collectBody(request)
            let inbound = try decode(body, query: q, account)
            // Waiting for a passive reply: the request's slot exists before the publish, so an
            // offer from a fast worker finds it. Without a reply queue (the broker connection is
            // being set up again) a push cannot be waited for: 503, and WeChat pushes it again.
            var waiting: (handshake: PassiveReplies, queue: String, id: String)?
            if let passive, account.replyWait > .zero {
                guard let queue = passive.queue else {
                    throw Rejection(
                        status: .serviceUnavailable, outcome: .unavailable,
                        reason: "INGRESS_REPLY_WAIT: the reply queue is not consumed yet (RabbitMQ connection being set up)")
                }
                waiting = (passive, queue, passive.register())
            }
            do {
                try await publish(
                    inbound, account, signedQuery: Self.signedQuery(q), receivedAt: receivedAt, replyTo: waiting.map { ($0.queue, $0.id) })
            } catch {
                if let waiting, let taken = waiting.handshake.abandon(waiting.id) { await waiting.handshake.send(.declined, for: taken) }
                throw error
            }
            metrics.count(.accepted)
            metrics.accepted(appID: account.appID)
            if let waiting {
                let waitStart = ContinuousClock.now
                let offer = await waiting.handshake.wait(waiting.id, for: arrived + account.offerWindow - ContinuousClock.now)
                metrics.replyWait.recordNanoseconds((ContinuousClock.now - waitStart).wholeNanoseconds)
                if let offer { return passiveResponse(offer, inbound, account, handshake: waiting.handshake) }
                metrics.passiveTimedOut.increment()
                // A wait past WeChat's 5 s (passive-only): no more offers are taken (WeChat would
                // drop the answer), but `success` only comes once WeChat has given up on this push
                // and retries it; the retry's ingress waits for the reply again.
                let hold = arrived + account.replyWait - ContinuousClock.now
                if hold > .zero { try? await Task.sleep(for: hold) }
            }
            logger.debug(
                "message accepted",
                metadata: [
                    "wechat.openid": "\(inbound.message.fromUserName)", "wechat.msg_type": "\(inbound.message.msgType)",
                    "wechat.dedup_key": "\(inbound.message.dedupKey)", "wechat.mode": "\(inbound.mode)",
                ])
            return Self.text(.ok, "success")
        } catch let r as Rejection {
            return reject(r, request)
        } catch {
            return reject(.badRequest("\(error)"), request)
        }
    }

    /// The signature first (cheap, constant-time, and it makes every later value one WeChat
    /// signed), then the window, with overflow-free arithmetic (`WeChatSignature.verifyPush`,
    /// which `ops/fuzz` fuzzes with Hummingbird's query parser in front).
    private func checkSignature(_ q: Parameters, _ account: IngressAccount) throws {
        do {
            try WeChatSignature.verifyPush(
                signature: q.get("signature"), timestamp: q.get("timestamp"), nonce: q.get("nonce"), tokens: account.tokens,
                now: now(), window: configuration.timestampWindow)
        } catch let e as WeChatError {
            throw Rejection.forbidden(e.message)
        }
    }

    private func collectBody(_ request: Request) async throws -> ByteBuffer {
        if let length = request.headers[.contentLength].flatMap(Int.init), length > configuration.maxBody {
            throw Rejection(
                status: .contentTooLarge, outcome: .tooLarge,
                reason: "body of \(length) bytes exceeds INGRESS_MAX_BODY (\(configuration.maxBody))")
        }
        do {
            let body = try await request.body.collect(upTo: configuration.maxBody)
            metrics.body(body.readableBytes)
            return body
        } catch is NIOTooManyBytesError {
            throw Rejection(
                status: .contentTooLarge, outcome: .tooLarge,
                reason: "body exceeds INGRESS_MAX_BODY (\(configuration.maxBody) bytes)")
        }
    }

    struct Inbound {
        var message: InboundMessage
        var xml: [UInt8]
        var mode: String
        /// For an encrypted push: the Token that signed it and the key that opened it (0 the
        /// current, 1 the previous, during a rotation): a passive reply is sealed with the same.
        var token: String? = nil
        var keyIndex = 0
    }

    /// Parses the body; in safe and compatible modes verifies `msg_signature` and decrypts.
    private func decode(_ body: ByteBuffer, query q: Parameters, _ account: IngressAccount) throws -> Inbound {
        let bytes = Array(body.readableBytesView)
        guard !bytes.isEmpty else { throw Rejection.badRequest("empty body") }
        let limits = XMLLimits(maxBytes: configuration.maxBody)
        let root = try parse(bytes, limits: limits)
        guard q.get("encrypt_type") == "aes" else {
            guard account.encryption != .safe else {
                throw Rejection.forbidden("safe mode (WECHAT_ENCRYPTION): a push without msg_signature and Encrypt is refused")
            }
            return Inbound(message: try message(root, account), xml: bytes, mode: "plaintext")
        }
        guard let crypto = account.crypto else {
            throw Rejection.badRequest("encrypted message, but WECHAT_AES_KEY is not configured")
        }
        guard let msgSignature = q.get("msg_signature") else { throw Rejection.forbidden("missing msg_signature") }
        guard let encrypted = root[child: "Encrypt"]?.text, !encrypted.isEmpty else {
            throw Rejection.badRequest("encrypt_type=aes but the body has no <Encrypt>")
        }
        guard let timestamp = q.get("timestamp"), let nonce = q.get("nonce"),
            let token = account.tokens.first(where: {
                WeChatSignature.verify(msgSignature, parts: [$0, timestamp, nonce, encrypted])
            })
        else {
            throw Rejection.forbidden("msg_signature does not match")
        }
        let plain: (message: String, keyIndex: Int)
        do {
            plain = try crypto.decryptReportingKey(encrypted)
        } catch let e as WeChatError {
            throw Rejection.badRequest("cannot decrypt (\(e.code.officialCode)): \(e.message)")
        }
        let xml = Array(plain.message.utf8)
        let mode = root[child: "MsgType"] != nil ? "compatible" : "safe"
        return Inbound(
            message: try message(try parse(xml, limits: limits), account), xml: xml, mode: mode, token: token, keyIndex: plain.keyIndex)
    }

    private func parse(_ bytes: [UInt8], limits: XMLLimits) throws -> XMLElement {
        do {
            return try WeChatXML.parse(bytes, limits: limits)
        } catch let e as WeChatError {
            throw Rejection.badRequest("XML rejected (\(e.code.rawValue)): \(e.message)")
        }
    }

    private func message(_ root: XMLElement, _ account: IngressAccount) throws -> InboundMessage {
        let m: InboundMessage
        do {
            m = try InboundMessage(root: root)
        } catch let e as WeChatError {
            throw Rejection.badRequest(e.message)
        }
        if let id = account.accountID, m.toUserName != id {
            throw Rejection.badRequest("ToUserName is not WECHAT_ACCOUNT_ID")
        }
        return m
    }

    /// `timestamp:nonce:signature`, once the signature was checked.
    static func signedQuery(_ q: Parameters) -> String {
        "\(q.get("timestamp") ?? ""):\(q.get("nonce") ?? ""):\(q.get("signature") ?? "")"
    }

    /// Publishes persistently and waits for the broker's confirm (at most INGRESS_CONFIRM_TIMEOUT).
    private func publish(_ inbound: Inbound, _ account: IngressAccount, signedQuery: String, receivedAt: Date, replyTo: (queue: String, id: String)?) async throws {
        let m = inbound.message
        let ms = Int64(receivedAt.timeIntervalSince1970 * 1000)
        var headers: AMQPTable = [
            WeChatTopology.Header.msgType: .string(m.msgType),
            WeChatTopology.Header.openID: .string(m.fromUserName),
            WeChatTopology.Header.receivedAtMs: .int(ms),
            WeChatTopology.Header.mode: .string(inbound.mode),
            WeChatTopology.Header.dedupKey: .string(m.dedupKey),
        ]
        // The worker records which message used the URL, so that a replay with another body is
        // dropped: needed wherever a plaintext push is accepted. The URL's signature covers neither
        // the body nor `encrypt_type`, so an encrypted push's URL can be replayed as a plaintext
        // push (another body) unless the account is safe-mode; in safe mode only encrypted pushes
        // are accepted, and their msg_signature covers the Encrypt they are read from: no header,
        // and the worker is spared that round trip to Redis.
        if account.encryption != .safe { headers[WeChatTopology.Header.signedQuery] = .string(signedQuery) }
        if let event = m.event { headers[WeChatTopology.Header.event] = .string(event) }
        if replyTo != nil {
            headers[PassiveHandshake.replyByHeader] = .int(ms + account.offerWindow.wholeNanoseconds / 1_000_000)
        }
        // message_id is a short string (≤ 255 bytes): the key's fixed-length digest goes there.
        let properties = AMQPProperties(
            contentType: "application/xml", headers: headers, persistent: true, correlationID: replyTo?.id,
            replyTo: replyTo?.queue, messageID: m.dedupID, timestamp: UInt64(ms / 1000), appID: account.appID)
        let topology = configuration.topology
        let start = ContinuousClock.now
        let deadline = start + configuration.confirmTimeout
        var pause = Duration.milliseconds(50)
        while true {
            do {
                try await amqp.publish(
                    AMQPMessage(body: inbound.xml, properties: properties), exchange: topology.inboundExchange,
                    routingKey: topology.routingKey(appID: account.appID, openID: m.fromUserName), confirmTimeout: deadline - ContinuousClock.now)
                metrics.published(after: ContinuousClock.now - start)
                return
            } catch let e as AMQPError where e.code == .invalidMessage {
                throw Rejection.badRequest("cannot be carried by AMQP: \(e.message)")
            } catch let e as AMQPError {
                // Nothing has been answered yet, so a publish the broker did not accept is tried
                // again while the deadline allows: a nack (a quorum queue electing a new leader
                // after a node loss), no connection (reconnecting to another node), a confirm lost
                // with its connection. A copy that did get in (the lost confirm) is a duplicate the
                // workers drop, as they drop WeChat's own retries. Resource alarms and a full
                // publish queue are answered at once: that is shedding load, not a fault to ride out.
                guard Self.transient.contains(e.code), deadline - ContinuousClock.now > pause + .milliseconds(100) else {
                    throw Rejection(
                        status: .serviceUnavailable, outcome: .unavailable, reason: "not confirmed by RabbitMQ: \(e.message)")
                }
                metrics.republished.increment()
                do {
                    try await Task.sleep(for: pause)
                } catch {
                    throw Rejection(status: .serviceUnavailable, outcome: .unavailable, reason: "stopping: \(e.message)")
                }
                pause = min(pause * 2, .milliseconds(500))
                // A publish needs time left for its confirm (a sleep can overrun).
                guard deadline - ContinuousClock.now > .milliseconds(50) else {
                    throw Rejection(
                        status: .serviceUnavailable, outcome: .unavailable, reason: "not confirmed by RabbitMQ: \(e.message)")
                }
            }
        }
    }

    /// The taken offer as the HTTP response: the worker's XML, encrypted when the push was
    /// (safe or compatible mode), with the Token and key the push came under. The verdict `taken`
    /// goes back once the body is written; a body that cannot be written (WeChat hung up), or a
    /// response never written, sends `declined`; a body written whose end fails gets no verdict
    /// (WeChat may have read it: the worker counts the send uncertain).
    private func passiveResponse(
        _ offer: PassiveReplies.Offer, _ inbound: Inbound, _ account: IngressAccount, handshake: PassiveReplies
    ) -> Response {
        var body = offer.xml
        if let token = inbound.token {
            do {
                guard let crypto = account.crypto else { throw WeChatError(.encryptAES, "no WECHAT_AES_KEY") }
                let nonce = String(UInt64.random(in: 1_000_000_000...9_999_999_999))
                body = Array(
                    try crypto.encryptedReply(
                        String(decoding: offer.xml, as: UTF8.self), token: token, timestamp: String(now()), nonce: nonce,
                        keyIndex: inbound.keyIndex
                    ).utf8)
            } catch {
                logger.error("cannot encrypt a passive reply; answering success", metadata: ["error": "\(error)"])
                Task { await handshake.send(.declined, for: offer) }
                metrics.passiveTimedOut.increment()
                return Self.text(.ok, "success")
            }
        }
        metrics.passiveReplied.increment()
        let verdict = VerdictOnce(offer: offer, handshake: handshake)
        let buffer = ByteBuffer(bytes: body)
        return Response(
            status: .ok, headers: [.contentType: "application/xml; charset=utf-8"],
            body: ResponseBody(contentLength: buffer.readableBytes) { writer in
                do {
                    try await writer.write(buffer)
                } catch {
                    await verdict.send(.declined)
                    throw error
                }
                do {
                    try await writer.finish(nil)
                } catch {
                    verdict.withhold()
                    throw error
                }
                await verdict.send(.taken)
            })
    }

    /// Publish failures tried again within the confirm deadline (see ``publish(_:signedQuery:receivedAt:)``).
    static let transient: Set<AMQPError.Code> = [.nacked, .notConnected, .connectionLost, .channelClosed]

    private func reject(_ r: Rejection, _ request: Request) -> Response {
        metrics.count(r.outcome)
        // The counter above keeps the full count; the log is rate-limited, since anyone can
        // send rejected requests, and every value from the request is escaped and shortened.
        if let suppressed = rejectionLog.admit() {
            let level: Logger.Level = r.status == .serviceUnavailable ? .error : .warning
            var metadata: Logger.Metadata = [
                "http.method": "\(request.method)", "http.status": "\(r.status.code)", "reason": "\(LogSafe.escape(r.reason))",
                "wechat.openid": "\(LogSafe.escape(request.uri.queryParameters.get("openid") ?? "-"))",
                "client.ip": "\(LogSafe.escape(Self.clientIP(request)))",
            ]
            if suppressed > 0 { metadata["log.suppressed"] = "\(suppressed)" }
            logger.log(level: level, "request rejected", metadata: metadata)
        }
        return Self.text(r.status, r.status == .serviceUnavailable ? "service unavailable" : r.status.reasonPhrase)
    }

    /// The caller's address as the reverse proxy saw it (`X-Real-IP`, else the
    /// first `X-Forwarded-For` hop; ops/nginx sets both), or `-` without a proxy.
    static func clientIP(_ request: Request) -> String {
        var forwardedFor: Substring?
        for field in request.headers {
            switch field.name.canonicalName {
            case "x-real-ip" where !field.value.isEmpty: return field.value
            case "x-forwarded-for" where forwardedFor == nil:
                forwardedFor = field.value.split(separator: ",").first.map { $0.drop { $0 == " " } }
            default: break
            }
        }
        if let forwardedFor, !forwardedFor.isEmpty { return String(forwardedFor) }
        return "-"
    }

    static func text(_ status: HTTPResponse.Status, _ body: String) -> Response {
        Response(
            status: status, headers: [.contentType: "text/plain; charset=utf-8"],
            body: ResponseBody(byteBuffer: ByteBuffer(string: body)))
    }
}

/// Builds the ingress router: `/wechat` (GET, POST), `/healthz`, `/readyz`, `/metrics`.
public func buildIngressRouter(_ handler: IngressHandler) -> Router<BasicRequestContext> {
    let router = Router()
    router.get("/wechat") { request, _ in
        guard let account = handler.account(nil) else { return handler.unknownAccount(request) }
        return handler.verify(request, account: account)
    }
    router.post("/wechat") { request, _ in
        guard let account = handler.account(nil) else { return handler.unknownAccount(request) }
        return await handler.receive(request, account: account)
    }
    router.get("/wechat/:appid") { request, context in
        guard let account = handler.account(context.parameters.get("appid") ?? "") else { return handler.unknownAccount(request) }
        return handler.verify(request, account: account)
    }
    router.post("/wechat/:appid") { request, context in
        guard let account = handler.account(context.parameters.get("appid") ?? "") else { return handler.unknownAccount(request) }
        return await handler.receive(request, account: account)
    }
    router.get("/healthz") { _, _ in IngressHandler.text(.ok, "ok") }
    router.get("/readyz") { _, _ in
        if handler.amqp.isReady {
            if let passive = handler.passive, passive.queue == nil {
                return IngressHandler.text(.serviceUnavailable, "INGRESS_REPLY_WAIT: the reply queue is not consumed yet")
            }
            return IngressHandler.text(.ok, "ready")
        }
        return IngressHandler.text(
            .serviceUnavailable,
            handler.amqp.isBlocked ? "RabbitMQ blocks publishing (resource alarm)" : "RabbitMQ connection is down")
    }
    router.get("/metrics") { _, _ in
        Response(
            status: .ok, headers: [.contentType: "text/plain; version=0.0.4"],
            body: ResponseBody(byteBuffer: ByteBuffer(string: handler.metrics.render(confirmsInFlight: handler.amqp.confirmsInFlight))))
    }
    return router
}

/// Builds the ingress application (an HTTP server `Service`). Connections idle for
/// `HTTP_IDLE_TIMEOUT` (including a request head that never completes) are closed.
public func buildIngressApplication(
    _ handler: IngressHandler, logger: Logger, onServerRunning: @escaping @Sendable (any Channel) async -> Void = { _ in }
) -> some ApplicationProtocol {
    Application(
        router: buildIngressRouter(handler),
        server: RelayHTTP.server(idleTimeout: handler.configuration.idleTimeout),
        configuration: .init(address: .hostname(handler.configuration.host, port: handler.configuration.port)),
        onServerRunning: onServerRunning,
        logger: logger)
}
