import CHiredis
import Dispatch
import Foundation
import Synchronization

/// One connection to Redis over hiredis.
///
/// - Important: hiredis contexts are not thread-safe. Every call on the context
///   runs on this connection's own serial `DispatchQueue` (never on Swift's
///   cooperative pool or a NIO event loop); async callers wait on a
///   continuation. That confinement is why the class is `@unchecked Sendable`.
///   Most code borrows connections from a ``RedisPool`` instead of making them.
public final class RedisConnection: @unchecked Sendable {
    public let configuration: RedisConfiguration
    private let queue: DispatchQueue
    /// Touched only on `queue`.
    private var context: UnsafeMutablePointer<redisContext>?
    /// The socket, for the pool's staleness check of an idle connection.
    private let fd: Int32
    private let broken = Atomic<Bool>(false)

    private init(configuration: RedisConfiguration, queue: DispatchQueue, context: UnsafeMutablePointer<redisContext>) {
        self.configuration = configuration
        self.queue = queue
        self.context = context
        self.fd = context.pointee.fd
    }

    deinit {
        if let context { redisFree(context) }
    }

    /// Connects, authenticates and selects the database.
    /// - Throws: ``RedisError`` `.connectionFailed`, `.authenticationFailed`, `.serverError` (SELECT).
    public static func connect(_ configuration: RedisConfiguration) async throws -> RedisConnection {
        let queue = DispatchQueue(label: "redis-connection")
        let connection: RedisConnection = try await withCheckedThrowingContinuation { continuation in
            queue.async {
                do {
                    let ctx = try openContext(configuration)
                    continuation.resume(returning: RedisConnection(configuration: configuration, queue: queue, context: ctx))
                } catch {
                    continuation.resume(throwing: error)
                }
            }
        }
        if let password = configuration.password {
            var auth: [RedisArgument] = ["AUTH"]
            if let user = configuration.user { auth.append(RedisArgument(user)) }
            auth.append(RedisArgument(password))
            if case .error(let message) = try await connection.reply(auth) {
                connection.close()
                throw RedisError(.authenticationFailed, "AUTH refused for \(configuration.redactedURL): \(message)")
            }
        }
        if configuration.database != 0 {
            if case .error(let message) = try await connection.reply(["SELECT", RedisArgument(configuration.database)]) {
                connection.close()
                throw RedisError(.serverError, "SELECT \(configuration.database) failed: \(message)")
            }
        }
        return connection
    }

    private static func openContext(_ c: RedisConfiguration) throws -> UnsafeMutablePointer<redisContext> {
        let connectTimeout = timeval(c.connectTimeout)
        let ctx: UnsafeMutablePointer<redisContext>?
        let target: String
        switch c.endpoint {
        case .tcp(let host, let port):
            target = "\(host):\(port)"
            ctx = redisConnectWithTimeout(host, Int32(port), connectTimeout)
        case .unix(let path):
            target = path
            ctx = redisConnectUnixWithTimeout(path, connectTimeout)
        }
        guard let ctx else { throw RedisError(.connectionFailed, "cannot allocate a hiredis context") }
        if ctx.pointee.err != 0 {
            let why = errorString(ctx)
            redisFree(ctx)
            throw RedisError(.connectionFailed, "cannot connect to Redis at \(target): \(why)")
        }
        _ = redisSetTimeout(ctx, timeval(c.commandTimeout))
        _ = redisEnableKeepAlive(ctx)
        return ctx
    }

    /// Whether an I/O error or timeout has made this connection unusable.
    public var isBroken: Bool { broken.load(ordering: .acquiring) }

    /// Sends one command and returns its reply.
    /// - Throws: ``RedisError/Code/serverError`` for an error reply; `.connectionLost` or
    ///   `.timeout` (both retriable) when the connection fails, which also breaks it.
    public func send(_ arguments: [RedisArgument]) async throws -> RedisReply {
        try await reply(arguments).orThrow()
    }

    /// Sends one command and returns its reply, error replies included.
    public func reply(_ arguments: [RedisArgument]) async throws -> RedisReply {
        try await pipeline([arguments])[0]
    }

    /// Sends all commands in one write and reads their replies in order: one round trip.
    /// Error replies are returned in place (``RedisReply/error(_:)``); only a
    /// connection failure throws.
    public func pipeline(_ commands: [[RedisArgument]]) async throws -> [RedisReply] {
        guard !commands.isEmpty else { return [] }
        return try await withCheckedThrowingContinuation { continuation in
            queue.async { [self] in
                do {
                    continuation.resume(returning: try runPipeline(commands))
                } catch {
                    continuation.resume(throwing: error)
                }
            }
        }
    }

    /// Runs on `queue`.
    private func runPipeline(_ commands: [[RedisArgument]]) throws -> [RedisReply] {
        guard let ctx = context, !isBroken else {
            throw RedisError(.connectionLost, "connection to \(configuration.redactedURL) is closed")
        }
        for command in commands {
            let status = Self.withArgv(command) { argc, argv, lengths in
                redisAppendCommandArgv(ctx, argc, argv, lengths)
            }
            if status != REDIS_OK { throw fail(ctx) }
        }
        var replies: [RedisReply] = []
        replies.reserveCapacity(commands.count)
        for _ in commands {
            var raw: UnsafeMutableRawPointer?
            guard redisGetReply(ctx, &raw) == REDIS_OK, let raw else { throw fail(ctx) }
            let reply = raw.assumingMemoryBound(to: redisReply.self)
            replies.append(Self.convert(reply))
            freeReplyObject(raw)
        }
        return replies
    }

    /// Marks the connection broken and describes why.
    private func fail(_ ctx: UnsafeMutablePointer<redisContext>) -> RedisError {
        broken.store(true, ordering: .releasing)
        let why = Self.errorString(ctx)
        if ctx.pointee.err == REDIS_ERR_IO, why.contains("temporarily unavailable") || why.contains("timed out") {
            return RedisError(.timeout, "no reply from \(configuration.redactedURL) within \(configuration.commandTimeout)")
        }
        if ctx.pointee.err == REDIS_ERR_PROTOCOL {
            return RedisError(.protocolError, "protocol error from \(configuration.redactedURL): \(why)")
        }
        return RedisError(.connectionLost, "connection to \(configuration.redactedURL) lost: \(why)")
    }

    /// Whether an idle connection's socket shows the server went away (EOF or reset):
    /// an idle Redis connection never has anything to read.
    func looksClosedByServer() -> Bool {
        var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        return poll(&p, 1, 0) != 0
    }

    /// Closes the socket (after whatever is queued on the connection).
    public func close() {
        broken.store(true, ordering: .releasing)
        queue.async { [self] in
            if let context {
                redisFree(context)
                self.context = nil
            }
        }
    }

    private static func errorString(_ ctx: UnsafeMutablePointer<redisContext>) -> String {
        withUnsafeBytes(of: ctx.pointee.errstr) { raw in
            let bytes = raw.bindMemory(to: UInt8.self)
            let end = bytes.firstIndex(of: 0) ?? bytes.count
            return String(decoding: bytes[0..<end], as: UTF8.self)
        }
    }

    /// Calls `body` with hiredis' argv form of `command`, pointing into one contiguous buffer.
    private static func withArgv<T>(
        _ command: [RedisArgument],
        _ body: (Int32, UnsafeMutablePointer<UnsafePointer<CChar>?>, UnsafePointer<Int>) -> T
    ) -> T {
        let total = command.reduce(0) { $0 + $1.bytes.count }
        let storage = UnsafeMutablePointer<CChar>.allocate(capacity: total + 1)
        let argv = UnsafeMutablePointer<UnsafePointer<CChar>?>.allocate(capacity: max(command.count, 1))
        let lengths = UnsafeMutablePointer<Int>.allocate(capacity: max(command.count, 1))
        defer {
            storage.deallocate()
            argv.deallocate()
            lengths.deallocate()
        }
        var offset = 0
        for (i, arg) in command.enumerated() {
            arg.bytes.withUnsafeBytes { raw in
                UnsafeMutableRawPointer(storage + offset).copyMemory(from: raw.baseAddress ?? UnsafeRawPointer(storage), byteCount: raw.count)
            }
            argv[i] = UnsafePointer(storage + offset)
            lengths[i] = arg.bytes.count
            offset += arg.bytes.count
        }
        storage[total] = 0
        return body(Int32(command.count), argv, lengths)
    }

    private static func convert(_ r: UnsafeMutablePointer<redisReply>) -> RedisReply {
        let reply = r.pointee
        func bytes() -> [UInt8] {
            guard let str = reply.str, reply.len > 0 else { return [] }
            return Array(UnsafeRawBufferPointer(start: str, count: reply.len))
        }
        switch reply.type {
        case REDIS_REPLY_STRING: return .string(bytes())
        case REDIS_REPLY_INTEGER: return .integer(reply.integer)
        case REDIS_REPLY_NIL: return .null
        case REDIS_REPLY_STATUS: return .status(String(decoding: bytes(), as: UTF8.self))
        case REDIS_REPLY_ERROR: return .error(String(decoding: bytes(), as: UTF8.self))
        case REDIS_REPLY_ARRAY:
            guard let elements = reply.element else { return .array([]) }
            return .array((0..<reply.elements).compactMap { i in elements[i].map(convert) })
        default: return .error("unsupported reply type \(reply.type)")
        }
    }
}

extension timeval {
    init(_ d: Duration) {
        let (s, attos) = d.components
        self.init(tv_sec: Int(s), tv_usec: Int(attos / 1_000_000_000_000))
    }
}
