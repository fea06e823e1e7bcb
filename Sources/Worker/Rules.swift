import Foundation
import WeChat
import Yams

/// Reply rules: the first rule whose `match` fits the message decides the reply
/// and the session's dialog state. Loaded from YAML (`WORKER_RULES`); the
/// built-in ``ReplyRules/defaults`` reproduce docs/CONTRACT.md exactly.
///
/// ```yaml
/// rules:
///   - match: { type: text, text: "菜单" }         # exact text; also prefix:, regex:
///     reply: { text: "功能列表\n1 我的消息数\n2 退出菜单" }
///     set_state: menu                             # "" clears it
///   - match: { type: text, text: "1", state: menu }
///     reply: { text: "您已发送{{session.messages}}条消息" }
///   - match: { type: event, event: CLICK, event_key: HELP }
///     reply: { msgtype: image, image: { media_id: "MEDIA" } }   # any customer-service type
///   - match: { type: event }
///     reply: none                                 # no reply
/// ```
/// A voice message with a `Recognition` field is matched as text with that content.
public struct ReplyRules: Sendable {
    public var rules: [Rule]

    public struct Rule: Sendable, Decodable {
        public var match: Match
        /// nil or `none`: no reply.
        public var reply: Reply?
        /// A new dialog state; `""` clears it; absent leaves it.
        public var setState: String?

        enum CodingKeys: String, CodingKey { case match, reply, setState = "set_state" }

        public init(from decoder: any Decoder) throws {
            let c = try decoder.container(keyedBy: CodingKeys.self)
            match = try c.decodeIfPresent(Match.self, forKey: .match) ?? Match()
            setState = try c.decodeIfPresent(String.self, forKey: .setState)
            if let s = try? c.decode(String.self, forKey: .reply), s == "none" {
                reply = nil
            } else {
                reply = try c.decodeIfPresent(Reply.self, forKey: .reply)
            }
        }

        init(match: Match, reply: Reply?, setState: String? = nil) {
            self.match = match
            self.reply = reply
            self.setState = setState
        }
    }

    public struct Match: Sendable, Decodable {
        /// MsgType (`text`, `image`, `event`, …); voice with Recognition counts as `text`.
        public var type: String?
        public var event: String?
        public var eventKey: String?
        public var text: String?
        public var prefix: String?
        public var regex: String?
        /// The session's dialog state must be this.
        public var state: String?
        /// `regex`, compiled once when the rules are loaded (not per message).
        var compiled: CompiledRegex? = nil

        enum CodingKeys: String, CodingKey { case type, event, eventKey = "event_key", text, prefix, regex, state }

        init(type: String? = nil, event: String? = nil, eventKey: String? = nil, text: String? = nil, state: String? = nil) {
            self.type = type
            self.event = event
            self.eventKey = eventKey
            self.text = text
            self.state = state
        }
    }

    /// A customer-service message: `{text: "…"}` or `{msgtype: T, T: {…}}` as in the API.
    public struct Reply: Sendable, Decodable {
        /// The JSON object of the API, without `touser` (templated per message).
        let object: [String: JSONValue]
        /// The message, built once, when the reply has no `{{…}}` to fill (most replies):
        /// only `touser` then differs per message.
        private let fixed: CustomerServiceMessage?

        private static func fixedMessage(_ object: [String: JSONValue]) -> CustomerServiceMessage? {
            var placeholders = false
            _ = JSONValue.object(object).filled { _ in
                placeholders = true
                return ""
            }
            guard !placeholders else { return nil }
            var o = object
            o["touser"] = .string("")
            guard let data = try? JSONEncoder().encode(JSONValue.object(o)) else { return nil }
            return try? JSONDecoder().decode(CustomerServiceMessage.self, from: data)
        }

        public init(from decoder: any Decoder) throws {
            let value = try JSONValue(from: decoder)
            guard case .object(var o) = value else { throw RulesError(message: "a reply must be a mapping") }
            if case .string(let text)? = o["text"] {
                o = ["msgtype": .string("text"), "text": .object(["content": .string(text)])]
            }
            guard case .string(let type)? = o["msgtype"], o[type] != nil else {
                throw RulesError(message: "a reply needs `text:` or `msgtype: T` with a `T:` object")
            }
            object = o
            fixed = Self.fixedMessage(o)
        }

        init(text: String) {
            object = ["msgtype": .string("text"), "text": .object(["content": .string(text)])]
            fixed = Self.fixedMessage(object)
        }

        /// The message for `user` as it is (no placeholders filled): a decision service's reply.
        func message(to user: String) throws -> CustomerServiceMessage {
            if var m = fixed {
                m.toUser = user
                return m
            }
            var o = object
            o["touser"] = .string(user)
            let data = try JSONEncoder().encode(JSONValue.object(o))
            return try JSONDecoder().decode(CustomerServiceMessage.self, from: data)
        }

        /// The message for `user`, with `{{session.X}}` and `{{message.X}}` filled in.
        func message(to user: String, fill: (String) -> String) throws -> CustomerServiceMessage {
            if var m = fixed {
                m.toUser = user
                return m
            }
            var o = object.mapValues { $0.filled(fill) }
            o["touser"] = .string(user)
            let data = try JSONEncoder().encode(JSONValue.object(o))
            return try JSONDecoder().decode(CustomerServiceMessage.self, from: data)
        }
    }

    /// What was decided for one message (by a handler, a rule or the decision service).
    public struct Decision: Sendable, Codable, Equatable {
        public var reply: CustomerServiceMessage?
        public var setState: String?
        /// Session fields to set (stored as `f:<name>`; an empty value removes the field):
        /// from the decision service (`set_fields`), or a handler.
        public var setFields: [String: String]?
        public init(reply: CustomerServiceMessage?, setState: String?, setFields: [String: String]? = nil) {
            self.reply = reply
            self.setState = setState
            self.setFields = setFields
        }
    }

    public init(rules: [Rule]) { self.rules = rules }

    /// Parses a YAML rules file; errors say which rule is wrong.
    public init(yaml: String) throws {
        struct File: Decodable { var rules: [Rule] }
        do {
            rules = try YAMLDecoder().decode(File.self, from: yaml).rules
        } catch {
            throw RulesError(message: "invalid rules file: \(error)")
        }
        for (i, r) in rules.enumerated() {
            if let pattern = r.match.regex {
                guard let re = try? NSRegularExpression(pattern: pattern) else {
                    throw RulesError(message: "rule \(i + 1): invalid regex '\(pattern)'")
                }
                rules[i].match.compiled = CompiledRegex(re)
            }
            if let reply = r.reply {
                // Check that the reply is a valid customer-service message.
                _ = try reply.message(to: "check") { _ in "1" }
            }
        }
    }

    /// docs/CONTRACT.md's default reply rules.
    public static let defaults = ReplyRules(rules: [
        Rule(match: Match(type: "text", text: "帮助"), reply: Reply(text: "您好!输入“菜单”查看功能列表")),
        Rule(match: Match(type: "event", event: "CLICK", eventKey: "HELP"), reply: Reply(text: "您好!输入“菜单”查看功能列表")),
        Rule(match: Match(type: "text", text: "菜单"), reply: Reply(text: "功能列表\n1 我的消息数\n2 退出菜单"), setState: "menu"),
        Rule(match: Match(type: "text", text: "1", state: "menu"), reply: Reply(text: "您已发送{{session.messages}}条消息")),
        Rule(match: Match(type: "text", text: "2", state: "menu"), reply: Reply(text: "已退出菜单"), setState: ""),
        Rule(match: Match(type: "event", event: "subscribe"), reply: Reply(text: "感谢关注！输入“帮助”查看使用说明")),
        Rule(match: Match(type: "event"), reply: nil),
        Rule(match: Match(), reply: Reply(text: "暂不支持该指令")),
    ])

    /// The first matching rule's decision, or no reply when none matches.
    public func decide(_ message: InboundMessage, session: SessionSnapshot) throws -> Decision {
        try decideIfMatched(message, session: session) ?? Decision(reply: nil, setState: nil)
    }

    /// The first matching rule's decision, or `nil` when no rule matches.
    public func decideIfMatched(_ message: InboundMessage, session: SessionSnapshot) throws -> Decision? {
        let (type, text) = Self.normalized(message)
        for rule in rules where rule.match.fits(type: type, text: text, message: message, state: session.state) {
            let reply = try rule.reply?.message(to: message.fromUserName) { key in
                if key.hasPrefix("session.") { return session.field(String(key.dropFirst(8))) }
                if key.hasPrefix("message.") { return message.fields[String(key.dropFirst(8))] ?? "" }
                return ""
            }
            return Decision(reply: reply, setState: rule.setState)
        }
        return nil
    }

    /// Voice with Recognition is text.
    static func normalized(_ m: InboundMessage) -> (type: String, text: String?) {
        if m.msgType == "voice", let r = m.fields["Recognition"], !r.isEmpty { return ("text", r) }
        return (m.msgType, m.fields["Content"])
    }
}

extension ReplyRules.Match {
    func fits(type: String, text: String?, message: InboundMessage, state: String?) -> Bool {
        if let t = self.type, t != type { return false }
        if let e = event, e != message.event { return false }
        if let k = eventKey, k != (message.eventKey ?? "") { return false }
        if let s = self.state, s != (state ?? "") { return false }
        if let exact = self.text, exact != (text ?? "").trimmingCharacters(in: .whitespacesAndNewlines) { return false }
        if let p = prefix, !(text ?? "").hasPrefix(p) { return false }
        if let pattern = regex {
            // Rules from YAML arrive compiled; one built in code with a regex is compiled here.
            guard let re = compiled?.regex ?? (try? NSRegularExpression(pattern: pattern)), let t = text,
                re.firstMatch(in: t, range: NSRange(t.startIndex..., in: t)) != nil
            else { return false }
        }
        return true
    }
}

/// A compiled regular expression shared by every task that evaluates the rules.
///
/// `@unchecked Sendable`: the expression is immutable after creation, and
/// `NSRegularExpression` is documented as safe to use from several threads at once.
final class CompiledRegex: @unchecked Sendable {
    let regex: NSRegularExpression
    init(_ regex: NSRegularExpression) { self.regex = regex }
}

public struct RulesError: Error, CustomStringConvertible, Sendable {
    public var message: String
    public var description: String { message }
}

/// Plain JSON/YAML values, for reply templates.
enum JSONValue: Codable, Sendable, Equatable {
    case string(String), number(Double), bool(Bool), object([String: JSONValue]), array([JSONValue]), null

    init(from decoder: any Decoder) throws {
        let c = try decoder.singleValueContainer()
        if c.decodeNil() { self = .null }
        else if let b = try? c.decode(Bool.self) { self = .bool(b) }
        else if let n = try? c.decode(Double.self) { self = .number(n) }
        else if let s = try? c.decode(String.self) { self = .string(s) }
        else if let a = try? c.decode([JSONValue].self) { self = .array(a) }
        else { self = .object(try c.decode([String: JSONValue].self)) }
    }

    func encode(to encoder: any Encoder) throws {
        var c = encoder.singleValueContainer()
        switch self {
        case .string(let s): try c.encode(s)
        case .number(let n): try c.encode(n)
        case .bool(let b): try c.encode(b)
        case .object(let o): try c.encode(o)
        case .array(let a): try c.encode(a)
        case .null: try c.encodeNil()
        }
    }

    /// Fills `{{name}}` placeholders in every string.
    func filled(_ fill: (String) -> String) -> JSONValue {
        switch self {
        case .string(let s):
            guard s.contains("{{") else { return self }
            var out = ""
            var rest = Substring(s)
            while let open = rest.range(of: "{{"), let close = rest[open.upperBound...].range(of: "}}") {
                out += rest[..<open.lowerBound]
                out += fill(rest[open.upperBound..<close.lowerBound].trimmingCharacters(in: .whitespaces))
                rest = rest[close.upperBound...]
            }
            return .string(out + rest)
        case .object(let o): return .object(o.mapValues { $0.filled(fill) })
        case .array(let a): return .array(a.map { $0.filled(fill) })
        default: return self
        }
    }
}
