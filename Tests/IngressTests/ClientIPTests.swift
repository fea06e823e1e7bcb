import Hummingbird
import NIOCore
import Testing

@testable import Ingress

/// The `client.ip` of the ingress's log lines: what the reverse proxy (ops/nginx) says.
@Suite("Client address behind the proxy")
struct ClientIPTests {
    /// HTTPTypes' `HTTPField`, reached through Hummingbird's export of `HTTPFields`.
    typealias Field = HTTPFields.Element

    func request(_ headers: [(String, String)]) -> Request {
        var fields = HTTPFields()
        for (name, value) in headers {
            if let n = Field.Name(name) { fields.append(Field(name: n, value: value)) }
        }
        let head = HTTPRequest(method: .post, scheme: "http", authority: "ingress", path: "/wechat", headerFields: fields)
        return Request(head: head, body: RequestBody(buffer: ByteBuffer()))
    }

    @Test func xRealIPWinsThenTheFirstForwardedHopThenNothing() {
        #expect(IngressHandler.clientIP(request([("X-Real-IP", "203.0.113.7"), ("X-Forwarded-For", "198.51.100.1")])) == "203.0.113.7")
        #expect(IngressHandler.clientIP(request([("X-Forwarded-For", "198.51.100.1, 10.0.0.2")])) == "198.51.100.1")
        #expect(IngressHandler.clientIP(request([("x-forwarded-for", " 198.51.100.9")])) == "198.51.100.9")
        #expect(IngressHandler.clientIP(request([])) == "-")
    }
}
