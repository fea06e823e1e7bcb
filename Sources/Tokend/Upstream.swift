import AsyncHTTPClient
import Foundation
import NIOCore
import WeChat

/// Calls to the WeChat API that tokend makes: `/cgi-bin/stable_token` or
/// `/cgi-bin/token`, and `/cgi-bin/ticket/getticket`.
public struct WeChatUpstream: Sendable {
    public enum TokenEndpoint: String, Sendable {
        /// `POST /cgi-bin/stable_token` (default): the same token while valid; `force_refresh` for a rejected one.
        case stable
        /// `GET /cgi-bin/token`: a new token every call (the previous one works for ~5 more minutes).
        case token
    }

    public var apiURL: String
    public var appID: String
    public var secret: String
    public var endpoint: TokenEndpoint
    let http: HTTPClient

    public init(apiURL: String, appID: String, secret: String, endpoint: TokenEndpoint, http: HTTPClient = .shared) {
        self.apiURL = apiURL.hasSuffix("/") ? String(apiURL.dropLast()) : apiURL
        self.appID = appID
        self.secret = secret
        self.endpoint = endpoint
        self.http = http
    }

    /// Fetches an access_token; `force` asks stable_token for a new one (used when the current one was rejected).
    public func accessToken(force: Bool) async throws -> AccessTokenResponse {
        var request: HTTPClientRequest
        switch endpoint {
        case .stable:
            request = HTTPClientRequest(url: "\(apiURL)/cgi-bin/stable_token")
            request.method = .POST
            request.headers.add(name: "Content-Type", value: "application/json")
            request.body = .bytes(ByteBuffer(bytes: try WeChatJSON.encode(StableTokenRequest(appid: appID, secret: secret, forceRefresh: force))))
        case .token:
            let q = "grant_type=client_credential&appid=\(appID)&secret=\(secret)"
            request = HTTPClientRequest(url: "\(apiURL)/cgi-bin/token?\(q)")
        }
        return try await call(request, as: AccessTokenResponse.self)
    }

    public func jsapiTicket(accessToken: String) async throws -> TicketResponse {
        try await call(HTTPClientRequest(url: "\(apiURL)/cgi-bin/ticket/getticket?access_token=\(accessToken)&type=jsapi"), as: TicketResponse.self)
    }

    private func call<T: Decodable>(_ request: HTTPClientRequest, as: T.Type) async throws -> T {
        let response: HTTPClientResponse
        do {
            response = try await http.execute(request, timeout: .seconds(10))
        } catch {
            throw UpstreamError(errcode: -1, errmsg: "network error: \(error)")
        }
        let body = try await response.body.collect(upTo: 1 << 20)
        let data = Data(body.readableBytesView)
        if let e = try? JSONDecoder().decode(APIErrorResponse.self, from: data), e.errcode != 0 {
            throw UpstreamError(errcode: e.errcode, errmsg: e.errmsg)
        }
        guard response.status == .ok, let value = try? JSONDecoder().decode(T.self, from: data) else {
            throw UpstreamError(errcode: -1, errmsg: "unexpected answer: HTTP \(response.status.code)")
        }
        return value
    }
}
