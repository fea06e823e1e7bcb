/// A value in an AMQP field table (message headers, queue and exchange arguments).
public enum AMQPFieldValue: Sendable, Hashable {
    case string(String)
    case int(Int64)
    case bool(Bool)
    case double(Double)
    /// Seconds since the Unix epoch (AMQP timestamp, type `T`).
    case timestamp(UInt64)
    case bytes([UInt8])
    case table([String: AMQPFieldValue])
    case array([AMQPFieldValue])
    case void

    /// The string value, if this is a string (or UTF-8 bytes).
    public var stringValue: String? {
        switch self {
        case .string(let s): return s
        case .bytes(let b): return String(validating: b, as: UTF8.self)
        default: return nil
        }
    }

    /// The integer value, if this is an integer or timestamp.
    public var intValue: Int64? {
        switch self {
        case .int(let i): return i
        case .timestamp(let t): return Int64(clamping: t)
        default: return nil
        }
    }
}

extension AMQPFieldValue: ExpressibleByStringLiteral, ExpressibleByIntegerLiteral, ExpressibleByBooleanLiteral {
    public init(stringLiteral value: String) { self = .string(value) }
    public init(integerLiteral value: Int64) { self = .int(value) }
    public init(booleanLiteral value: Bool) { self = .bool(value) }
}

/// A field table: header or argument name → value.
public typealias AMQPTable = [String: AMQPFieldValue]

/// The basic-class properties of a message.
public struct AMQPProperties: Sendable, Hashable {
    public var contentType: String?
    public var contentEncoding: String?
    public var headers: AMQPTable
    /// Persistent messages (`true`, delivery mode 2) survive a broker restart in durable queues.
    public var persistent: Bool
    public var priority: UInt8?
    public var correlationID: String?
    public var replyTo: String?
    /// Per-message TTL in milliseconds, as AMQP's string form.
    public var expiration: String?
    public var messageID: String?
    /// Seconds since the Unix epoch.
    public var timestamp: UInt64?
    public var type: String?
    public var userID: String?
    public var appID: String?

    public init(
        contentType: String? = nil,
        contentEncoding: String? = nil,
        headers: AMQPTable = [:],
        persistent: Bool = true,
        priority: UInt8? = nil,
        correlationID: String? = nil,
        replyTo: String? = nil,
        expiration: String? = nil,
        messageID: String? = nil,
        timestamp: UInt64? = nil,
        type: String? = nil,
        userID: String? = nil,
        appID: String? = nil
    ) {
        self.contentType = contentType
        self.contentEncoding = contentEncoding
        self.headers = headers
        self.persistent = persistent
        self.priority = priority
        self.correlationID = correlationID
        self.replyTo = replyTo
        self.expiration = expiration
        self.messageID = messageID
        self.timestamp = timestamp
        self.type = type
        self.userID = userID
        self.appID = appID
    }
}

/// A message to publish: a body and its properties.
public struct AMQPMessage: Sendable, Hashable {
    public var body: [UInt8]
    public var properties: AMQPProperties

    public init(body: [UInt8], properties: AMQPProperties = AMQPProperties()) {
        self.body = body
        self.properties = properties
    }

    public init(_ text: String, properties: AMQPProperties = AMQPProperties()) {
        self.init(body: Array(text.utf8), properties: properties)
    }

    /// The body as UTF-8 text, or `nil` if it is not valid UTF-8.
    public var bodyString: String? { String(validating: body, as: UTF8.self) }
}

extension AMQPMessage {
    /// The longest AMQP short string (exchange and queue names, routing keys, most
    /// properties, field-table keys): its length is one octet.
    public static let maxShortString = 255

    /// Checks everything that goes on the wire as a short string, so that a message the
    /// protocol cannot carry fails alone, before a frame is written (librabbitmq would
    /// refuse it after the method frame and leave the connection unusable).
    /// - Throws: ``AMQPError/Code/invalidMessage`` naming the field (never its value).
    public func validate(exchange: String, routingKey: String) throws {
        let short = Self.validateShortString
        try short(exchange, "exchange name")
        try short(routingKey, "routing key")
        let p = properties
        try short(p.contentType, "content-type")
        try short(p.contentEncoding, "content-encoding")
        try short(p.correlationID, "correlation-id")
        try short(p.replyTo, "reply-to")
        try short(p.expiration, "expiration")
        try short(p.messageID, "message-id")
        try short(p.type, "type")
        try short(p.userID, "user-id")
        try short(p.appID, "app-id")
        try Self.validate(p.headers, path: "header")
    }

    /// Refuses a value AMQP's short strings cannot carry (over 255 bytes).
    static func validateShortString(_ value: String?, _ name: String) throws {
        guard let value, value.utf8.count > maxShortString else { return }
        throw AMQPError(.invalidMessage, "\(name) is \(value.utf8.count) bytes; AMQP allows at most \(maxShortString)")
    }

    /// Refuses a table whose keys (at any depth) AMQP cannot carry.
    static func validate(_ table: AMQPTable, path: String) throws {
        for (key, value) in table {
            guard key.utf8.count <= maxShortString else {
                throw AMQPError(.invalidMessage, "a \(path) name is \(key.utf8.count) bytes; AMQP allows at most \(maxShortString)")
            }
            try validate(value, path: path)
        }
    }

    private static func validate(_ value: AMQPFieldValue, path: String) throws {
        switch value {
        case .table(let t): try validate(t, path: "nested \(path)")
        case .array(let a): for v in a { try validate(v, path: path) }
        default: break
        }
    }
}
