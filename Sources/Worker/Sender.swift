import AsyncHTTPClient
import Foundation
import NIOCore
import NIOPosix
import TokenClient
import WeChat

/// How a send ended, per the error table of the protocol page (§8).
public enum SendOutcome: Sendable, Equatable {
    case sent
    /// -1, 45011, 5xx, a connection that could not be opened: certainly not sent; try again later.
    case retryLater(String)
    /// The request may have reached WeChat and the answer was lost (a timeout, a connection
    /// closed mid-request): it may or may not have been sent (`WORKER_UNCERTAIN_SEND`).
    case uncertain(String)
    /// No access_token to be had (tokend or its Redis down): an outage of ours; the message
    /// waits it out without using up its retries.
    case unavailable(String)
    /// 43004, 45015, 45047 and request errors: this message will never go out.
    case permanent(Int, String)
    /// 45009, 48001, 40164 and credential errors: stop sending and alert an operator.
    case alert(Int, String)
}

/// Sends customer-service messages through `POST {WECHAT_API_URL}/cgi-bin/message/custom/send`
/// with pooled HTTP connections; a rejected token is refreshed (compare-and-refresh through
/// tokend) and the send retried once.
public struct Sender: Sendable {
    let apiURL: String
    let http: HTTPClient
    let tokens: TokenClient
    let timeout: Duration

    /// - Parameter timeout: bound on one API call (connect, send, answer); a call that runs
    ///   out is retried later through a delay queue.
    public init(apiURL: String, http: HTTPClient, tokens: TokenClient, timeout: Duration = .seconds(5)) {
        self.apiURL = apiURL.hasSuffix("/") ? String(apiURL.dropLast()) : apiURL
        self.http = http
        self.tokens = tokens
        self.timeout = timeout
    }

    /// Sends `message`. `stillOurs` is asked right before each request goes out (after the
    /// token was fetched): when it says no — the caller's claim grew too old, for example
    /// because the process was paused — nothing is sent and the outcome is ``SendOutcome/retryLater(_:)``.
    public func send(_ message: CustomerServiceMessage, stillOurs: @Sendable () -> Bool = { true }) async -> SendOutcome {
        let body: [UInt8]
        do {
            body = try message.jsonBody()
        } catch {
            return .permanent(-2, "cannot encode the message: \(error)")
        }
        let token: String
        do {
            token = try await tokens.accessToken()
        } catch {
            return .unavailable("no access_token: \(error)")
        }
        guard stillOurs() else { return .retryLater("the claim grew too old before the request could go out; not sent") }
        let first = await post(body, token: token)
        guard case .refresh = first else { return first.outcome }
        // The token was rejected: compare-and-refresh, then one more try.
        do {
            let fresh = try await tokens.tokenRejected(token)
            guard stillOurs() else { return .retryLater("the claim grew too old before the request could go out; not sent") }
            let second = await post(body, token: fresh)
            if case .refresh(let code, let msg) = second { return .retryLater("token rejected twice (\(code) \(msg))") }
            return second.outcome
        } catch {
            return .unavailable("token refresh failed: \(error)")
        }
    }

    private enum Attempt {
        case done(SendOutcome)
        case refresh(Int, String)

        var outcome: SendOutcome {
            switch self {
            case .done(let o): return o
            case .refresh(let code, let msg): return .retryLater("token rejected (\(code) \(msg))")
            }
        }
    }

    private static let okAnswer = Array(#"{"errcode":0,"errmsg":"ok"}"#.utf8)

    private func post(_ body: [UInt8], token: String) async -> Attempt {
        var request = HTTPClientRequest(url: "\(apiURL)/cgi-bin/message/custom/send?access_token=\(token)")
        request.method = .POST
        request.headers.add(name: "Content-Type", value: "application/json; charset=utf-8")
        request.body = .bytes(ByteBuffer(bytes: body))
        do {
            let response = try await http.execute(request, timeout: TimeAmount(timeout))
            let data = Data(try await response.body.collect(upTo: 1 << 16).readableBytesView)
            // A gateway's 502/504 may come after WeChat carried the send out: the reply may be out.
            if response.status == .badGateway || response.status == .gatewayTimeout {
                return .done(.uncertain("HTTP \(response.status.code) from a gateway: WeChat may have sent it"))
            }
            guard response.status == .ok else { return .done(.retryLater("HTTP \(response.status.code)")) }
            // The common answer, recognised without a JSON decoder.
            if data.elementsEqual(Self.okAnswer) { return .done(.sent) }
            guard let answer = try? JSONDecoder().decode(APIErrorResponse.self, from: data) else {
                return .done(.retryLater("unreadable answer"))
            }
            switch answer.disposition {
            case .success: return .done(.sent)
            case .retry: return .done(.retryLater("errcode \(answer.errcode) \(answer.errmsg)"))
            case .refreshToken: return .refresh(answer.errcode, answer.errmsg)
            case .permanent: return .done(.permanent(answer.errcode, answer.errmsg))
            case .alert: return .done(.alert(answer.errcode, answer.errmsg))
            }
        } catch let error as HTTPClientError where error == .connectTimeout {
            return .done(.retryLater("cannot connect: \(error)"))
        } catch let error as NIOConnectionError {
            return .done(.retryLater("cannot connect: \(error)"))
        } catch {
            // The request may have been written: WeChat may have sent the message.
            return .done(.uncertain("no answer: \(error)"))
        }
    }
}
