import AMQP
import Testing

@Suite("AMQP URL parsing")
struct AMQPConfigurationTests {
    @Test func fullURLIsPercentDecoded() throws {
        let c = try AMQPConfiguration(url: "amqp://us%40er:p%3Ass@broker.example:5673/my%2Fvhost")
        #expect(c.user == "us@er")
        #expect(c.password == "p:ss")
        #expect(c.host == "broker.example")
        #expect(c.port == 5673)
        #expect(c.virtualHost == "my/vhost")
    }

    @Test func defaults() throws {
        let c = try AMQPConfiguration(url: "amqp://localhost")
        #expect(c.user == "guest" && c.password == "guest")
        #expect(c.port == 5672)
        #expect(c.virtualHost == "/")
        let d = try AMQPConfiguration(url: "amqp://guest:guest@127.0.0.1:5672/%2F")
        #expect(d.virtualHost == "/")
    }

    /// RabbitMQ's URI query parameter `heartbeat` (seconds); other parameters are ignored.
    /// Later nodes without credentials take the first URL's (docker-compose names the extra
    /// nodes of its `cluster` profile that way, without repeating the password).
    @Test func laterNodesWithoutCredentialsTakeTheFirstOnes() throws {
        let c = try AMQPConfiguration(url: "amqp://a:p%2Cw@h1:5673/v,amqp://h2/v, amqp://h3:5674/v")
        #expect(c.addresses.map { "\($0.host):\($0.port)" } == ["h1:5673", "h2:5672", "h3:5674"])
        #expect(c.user == "a" && c.password == "p,w" && c.virtualHost == "v")
        #expect(throws: AMQPError.self) { try AMQPConfiguration(url: "amqp://a:b@h1/v,amqp://h2/other") }
    }

    @Test func heartbeatFromTheQuery() throws {
        #expect(try AMQPConfiguration(url: "amqp://h/v?heartbeat=5").heartbeat == .seconds(5))
        #expect(try AMQPConfiguration(url: "amqp://h/v?connection_timeout=10&heartbeat=0").heartbeat == .zero)
        #expect(try AMQPConfiguration(url: "amqp://h/v").heartbeat == .seconds(30))
        #expect(try AMQPConfiguration(url: "amqp://h/v?heartbeat=5").virtualHost == "v")
        for bad in ["amqp://h/?heartbeat=-1", "amqp://h/?heartbeat=x", "amqp://h/?heartbeat=99999999999999999999"] {
            #expect(throws: AMQPError.self) { try AMQPConfiguration(url: bad) }
        }
    }

    /// A comma is a list separator only before another URL; elsewhere (a password) it is data.
    @Test func aCommaInAPasswordIsNotAListSeparator() throws {
        let one = try AMQPConfiguration(url: "amqp://u:pa,ss@h1:5673/v")
        #expect(one.password == "pa,ss" && one.addresses.count == 1 && one.port == 5673)
        let two = try AMQPConfiguration(url: "amqp://u:pa,ss@h1/v, amqp://u:pa,ss@h2:5674/v")
        #expect(two.addresses.map(\.host) == ["h1", "h2"] && two.password == "pa,ss")
        #expect(!two.redactedURL.contains("pa,ss"))
    }

    @Test func ipv6Literal() throws {
        let c = try AMQPConfiguration(url: "amqp://u:p@[::1]:5999/v")
        #expect(c.host == "::1")
        #expect(c.port == 5999)
        #expect(c.redactedURL == "amqp://u@[::1]:5999/v")
    }

    @Test(arguments: [
        ("http://localhost", "unsupported AMQP URL scheme"),
        ("localhost:5672", "must start with amqp://"),
        ("amqps://localhost", "amqps:// (TLS) is not supported"),
        ("amqp://localhost:99999/", "invalid port"),
        ("amqp://localhost:abc/", "invalid port"),
        ("amqp://u:p%zz@localhost/", "bad percent-escape in the password"),
        ("amqp://[::1/", "unterminated IPv6"),
    ])
    func badURLsAreRejectedClearly(url: String, expected: String) {
        #expect {
            _ = try AMQPConfiguration(url: url)
        } throws: { error in
            guard let e = error as? AMQPError, e.code == .invalidURL else { return false }
            return e.message.contains(expected)
        }
    }

    /// Hardening #5: a `/` in the password cut the URL there, and the rest (part of the
    /// password) became the host or the vhost, which log lines and errors showed.
    @Test(arguments: ["s3cr/et", "s3cr?et", "s3cr#et", "a/b@c", "/:?#"])
    func passwordWithDelimitersNeverLeaks(password: String) throws {
        let c = try AMQPConfiguration(url: "amqp://user:\(password)@broker.example:5673/v")
        #expect(c.password == password)
        #expect(c.host == "broker.example" && c.port == 5673 && c.virtualHost == "v")
        #expect(!c.redactedURL.contains(password))
        // A bad URL with such a password: the error never quotes a part of it.
        for bad in ["amqp://user:\(password)@broker.example:notaport/v", "amqp://user:\(password)@[::1/v"] {
            #expect {
                _ = try AMQPConfiguration(url: bad)
            } throws: { error in
                guard let e = error as? AMQPError else { return false }
                return !e.message.contains(password) && !e.message.contains("s3cr") && !e.description.contains("notaport")
            }
        }
    }

    @Test func redactedURLHasNoPassword() throws {
        let c = try AMQPConfiguration(url: "amqp://user:secret-pw@h:1/%2F")
        #expect(!c.redactedURL.contains("secret-pw"))
        #expect(c.redactedURL == "amqp://user@h:1/%2F")
    }
}
