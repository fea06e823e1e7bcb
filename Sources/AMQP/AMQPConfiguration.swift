/// How to reach a RabbitMQ broker and how the connection behaves.
///
/// Created from an `amqp://user:password@host:port/vhost` URL; the parts are
/// percent-decoded, so the default virtual host `/` is written `%2F`. An empty
/// path (`amqp://host`) also selects `/`, following the RabbitMQ URI spec's
/// common usage.
///
/// Several URLs separated by commas name the nodes of a cluster (same credentials and
/// virtual host in each): the connection uses the first that answers and, after a loss,
/// tries the others (see ``ConnectionStateMachine``).
public struct AMQPConfiguration: Sendable {
    /// The first broker address (``addresses`` has them all).
    public var host: String {
        get { addresses[0].host }
        set { addresses[0].host = newValue }
    }
    public var port: Int {
        get { addresses[0].port }
        set { addresses[0].port = newValue }
    }
    /// Every broker address, in the order given; tried in turn.
    public private(set) var addresses: [(host: String, port: Int)]
    public var user: String
    public var password: String
    public var virtualHost: String
    /// Heartbeat interval negotiated with the broker; 0 disables heartbeats.
    public var heartbeat: Duration
    /// Shown in the management UI and `rabbitmqctl list_connections`.
    public var connectionName: String?
    /// Bound on the TCP connect.
    public var connectTimeout: Duration
    /// Bound on the login and on each synchronous AMQP method (declare, consume, …). A method
    /// that runs out closes the connection (its reply may still come, so the channel's state is
    /// unknown). Generous: declaring a quorum queue on a busy broker or cluster takes seconds,
    /// and a timeout that fires under load turns into a reconnect-and-redeclare loop; a dead peer
    /// is noticed by the heartbeat instead.
    public var rpcTimeout: Duration
    /// First delay between reconnection attempts; doubles up to ``maxReconnectDelay``.
    public var minReconnectDelay: Duration
    public var maxReconnectDelay: Duration
    /// Largest frame size we propose (the broker may lower it).
    public var frameMax: Int32
    /// Publishes handed to the connection and not yet confirmed, at most; beyond it a
    /// publish fails at once with ``AMQPError/Code/flowControl`` (bounded memory when the
    /// broker is slow or blocked).
    public var maxPendingPublishes: Int
    /// Largest message body accepted (RabbitMQ's default `max_message_size` is 128 MiB); a
    /// larger one fails alone with ``AMQPError/Code/invalidMessage`` instead of closing the channel.
    public var maxMessageSize: Int

    /// Parses an `amqp://` URL, or several separated by commas (a comma not followed by
    /// another URL is part of the URL, for example of a password). A later URL without a user
    /// and password takes the first one's (`amqp://u:p@node1/%2F,amqp://node2/%2F`), so a
    /// deployment can name the nodes without repeating the secret; one with other credentials
    /// is refused.
    /// - Throws: ``AMQPError/Code/invalidURL`` naming what is wrong (never echoing the password).
    public init(url: String, connectionName: String? = nil) throws {
        // A list separator is a comma before another URL (`amqp://` after optional spaces);
        // any other comma belongs to the URL (a password may contain one).
        var parts: [String] = []
        for piece in url.split(separator: ",", omittingEmptySubsequences: false) {
            let trimmed = String(piece.drop(while: \.isWhitespace).reversed().drop(while: \.isWhitespace).reversed())
            if parts.isEmpty || trimmed.isEmpty || trimmed.lowercased().contains("://") {
                parts.append(trimmed)
            } else {
                parts[parts.count - 1] += "," + piece
            }
        }
        guard let first = parts.first else { throw AMQPError(.invalidURL, "AMQP URL is empty") }
        try self.init(single: first, connectionName: connectionName)
        for (i, part) in parts.enumerated().dropFirst() {
            guard !part.isEmpty else { throw AMQPError(.invalidURL, "AMQP URL list has an empty entry (number \(i + 1))") }
            var other = try AMQPConfiguration(single: part, connectionName: connectionName)
            // As the parser reads it: user information is whatever precedes the last `@`.
            if let schemeEnd = part.range(of: "://"), !part[schemeEnd.upperBound...].contains("@") {
                other.user = user
                other.password = password
            }
            guard other.user == user, other.password == password, other.virtualHost == virtualHost else {
                throw AMQPError(.invalidURL, "every URL in an AMQP URL list must have the same user, password and virtual host (number \(i + 1) differs)")
            }
            addresses.append((other.host, other.port))
        }
    }

    private init(single url: String, connectionName: String?) throws {
        guard let schemeEnd = url.range(of: "://") else {
            throw AMQPError(.invalidURL, "AMQP URL must start with amqp://")
        }
        let scheme = url[..<schemeEnd.lowerBound].lowercased()
        guard scheme == "amqp" else {
            if scheme == "amqps" {
                throw AMQPError(.invalidURL, "amqps:// (TLS) is not supported yet; use amqp:// or a TLS-terminating proxy")
            }
            throw AMQPError(.invalidURL, "unsupported AMQP URL scheme (amqp:// expected)")
        }
        var rest = Substring(url[schemeEnd.upperBound...])
        // The user information ends at the last `@`: a password may contain `/`, `?` or `#`
        // unescaped, and none of it may end up in the host, the path or an error message.
        var info: Substring? = nil
        if let at = rest.lastIndex(of: "@") {
            info = rest[..<at]
            rest = rest[rest.index(after: at)...]
        }
        var query: Substring = ""
        if let q = rest.firstIndex(where: { $0 == "?" || $0 == "#" }) {
            if rest[q] == "?" { query = rest[rest.index(after: q)...].prefix { $0 != "#" } }
            rest = rest[..<q]
        }
        var path: Substring? = nil
        if let slash = rest.firstIndex(of: "/") {
            path = rest[rest.index(after: slash)...]
            rest = rest[..<slash]
        }
        var user = "guest", password = "guest"
        if let info {
            if let colon = info.firstIndex(of: ":") {
                user = try Self.decode(info[..<colon], what: "user")
                password = try Self.decode(info[info.index(after: colon)...], what: "password")
            } else {
                user = try Self.decode(info, what: "user")
                password = ""
            }
        }
        var host = String(rest)
        var port = 5672
        if host.hasPrefix("[") {  // IPv6 literal
            guard let close = host.firstIndex(of: "]") else {
                throw AMQPError(.invalidURL, "AMQP URL has an unterminated IPv6 address")
            }
            let after = host[host.index(after: close)...]
            let literal = String(host[host.index(after: host.startIndex)..<close])
            if after.hasPrefix(":") {
                guard let p = Int(after.dropFirst()), (1...65535).contains(p) else {
                    throw AMQPError(.invalidURL, "AMQP URL has an invalid port (a number from 1 to 65535 expected)")
                }
                port = p
            } else if !after.isEmpty {
                throw AMQPError(.invalidURL, "AMQP URL has junk after the IPv6 address")
            }
            host = literal
        } else if let colon = host.lastIndex(of: ":") {
            let portText = host[host.index(after: colon)...]
            guard let p = Int(portText), (1...65535).contains(p) else {
                throw AMQPError(.invalidURL, "AMQP URL has an invalid port (a number from 1 to 65535 expected)")
            }
            port = p
            host = String(host[..<colon])
        }
        if host.isEmpty { host = "localhost" }
        let vhost: String
        if let path, !path.isEmpty {
            vhost = try Self.decode(path, what: "virtual host")
        } else {
            vhost = "/"
        }
        self.addresses = [(host, port)]
        self.user = user
        self.password = password
        self.virtualHost = vhost
        self.heartbeat = .seconds(30)
        // RabbitMQ's URI query parameters: `heartbeat` (seconds; others are ignored).
        for pair in query.split(separator: "&") where pair.hasPrefix("heartbeat=") {
            guard let seconds = Int(pair.dropFirst("heartbeat=".count)), (0...65_535).contains(seconds) else {
                throw AMQPError(.invalidURL, "AMQP URL has an invalid heartbeat (seconds from 0 to 65535 expected)")
            }
            self.heartbeat = .seconds(seconds)
        }
        self.connectionName = connectionName
        self.connectTimeout = .seconds(5)
        self.rpcTimeout = .seconds(30)
        self.minReconnectDelay = .milliseconds(100)
        self.maxReconnectDelay = .seconds(5)
        self.frameMax = 131_072
        self.maxPendingPublishes = 10_000
        self.maxMessageSize = 128 << 20
    }

    /// The URL without the password, for log lines (every address, when there are several).
    public var redactedURL: String {
        redacted(addresses.map { Self.place($0.host, $0.port) }.joined(separator: ","))
    }

    /// One address's URL without the password.
    public func redactedURL(address i: Int) -> String {
        guard addresses.indices.contains(i) else { return redactedURL }
        return redacted(Self.place(addresses[i].host, addresses[i].port))
    }

    private func redacted(_ places: String) -> String {
        let vhost = virtualHost == "/" ? "%2F" : virtualHost
        return "amqp://\(user)@\(places)/\(vhost)"
    }

    private static func place(_ host: String, _ port: Int) -> String {
        "\(host.contains(":") ? "[\(host)]" : host):\(port)"
    }

    private static func decode(_ text: Substring, what: String) throws -> String {
        var bytes: [UInt8] = []
        bytes.reserveCapacity(text.utf8.count)
        var it = Array(text.utf8)[...]
        while let b = it.popFirst() {
            if b == UInt8(ascii: "%") {
                guard it.count >= 2, let hi = hexValue(it[it.startIndex]), let lo = hexValue(it[it.startIndex + 1]) else {
                    throw AMQPError(.invalidURL, "AMQP URL has a bad percent-escape in the \(what)")
                }
                bytes.append(hi << 4 | lo)
                it = it.dropFirst(2)
            } else {
                bytes.append(b)
            }
        }
        guard let s = String(validating: bytes, as: UTF8.self) else {
            throw AMQPError(.invalidURL, "AMQP URL's \(what) is not valid UTF-8 after percent-decoding")
        }
        return s
    }

    private static func hexValue(_ c: UInt8) -> UInt8? {
        switch c {
        case UInt8(ascii: "0")...UInt8(ascii: "9"): return c - UInt8(ascii: "0")
        case UInt8(ascii: "a")...UInt8(ascii: "f"): return c - UInt8(ascii: "a") + 10
        case UInt8(ascii: "A")...UInt8(ascii: "F"): return c - UInt8(ascii: "A") + 10
        default: return nil
        }
    }
}
