import Foundation
import Redis
import RelayContract
import Simulator
import TestSupport
import Testing
import WeChat
import Worker

/// `WORKER_DECIDE_URL`: the toy decision service of `wechat-sim` (`/sim/decide`) through a real worker.
@Suite("Decision service", .enabled(if: TestServices.amqpEnabled && TestServices.redisEnabled), .timeLimit(.minutes(6)))
struct DecisionServiceTests {
    static let shortRetries: [Duration] = [.milliseconds(200), .milliseconds(200), .milliseconds(200)]

    @Test func theServiceDecidesWhatNoRuleMatchesAndItsFieldsCarryOver() async throws {
        try await withStack { s in
            // One rule: it wins over the service for what it matches.
            let rules = try ReplyRules(yaml: "rules:\n  - match: { type: text, text: 帮助 }\n    reply: { text: 规则的回复 }\n")
            let w = try await s.worker(rules: rules, decideTimeout: .seconds(3))
            try await running([w]) {
                try await s.push("event", "subscribe", from: "oDecide")
                let help = try await s.push("text", "帮助", from: "oDecide")
                try await s.push("text", "你好", from: "oDecide")
                try await s.push("event", "LOCATION", from: "oDecide")  // the service answers no reply
                try await s.push("text", "再见", from: "oDecide")
                let replies = await s.replies(to: "oDecide", count: 4)
                #expect(replies == ["欢迎关注(来自决策服务)", "规则的回复", "回声(第1句): 你好", "回声(第2句): 再见"])
                #expect(s.decider.calls[help.dedupID] == nil)
            }
            #expect(s.decider.calls.count == 4)
            #expect(s.platform.messages(touser: "oDecide").count == 4)
            // The field the service set is in the session.
            let session = try await s.redis.send(["HGET", .init(WorkerKeys(prefix: s.topology.prefix, appID: s.appID).session("oDecide")), "f:turns"])
            #expect(session.text == "2")
        }
    }

    /// A failing service (HTTP 500) and one past its deadline: the message is retried with
    /// back-off (the 500s count against its retries; the deadline is an outage, waited out) and
    /// answered once, from the first answer that came.
    @Test func aFailingOrSlowServiceIsRetriedAndTheMessageAnsweredOnce() async throws {
        try await withStack { s in
            let w = try await s.worker(retryDelays: Self.shortRetries, decideTimeout: .seconds(1))
            var faults = ToyDecider.Faults()
            faults.failNext = 2
            s.decider.faults = faults
            try await running([w]) {
                let failing = try await s.push("text", "一", from: "oFlaky")
                #expect(await s.replies(to: "oFlaky", count: 1) == ["回声(第1句): 一"])
                #expect(s.decider.calls[failing.dedupID] == 3)
                // Past the 1 s deadline: the call is abandoned and made again.
                faults.failNext = 0
                faults.latencyMs = 1_500
                s.decider.faults = faults
                let slow = try await s.push("text", "二", from: "oFlaky")
                try await eventually("the first call to time out and a second to start") { (s.decider.calls[slow.dedupID] ?? 0) >= 2 }
                faults.latencyMs = 0
                s.decider.faults = faults
                #expect(await s.replies(to: "oFlaky", count: 2) == ["回声(第1句): 一", "回声(第2句): 二"])
            }
            #expect(s.platform.messages(touser: "oFlaky").count == 2)
            #expect(retried(w) >= 3)
        }
    }

    /// A service that keeps failing: the message is dead-lettered after its retries (replayable),
    /// nothing is sent, and the user's next message goes on.
    @Test func aServiceThatKeepsFailingDeadLettersTheMessage() async throws {
        try await withStack { s in
            let w = try await s.worker(retryDelays: Self.shortRetries, decideTimeout: .seconds(1))
            var faults = ToyDecider.Faults()
            faults.failNext = 4  // the first try and its three retries
            s.decider.faults = faults
            try await running([w]) {
                let lost = try await s.push("text", "一", from: "oDown")
                try await s.push("text", "二", from: "oDown")
                #expect(await s.replies(to: "oDown", count: 1) == ["回声(第1句): 二"])
                #expect(s.decider.calls[lost.dedupID] == 4)
            }
            let dead = try #require(try await s.pusher.get(queue: s.topology.deadLetterQueue))
            #expect(dead.message.properties.messageID == (try InboundMessage(xml: String(decoding: dead.message.body, as: UTF8.self))).dedupID)
            #expect(dead.message.properties.headers[WorkerHeader.reason]?.stringValue?.contains("decision service") == true)
        }
    }

    /// The decision is stored before the send: a send retried (errcode -1), a WeChat retry of the
    /// same push, all reuse it; the service is asked once.
    @Test func aRetriedSendAndARepeatedPushReuseTheStoredDecision() async throws {
        try await withStack { s in
            let w = try await s.worker(retryDelays: Self.shortRetries, decideTimeout: .seconds(3))
            var faults = FakePlatform.Faults()
            faults.failNextWith = -1
            faults.failNextCount = 1
            s.platform.faults = faults
            try await running([w]) {
                let m = try await s.push("text", "一", from: "oOnce", msgID: 4242)
                try await s.push("text", "一", from: "oOnce", msgID: 4242)
                try await s.push("text", "二", from: "oOnce")
                #expect(await s.replies(to: "oOnce", count: 2) == ["回声(第1句): 一", "回声(第2句): 二"])
                #expect(s.decider.calls[m.dedupID] == 1)
            }
            #expect(s.platform.messages(touser: "oOnce").count == 2)
            #expect(s.platform.sendCalls == 3)
        }
    }
}

extension DecisionServiceTests {
    /// A service that cannot be reached (nothing listens) is an outage: the message waits it
    /// out — far more tries than its three retries — and is not dead-lettered. (Failed before
    /// connection failures were told apart from bad answers: dead-lettered after 3 retries.)
    @Test func anUnreachableServiceIsWaitedOutNotDeadLettered() async throws {
        try await withStack { s in
            let closed = try freePort()
            let w = try await s.worker(retryDelays: Self.shortRetries, decideTimeout: .seconds(1), decideURL: "http://127.0.0.1:\(closed)/decide")
            try await running([w]) {
                try await s.push("text", "一", from: "oOutage")
                try await eventually("six tries") { retried(w) >= 6 }
            }
            #expect(try await s.pusher.queueInfo(s.topology.deadLetterQueue).messageCount == 0)
            #expect(s.platform.messages(touser: "oOutage").isEmpty)
        }
    }

    /// A message redelivered by the broker (its worker stopped while the send was failing) is
    /// answered from the stored decision by the next worker: the service is not asked again.
    @Test func aRedeliveredMessageIsNotDecidedAgain() async throws {
        try await withStack { s in
            var faults = FakePlatform.Faults()
            faults.failNextWith = -1
            faults.failNextCount = 1_000
            s.platform.faults = faults
            // Both with the same delays: the delay queues are declared with them (a different TTL is refused).
            let delays: [Duration] = [.seconds(60), .seconds(60), .seconds(60)]
            let a = try await s.worker(retryDelays: delays, decideTimeout: .seconds(3))
            let m = Locked<InboundMessage?>(nil)
            try await running([a]) {
                let pushed = try await s.push("text", "一", from: "oRedeliver")
                m.withLock { $0 = pushed }
                // Handled (the claim given back, a retry waiting), not merely sent.
                try await eventually("the first send to fail and wait for its retry") { retried(a) >= 1 }
            }
            // Stopped gracefully while the message waited for its retry: it went back to the queue.
            s.platform.faults = FakePlatform.Faults()
            let b = try await s.worker(retryDelays: delays, decideTimeout: .seconds(3))
            try await running([b]) {
                #expect(await s.replies(to: "oRedeliver", count: 1) == ["回声(第1句): 一"])
            }
            #expect(consumed(b) >= 1)
            let message = try #require(m.withLock { $0 })
            #expect(s.decider.calls[message.dedupID] == 1)
        }
    }
}

/// The answer's validation and the request's shape, without a broker.
@Suite("Decision service: answers")
struct DecisionAnswerTests {
    func decision(_ json: String) throws -> ReplyRules.Decision {
        try DecisionService.decision(from: Data(json.utf8), to: "oU")
    }

    @Test func validAnswers() throws {
        #expect(try decision("{}").reply == nil)
        #expect(try decision(#"{"reply":null,"set_state":""}"#).setState == "")
        #expect(try decision(#"{"reply":{"text":"hi"}}"#).reply == .text(to: "oU", "hi"))
        let full = try decision(#"{"reply":{"msgtype":"image","image":{"media_id":"M"}},"set_fields":{"a":"1"},"extra":1}"#)
        #expect(full.reply?.content == .image(mediaID: "M"))
        #expect(full.setFields == ["a": "1"])
    }

    /// What the schema allows, the worker takes: its answer examples, and a long value in Chinese
    /// (the limits count characters, as JSON Schema does, not bytes).
    @Test func theSchemasAnswerExamplesAreAccepted() throws {
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        let schema = try JSONSerialization.jsonObject(with: Data(contentsOf: root.appendingPathComponent("docs/decision.schema.json")))
        let defs = try #require((schema as? [String: Any])?["$defs"] as? [String: Any])
        let examples = try #require((defs["answer"] as? [String: Any])?["examples"] as? [Any])
        #expect(examples.count >= 3)
        for example in examples {
            let json = String(decoding: try JSONSerialization.data(withJSONObject: example), as: UTF8.self)
            #expect(throws: Never.self, "\(json)") { try decision(json) }
        }
        let long = String(repeating: "长", count: 4096)
        #expect(try decision(#"{"set_fields":{"名字":"\#(long)"},"set_state":"\#(long)"}"#).setFields?["名字"] == long)
    }

    @Test(arguments: [
        "", "[]", #"{"set_state":"\#(String(repeating: "s", count: 4097))"}"#, "not json", #"{"reply":"hi"}"#, #"{"reply":{"msgtype":"text"}}"#, #"{"reply":{"msgtype":"nope","nope":{}}}"#,
        #"{"set_fields":{"":"x"}}"#, #"{"set_fields":{"a":1}}"#,
        #"{"set_fields":{"\#(String(repeating: "n", count: 65))":"x"}}"#,
        #"{"set_fields":{"a":"\#(String(repeating: "v", count: 4097))"}}"#,
        "{\"set_fields\":{" + (0..<33).map { "\"f\($0)\":\"x\"" }.joined(separator: ",") + "}}",
    ])
    func invalidAnswersAreFailures(json: String) {
        #expect(throws: DecisionServiceError.self) { try decision(json) }
    }

    /// The request the worker sends, the schema's examples, and the example service's answers
    /// all fit docs/decision.schema.json (checked by python-jsonschema, installed by ops/test).
    @Test(.enabled(if: TestServices.environment["WECHATPY_PYTHON"] != nil || TestServices.isCI))
    func theSchemaDescribesWhatIsSent() async throws {
        let python = try #require(TestServices.environment["WECHATPY_PYTHON"])
        let xml = try PushBuilder.xml(kind: "text", value: "add milk", eventKey: nil, from: "oSchema", to: "gh_schema", msgID: 7)
        let m = try InboundMessage(xml: xml)
        let session = SessionSnapshot(values: ["subscribed": "1", "messages": "2", "state": "menu", "f:todo": "[]", "window": "message", "last_inbound": "1700000000"])
        let request = String(decoding: try WeChatJSON.encode(DecisionService.Request(appID: "wxschema", message: m, session: session)), as: UTF8.self)
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        let script = """
            import json, subprocess, sys
            from jsonschema import Draft202012Validator
            schema = json.load(open(sys.argv[1]))
            Draft202012Validator.check_schema(schema)
            def validator(name):
                return Draft202012Validator({"$ref": "#/$defs/" + name, "$defs": schema["$defs"]})
            request, answer = validator("request"), validator("answer")
            for e in schema["$defs"]["request"]["examples"]: request.validate(e)
            for e in schema["$defs"]["answer"]["examples"]: answer.validate(e)
            assert any(isinstance(e.get("reply"), dict) and e["reply"].get("msgtype") == "text" for e in schema["$defs"]["answer"]["examples"])
            Draft202012Validator(schema).validate(schema["examples"][0])
            sent = json.loads(sys.argv[3])
            request.validate(sent)
            # The example service answers what the worker sends, in the answer's shape.
            sys.path.insert(0, sys.argv[2])
            import app
            for text in ["add milk", "list", "clear", "hello"]:
                sent["message"]["Content"] = text
                answer.validate(app.decide(sent))
            print("ok")
            """
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("schema-\(UUID().uuidString).py").path
        try script.write(toFile: path, atomically: true, encoding: .utf8)
        defer { try? FileManager.default.removeItem(atPath: path) }
        let out = try await runCommand(
            python, [path, root.appendingPathComponent("docs/decision.schema.json").path, root.appendingPathComponent("examples/decision-service").path, request])
        #expect(out.trimmingCharacters(in: .whitespacesAndNewlines) == "ok")
    }
}
