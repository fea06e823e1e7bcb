import AsyncHTTPClient
import Foundation
import NIOCore
import NIOHTTP1
import WeChat

/// Business logic in a service of its own, in any language (`WORKER_DECIDE_URL`).
///
/// For each message that no Swift handler and no rule decided, the worker POSTs
/// ``Request`` as JSON and takes the reply, a dialog-state change and session fields
/// from the ``Answer`` (both described by `docs/decision.schema.json`). The call has a
/// deadline (`WORKER_DECIDE_TIMEOUT`, the answer's body included); a failed answer (a status
/// other than 200 or 204, an answer that is not valid) throws, and the message is retried with
/// the same back-off as a failed send, then dead-lettered (replayable); no answer at all is an
/// outage (``DecisionServiceError/isOutage``), waited out without using up retries. A message is
/// decided once: the first answer stored is the one used, by every redelivery and retry
/// (the service may be asked again only when a worker stopped between its answer and the
/// commit, and that second answer is discarded). The request carries the message's
/// `dedup_key` (also as the `X-Relay-Dedup-Key` header) for services that want to
/// recognise such a repeat.
public struct DecisionService: Sendable {
    public let url: String
    let http: HTTPClient
    public let timeout: Duration
    let appID: String

    /// The largest answer read (64 KiB): a customer-service message is far smaller.
    static let maxAnswer = 65_536
    /// At most this many session fields set by one answer, and in one session; each name at
    /// most 64 characters and each value (and `set_state`) at most 4,096 (Unicode scalars, as
    /// JSON Schema counts them).
    static let maxFields = 32
    static let maxSessionFields = 64
    static let maxValue = 4096

    public init(url: String, http: HTTPClient, timeout: Duration, appID: String) {
        self.url = url
        self.http = http
        self.timeout = timeout
        self.appID = appID
    }

    /// What the service is sent.
    public struct Request: Encodable, Sendable {
        public var appid: String
        /// The account's original id (the push's `ToUserName`).
        public var account: String
        /// The message's fixed-length dedup id (the same for WeChat's retries of one message).
        public var dedupKey: String
        /// Every top-level element of the push, as text (`ToUserName`, `FromUserName`,
        /// `CreateTime`, `MsgType`, `Content`, `Event`, `EventKey`, …).
        public var message: [String: String]
        public var session: Session

        public struct Session: Encodable, Sendable {
            public var subscribed: Bool
            /// User messages so far (events not counted), this one included.
            public var messages: Int
            public var state: String?
            /// Fields set by earlier answers (`set_fields`) or handlers.
            public var fields: [String: String]
            /// Which customer-service window the last push opened (`message` or `event`).
            public var window: String?
            public var lastInbound: Int64?

            enum CodingKeys: String, CodingKey { case subscribed, messages, state, fields, window, lastInbound = "last_inbound" }
        }

        enum CodingKeys: String, CodingKey { case appid, account, dedupKey = "dedup_key", message, session }

        public init(appID: String, message m: InboundMessage, session: SessionSnapshot) {
            appid = appID
            account = m.toUserName
            dedupKey = m.dedupID
            message = m.fields
            var fields: [String: String] = [:]
            for (k, v) in session.values where k.hasPrefix("f:") { fields[String(k.dropFirst(2))] = v }
            self.session = Session(
                subscribed: session.subscribed, messages: session.messages, state: session.state, fields: fields,
                window: session.window, lastInbound: session.lastInbound)
        }
    }

    /// What the service answers (all optional; `{}` or an empty 200, or a 204, is "no reply").
    struct Answer: Decodable {
        /// A customer-service message without `touser` (`{"msgtype":"text","text":{"content":"…"}}`,
        /// any type the API has), `{"text":"…"}` for short, or null for no reply.
        var reply: ReplyRules.Reply?
        var setState: String?
        var setFields: [String: String]?

        enum CodingKeys: String, CodingKey { case reply, setState = "set_state", setFields = "set_fields" }
    }

    /// Asks the service for `message`'s decision.
    /// - Throws: ``DecisionServiceError`` on any failure (the message is retried).
    public func decide(_ message: InboundMessage, session: SessionSnapshot) async throws -> ReplyRules.Decision {
        var request = HTTPClientRequest(url: url)
        request.method = .POST
        request.headers.add(name: "Content-Type", value: "application/json")
        request.headers.add(name: "X-Relay-Dedup-Key", value: message.dedupID)
        let body = try WeChatJSON.encode(Request(appID: appID, message: message, session: session))
        request.body = .bytes(ByteBuffer(bytes: body))
        // One deadline for the whole exchange: the client's own timeout ends with the answer's
        // head, so a body sent slowly would otherwise hold the message (and its user) longer.
        let prepared = request
        let (status, answer) = try await withThrowingTaskGroup(of: (UInt, ByteBuffer)?.self) { group in
            group.addTask { [http, timeout] in
                let request = prepared
                let response: HTTPClientResponse
                do {
                    response = try await http.execute(request, timeout: .nanoseconds(Int64(timeout.wholeNanoseconds)))
                } catch {
                    throw DecisionServiceError("no answer from the decision service: \(error)", isOutage: true)
                }
                do {
                    return (response.status.code, try await response.body.collect(upTo: Self.maxAnswer))
                } catch {
                    throw DecisionServiceError("cannot read the decision service's answer: \(error)")
                }
            }
            group.addTask { [timeout] in
                try? await Task.sleep(for: timeout)
                return nil
            }
            defer { group.cancelAll() }
            guard let first = try await group.next(), let answer = first else {
                throw DecisionServiceError("no answer from the decision service within \(timeout)", isOutage: true)
            }
            return answer
        }
        switch status {
        case 204: return ReplyRules.Decision(reply: nil, setState: nil)
        case 200: break
        default: throw DecisionServiceError("the decision service answered HTTP \(status)")
        }
        if answer.readableBytes == 0 { return ReplyRules.Decision(reply: nil, setState: nil) }
        let decision = try Self.decision(from: Data(answer.readableBytesView), to: message.fromUserName)
        if let set = decision.setFields {
            // The session's fields stay bounded: an answer may replace fields, not add past the limit.
            let existing = Set(session.values.keys.filter { $0.hasPrefix("f:") }.map { String($0.dropFirst(2)) })
            let after = existing.union(set.filter { !$0.value.isEmpty }.keys).subtracting(set.filter { $0.value.isEmpty }.keys)
            guard after.count <= Self.maxSessionFields else {
                throw DecisionServiceError("set_fields would give the session \(after.count) fields; at most \(Self.maxSessionFields)")
            }
        }
        return decision
    }

    /// Validates an answer and turns it into a decision for `user`.
    package static func decision(from json: Data, to user: String) throws -> ReplyRules.Decision {
        let a: Answer
        do {
            a = try JSONDecoder().decode(Answer.self, from: json)
        } catch {
            throw DecisionServiceError("the decision service's answer is not valid: \(error)")
        }
        if let fields = a.setFields {
            guard fields.count <= maxFields else { throw DecisionServiceError("set_fields has \(fields.count) fields; at most \(maxFields)") }
            for (name, value) in fields {
                guard !name.isEmpty, name.unicodeScalars.count <= 64, !name.unicodeScalars.contains(where: { $0.value < 0x20 }) else {
                    throw DecisionServiceError("set_fields: a field name must be 1-64 characters without control characters")
                }
                guard value.unicodeScalars.count <= maxValue else {
                    throw DecisionServiceError("set_fields: the value of a field is over \(maxValue) characters")
                }
            }
        }
        if let state = a.setState, state.unicodeScalars.count > maxValue {
            throw DecisionServiceError("set_state is over \(maxValue) characters")
        }
        let reply: CustomerServiceMessage?
        do {
            reply = try a.reply?.message(to: user)
        } catch {
            throw DecisionServiceError("the decision service's reply is not a customer-service message: \(error)")
        }
        return ReplyRules.Decision(reply: reply, setState: a.setState, setFields: a.setFields.flatMap { $0.isEmpty ? nil : $0 })
    }
}

/// A decision service call that failed; the message is retried (and dead-lettered when its retries run out).
public struct DecisionServiceError: Error, CustomStringConvertible, Sendable {
    public var description: String
    /// No answer at all — the service refused or could not be reached, or its answer did not
    /// start within the deadline (the connection pool's reconnect back-off makes an unreachable
    /// service look like a slow one, so the two are not told apart): an outage, waited out
    /// without using up the message's retries, like a Redis or tokend outage. An answer that
    /// is an error status or not valid counts as a retry (then the message is dead-lettered).
    public var isOutage: Bool
    init(_ description: String, isOutage: Bool = false) {
        self.description = description
        self.isOutage = isOutage
    }
}
