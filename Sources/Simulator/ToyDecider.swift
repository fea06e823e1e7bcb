import Foundation
import Hummingbird
import NIOCore
import Synchronization

/// A toy decision service (`WORKER_DECIDE_URL`, docs/decision.schema.json) for tests and
/// `ops/dev`, served by `wechat-sim api` at `POST /sim/decide`:
///
/// - text `X` → `{"reply":{"text":"回声(第N句): X"},"set_fields":{"turns":"N"}}`, N counting the
///   user's texts through the session field `turns` the previous answer set;
/// - a `subscribe` event → a welcome text; other events → no reply (`{"reply":null}`);
/// - any other message → `收到<MsgType>`.
///
/// Faults for tests (`POST /sim/decide/faults` `{"latencyMs":…, "failNext":…}`): a delay
/// before every answer, and the next `failNext` calls answered HTTP 500. `GET /sim/decide/calls`
/// counts the calls per `dedup_key`.
public final class ToyDecider: Sendable {
    public struct Faults: Codable, Sendable {
        public var latencyMs: Int = 0
        public var failNext: Int = 0
        public init() {}
        public init(from decoder: any Decoder) throws {
            let c = try decoder.container(keyedBy: CodingKeys.self)
            latencyMs = try c.decodeIfPresent(Int.self, forKey: .latencyMs) ?? 0
            failNext = try c.decodeIfPresent(Int.self, forKey: .failNext) ?? 0
        }
        enum CodingKeys: String, CodingKey { case latencyMs, failNext }
    }

    private let state = Mutex<(faults: Faults, calls: [String: Int])>((Faults(), [:]))

    public init() {}

    public var faults: Faults {
        get { state.withLock { $0.faults } }
        set { state.withLock { $0.faults = newValue } }
    }

    /// Calls per dedup key so far.
    public var calls: [String: Int] { state.withLock { $0.calls } }

    struct Call: Decodable {
        var dedupKey: String
        var message: [String: String]
        var session: Session
        struct Session: Decodable { var fields: [String: String] }
        enum CodingKeys: String, CodingKey { case dedupKey = "dedup_key", message, session }
    }

    /// The answer to one request body: an HTTP status and a JSON body.
    func answer(_ body: ByteBuffer) async -> (HTTPResponse.Status, String) {
        guard let call = try? JSONDecoder().decode(Call.self, from: Data(body.readableBytesView)) else {
            return (.badRequest, #"{"error":"not a decision request"}"#)
        }
        let (latency, fail) = state.withLock { s -> (Int, Bool) in
            s.calls[call.dedupKey, default: 0] += 1
            let fail = s.faults.failNext > 0
            if fail { s.faults.failNext -= 1 }
            return (s.faults.latencyMs, fail)
        }
        if latency > 0 { try? await Task.sleep(for: .milliseconds(latency)) }
        if fail { return (.internalServerError, #"{"error":"injected failure"}"#) }
        return (.ok, Self.decide(call))
    }

    static func decide(_ call: Call) -> String {
        let m = call.message
        switch m["MsgType"] ?? "" {
        case "text":
            let turns = (Int(call.session.fields["turns"] ?? "0") ?? 0) + 1
            return json(["reply": ["text": "回声(第\(turns)句): \(m["Content"] ?? "")"], "set_fields": ["turns": "\(turns)"]])
        case "event":
            if m["Event"] == "subscribe" { return json(["reply": ["text": "欢迎关注(来自决策服务)"]]) }
            return #"{"reply":null}"#
        case let type:
            return json(["reply": ["text": "收到\(type)"]])
        }
    }

    private static func json(_ value: [String: [String: String]]) -> String {
        guard let data = try? JSONSerialization.data(withJSONObject: value, options: [.sortedKeys]) else { return "{}" }
        return String(decoding: data, as: UTF8.self)
    }

    /// Adds `POST /sim/decide`, `POST /sim/decide/faults` and `GET /sim/decide/calls` to `router`.
    public func addRoutes(to router: Router<BasicRequestContext>) {
        router.post("/sim/decide") { request, _ in
            let body = try await request.body.collect(upTo: 1 << 20)
            let (status, json) = await self.answer(body)
            return Response(
                status: status, headers: [.contentType: "application/json; charset=utf-8"],
                body: ResponseBody(byteBuffer: ByteBuffer(string: json)))
        }
        router.post("/sim/decide/faults") { request, _ in
            let body = try await request.body.collect(upTo: 64 << 10)
            guard let faults = try? JSONDecoder().decode(Faults.self, from: Data(body.readableBytesView)) else {
                return FakeAPI.status(.badRequest, "expected {latencyMs, failNext}")
            }
            self.faults = faults
            return FakeAPI.json(faults)
        }
        router.get("/sim/decide/calls") { _, _ in FakeAPI.json(self.calls) }
    }
}
