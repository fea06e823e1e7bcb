import Foundation
import Hummingbird
import NIOCore
import TokenClient
import WeChat

/// tokend's HTTP API (docs/CONTRACT.md): `/v1/*` behind `Authorization: Bearer $TOKEND_SECRET`.
public func buildTokendRouter(_ tokend: Tokend) -> Router<BasicRequestContext> {
    let router = Router()
    let bearer = Array("Bearer \(tokend.configuration.bearer)".utf8)
    @Sendable func authorized(_ request: Request) -> Bool {
        let given = Array((request.headers[.authorization] ?? "").utf8)
        return WeChatSignature.constantTimeEquals(given, bearer)
    }
    @Sendable func guarded(_ request: Request, _ body: () async throws -> Response) async -> Response {
        guard authorized(request) else {
            tokend.logger.warning("unauthorized request", metadata: ["http.path": "\(request.uri.path)"])
            return text(.unauthorized, "missing or wrong bearer token")
        }
        do {
            return try await body()
        } catch {
            tokend.recordUpstreamError(error)
            tokend.logger.error("request failed", metadata: ["http.path": "\(request.uri.path)", "error": "\(error)"])
            return text(.serviceUnavailable, "\(error)")
        }
    }
    /// The four requests, for one account: `/v1/…` (the only account) and `/v1/accounts/<appid>/…`.
    func routes(_ group: RouterGroup<BasicRequestContext>, _ resolve: @escaping @Sendable (Request, BasicRequestContext) -> TokendAccount?) {
        @Sendable func forAccount(_ request: Request, _ context: BasicRequestContext, _ body: (TokendAccount) async throws -> Response) async -> Response {
            await guarded(request) {
                guard let account = resolve(request, context) else {
                    return text(.notFound, "no such account (with several accounts, use /v1/accounts/<appid>/…)")
                }
                return try await body(account)
            }
        }
        group.get("access-token") { request, context in
            await forAccount(request, context) { account in
                let c = try await account.accessToken.refresh(.missing)
                return json(AccessTokenAnswer(accessToken: c.value, expiresAt: c.expiresAt))
            }
        }
        group.post("access-token/refresh") { request, context in
            await forAccount(request, context) { account in
                guard let stale = try await stringField(request, "stale_token") else {
                    return text(.badRequest, "expected {\"stale_token\": \"…\"}")
                }
                let c = try await account.accessToken.refresh(.passive, stale: stale)
                return json(AccessTokenAnswer(accessToken: c.value, expiresAt: c.expiresAt))
            }
        }
        group.get("jsapi-ticket") { request, context in
            await forAccount(request, context) { account in
                let c = try await account.jsapiTicket.refresh(.missing)
                return json(TicketAnswer(ticket: c.value, expiresAt: c.expiresAt))
            }
        }
        group.post("jssdk/signature") { request, context in
            await forAccount(request, context) { account in
                guard let url = try await stringField(request, "url") else {
                    return text(.badRequest, "expected {\"url\": \"…\"}")
                }
                let ticket = try await account.jsapiTicket.refresh(.missing).value
                let nonce = String((0..<16).map { _ in "abcdefghijklmnopqrstuvwxyz0123456789".randomElement() ?? "a" })
                let timestamp = Int64(Date().timeIntervalSince1970)
                return json(
                    JSSDKSignature(
                        appId: account.appID, timestamp: timestamp, nonceStr: nonce,
                        signature: WeChatSignature.jsapiSignature(ticket: ticket, nonceStr: nonce, timestamp: timestamp, url: url)))
            }
        }
    }
    let v1 = router.group("v1")
    routes(v1) { _, _ in tokend.account(nil) }
    routes(v1.group("accounts/:appid")) { _, context in context.parameters.get("appid").flatMap { tokend.account($0) } }
    router.get("/healthz") { _, _ in text(.ok, "ok") }
    router.get("/readyz") { _, _ in
        if let reason = await tokend.notReadyReason() { return text(.serviceUnavailable, reason) }
        return text(.ok, "ready")
    }
    router.get("/metrics") { _, _ in
        Response(
            status: .ok, headers: [.contentType: "text/plain; version=0.0.4"],
            body: ResponseBody(byteBuffer: ByteBuffer(string: await tokend.renderMetrics())))
    }
    return router
}

public struct TicketAnswer: Codable, Sendable {
    public var ticket: String
    public var expiresAt: Int64
    enum CodingKeys: String, CodingKey { case ticket, expiresAt = "expires_at" }
}

/// What `wx.config` needs.
public struct JSSDKSignature: Codable, Sendable {
    public var appId: String
    public var timestamp: Int64
    public var nonceStr: String
    public var signature: String
}

/// The non-empty string `name` of a small JSON object body (`{"url": "…"}`), or nil.
private func stringField(_ request: Request, _ name: String) async throws -> String? {
    let body = try await request.body.collect(upTo: 1 << 16)
    guard let value = (try? JSONDecoder().decode([String: String].self, from: Data(body.readableBytesView)))?[name], !value.isEmpty
    else { return nil }
    return value
}

private func json<T: Encodable>(_ value: T) -> Response {
    Response(
        status: .ok, headers: [.contentType: "application/json"],
        body: ResponseBody(byteBuffer: ByteBuffer(bytes: (try? WeChatJSON.encode(value)) ?? Array("{}".utf8))))
}

private func text(_ status: HTTPResponse.Status, _ body: String) -> Response {
    Response(status: status, headers: [.contentType: "text/plain; charset=utf-8"], body: ResponseBody(byteBuffer: ByteBuffer(string: body)))
}
