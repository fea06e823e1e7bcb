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

    /// What a run did.
    public struct Report: Sendable, Equatable, CustomStringConvertible {
        /// Sessions renamed into the new layout.
        public var moved = 0
        /// Old sessions left where they are: the new layout already had the user's session.
        public var kept = 0
        /// Keys that look like old sessions but are not (an unexpected AppID or OpenID), untouched.
        public var unrecognized = 0
        /// Per-shard fence keys deleted.
        public var fencesDeleted = 0

        public var description: String {
            "\(moved) session(s) moved, \(kept) kept (the new layout had a newer one), \(unrecognized) unrecognized key(s) left alone, \(fencesDeleted) old fence key(s) deleted"
        }
    }

    /// Runs the migration (see the type's documentation).
    public func run() async throws -> Report {
        var report = Report()
        for key in try await scan(match: Self.globEscaped(prefix) + ":*:session:*") {
            guard let (appID, openID) = Self.oldSession(key, prefix: prefix) else {
                report.unrecognized += 1
                continue
            }
            let target = WorkerKeys(prefix: prefix, appID: appID).session(openID)
            if try await redis.send(["RENAMENX", .init(key), .init(target)]).int == 1 { report.moved += 1 } else { report.kept += 1 }
        }
        for key in try await scan(match: Self.globEscaped(prefix) + ":fence:*") {
            let shard = key.dropFirst(prefix.utf8.count + ":fence:".utf8.count)
            guard !shard.isEmpty, shard.utf8.allSatisfy({ $0 >= UInt8(ascii: "0") && $0 <= UInt8(ascii: "9") }) else { continue }
            report.fencesDeleted += Int(try await redis.send(["DEL", .init(key)]).int ?? 0)
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

    /// Every key matching `pattern` (SCAN: no long block of the server; a key may be seen twice,
    /// which the callers tolerate).
    private func scan(match pattern: String) async throws -> [String] {
        var cursor = "0"
        var keys: [String] = []
        repeat {
            let reply = try await redis.send(["SCAN", .init(cursor), "MATCH", .init(pattern), "COUNT", "1000"])
            guard let parts = reply.array, parts.count == 2, let next = parts[0].text, let batch = parts[1].array else {
                throw RedisError(.protocolError, "unexpected answer to SCAN")
            }
            keys += batch.compactMap(\.text)
            cursor = next
        } while cursor != "0"
        return Array(Set(keys)).sorted()
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
