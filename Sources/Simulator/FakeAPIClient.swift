import AsyncHTTPClient
import Foundation
import NIOCore
import WeChat

/// Talks to a running `wechat-sim api` from another process: reports pushes
/// (so the customer-service window opens) and reads recorded replies.
public struct FakeAPIClient: Sendable {
    public var baseURL: String
    /// The account (with several configured in the fake API); nil: its first.
    public var appID: String?

    public init(baseURL: String, appID: String? = nil) {
        self.baseURL = baseURL
        self.appID = appID
    }

    private var account: String { appID.map { "&appid=\($0)" } ?? "" }

    /// Tells the fake API about a push; returns how many messages were recorded for the user before it.
    public func register(push message: InboundMessage, client: HTTPClient) async throws -> Int {
        var url = "\(baseURL)/sim/users/\(message.fromUserName)/pushed?msgtype=\(message.msgType)"
        if let event = message.event { url += "&event=\(event)" }
        url += account
        var request = HTTPClientRequest(url: url)
        request.method = .POST
        let response = try await client.execute(request, timeout: .seconds(5))
        guard response.status == .ok else { throw PushError(message: "fake API at \(baseURL) answered \(response.status)") }
        return try await messages(to: message.fromUserName, client: client).count
    }

    public func messages(to openID: String, client: HTTPClient) async throws -> [FakePlatform.Recorded] {
        let response = try await client.execute(HTTPClientRequest(url: "\(baseURL)/sim/messages?touser=\(openID)\(account)"), timeout: .seconds(5))
        let body = try await response.body.collect(upTo: 16 << 20)
        return try JSONDecoder().decode([FakePlatform.Recorded].self, from: Data(body.readableBytesView))
    }

    /// Polls (every 50 ms) until a message beyond the first `count` is recorded for the user.
    public func waitForReply(to openID: String, after count: Int, timeout: Duration, client: HTTPClient) async throws
        -> FakePlatform.Recorded?
    {
        let deadline = ContinuousClock.now + timeout
        while ContinuousClock.now < deadline {
            let all = try await messages(to: openID, client: client)
            if all.count > count { return all[count] }
            try await Task.sleep(for: .milliseconds(50))
        }
        return nil
    }
}
