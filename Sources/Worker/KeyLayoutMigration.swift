import Redis
import RelayContract
import RelayCore

/// Moves a deployment's Redis state from the layout before the per-user hash tags to the
/// current one (`wechat-worker migrate-keys`; docs/operations.md, "Upgrading to the per-user key
/// layout"). Run once, with the old workers stopped and their queues drained:
/// - sessions `<prefix>:<appid>:session:<openid>` are renamed to `<prefix>:<appid>:{<openid>}:session`
///   (`RENAMENX`: the expiry goes with them; a session the new layout already has is newer and
///   stays, the old one is left to expire);
/// - the per-shard fences `<prefix>:fence:<shard>` are deleted (the deployment's counter,
///   `<prefix>:fence`, replaces them);
/// - message records and signed-query keys are left alone: they expire within an hour (a day for
///   an unfinished record), and a drained queue has no message that needs them.
///
/// It runs on a single Redis (the old layout could not run on a cluster) and is safe to run twice.
public struct KeyLayoutMigration: Sendable {
    public let redis: RedisPool
    public let prefix: String

    public init(redis: RedisPool, prefix: String) {
        self.redis = redis
        self.prefix = prefix
    }

    /// What a run did. (SCAN may return a key twice: a second rename of a moved session finds it
    /// gone and is not counted, but `kept` and `unrecognized` may count such a key twice.)
    public struct Report: Sendable, Equatable, CustomStringConvertible {
        /// Sessions renamed into the new layout.
        public var moved = 0
        /// Old sessions left where they are (to expire): the new layout already had the user's
        /// session (a new worker wrote it), which is kept as it is.
        public var kept = 0
        /// Keys that look like old sessions but are not (an unexpected AppID or OpenID), untouched.
        public var unrecognized = 0
        /// Per-shard fence keys deleted.
        public var fencesDeleted = 0

        public var description: String {
            "\(moved) session(s) moved, \(kept) left (the new layout already had the user's session), \(unrecognized) unrecognized key(s) left alone, \(fencesDeleted) old fence key(s) deleted"
        }
    }

    /// Runs the migration (see the type's documentation): each batch of the scan is renamed as it
    /// comes, in one pipeline; a key that expired in between is skipped.
    public func run() async throws -> Report {
        var report = Report()
        try await scan(match: Self.globEscaped(prefix) + ":*:session:*") { batch in
            var renames: [(String, String)] = []
            for key in batch {
                guard let (appID, openID) = Self.oldSession(key, prefix: prefix) else {
                    report.unrecognized += 1
                    continue
                }
                renames.append((key, WorkerKeys(prefix: prefix, appID: appID).session(openID)))
            }
            guard !renames.isEmpty else { return }
            let replies = try await redis.pipeline(renames.map { ["RENAMENX", .init($0.0), .init($0.1)] })
            for reply in replies {
                switch reply {
                case .integer(1): report.moved += 1
                case .integer: report.kept += 1
                case .error(let message) where message.contains("no such key"): break  // expired since the scan saw it
                case .error(let message): throw RedisError(.serverError, "RENAMENX failed: \(message)")
                default: throw RedisError(.protocolError, "unexpected answer to RENAMENX")
                }
            }
        }
        let fencePrefix = prefix + ":fence:"
        try await scan(match: Self.globEscaped(fencePrefix) + "*") { batch in
            let old = batch.filter { key in
                guard key.hasPrefix(fencePrefix) else { return false }
                let shard = key.dropFirst(fencePrefix.count)
                return !shard.isEmpty && shard.allSatisfy { $0.isASCII && $0.isNumber }
            }
            guard !old.isEmpty else { return }
            report.fencesDeleted += Int(try await redis.send(["DEL"] + old.map { .init($0) }).int ?? 0)
        }
        return report
    }

    /// The AppID and OpenID of an old session key, or nil for a key of another shape.
    static func oldSession(_ key: String, prefix: String) -> (appID: String, openID: String)? {
        guard key.hasPrefix(prefix + ":") else { return nil }
        let rest = key.dropFirst(prefix.count + 1)
        guard let colon = rest.firstIndex(of: ":") else { return nil }
        let appID = String(rest[..<colon])
        let tail = rest[rest.index(after: colon)...]
        guard AccountSpec.isValidAppID(appID), tail.hasPrefix("session:") else { return nil }
        let openID = String(tail.dropFirst("session:".count))
        guard !openID.isEmpty, !openID.contains(":") else { return nil }
        return (appID, openID)
    }

    /// Calls `body` with each batch of keys matching `pattern` (SCAN: no long block of the
    /// server; a key may come twice, which the callers tolerate: a second rename finds it gone).
    private func scan(match pattern: String, _ body: ([String]) async throws -> Void) async throws {
        var cursor = "0"
        repeat {
            let reply = try await redis.send(["SCAN", .init(cursor), "MATCH", .init(pattern), "COUNT", "1000"])
            guard let parts = reply.array, parts.count == 2, let next = parts[0].text, let batch = parts[1].array else {
                throw RedisError(.protocolError, "unexpected answer to SCAN")
            }
            try await body(batch.compactMap(\.text))
            cursor = next
        } while cursor != "0"
    }

    /// `text` with the glob's special characters escaped.
    static func globEscaped(_ text: String) -> String {
        var out = ""
        for c in text {
            if "*?[]\\".contains(c) { out.append("\\") }
            out.append(c)
        }
        return out
    }
}
