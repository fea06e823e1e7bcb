import Foundation
import Hummingbird
import Logging
import NIOCore
import WeChat

/// The fake `api.weixin.qq.com`: the HTTP face of ``FakePlatform``.
///
/// Like WeChat, every API answer is HTTP 200 with a JSON body; failures carry
/// `errcode`/`errmsg`. Extra routes under `/sim/` inspect what was sent,
/// inject faults and tell the platform about pushes made by another process.
public struct FakeAPI: Sendable {
    /// The first account's platform (the single-account case).
    public let platform: FakePlatform
    /// Every account's platform, the first one included: an API call belongs to the account
    /// whose AppID (token requests) or token (everything else) it carries; `/sim/…` requests
    /// take `?appid=` (default: the first account).
    public let platforms: [FakePlatform]
    /// The toy decision service at `/sim/decide`.
    public let decider: ToyDecider
    let logger: Logger

    public init(platform: FakePlatform, others: [FakePlatform] = [], decider: ToyDecider = ToyDecider(), logger: Logger) {
        self.platform = platform
        self.platforms = [platform] + others
        self.decider = decider
        self.logger = logger
    }

    /// The platform of an AppID (the first one when nil or unknown: it then refuses the call).
    func platform(appID: String?) -> FakePlatform {
        guard let appID else { return platform }
        return platforms.first { $0.settings.appID == appID } ?? platform
    }

    /// The platform that issued an access_token (the first one when none did: it refuses it).
    func platform(token: String?) -> FakePlatform {
        guard let token, platforms.count > 1 else { return platform }
        return platforms.first { $0.issued(token) } ?? platform
    }

    /// The platform a `/sim/…` request names with `?appid=`.
    func platform(_ request: Request) -> FakePlatform { platform(appID: request.uri.queryParameters.get("appid")) }

    public func router() -> Router<BasicRequestContext> {
        let router = Router()
        let api = router.group("cgi-bin")
        api.get("token") { request, _ in await faulty(request) { token(request) } }
        api.post("stable_token") { request, _ in await faulty(request) { try await stableToken(request) } }
        api.get("ticket/getticket") { request, _ in await faulty(request) { ticket(request) } }
        api.post("message/custom/send") { request, _ in await faulty(request) { try await customSend(request) } }
        api.post("message/custom/typing") { request, _ in await faulty(request) { try await typing(request) } }
        api.post("message/template/send") { request, _ in await faulty(request) { try await templateSend(request) } }
        api.post("menu/create") { request, _ in await faulty(request) { try await menuCreate(request) } }
        api.get("menu/get") { request, _ in await faulty(request) { menuGet(request) } }
        api.get("menu/delete") { request, _ in await faulty(request) { menuDelete(request) } }

        router.get("/sim/messages") { request, _ in
            Self.json(platform(request).messages(touser: request.uri.queryParameters.get("touser")))
        }
        router.get("/sim/count") { request, _ in
            Self.json(["count": platform(request).count(touser: request.uri.queryParameters.get("touser"))])
        }
        router.delete("/sim/messages") { request, _ in
            platform(request).clearMessages()
            return Self.json(["cleared": true])
        }
        router.get("/sim/faults") { request, _ in Self.json(platform(request).faults) }
        router.post("/sim/faults") { request, _ in
            let body = try await request.body.collect(upTo: 64 << 10)
            guard let faults = try? JSONDecoder().decode(FakePlatform.Faults.self, from: Data(body.readableBytesView)) else {
                return Self.status(.badRequest, "expected {errorRate, latencyMs, dropRate, expireTokens, quotaExhausted}")
            }
            platform(request).faults = faults
            logger.notice("faults set", metadata: ["sim.faults": "\(faults)"])
            return Self.json(faults)
        }
        router.post("/sim/users/:openid/pushed") { request, context in
            guard let openID = context.parameters.get("openid"), let type = request.uri.queryParameters.get("msgtype") else {
                return Self.status(.badRequest, "need /sim/users/{openid}/pushed?msgtype=…[&event=…]")
            }
            platform(request).userPushed(openID: openID, msgType: type, event: request.uri.queryParameters.get("event"))
            return Self.json(["ok": true])
        }
        decider.addRoutes(to: router)
        router.get("/healthz") { _, _ in Self.status(.ok, "ok") }
        return router
    }

    // MARK: - Token and ticket

    private func token(_ request: Request) -> Response {
        let q = request.uri.queryParameters
        guard q.get("grant_type") == "client_credential" else { return Self.error(40002, "invalid grant_type") }
        let platform = self.platform(appID: q.get("appid"))
        if let e = platform.checkCredentials(appID: q.get("appid"), secret: q.get("secret")) { return Self.json(e) }
        return Self.json(platform.issueToken())
    }

    private func stableToken(_ request: Request) async throws -> Response {
        guard let body = try await Self.body(request) else { return Self.error(44002, "empty post data") }
        guard let r = try? JSONDecoder().decode(StableTokenRequest.self, from: Data(body)) else {
            return Self.error(47001, "data format error")
        }
        guard r.grantType == "client_credential" else { return Self.error(40002, "invalid grant_type") }
        let platform = self.platform(appID: r.appid)
        if let e = platform.checkCredentials(appID: r.appid, secret: r.secret) { return Self.json(e) }
        return Self.json(platform.issueStableToken(forceRefresh: r.forceRefresh))
    }

    private func ticket(_ request: Request) -> Response {
        let q = request.uri.queryParameters
        let platform = self.platform(token: q.get("access_token"))
        if let e = platform.checkToken(q.get("access_token")) { return Self.json(e) }
        guard q.get("type") == "jsapi" else { return Self.error(40097, "invalid args: type must be jsapi") }
        return Self.json(platform.issueTicket())
    }

    // MARK: - Messages

    private func customSend(_ request: Request) async throws -> Response {
        let platform = self.platform(token: request.uri.queryParameters.get("access_token"))
        if let e = platform.checkToken(request.uri.queryParameters.get("access_token")) { return Self.json(e) }
        guard let body = try await Self.body(request) else { return Self.error(44002, "empty post data") }
        let text = String(decoding: body, as: UTF8.self)
        let message: CustomerServiceMessage
        do {
            message = try JSONDecoder().decode(CustomerServiceMessage.self, from: Data(body))
        } catch let e as CustomerServiceMessage.InvalidMessage {
            return e.description.hasPrefix("unknown msgtype")
                ? Self.error(WeChatErrorCode.invalidMsgType, "invalid message type")
                : Self.error(WeChatErrorCode.invalidParameter, "invalid parameter: \(e.description)")
        } catch {
            return Self.error(47001, "data format error")
        }
        if case .news(let articles) = message.content, articles.count > 1 {
            return Self.error(WeChatErrorCode.articleLimitExceeded, "article size out of limit")
        }
        await platform.passGate(touser: message.toUser)
        let answer = platform.sendCustomerService(message, body: text)
        if answer.errcode != 0 {
            logger.info("custom/send refused", metadata: ["wechat.openid": "\(message.toUser)", "wechat.errcode": "\(answer.errcode)"])
        } else if platform.takeGatewayErrorAfterSend() {
            return Self.status(.gatewayTimeout, "gateway timeout (the message was sent)")
        }
        return Self.json(answer)
    }

    private func typing(_ request: Request) async throws -> Response {
        let platform = self.platform(token: request.uri.queryParameters.get("access_token"))
        if let e = platform.checkToken(request.uri.queryParameters.get("access_token")) { return Self.json(e) }
        guard let body = try await Self.body(request) else { return Self.error(44002, "empty post data") }
        guard let t = try? JSONDecoder().decode(TypingCommand.self, from: Data(body)), !t.touser.isEmpty else {
            return Self.error(47001, "data format error")
        }
        _ = platform.record(api: "typing", touser: t.touser, msgtype: t.command.rawValue, body: String(decoding: body, as: UTF8.self))
        return Self.error(0, "ok")
    }

    private func templateSend(_ request: Request) async throws -> Response {
        let platform = self.platform(token: request.uri.queryParameters.get("access_token"))
        if let e = platform.checkToken(request.uri.queryParameters.get("access_token")) { return Self.json(e) }
        guard let body = try await Self.body(request) else { return Self.error(44002, "empty post data") }
        guard let t = try? JSONDecoder().decode(TemplateMessage.self, from: Data(body)) else {
            return Self.error(47001, "data format error")
        }
        guard !t.templateID.isEmpty else { return Self.error(40037, "invalid template_id") }
        guard !t.touser.isEmpty else { return Self.error(40003, "invalid openid") }
        let seq = platform.record(api: "template", touser: t.touser, msgtype: "template", body: String(decoding: body, as: UTF8.self))
        return Self.json(TemplateAnswer(errcode: 0, errmsg: "ok", msgid: seq))
    }

    private struct TemplateAnswer: Codable { var errcode: Int; var errmsg: String; var msgid: Int }

    // MARK: - Menu

    private func menuCreate(_ request: Request) async throws -> Response {
        let platform = self.platform(token: request.uri.queryParameters.get("access_token"))
        if let e = platform.checkToken(request.uri.queryParameters.get("access_token")) { return Self.json(e) }
        guard let body = try await Self.body(request) else { return Self.error(44002, "empty post data") }
        guard let object = try? JSONSerialization.jsonObject(with: Data(body)) as? [String: Any],
            let buttons = object["button"] as? [Any], (1...3).contains(buttons.count)
        else {
            return Self.error(40016, "invalid button size")
        }
        platform.menu = String(decoding: body, as: UTF8.self)
        return Self.error(0, "ok")
    }

    private func menuGet(_ request: Request) -> Response {
        let platform = self.platform(token: request.uri.queryParameters.get("access_token"))
        if let e = platform.checkToken(request.uri.queryParameters.get("access_token")) { return Self.json(e) }
        guard let menu = platform.menu else { return Self.error(46003, "menu no exist") }
        return Self.raw("{\"menu\":\(menu)}")
    }

    private func menuDelete(_ request: Request) -> Response {
        let platform = self.platform(token: request.uri.queryParameters.get("access_token"))
        if let e = platform.checkToken(request.uri.queryParameters.get("access_token")) { return Self.json(e) }
        platform.menu = nil
        return Self.error(0, "ok")
    }

    // MARK: - Faults and helpers

    /// Applies the injected faults around an API call.
    private func faulty(_ request: Request, _ body: () async throws -> Response) async -> Response {
        let q = request.uri.queryParameters
        let platform = q.get("access_token").map { self.platform(token: $0) } ?? self.platform(appID: q.get("appid"))
        platform.noteArrival()
        let f = platform.faults
        if f.latencyMs > 0 { try? await Task.sleep(for: .milliseconds(f.latencyMs)) }
        if f.dropRate > 0, Double.random(in: 0..<1) < f.dropRate {
            // A dropped connection, as the caller sees it: no answer within any sane client timeout.
            try? await Task.sleep(for: .seconds(30))
            return Self.status(.gatewayTimeout, "dropped")
        }
        if f.errorRate > 0, Double.random(in: 0..<1) < f.errorRate {
            return Self.error(WeChatErrorCode.systemBusy, "system error")
        }
        do {
            return try await body()
        } catch {
            return Self.error(47001, "data format error")
        }
    }

    static func body(_ request: Request) async throws -> [UInt8]? {
        let buffer = try await request.body.collect(upTo: 1 << 20)
        return buffer.readableBytes == 0 ? nil : Array(buffer.readableBytesView)
    }

    static func error(_ code: Int, _ message: String) -> Response { json(APIErrorResponse(errcode: code, errmsg: message)) }

    static func json<T: Encodable>(_ value: T) -> Response {
        raw(String(decoding: (try? WeChatJSON.encode(value)) ?? Array("{}".utf8), as: UTF8.self))
    }

    static func raw(_ json: String) -> Response {
        Response(
            status: .ok, headers: [.contentType: "application/json; charset=utf-8"],
            body: ResponseBody(byteBuffer: ByteBuffer(string: json)))
    }

    static func status(_ status: HTTPResponse.Status, _ text: String) -> Response {
        Response(status: status, headers: [.contentType: "text/plain"], body: ResponseBody(byteBuffer: ByteBuffer(string: text)))
    }
}
