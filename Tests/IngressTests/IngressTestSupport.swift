import AMQP
import Foundation
import Hummingbird
import HummingbirdTesting
import Ingress
import Logging
import NIOCore
import RelayCore
import TestSupport
import WeChat
import RelayAMQP
import RelayContract

let ingressLogger: Logger = {
    var l = Logger(label: "ingress-test")
    l.logLevel = ProcessInfo.processInfo.environment["WR_TEST_LOG"].flatMap(Logger.Level.init(rawValue:)) ?? .critical
    return l
}()

let appID = "wxb11529c136998cb6"
let token = "pamtest"
let aesKey = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG"
let now: Int64 = 1_700_000_000

/// An ingress wired to the test broker, with a topology of its own.
struct IngressFixture {
    let handler: IngressHandler
    let amqp: AMQPConnection
    let topology: WeChatTopology
    let crypto: WeChatMessageCrypto

    static func make(extra: [String: String] = [:], amqpURL: String? = nil, realClock: Bool = false) async throws -> IngressFixture {
        var env = ["WECHAT_APPID": appID, "WECHAT_TOKEN": token, "WECHAT_AES_KEY": aesKey, "INGRESS_TIMESTAMP_WINDOW": "300"]
        env["AMQP_URL"] = try amqpURL ?? TestServices.amqpURL()
        for (k, v) in extra { env[k] = v }
        var configuration = try IngressConfiguration(RelayEnvironment(env))
        configuration.topology = WeChatTopology(prefix: TestServices.unique("ingress"), shardCount: 2)
        configuration.port = 0
        var amqpConfig = configuration.amqp
        amqpConfig.maxReconnectDelay = .milliseconds(300)
        let amqp = try await AMQPConnection.connect(
            configuration: amqpConfig, topology: configuration.topology.inbound, logger: ingressLogger)
        let handler = realClock
            ? IngressHandler(configuration: configuration, amqp: amqp, metrics: IngressMetrics(), logger: ingressLogger)
            : IngressHandler(configuration: configuration, amqp: amqp, metrics: IngressMetrics(), logger: ingressLogger, now: { now })
        return IngressFixture(
            handler: handler, amqp: amqp, topology: configuration.topology,
            crypto: WeChatMessageCrypto(appID: appID, key: try EncodingAESKey(aesKey)))
    }

    var app: some ApplicationProtocol { Application(router: buildIngressRouter(handler), logger: ingressLogger) }

    /// Messages waiting in all shard queues.
    func queued() async throws -> Int {
        var n = 0
        for s in 0..<topology.shardCount { n += try await amqp.queueInfo(topology.shardQueue(s)).messageCount }
        return n
    }

    /// Takes the next message of a user's shard (`basic.get` is refused by quorum
    /// queues with a single active consumer, so this consumes one delivery).
    func take(openID: String) async throws -> AMQPDelivery? {
        let consumer = try await amqp.consume(queue: topology.shardQueue(topology.shard(appID: appID, openID: openID)), prefetch: 1)
        var it = consumer.makeAsyncIterator()
        let d = try await it.next()
        await consumer.cancel()
        return d
    }

    func tearDown() async {
        for s in 0..<topology.shardCount { _ = try? await amqp.deleteQueue(topology.shardQueue(s)) }
        _ = try? await amqp.deleteQueue(topology.deadLetterQueue)
        try? await amqp.deleteExchange(topology.inboundExchange)
        try? await amqp.deleteExchange(topology.deadLetterExchange)
        await amqp.close()
    }
}

/// The query string WeChat would send.
func query(
    timestamp: Int64 = now, nonce: String = "nonce1", openID: String = "oUser", token: String = token,
    encrypted: String? = nil, signature: String? = nil, msgSignature: String? = nil
) -> String {
    let ts = String(timestamp)
    var q = "signature=\(signature ?? WeChatSignature.signature(token: token, timestamp: ts, nonce: nonce))&timestamp=\(ts)&nonce=\(nonce)&openid=\(openID)"
    if let encrypted {
        let sig = msgSignature ?? WeChatSignature.messageSignature(token: token, timestamp: ts, nonce: nonce, encrypted: encrypted)
        q += "&encrypt_type=aes&msg_signature=\(sig)"
    }
    return q
}

/// A pushed message of every type and event of the protocol page.
func sampleMessages(openID: String) -> [(name: String, xml: String)] {
    func push(_ type: String, _ fields: [(String, String)], msgID: String? = nil) -> String {
        var x = XMLBuilder()
        x.header(to: "gh_account", from: openID, createTime: now, msgType: type)
        for (k, v) in fields { x.cdata(k, v) }
        if let msgID { x.raw("MsgId", msgID) }
        return x.finish()
    }
    func event(_ name: String, _ fields: [(String, String)] = []) -> String { push("event", [("Event", name)] + fields) }
    return [
        ("text", push("text", [("Content", "帮助 ]]> <&>")], msgID: "1001")),
        ("image", push("image", [("PicUrl", "http://p/1.jpg"), ("MediaId", "m1")], msgID: "1002")),
        ("voice", push("voice", [("MediaId", "m2"), ("Format", "amr"), ("Recognition", "菜单")], msgID: "1003")),
        ("video", push("video", [("MediaId", "m3"), ("ThumbMediaId", "t3")], msgID: "1004")),
        ("shortvideo", push("shortvideo", [("MediaId", "m4"), ("ThumbMediaId", "t4")], msgID: "1005")),
        ("location", push("location", [("Location_X", "23.1"), ("Location_Y", "113.3"), ("Scale", "20"), ("Label", "广州")], msgID: "1006")),
        ("link", push("link", [("Title", "t"), ("Description", "d"), ("Url", "http://u")], msgID: "1007")),
        ("file", push("file", [("Title", "a.pdf"), ("FileKey", "k"), ("FileMd5", "m"), ("FileTotalLen", "9")], msgID: "1008")),
        ("subscribe", event("subscribe", [("EventKey", "qrscene_7"), ("Ticket", "TK")])),
        ("unsubscribe", event("unsubscribe")),
        ("SCAN", event("SCAN", [("EventKey", "7"), ("Ticket", "TK")])),
        ("LOCATION", event("LOCATION", [("Latitude", "23.1"), ("Longitude", "113.3"), ("Precision", "119.3")])),
        ("CLICK", event("CLICK", [("EventKey", "HELP")])),
        ("VIEW", event("VIEW", [("EventKey", "http://v")])),
        ("scancode_push", event("scancode_push", [("EventKey", "s")])),
        ("pic_weixin", event("pic_weixin", [("EventKey", "p")])),
        ("location_select", event("location_select", [("EventKey", "l")])),
        ("view_miniprogram", event("view_miniprogram", [("EventKey", "pages/i")])),
        ("TEMPLATESENDJOBFINISH", event("TEMPLATESENDJOBFINISH", [("MsgID", "88"), ("Status", "success")])),
        ("MASSSENDJOBFINISH", event("MASSSENDJOBFINISH", [("MsgID", "99"), ("Status", "sendsuccess")])),
        ("future type", push("miniprogram_card", [("Title", "x")], msgID: "1009")),
    ]
}

extension TestResponse {
    var text: String { String(buffer: body) }
}
