import AsyncHTTPClient
import Hummingbird
import HummingbirdTesting
import Ingress
import RelayCore
import Simulator
import TestSupport
import Testing
import WeChat
import RelayContract

/// `wechat-sim send`'s pusher against a real ingress (live HTTP) and the real broker.
@Suite("wechat-sim send against the ingress", .enabled(if: TestServices.amqpEnabled), .timeLimit(.minutes(6)))
struct SimulatorSendTests {
    @Test(arguments: Pusher.Mode.allCases)
    func sendInEveryMode(mode: Pusher.Mode) async throws {
        // The ingress checks timestamps against the real clock here.
        let f = try await IngressFixture.make(realClock: true)
        let app = Application(router: buildIngressRouter(f.handler), configuration: .init(address: .hostname("127.0.0.1", port: 0)))
        try await app.test(.live) { client in
            let port = try #require(client.port)
            let pusher = Pusher(
                ingressURL: "http://127.0.0.1:\(port)/wechat", appID: appID, token: token, aesKey: try EncodingAESKey(aesKey),
                accountID: "gh_account", mode: mode)
            let openID = "oSend-\(mode.rawValue)"
            for (kind, value, key) in [("text", "帮助", nil), ("voice", "菜单", nil), ("image", nil, nil), ("event", "CLICK", "HELP"), ("event", "subscribe", "qrscene_1")] as [(String, String?, String?)] {
                let xml = try PushBuilder.xml(kind: kind, value: value, eventKey: key, from: openID, to: "gh_account")
                let result = try await pusher.push(xml, openID: openID)
                #expect(result.status == 200 && result.body == "success" && result.tries == 1, "\(mode) \(kind)")
                let d = try #require(try await f.take(openID: openID))
                #expect(d.message.bodyString == xml)
                #expect(d.message.properties.headers[WeChatTopology.Header.mode]?.stringValue == mode.rawValue)
                try d.ack()
            }
            let verified = try await pusher.verify()
            #expect(verified.status == 200 && verified.echoed)
            // A wrong token is refused, and `verify` says so.
            var wrong = pusher
            wrong.token = "not-the-token"
            #expect(try await wrong.verify().echoed == false)
            let refused = try await wrong.push(try PushBuilder.xml(kind: "text", value: "x", eventKey: nil, from: openID, to: "gh_account"), openID: openID)
            #expect(refused.status == 403)
        }
        await f.tearDown()
    }
}
