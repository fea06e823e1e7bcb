import Crypto

/// Anything that can run Redis commands: a ``RedisConnection`` or a ``RedisPool``.
///
/// The typed helpers below are one line each; add more the same way.
public protocol RedisCommands: Sendable {
    /// Runs one command; an error reply throws ``RedisError/Code/serverError``.
    func send(_ arguments: [RedisArgument]) async throws -> RedisReply
    /// Runs commands in one round trip; error replies come back in place.
    func pipeline(_ commands: [[RedisArgument]]) async throws -> [RedisReply]
}

extension RedisConnection: RedisCommands {}

/// Expiry for SET.
public enum RedisExpiration: Sendable, Hashable {
    case seconds(Int)
    case milliseconds(Int)
}

/// SET's condition.
public enum RedisSetCondition: Sendable, Hashable {
    /// Only if the key does not exist (NX).
    case ifAbsent
    /// Only if the key exists (XX).
    case ifPresent
}

extension RedisCommands {
    public func get(_ key: String) async throws -> [UInt8]? { try await send(["GET", .init(key)]).bytes }

    public func getString(_ key: String) async throws -> String? { try await send(["GET", .init(key)]).text }

    /// SET with an optional expiry and condition; returns whether the value was set.
    @discardableResult
    public func set(
        _ key: String, to value: [UInt8], expiration: RedisExpiration? = nil, condition: RedisSetCondition? = nil
    ) async throws -> Bool {
        var args: [RedisArgument] = ["SET", .init(key), .init(value)]
        switch expiration {
        case .seconds(let s): args += ["EX", .init(s)]
        case .milliseconds(let ms): args += ["PX", .init(ms)]
        case nil: break
        }
        switch condition {
        case .ifAbsent: args.append("NX")
        case .ifPresent: args.append("XX")
        case nil: break
        }
        return try await send(args) != .null
    }

    @discardableResult
    public func set(
        _ key: String, to value: String, expiration: RedisExpiration? = nil, condition: RedisSetCondition? = nil
    ) async throws -> Bool {
        try await set(key, to: Array(value.utf8), expiration: expiration, condition: condition)
    }

    /// Deletes keys; returns how many existed.
    @discardableResult
    public func del(_ keys: String...) async throws -> Int { try await integer(["DEL"] + keys.map { RedisArgument($0) }) }

    /// Sets a key's time to live; returns whether the key exists.
    @discardableResult
    public func expire(_ key: String, seconds: Int) async throws -> Bool {
        try await integer(["EXPIRE", .init(key), .init(seconds)]) == 1
    }

    public func ttl(_ key: String) async throws -> Int { try await integer(["TTL", .init(key)]) }

    @discardableResult
    public func incr(_ key: String) async throws -> Int { try await integer(["INCR", .init(key)]) }

    public func hgetall(_ key: String) async throws -> [String: String] {
        let items = try await send(["HGETALL", .init(key)]).array ?? []
        var out: [String: String] = [:]
        var i = 0
        while i + 1 < items.count {
            out[items[i].text ?? ""] = items[i + 1].text ?? ""
            i += 2
        }
        return out
    }

    /// HSET of several fields; returns how many fields were new.
    @discardableResult
    public func hset(_ key: String, _ fields: [String: String]) async throws -> Int {
        try await integer(["HSET", .init(key)] + fields.flatMap { [RedisArgument($0.key), RedisArgument($0.value)] })
    }

    @discardableResult
    public func hincrby(_ key: String, field: String, by amount: Int) async throws -> Int {
        try await integer(["HINCRBY", .init(key), .init(field), .init(amount)])
    }

    /// Publishes on a channel; returns how many subscribers received it.
    @discardableResult
    public func publish(_ channel: String, _ message: [UInt8]) async throws -> Int {
        try await integer(["PUBLISH", .init(channel), .init(message)])
    }

    /// Runs a Lua script atomically: EVALSHA, and when Redis answers NOSCRIPT (a restart, a
    /// failover, `SCRIPT FLUSH`) EVAL with the source, which runs it and caches it again in one
    /// command. (Loading it and retrying EVALSHA left a window: a flush between the two made
    /// the retry fail too.)
    public func eval(_ script: RedisScript, keys: [String] = [], arguments: [RedisArgument] = []) async throws
        -> RedisReply
    {
        let rest: [RedisArgument] = [.init(keys.count)] + keys.map { RedisArgument($0) } + arguments
        do {
            return try await send(["EVALSHA", .init(script.sha1)] + rest)
        } catch let e as RedisError where e.code == .serverError && e.message.hasPrefix("NOSCRIPT") {
            return try await send(["EVAL", .init(script.source)] + rest)
        }
    }

    /// Runs `script` as ``eval(_:keys:arguments:)`` does, then `WAIT replicas timeout` on the
    /// same connection in the same round trip. Returns the script's reply and how many replicas
    /// acknowledged it: `WAIT` waits for the replication offset of this connection's last write,
    /// so the script must write (it then covers every write the primary executed before it,
    /// whichever connection sent it). `WAIT` blocks its connection: ``RedisPool`` runs this on a
    /// connection of its own.
    public func eval(
        _ script: RedisScript, keys: [String] = [], arguments: [RedisArgument] = [], replicas: Int, timeout: Duration
    ) async throws -> (reply: RedisReply, acknowledged: Int) {
        let rest: [RedisArgument] = [.init(keys.count)] + keys.map { RedisArgument($0) } + arguments
        let (seconds, attoseconds) = timeout.components
        let wait: [RedisArgument] = ["WAIT", .init(replicas), .init(max(1, seconds * 1000 + attoseconds / 1_000_000_000_000_000))]
        var replies = try await pipeline([["EVALSHA", .init(script.sha1)] + rest, wait])
        if case .error(let message) = replies[0], message.hasPrefix("NOSCRIPT") {
            replies = try await pipeline([["EVAL", .init(script.source)] + rest, wait])
        }
        guard replies.count == 2 else { throw RedisError(.protocolError, "expected two replies to a script and WAIT") }
        let reply = try replies[0].orThrow()
        guard case .integer(let acknowledged) = try replies[1].orThrow() else {
            throw RedisError(.protocolError, "expected an integer reply to WAIT")
        }
        return (reply, Int(acknowledged))
    }

    private func integer(_ args: [RedisArgument]) async throws -> Int {
        let reply = try await send(args)
        guard case .integer(let n) = reply else {
            throw RedisError(.protocolError, "expected an integer reply to \(args.first.map { String(decoding: $0.bytes, as: UTF8.self) } ?? "?")")
        }
        return Int(n)
    }
}

/// A Lua script, identified by its SHA-1 for EVALSHA.
public struct RedisScript: Sendable, Hashable {
    public let source: String
    public let sha1: String

    public init(_ source: String) {
        self.source = source
        self.sha1 = Insecure.SHA1.hash(data: Array(source.utf8)).map { b in
            let digits = Array("0123456789abcdef")
            return "\(digits[Int(b >> 4)])\(digits[Int(b & 0xf)])"
        }.joined()
    }
}
