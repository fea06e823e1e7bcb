import AsyncHTTPClient
import Hummingbird
import HummingbirdTesting
import Logging
import Simulator
import Testing
import WeChat
import Synchronization

/// The bench's bookkeeping, against a stand-in for ingress + worker that answers
/// `success` and replies through the fake platform — except that it drops the
/// reply to one push and sends another one twice.
@Suite("wechat-sim bench accounting")
struct BenchTests {
    @Test func countsLostAndDuplicatedReplies() async throws {
        // A quota above the 6 sends one user gets here: when the machine is slow, all of a
        // user's pushes can open the window before the first reply is sent, and the
        // default quota (5 per window) would then refuse the duplicate this test plants.
        var settings = FakePlatform.Settings(appID: "wx_b", secret: "s")
        settings.messageQuota = 100
        let platform = FakePlatform(settings: settings)
        let arrivals = Arrivals()
        let router = Router()
        router.post("/wechat") { request, _ -> String in
            let body = try await request.body.collect(upTo: 1 << 16)
            let message = try InboundMessage(xml: Array(body.readableBytesView))
            let reply = CustomerServiceMessage.text(to: message.fromUserName, "您好")
            let json = String(decoding: try WeChatJSON.encode(reply), as: UTF8.self)
            // Per user, so that concurrency cannot make the drop and the duplicate land on one user.
            switch (message.fromUserName, arrivals.next(message.fromUserName)) {
            case ("oBench000001", 1): break  // lost
            case ("oBench000002", 1):
                _ = platform.sendCustomerService(reply, body: json)
                _ = platform.sendCustomerService(reply, body: json)  // duplicated
            default:
                _ = platform.sendCustomerService(reply, body: json)
            }
            return "success"
        }
        let app = Application(router: router, configuration: .init(address: .hostname("127.0.0.1", port: 0)))
        try await app.test(.live) { client in
            let port = try #require(client.port)
            let pusher = Pusher(ingressURL: "http://127.0.0.1:\(port)/wechat", appID: "wx_b", token: "t", aesKey: nil, mode: .plaintext)
            let runner = BenchRunner(
                settings: BenchSettings(rate: 200, duration: .milliseconds(100), users: 4, drainTimeout: .milliseconds(300)),
                pusher: pusher, platform: platform, client: .shared)
            let report = await runner.run { _ in }
            #expect(report.pushed == 20)
            #expect(report.accepted == 20)
            #expect(report.errors.isEmpty)
            #expect(report.replies == 20)
            #expect(report.lost == 1)
            #expect(report.duplicated == 1)
            #expect(report.refusedByAPI.isEmpty)
            #expect(report.pushToReplyMs.count == 19)
            #expect(report.ingressLatencyMs.count == 20)
        }
    }
}

final class Arrivals: Sendable {
    private let counts = Mutex<[String: Int]>([:])
    func next(_ user: String) -> Int { counts.withLock { $0[user, default: 0] += 1; return $0[user, default: 0] } }
}
