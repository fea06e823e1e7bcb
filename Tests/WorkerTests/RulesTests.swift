import Foundation
import Testing
import WeChat
import Worker

/// The YAML rules without a broker: matching, templates, reply types and errors.
@Suite("Reply rules")
struct RulesTests {
    let yaml = """
        rules:
          - match: { type: text, regex: "^订单\\\\s*([0-9]+)$" }
            reply: { text: "查询订单 {{message.Content}}" }
          - match: { type: text, prefix: "echo " }
            reply: { text: "{{message.Content}} / {{session.messages}} / {{session.nickname}}" }
          - match: { type: event, event: CLICK, event_key: PHOTO }
            reply: { msgtype: image, image: { media_id: "MEDIA_1" } }
          - match: { type: text, text: "next", state: quiz }
            reply: { text: "下一题" }
            set_state: ""
          - match: { type: text, text: "quiz" }
            reply: { text: "开始" }
            set_state: quiz
          - match: { type: event }
            reply: none
          - match: {}
            reply: { text: "?" }
        """

    func message(_ type: String, _ value: String? = nil, key: String? = nil) throws -> InboundMessage {
        var x = XMLBuilder()
        x.header(to: "gh", from: "oR", createTime: 1, msgType: type)
        if type == "event" {
            x.cdata("Event", value ?? "")
            if let key { x.cdata("EventKey", key) }
        } else {
            x.cdata("Content", value ?? ""); x.raw("MsgId", "1")
        }
        return try InboundMessage(xml: x.finish())
    }

    func text(_ d: ReplyRules.Decision) -> String? {
        if case .text(let t)? = d.reply?.content { return t }
        return nil
    }

    @Test func matchingTemplatesAndReplyTypes() throws {
        let rules = try ReplyRules(yaml: yaml)
        let session = SessionSnapshot(values: ["messages": "7", "f:nickname": "小明"])
        #expect(text(try rules.decide(message("text", "订单 42"), session: session)) == "查询订单 订单 42")
        #expect(text(try rules.decide(message("text", "订单x"), session: session)) == "?")  // regex does not match
        #expect(text(try rules.decide(message("text", "echo hi"), session: session)) == "echo hi / 7 / 小明")
        let photo = try rules.decide(message("event", "CLICK", key: "PHOTO"), session: session)
        #expect(photo.reply == CustomerServiceMessage(toUser: "oR", content: .image(mediaID: "MEDIA_1")))
        #expect(try rules.decide(message("event", "CLICK", key: "OTHER"), session: session).reply == nil)
        // State: "next" only matches inside the quiz; entering and leaving set the state.
        #expect(text(try rules.decide(message("text", "next"), session: session)) == "?")
        let start = try rules.decide(message("text", "quiz"), session: session)
        #expect(start.setState == "quiz")
        let next = try rules.decide(message("text", "next"), session: SessionSnapshot(values: ["state": "quiz"]))
        #expect(text(next) == "下一题" && next.setState == "")
    }

    @Test func theDefaultsMatchTheContract() throws {
        let d = ReplyRules.defaults
        let s = SessionSnapshot(values: ["messages": "3", "state": "menu"])
        #expect(text(try d.decide(message("text", "1"), session: s)) == "您已发送3条消息")
        #expect(text(try d.decide(message("text", "1"), session: SessionSnapshot(values: [:]))) == "暂不支持该指令")
        #expect(try d.decide(message("event", "VIEW", key: "https://x"), session: s).reply == nil)
    }

    /// ops/rules/default.yaml, the example shipped for operators, decides exactly like the built-in rules.
    @Test func theShippedRulesFileEqualsTheDefaults() throws {
        let path = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
            .appendingPathComponent("../../ops/rules/default.yaml").standardized.path
        let shipped = try ReplyRules(yaml: String(contentsOfFile: path, encoding: .utf8))
        let cases: [(String, String?, String?)] = [
            ("text", "帮助", nil), ("text", " 菜单 ", nil), ("text", "1", nil), ("text", "2", nil), ("text", "hello", nil),
            ("image", nil, nil), ("location", nil, nil), ("event", "CLICK", "HELP"), ("event", "CLICK", "OTHER"),
            ("event", "subscribe", nil), ("event", "unsubscribe", nil), ("event", "VIEW", "https://x"), ("event", "SCAN", "1"),
        ]
        let sessions = [SessionSnapshot(values: [:]), SessionSnapshot(values: ["messages": "5", "state": "menu"])]
        for (type, value, key) in cases {
            for session in sessions {
                let m = try message(type, value, key: key)
                #expect(try shipped.decide(m, session: session) == ReplyRules.defaults.decide(m, session: session), "\(type) \(value ?? "")")
            }
        }
    }

    @Test(arguments: [
        ("rules:\n  - match: { regex: \"([\" }\n    reply: { text: x }\n", "rule 1: invalid regex"),
        ("rules:\n  - match: {}\n    reply: { msgtype: image, image: {} }\n", "image.media_id is missing"),
        ("rules:\n  - match: {}\n    reply: { msgtype: sticker }\n", "needs `text:` or `msgtype: T`"),
        ("rules: [", "invalid rules file"),
    ])
    func badRulesFilesAreClearErrors(yaml: String, expected: String) {
        #expect { try ReplyRules(yaml: yaml) } throws: { "\($0)".contains(expected) }
    }
}
