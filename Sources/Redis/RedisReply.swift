/// A reply from Redis.
public enum RedisReply: Sendable, Hashable {
    /// A bulk string: binary-safe bytes.
    case string([UInt8])
    case integer(Int64)
    case array([RedisReply])
    /// The nil bulk string or nil array.
    case null
    /// A status reply (`OK`, `QUEUED`, …).
    case status(String)
    /// An error reply (`ERR …`, `WRONGTYPE …`), as a value: inside a pipeline or
    /// a transaction it belongs to one command, not to the whole call.
    case error(String)

    /// The bytes of a bulk string (or a status), `nil` otherwise.
    public var bytes: [UInt8]? {
        switch self {
        case .string(let b): return b
        case .status(let s): return Array(s.utf8)
        default: return nil
        }
    }

    /// A bulk string or status as UTF-8 text.
    public var text: String? {
        switch self {
        case .string(let b): return String(decoding: b, as: UTF8.self)
        case .status(let s): return s
        case .integer(let i): return String(i)
        default: return nil
        }
    }

    public var int: Int64? {
        switch self {
        case .integer(let i): return i
        case .string(let b): return Int64(String(decoding: b, as: UTF8.self))
        default: return nil
        }
    }

    public var array: [RedisReply]? {
        if case .array(let a) = self { return a }
        return nil
    }

    public var isNull: Bool { self == .null }

    /// Throws for an error reply (``RedisError/reply(_:)``: ``RedisError/Code/unavailable`` when it
    /// means "try later", else ``RedisError/Code/serverError``), otherwise returns the reply.
    @discardableResult
    public func orThrow() throws -> RedisReply {
        if case .error(let message) = self { throw RedisError.reply(message) }
        return self
    }
}

/// An argument of a Redis command: binary-safe bytes.
public struct RedisArgument: Sendable, Hashable, ExpressibleByStringLiteral, ExpressibleByIntegerLiteral {
    public var bytes: [UInt8]

    public init(_ bytes: [UInt8]) { self.bytes = bytes }
    public init(_ text: String) { self.bytes = Array(text.utf8) }
    public init<I: BinaryInteger>(_ n: I) { self.bytes = Array(String(n).utf8) }
    public init(stringLiteral value: String) { self.init(value) }
    public init(integerLiteral value: Int) { self.init(value) }
}
