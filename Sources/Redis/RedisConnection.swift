import CHiredis
import Foundation
import Synchronization

/// One connection to Redis over hiredis, shared by any number of concurrent callers and
/// pipelined automatically: commands that arrive while a round trip is under way are written
/// together in the next one, and their replies matched to them in order.
///
/// - Important: hiredis contexts are not thread-safe. The context is owned by this
///   connection's own thread (never Swift's cooperative pool or a NIO event loop), which alone
///   calls hiredis; callers hand their commands over through a lock and wait on a
///   continuation. That confinement is why the class is `@unchecked Sendable`.
///
/// A round trip: take every waiting caller's commands, write them in one go, read the replies
/// in order, resume each caller as soon as its replies are in. With many callers, one write
/// and one or two reads serve dozens of commands; with one caller it is a plain round trip.
///
/// The connection (re)connects by itself: on first use, and on the next use after it broke.
/// A command whose round trip fails (I/O error, timeout) fails with a retriable error — its
/// effect is unknown — and is never resent here. Before each round trip an idle socket that
/// shows the server closed it (a restart) is replaced first, since nothing was sent on it yet.
/// Blocking commands (`BLPOP`, …) hold every caller behind them: give them a connection of
/// their own (``RedisPool/withConnection(_:)``).
///
/// Under Sentinel (``RedisConfiguration/Endpoint/sentinel(sentinels:master:)``) every connect
/// asks the sentinels, in turn, for the current primary and checks with `ROLE` that the
/// server it reached is a primary, so a connection is never opened to a replica. A `READONLY`
/// answer (the server was demoted since) and a lost connection both drop the connection:
/// the next round trip asks the sentinels again. Writes on a demoted server fail (`READONLY`,
/// retriable), they are never accepted by a replica.
public final class RedisConnection: @unchecked Sendable {
    public let configuration: RedisConfiguration

    private struct Job {
        let commands: [[RedisArgument]]
        let continuation: CheckedContinuation<[RedisReply], any Error>
    }

    private struct State {
        var jobs: [Job] = []
        var sleeping = false
        var started = false
        var closed = false
    }

    private let state = Mutex(State())
    private let wake = DispatchSemaphore(value: 0)
    private let broken = Atomic<Bool>(false)
    private let reconnect = Atomic<Bool>(false)
    private let connected = Atomic<Bool>(false)
    /// Touched only on the connection's thread.
    private var context: UnsafeMutablePointer<redisContext>?

    /// A connection that connects on first use (use ``connect(_:)`` to connect now and see
    /// errors at once).
    public init(configuration: RedisConfiguration) {
        self.configuration = configuration
    }

    /// Connects, authenticates and selects the database.
    /// - Throws: ``RedisError`` `.connectionFailed`, `.authenticationFailed`, `.serverError` (SELECT).
    public static func connect(_ configuration: RedisConfiguration) async throws -> RedisConnection {
        let connection = RedisConnection(configuration: configuration)
        do {
            _ = try await connection.submit([])  // an empty round trip: connects
        } catch {
            connection.close()
            throw error
        }
        return connection
    }

    /// Whether the last round trip failed (I/O error, timeout) and left the connection
    /// unconnected; the next command connects again.
    public var isBroken: Bool { broken.load(ordering: .acquiring) }

    /// Closes the socket before the next round trip, which connects again (under Sentinel:
    /// asks the sentinels again).
    public func reconnectBeforeNextUse() { reconnect.store(true, ordering: .releasing) }

    /// Whether a context is open right now.
    public var isConnected: Bool { connected.load(ordering: .acquiring) }

    /// Sends one command and returns its reply.
    /// - Throws: ``RedisError/Code/serverError`` for an error reply; `.connectionLost` or
    ///   `.timeout` (both retriable) when the connection fails.
    public func send(_ arguments: [RedisArgument]) async throws -> RedisReply {
        try await reply(arguments).orThrow()
    }

    /// Sends one command and returns its reply, error replies included.
    public func reply(_ arguments: [RedisArgument]) async throws -> RedisReply {
        try await submit([arguments])[0]
    }

    /// Sends all commands together and reads their replies in order (one round trip, shared
    /// with other callers'). Error replies are returned in place (``RedisReply/error(_:)``);
    /// only a connection failure throws.
    public func pipeline(_ commands: [[RedisArgument]]) async throws -> [RedisReply] {
        guard !commands.isEmpty else { return [] }
        return try await submit(commands)
    }

    /// Closes the socket after the round trips already handed over; later commands fail with
    /// ``RedisError/Code/closed``.
    public func close() {
        let wakeUp = state.withLock { s -> Bool in
            s.closed = true
            guard s.sleeping else { return false }
            s.sleeping = false
            return true
        }
        if wakeUp { wake.signal() }
    }

    // MARK: - The hand-over

    private func submit(_ commands: [[RedisArgument]]) async throws -> [RedisReply] {
        try await withCheckedThrowingContinuation { (c: CheckedContinuation<[RedisReply], any Error>) in
            enum Next { case refuse, start, wake, none }
            let next = state.withLock { s -> Next in
                if s.closed { return .refuse }
                s.jobs.append(Job(commands: commands, continuation: c))
                if !s.started {
                    s.started = true
                    return .start
                }
                guard s.sleeping else { return .none }
                s.sleeping = false
                return .wake
            }
            switch next {
            case .refuse: c.resume(throwing: RedisError(.closed, "the Redis connection is closed"))
            case .start:
                let thread = Thread { [self] in runLoop() }
                thread.name = "redis-connection"
                thread.start()
            case .wake: wake.signal()
            case .none: break
            }
        }
    }

    /// The connection's thread: round trips until closed.
    private func runLoop() {
        while true {
            let (jobs, closed) = state.withLock { s -> ([Job], Bool) in
                let jobs = s.jobs
                s.jobs.removeAll(keepingCapacity: true)
                if jobs.isEmpty, !s.closed { s.sleeping = true }
                return (jobs, s.closed)
            }
            if !jobs.isEmpty {
                roundTrip(jobs)
            } else if closed {
                disconnect()
                return
            } else {
                wake.wait()
            }
        }
    }

    // MARK: - On the connection's thread

    private func roundTrip(_ jobs: [Job]) {
        if reconnect.exchange(false, ordering: .acquiringAndReleasing) { disconnect() }
        if let ctx = context, Self.looksClosedByServer(ctx) { disconnect() }
        let ctx: UnsafeMutablePointer<redisContext>
        do {
            ctx = try context ?? open()
        } catch {
            for job in jobs { job.continuation.resume(throwing: error) }
            return
        }
        for job in jobs {
            for command in job.commands {
                let status = Self.withArgv(command) { argc, argv, lengths in redisAppendCommandArgv(ctx, argc, argv, lengths) }
                if status != REDIS_OK { return fail(jobs[...], ctx) }
            }
        }
        var done: Int32 = 0
        while done == 0 {
            if redisBufferWrite(ctx, &done) != REDIS_OK { return fail(jobs[...], ctx) }
        }
        var demoted = false
        for (i, job) in jobs.enumerated() {
            var replies: [RedisReply] = []
            replies.reserveCapacity(job.commands.count)
            for _ in job.commands {
                var raw: UnsafeMutableRawPointer?
                guard redisGetReply(ctx, &raw) == REDIS_OK, let raw else { return fail(jobs[i...], ctx) }
                let reply = Self.convert(raw.assumingMemoryBound(to: redisReply.self))
                if case .error(let message) = reply, message.hasPrefix("READONLY") { demoted = true }
                replies.append(reply)
                freeReplyObject(raw)
            }
            job.continuation.resume(returning: replies)
        }
        // The server is a replica now (a failover demoted it): the next round trip connects
        // again, through the sentinels when there are some.
        if demoted { disconnect() }
    }

    /// The round trip failed: its commands' effect is unknown. The context is dropped (the
    /// next round trip connects again) and every caller still waiting is told why.
    private func fail(_ jobs: ArraySlice<Job>, _ ctx: UnsafeMutablePointer<redisContext>) {
        let error = describe(ctx)
        broken.store(true, ordering: .releasing)
        disconnect()
        for job in jobs { job.continuation.resume(throwing: error) }
    }

    private func disconnect() {
        guard let ctx = context else { return }
        context = nil
        connected.store(false, ordering: .releasing)
        redisFree(ctx)
    }

    /// Connects, authenticates and selects the database.
    private func open() throws -> UnsafeMutablePointer<redisContext> {
        let c = configuration
        let connectTimeout = timeval(c.connectTimeout)
        let opened: UnsafeMutablePointer<redisContext>?
        let target: String
        switch c.endpoint {
        case .tcp(let host, let port):
            target = "\(host):\(port)"
            opened = redisConnectWithTimeout(host, Int32(port), connectTimeout)
        case .unix(let path):
            target = path
            opened = redisConnectUnixWithTimeout(path, connectTimeout)
        case .sentinel(let sentinels, let master):
            let primary = try Self.askSentinels(sentinels, master: master, configuration: c)
            target = "\(primary) (primary of \(master))"
            opened = redisConnectWithTimeout(primary.host, Int32(primary.port), connectTimeout)
        }
        guard let ctx = opened else { throw RedisError(.connectionFailed, "cannot allocate a hiredis context") }
        if ctx.pointee.err != 0 {
            let why = Self.errorString(ctx)
            redisFree(ctx)
            throw RedisError(.connectionFailed, "cannot connect to Redis at \(target): \(why)")
        }
        _ = redisSetTimeout(ctx, timeval(c.commandTimeout))
        _ = redisEnableKeepAlive(ctx)
        do {
            if let password = c.password {
                var auth: [RedisArgument] = ["AUTH"]
                if let user = c.user { auth.append(RedisArgument(user)) }
                auth.append(RedisArgument(password))
                if case .error(let message) = try Self.command(ctx, auth, configuration: c) {
                    throw RedisError(.authenticationFailed, "AUTH refused for \(c.redactedURL): \(message)")
                }
            }
            if c.database != 0, case .error(let message) = try Self.command(ctx, ["SELECT", RedisArgument(c.database)], configuration: c) {
                throw RedisError(.serverError, "SELECT \(c.database) failed: \(message)")
            }
            if case .sentinel = c.endpoint {
                // The sentinels may lag behind a failover: never keep a connection to a replica.
                let role = try Self.command(ctx, ["ROLE"], configuration: c)
                guard role.array?.first?.text == "master" else {
                    throw RedisError(.connectionFailed, "\(target) is not a primary (ROLE: \(role.array?.first?.text ?? "?")); asking the sentinels again")
                }
            }
        } catch {
            redisFree(ctx)
            throw error
        }
        context = ctx
        broken.store(false, ordering: .releasing)
        connected.store(true, ordering: .releasing)
        return ctx
    }

    /// The primary's address from the first sentinel that knows it (each asked with the
    /// connect timeout; a sentinel that is down or does not know `master` is skipped).
    private static func askSentinels(
        _ sentinels: [RedisConfiguration.HostAndPort], master: String, configuration c: RedisConfiguration
    ) throws -> RedisConfiguration.HostAndPort {
        var why: [String] = []
        for sentinel in sentinels {
            guard let ctx = redisConnectWithTimeout(sentinel.host, Int32(sentinel.port), timeval(c.connectTimeout)) else { continue }
            defer { redisFree(ctx) }
            if ctx.pointee.err != 0 {
                why.append("\(sentinel): \(errorString(ctx))")
                continue
            }
            _ = redisSetTimeout(ctx, timeval(c.connectTimeout))
            do {
                if let password = c.sentinelPassword, case .error(let m) = try command(ctx, ["AUTH", RedisArgument(password)], configuration: c) {
                    why.append("\(sentinel): AUTH refused: \(m)")
                    continue
                }
                let answer = try command(ctx, ["SENTINEL", "get-master-addr-by-name", RedisArgument(master)], configuration: c)
                guard let parts = answer.array, parts.count == 2, let host = parts[0].text, let port = parts[1].text.flatMap({ Int($0) }) else {
                    why.append("\(sentinel): does not know '\(master)' (\(answer))")
                    continue
                }
                return RedisConfiguration.HostAndPort(host: host, port: port)
            } catch {
                why.append("\(sentinel): \(error)")
            }
        }
        throw RedisError(.connectionFailed, "no sentinel named a primary for '\(master)': \(why.joined(separator: "; "))")
    }

    /// One command on a context being set up.
    private static func command(
        _ ctx: UnsafeMutablePointer<redisContext>, _ command: [RedisArgument], configuration: RedisConfiguration
    ) throws -> RedisReply {
        let status = withArgv(command) { argc, argv, lengths in redisAppendCommandArgv(ctx, argc, argv, lengths) }
        var raw: UnsafeMutableRawPointer?
        guard status == REDIS_OK, redisGetReply(ctx, &raw) == REDIS_OK, let raw else {
            throw RedisError(.connectionFailed, "connection to \(configuration.redactedURL) failed while logging in: \(errorString(ctx))")
        }
        defer { freeReplyObject(raw) }
        return convert(raw.assumingMemoryBound(to: redisReply.self))
    }

    /// Why a round trip failed.
    private func describe(_ ctx: UnsafeMutablePointer<redisContext>) -> RedisError {
        let why = Self.errorString(ctx)
        if ctx.pointee.err == REDIS_ERR_IO, why.contains("temporarily unavailable") || why.contains("timed out") {
            return RedisError(.timeout, "no reply from \(configuration.redactedURL) within \(configuration.commandTimeout)")
        }
        if ctx.pointee.err == REDIS_ERR_PROTOCOL {
            return RedisError(.protocolError, "protocol error from \(configuration.redactedURL): \(why)")
        }
        return RedisError(.connectionLost, "connection to \(configuration.redactedURL) lost: \(why)")
    }

    /// Whether an idle connection's socket shows the server went away (EOF or reset): between
    /// round trips a Redis connection never has anything to read.
    private static func looksClosedByServer(_ ctx: UnsafeMutablePointer<redisContext>) -> Bool {
        var p = pollfd(fd: ctx.pointee.fd, events: Int16(POLLIN), revents: 0)
        return poll(&p, 1, 0) != 0
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
