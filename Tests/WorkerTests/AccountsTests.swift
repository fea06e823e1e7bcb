import AsyncHTTPClient
import Foundation
import NIOCore
import Redis
import RelayContract
import RelayCore
import Simulator
import TokenClient
import Testing
import TestSupport
import WeChat

@testable import Worker

/// Three accounts, one in each encryption mode, served by one deployment of real processes:
/// `wechat-sim api`, `wechat-tokend`, `wechat-ingress` and `wechat-worker`, all reading one
/// `WECHAT_ACCOUNTS_FILE` (docs/operations.md, "Many accounts").
struct AccountsStack {
    struct Account: Sendable {
        var appID: String
        var mode: Pusher.Mode
        var token: String
        var aesKey: String?
        var accountID: String
    }

    static let accounts = [
        Account(appID: "wxacc0plain0000001", mode: .plaintext, token: "tokenA", aesKey: nil, accountID: "gh_accountA00"),
        Account(
            appID: "wxacc0compat000002", mode: .compatible, token: "tokenB", aesKey: "bbcdefghijklmnopqrstuvwxyz0123456789ABCDEFG",
            accountID: "gh_accountB00"),
        Account(
            appID: "wxacc0safe00000003", mode: .safe, token: "tokenC", aesKey: "cbcdefghijklmnopqrstuvwxyz0123456789ABCDEFG",
            accountID: "gh_accountC00"),
    ]

    let bin: String
    let directory: URL
    let file: String
    let prefix: String
    let simPort: Int
    let tokendPort: Int
    let ingressPort: Int
    let client: HTTPClient
    var workerPorts: [Int] = []
    /// Every process's `REDIS_URL` (default: the shared test Redis).
    var redisURL: String? = nil
    var children: [ChildProcess] = []
    var logs: [String] = []

    var simURL: String { "http://127.0.0.1:\(simPort)" }
    var tokendURL: String { "http://127.0.0.1:\(tokendPort)" }
    var ingressURL: String { "http://127.0.0.1:\(ingressPort)" }

    /// The accounts file's entry of an account; `extra` adds keys (`send_rate: 5`).
    static func entry(_ a: Account, index: Int, directory: URL, extra: [String] = []) throws -> String {
        // Each secret form once: inline, env:NAME, file:PATH.
        var lines = ["  - appid: \(a.appID)", "    account_id: \(a.accountID)", "    mode: \(a.mode.rawValue)"]
        switch index {
        case 0:
            lines += ["    token: \(a.token)", "    secret: env:ACC_SECRET_A"]
        case 1:
            lines += ["    token: env:ACC_TOKEN_B", "    aes_key: \(a.aesKey ?? "")", "    secret: secretB"]
        default:
            let token = directory.appendingPathComponent("token-\(index)").path
            let key = directory.appendingPathComponent("aes-\(index)").path
            try "\(a.token)\n".write(toFile: token, atomically: true, encoding: .utf8)
            try (a.aesKey ?? "").write(toFile: key, atomically: true, encoding: .utf8)
            lines += ["    token: file:\(token)", "    aes_key: file:\(key)", "    secret: secret\(index)", "    rules: rules-c.yaml"]
        }
        return (lines + extra.map { "    \($0)" }).joined(separator: "\n")
    }

    /// Writes the accounts file with these accounts (by index in ``accounts``).
    func writeAccounts(_ indexes: [Int], extra: [Int: [String]] = [:]) throws {
        let entries = try indexes.map { try Self.entry(Self.accounts[$0], index: $0, directory: directory, extra: extra[$0] ?? []) }
        // Written whole, then moved into place: a reader never sees half a file.
        let temporary = file + ".tmp"
        try (["accounts:"] + entries).joined(separator: "\n").appending("\n").write(toFile: temporary, atomically: false, encoding: .utf8)
        _ = rename(temporary, file)
    }

    var environment: [String: String] {
        get throws {
            [
                "WECHAT_ACCOUNTS_FILE": file, "ACC_SECRET_A": "secretA", "ACC_TOKEN_B": "tokenB",
                "AMQP_URL": try TestServices.amqpURL(), "REDIS_URL": try redisURL ?? TestServices.redisURL(), "WECHAT_QUEUE_PREFIX": prefix,
                "WECHAT_API_URL": simURL, "TOKEND_URL": tokendURL, "TOKEND_SECRET": "bearer", "HTTP_HOST": "127.0.0.1",
                "LOG_LEVEL": TestServices.environment["WR_TEST_LOG"] ?? "warning", "INGRESS_TIMESTAMP_WINDOW": "0",
            ]
        }
    }

    mutating func start(_ executable: String, _ arguments: [String] = [], extra: [String: String]) throws {
        let log = directory.appendingPathComponent("\(executable)-\(children.count).log").path
        logs.append(log)
        children.append(
            try ChildProcess("\(bin)/\(executable)", arguments: arguments, environment: try environment.merging(extra) { $1 }, logPath: log))
    }

    /// Starts the simulator, tokend, the ingress and `workers` workers, and waits until all are ready.
    static func run(
        accounts: [Int] = [0, 1, 2], extra: [Int: [String]] = [:], workers: Int = 1, workerEnvironment: [String: String] = [:],
        ingressEnvironment: [String: String] = [:], redisURL: String? = nil,
        _ body: (inout AccountsStack) async throws -> Void
    ) async throws {
        let bin = try #require(TestServices.environment["WR_BIN_DIR"], "WR_BIN_DIR is set by ops/test")
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("accounts-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        try """
        rules:
          - match: { type: text, text: "帮助" }
            reply: { text: "C 号的帮助" }
          - match: {}
            reply: { text: "C 号只懂“帮助”" }
        """.write(to: directory.appendingPathComponent("rules-c.yaml"), atomically: true, encoding: .utf8)
        // The simulator knows every account (it is WeChat): its own file, always all three.
        let simFile = directory.appendingPathComponent("sim-accounts.yaml").path
        try (["accounts:"] + Self.accounts.indices.map { try entry(Self.accounts[$0], index: $0, directory: directory) })
            .joined(separator: "\n").appending("\n").write(toFile: simFile, atomically: true, encoding: .utf8)
        var configuration = HTTPClient.Configuration()
        configuration.connectionPool.concurrentHTTP1ConnectionsPerHostSoftLimit = 64
        let client = HTTPClient(eventLoopGroupProvider: .singleton, configuration: configuration)
        var stack = AccountsStack(
            bin: bin, directory: directory, file: directory.appendingPathComponent("accounts.yaml").path, prefix: TestServices.unique("acc"),
            simPort: try freePort(), tokendPort: try freePort(), ingressPort: try freePort(), client: client, redisURL: redisURL)
        try stack.writeAccounts(accounts, extra: extra)
        do {
            // WeChat's 5 customer-service messages per user message would refuse replies to a user
            // whose pushes all came before the replies (the flood test's heavy user).
            try stack.start("wechat-sim", ["api", "--message-quota", "100"], extra: ["HTTP_PORT": "\(stack.simPort)", "WECHAT_ACCOUNTS_FILE": simFile])
            try await eventually("the simulator listens") { canConnect(port: stack.simPort) }
            try stack.start("wechat-tokend", extra: ["HTTP_PORT": "\(stack.tokendPort)"])
            try stack.start("wechat-ingress", extra: ingressEnvironment.merging(["HTTP_PORT": "\(stack.ingressPort)"]) { $1 })
            for _ in 0..<workers {
                let port = try freePort()
                stack.workerPorts.append(port)
                try stack.start("wechat-worker", extra: workerEnvironment.merging(["METRICS_PORT": "\(port)"]) { $1 })
            }
            let s = stack
            try await eventually("tokend, the ingress and the workers are ready", within: 60) {
                var urls = ["\(s.tokendURL)/readyz", "\(s.ingressURL)/readyz"]
                urls += s.workerPorts.map { "http://127.0.0.1:\($0)/readyz" }
                for url in urls where try await s.status(url) != 200 { return false }
                return true
            }
            try await body(&stack)
        } catch {
            for log in stack.logs { print("--- \(log)\n\((try? String(contentsOfFile: log, encoding: .utf8)).map { String($0.suffix(3000)) } ?? "")") }
            await stack.stop()
            try? await client.shutdown()
            throw error
        }
        await stack.stop()
        try await client.shutdown()
    }

    func stop() async {
        for child in children { child.signal(SIGTERM) }
        for child in children { _ = await child.waitForExit(within: 20) }
        try? FileManager.default.removeItem(at: directory)
    }

    func status(_ url: String, bearer: String? = nil) async throws -> Int {
        var request = HTTPClientRequest(url: url)
        if let bearer { request.headers.add(name: "Authorization", value: "Bearer \(bearer)") }
        do {
            let response = try await client.execute(request, timeout: .seconds(5))
            _ = try await response.body.collect(upTo: 1 << 20)
            return Int(response.status.code)
        } catch {
            return 0
        }
    }

    func get(_ url: String, bearer: String? = nil) async throws -> (status: Int, body: String) {
        var request = HTTPClientRequest(url: url)
        if let bearer { request.headers.add(name: "Authorization", value: "Bearer \(bearer)") }
        let response = try await client.execute(request, timeout: .seconds(10))
        let body = try await response.body.collect(upTo: 1 << 20)
        return (Int(response.status.code), String(buffer: body))
    }

    /// A pusher for an account, at `path` (default `/wechat/<appid>`), signing with `token`.
    func pusher(_ a: Account, path: String? = nil, token: String? = nil) throws -> Pusher {
        var p = Pusher(
            ingressURL: ingressURL + (path ?? "/wechat/\(a.appID)"), appID: a.appID, token: token ?? a.token,
            aesKey: try a.aesKey.map(EncodingAESKey.init), accountID: a.accountID, mode: a.mode)
        p.tries = 1
        return p
    }

    /// Pushes a text from `user` to account `a` as WeChat would, telling the simulator first.
    @discardableResult
    func push(_ a: Account, _ text: String, from user: String) async throws -> Int {
        let xml = try PushBuilder.xml(kind: "text", value: text, eventKey: nil, from: user, to: a.accountID)
        _ = try await FakeAPIClient(baseURL: simURL, appID: a.appID).register(push: try InboundMessage(xml: xml), client: client)
        return try await pusher(a).push(xml, openID: user, client: client).status
    }

    /// The texts account `a` sent to `user`, once there are `count` (bounded wait).
    func replies(_ a: Account, to user: String, count: Int, within seconds: Int = 30) async throws -> [String] {
        let api = FakeAPIClient(baseURL: simURL, appID: a.appID)
        var last: [FakePlatform.Recorded] = []
        try await eventually("\(count) replies from \(a.appID) to \(user)", within: seconds) {
            last = try await api.messages(to: user, client: client)
            return last.count >= count
        }
        return last.map { $0.content ?? "" }
    }

    /// All messages account `a` sent.
    func sent(_ a: Account) async throws -> [FakePlatform.Recorded] {
        let (_, body) = try await get("\(simURL)/sim/messages?appid=\(a.appID)")
        return try JSONDecoder().decode([FakePlatform.Recorded].self, from: Data(body.utf8))
    }

    /// The value of the ingress's metric lines starting with `prefix`, summed.
    func ingressMetric(_ prefix: String) async throws -> Double {
        try await get("\(ingressURL)/metrics").body.split(separator: "\n").filter { $0.hasPrefix(prefix) }
            .compactMap { $0.split(separator: " ").last.flatMap { Double($0) } }.reduce(0, +)
    }

    /// Every worker's `/metrics`, concatenated.
    func workerMetrics() async throws -> String {
        var out = ""
        for port in workerPorts { out += try await get("http://127.0.0.1:\(port)/metrics").body }
        return out
    }

    /// The value of a metric line starting with `prefix`, summed over the workers.
    func metric(_ prefix: String) async throws -> Double {
        try await workerMetrics().split(separator: "\n").filter { $0.hasPrefix(prefix) }
            .compactMap { $0.split(separator: " ").last.flatMap { Double($0) } }.reduce(0, +)
    }
}

@Suite(
    "Many accounts", .serialized,
    .enabled(if: (TestServices.amqpEnabled && TestServices.redisEnabled && TestServices.environment["WR_BIN_DIR"] != nil) || TestServices.isCI),
    .timeLimit(.minutes(6)))
struct ManyAccountsTests {
    /// One deployment, three accounts (plaintext, compatible, safe): each path verifies with its
    /// own Token and key; replies go out with each account's own token, rules and sessions.
    @Test func threeAccountsOneInEachModeThroughTheRealProcesses() async throws {
        try await AccountsStack.run { s in
            let (a, b, c) = (AccountsStack.accounts[0], AccountsStack.accounts[1], AccountsStack.accounts[2])
            // The same OpenID in every account: three different users (OpenIDs are per account).
            for account in [a, b, c] { #expect(try await s.push(account, "帮助", from: "oSameUser") == 200) }
            #expect(try await s.replies(a, to: "oSameUser", count: 1) == [help])
            #expect(try await s.replies(b, to: "oSameUser", count: 1) == [help])
            #expect(try await s.replies(c, to: "oSameUser", count: 1) == ["C 号的帮助"])  // C's own rules file

            // Sessions per account: A's menu and message count are A's only.
            #expect(try await s.push(a, "菜单", from: "oSameUser") == 200)
            _ = try await s.replies(a, to: "oSameUser", count: 2)
            #expect(try await s.push(a, "1", from: "oSameUser") == 200)
            #expect(try await s.push(b, "1", from: "oSameUser") == 200)
            #expect(try await s.replies(a, to: "oSameUser", count: 3).last == "您已发送3条消息")
            #expect(try await s.replies(b, to: "oSameUser", count: 2).last == "暂不支持该指令")  // B's user is not in a menu
            // Each reply went to its own account's API (the simulator finds the account by the token).
            #expect(try await s.sent(a).count == 3)
            #expect(try await s.sent(b).count == 2)
            #expect(try await s.sent(c).count == 1)

            // Paths: an unknown AppID is 404; `/wechat` is 404 with several accounts; another
            // account's Token does not open a path (403); C (safe) refuses plaintext (403).
            let xml = try PushBuilder.xml(kind: "text", value: "x", eventKey: nil, from: "oPath", to: a.accountID)
            var unknown = try s.pusher(a, path: "/wechat/wxnosuchaccount00")
            unknown.tries = 1
            #expect(try await unknown.push(xml, openID: "oPath", client: s.client).status == 404)
            #expect(try await s.pusher(a, path: "/wechat").push(xml, openID: "oPath", client: s.client).status == 404)
            #expect(try await s.pusher(a, token: b.token).push(xml, openID: "oPath", client: s.client).status == 403)
            var plainToC = try s.pusher(c)
            plainToC.mode = .plaintext
            #expect(try await plainToC.push(xml, openID: "oPath", client: s.client).status == 403)
            // The ToUserName must be the account's original id (account_id).
            let wrongAccount = try PushBuilder.xml(kind: "text", value: "x", eventKey: nil, from: "oPath", to: b.accountID)
            #expect(try await s.pusher(a).push(wrongAccount, openID: "oPath", client: s.client).status == 400)
            // URL verification per account.
            #expect(try await s.pusher(b).verify(client: s.client).status == 200)

            // tokend: one token per account under /v1/accounts/<appid>/…; the single-account
            // paths are 404 with several accounts; an unknown AppID is 404; the bearer is checked.
            var tokens: Set<String> = []
            for account in [a, b, c] {
                let (status, body) = try await s.get("\(s.tokendURL)/v1/accounts/\(account.appID)/access-token", bearer: "bearer")
                #expect(status == 200)
                tokens.insert(try JSONDecoder().decode(AccessTokenAnswer.self, from: Data(body.utf8)).accessToken)
                let (ticketStatus, _) = try await s.get("\(s.tokendURL)/v1/accounts/\(account.appID)/jsapi-ticket", bearer: "bearer")
                #expect(ticketStatus == 200)
            }
            #expect(tokens.count == 3)
            #expect(try await s.status("\(s.tokendURL)/v1/access-token", bearer: "bearer") == 404)
            #expect(try await s.status("\(s.tokendURL)/v1/accounts/wxnosuchaccount00/access-token", bearer: "bearer") == 404)
            #expect(try await s.status("\(s.tokendURL)/v1/accounts/\(a.appID)/access-token", bearer: "wrong") == 401)

            // Per-account metrics: replies and the day's quota count.
            #expect(try await s.metric("wechat_worker_account_replies_total{appid=\"\(a.appID)\"}") == 3)
            #expect(try await s.metric("wechat_worker_quota_used{appid=\"\(b.appID)\"}") == 2)
            #expect(try await s.metric("wechat_worker_quota_limit{appid=\"\(c.appID)\"}") == 500_000)
            let accepted = try await s.get("\(s.ingressURL)/metrics").body
            #expect(accepted.contains("wechat_ingress_accepted_total{appid=\"\(a.appID)\"} 3"))
        }
    }

    /// #18: the key layout a Redis Cluster needs. Every process on a one-node Redis Cluster, which
    /// refuses a command or a script whose keys are in more than one slot (`CROSSSLOT`) as a real
    /// cluster does: sessions and dialog state in order, all three encryption modes, a passive
    /// reply, WeChat's retry of a push (a duplicate), a replayed signed URL with another body
    /// (dropped), the send-rate limiter, the quota count, the fences and the membership. Before the
    /// per-user hash tags, every message's first script was refused and no reply went out.
    @Test func everyProcessRunsOnARedisCluster() async throws {
        let cluster = try await PrivateRedis(cluster: true)
        defer { cluster.stop() }
        try await AccountsStack.run(
            extra: [0: ["send_rate: 50"], 1: ["reply_mode: passive-first", "reply_wait: 3"]], redisURL: cluster.url
        ) { (s: inout AccountsStack) async throws in
            let (a, b, c) = (AccountsStack.accounts[0], AccountsStack.accounts[1], AccountsStack.accounts[2])
            for text in ["帮助", "菜单", "1"] { #expect(try await s.push(a, text, from: "oCluster") == 200) }
            #expect(try await s.replies(a, to: "oCluster", count: 3) == [help, "功能列表\n1 我的消息数\n2 退出菜单", "您已发送3条消息"])
            #expect(try await s.push(c, "帮助", from: "oCluster") == 200)
            #expect(try await s.replies(c, to: "oCluster", count: 1) == ["C 号的帮助"])

            // B answers passively, in the HTTP response.
            let passive = try PushBuilder.xml(kind: "text", value: "帮助", eventKey: nil, from: "oClusterPassive", to: b.accountID)
            _ = try await FakeAPIClient(baseURL: s.simURL, appID: b.appID).register(push: try InboundMessage(xml: passive), client: s.client)
            let answer = try await s.pusher(b).push(passive, openID: "oClusterPassive", client: s.client)
            #expect(answer.status == 200)
            #expect(try s.pusher(b).passiveReply(in: answer.body)?[child: "Content"]?.text == help)

            // A push URL signed by hand (timestamp and nonce fixed), the users told to the
            // simulator, and a POST that returns the status and the body.
            let timestamp = String(Int(Date().timeIntervalSince1970))
            func signedURL(_ account: AccountsStack.Account, nonce: String) -> String {
                "\(s.ingressURL)/wechat/\(account.appID)?signature=\(WeChatSignature.signature(token: account.token, timestamp: timestamp, nonce: nonce))"
                    + "&timestamp=\(timestamp)&nonce=\(nonce)"
            }
            func texts(_ account: AccountsStack.Account, from users: [String], firstID: UInt64) async throws -> [String] {
                var xmls: [String] = []
                for (i, user) in users.enumerated() {
                    let xml = try PushBuilder.xml(kind: "text", value: "帮助", eventKey: nil, from: user, to: account.accountID, msgID: firstID + UInt64(i))
                    _ = try await FakeAPIClient(baseURL: s.simURL, appID: account.appID).register(push: try InboundMessage(xml: xml), client: s.client)
                    xmls.append(xml)
                }
                return xmls
            }
            func post(_ url: String, _ body: String) async throws -> (status: Int, body: String) {
                var request = HTTPClientRequest(url: url)
                request.method = .POST
                request.body = .bytes(ByteBuffer(string: body))
                let response = try await s.client.execute(request, timeout: .seconds(10))
                return (Int(response.status.code), String(buffer: try await response.body.collect(upTo: 1 << 20)))
            }

            // One signed URL of A (plaintext: the signature does not cover the body): WeChat's
            // retry of the push, then the URL replayed with another user's body.
            let url = signedURL(a, nonce: "424242")
            let aPushes = try await texts(a, from: ["oVictim", "oForger"], firstID: 7_770_001)
            #expect(try await post(url, aPushes[0]).status == 200)
            #expect(try await s.replies(a, to: "oVictim", count: 1) == [help])
            #expect(try await post(url, aPushes[0]).status == 200)
            #expect(try await post(url, aPushes[1]).status == 200)
            let stack = s
            try await eventually("the retry is a duplicate and the replay is dropped") {
                let duplicates = try await stack.metric("wechat_worker_messages_total{outcome=\"duplicate\"}")
                let replayed = try await stack.metric("wechat_worker_messages_total{outcome=\"replayed_query\"}")
                return duplicates == 1 && replayed == 1
            }
            #expect(try await s.sent(a).filter { $0.touser == "oForger" }.isEmpty)
            #expect(try await s.sent(a).filter { $0.touser == "oVictim" }.count == 1)

            // B (compatible) also accepts plaintext: its encrypted push's URL, replayed without
            // encrypt_type and msg_signature (which the URL's signature does not cover) and with a
            // forged plaintext body, finds the query taken and is dropped.
            let bURL = signedURL(b, nonce: "434343")
            let bPushes = try await texts(b, from: ["oVictimB", "oForgerB"], firstID: 7_770_003)
            let cipher = try WeChatMessageCrypto(appID: b.appID, key: try EncodingAESKey(try #require(b.aesKey))).encrypt(bPushes[0])
            let envelope = "<xml><ToUserName><![CDATA[\(b.accountID)]]></ToUserName><Encrypt><![CDATA[\(cipher)]]></Encrypt></xml>"
            let encryptedURL = bURL + "&encrypt_type=aes&msg_signature="
                + WeChatSignature.messageSignature(token: b.token, timestamp: timestamp, nonce: "434343", encrypted: cipher)
            let genuine = try await post(encryptedURL, envelope)
            #expect(genuine.status == 200 && genuine.body.contains("<Encrypt>"))  // answered passively
            let forged = try await post(bURL, bPushes[1])
            #expect(forged.status == 200 && forged.body == "success")  // no passive reply: not processed
            try await eventually("the replayed encrypted URL is dropped") {
                try await stack.metric("wechat_worker_messages_total{outcome=\"replayed_query\"}") == 2
            }
            #expect(try await s.sent(b).filter { $0.touser == "oForgerB" }.isEmpty)

            // The quota count (its own key), and nothing waited on a Redis error.
            #expect(try await s.metric("wechat_worker_quota_used{appid=\"\(a.appID)\"}") == 4)
            #expect(try await s.metric("wechat_worker_messages_total{outcome=\"retried\"}") == 0)
            #expect(try await s.metric("wechat_worker_messages_total{outcome=\"dead_lettered\"}") == 0)
            // The user's session is under the user's hash tag, with the fencing copy in it.
            let session = WorkerKeys(prefix: s.prefix, appID: a.appID).session("oCluster")
            #expect(session == "\(s.prefix):\(a.appID):{oCluster}:session")
            let fence = try await runCommand("/usr/bin/redis-cli", ["-p", String(cluster.port), "HGET", session, "fence"])
            #expect(Int(fence.trimmingCharacters(in: .whitespacesAndNewlines)) ?? 0 >= 1)
        }
    }

    /// One account's failure pauses that account only: B's daily quota runs out (45009), its
    /// message is dead-lettered and counted; A's replies go on.
    @Test func oneAccountsQuotaAlertPausesThatAccountOnly() async throws {
        try await AccountsStack.run(accounts: [0, 1]) { s in
            let (a, b) = (AccountsStack.accounts[0], AccountsStack.accounts[1])
            var request = HTTPClientRequest(url: "\(s.simURL)/sim/faults?appid=\(b.appID)")
            request.method = .POST
            request.body = .bytes(ByteBuffer(string: #"{"quotaExhausted": true}"#))
            #expect(try await s.client.execute(request, timeout: .seconds(5)).status == .ok)
            #expect(try await s.push(b, "帮助", from: "oQuota") == 200)
            try await eventually("B's 45009 is counted") {
                try await s.metric("wechat_worker_quota_exhausted_total{appid=\"\(b.appID)\"}") == 1
            }
            for i in 0..<3 { #expect(try await s.push(a, "帮助", from: "oGoesOn\(i)") == 200) }
            for i in 0..<3 { #expect(try await s.replies(a, to: "oGoesOn\(i)", count: 1) == [help]) }
            #expect(try await s.sent(b).isEmpty)
            #expect(try await s.metric("wechat_worker_messages_total{outcome=\"dead_lettered\"}") == 1)
        }
    }

    /// INGRESS_REPLY_WAIT is the default of the accounts that set no `reply_mode`: an account
    /// whose replies go through the customer-service API is not held for a passive reply that
    /// never comes (its push is answered at once); another account's push waits (and, with
    /// workers in customer-service mode, times out).
    @Test func theReplyWaitAppliesOnlyToAccountsThatMayAnswerPassively() async throws {
        try await AccountsStack.run(accounts: [0, 1], extra: [0: ["reply_mode: customer-service"]], ingressEnvironment: ["INGRESS_REPLY_WAIT": "1"]) { (s: inout AccountsStack) async throws in
            let (a, b) = (AccountsStack.accounts[0], AccountsStack.accounts[1])
            #expect(try await s.push(a, "帮助", from: "oNoWait") == 200)
            #expect(try await s.ingressMetric("wechat_ingress_reply_wait_seconds_count") == 0)
            #expect(try await s.replies(a, to: "oNoWait", count: 1) == [help])
            #expect(try await s.push(b, "帮助", from: "oWaits") == 200)
            #expect(try await s.ingressMetric("wechat_ingress_reply_wait_seconds_count") == 1)
            #expect(try await s.ingressMetric("wechat_ingress_passive_total{outcome=\"timed_out\"}") == 1)
        }
    }

    /// passive-first with a send rate: a reply the ingress did not wait for goes to the API, and
    /// waits for its account's slot. It waited holding the claim of the offer: a wait past half
    /// the claim's lease made the sender refuse (a stale claim), the message was retried, and each
    /// retry reserved a slot further back (the reviewer's finding). Now the claim is given back
    /// for the wait and taken again after it: every reply goes out, none retried.
    @Test func passiveFirstFallsBackToTheRateLimitedAPIWithoutRetries() async throws {
        try await AccountsStack.run(
            accounts: [0], extra: [0: ["reply_mode: passive-first", "reply_wait: 0", "send_rate: 1", "send_burst: 1"]],
            workerEnvironment: ["WORKER_CLAIM_LEASE": "4"]
        ) { (s: inout AccountsStack) async throws in
            let a = AccountsStack.accounts[0]
            let users = (0..<6).map { "oSlow\($0)" }
            for u in users { #expect(try await s.push(a, "帮助", from: u) == 200) }
            // One a second: the last one's slot is 5 s away, past half the 4 s lease.
            for u in users { #expect(try await s.replies(a, to: u, count: 1, within: 40) == [help]) }
            #expect(try await s.metric("wechat_worker_messages_total{outcome=\"retried\"}") == 0)
            #expect(try await s.metric("wechat_worker_replies_total{channel=\"customer_service\"}") == 6)
        }
    }

    /// A worker process killed while messages wait for their account's send slots: they hold no
    /// claim then (the slot is reserved before the claim), so the broker gives them to the next
    /// worker, which reserves new slots and sends each once — one user's three messages in their
    /// order (docs/worker.md, "The send-rate limit").
    @Test func aWorkerKilledWhileSendsWaitForTheirSlotsLosesAndRepeatsNothing() async throws {
        try await AccountsStack.run(accounts: [0], extra: [0: ["send_rate: 1", "send_burst: 1"]]) { s in
            let a = AccountsStack.accounts[0]
            let users = (0..<5).map { "oSlot\($0)" }
            for u in users { #expect(try await s.push(a, "帮助", from: u) == 200) }
            for text in ["帮助", "菜单", "1"] { #expect(try await s.push(a, text, from: "oSlotOrder") == 200) }
            // One send a second: when the first reply is out and recorded (not between a send
            // and its finished mark, which would make that one send uncertain), the others wait
            // for their slots.
            _ = try await s.replies(a, to: users[0], count: 1)
            let stack = s
            try await eventually("the sends so far are recorded") {
                try await stack.metric("wechat_worker_account_replies_total{appid=\"\(a.appID)\"}") == Double(try await stack.sent(a).count)
            }
            let worker = s.children.removeLast()  // the last started: the worker
            worker.kill()
            let sentBefore = try await s.sent(a).count
            #expect(sentBefore < users.count + 3, "the kill came while sends were still waiting for their slots")

            let port = try freePort()
            s.workerPorts = [port]
            try s.start("wechat-worker", extra: ["METRICS_PORT": "\(port)"])
            for u in users { #expect(try await s.replies(a, to: u, count: 1, within: 90) == [help]) }
            #expect(
                try await s.replies(a, to: "oSlotOrder", count: 3, within: 90) == [help, "功能列表\n1 我的消息数\n2 退出菜单", "您已发送3条消息"])
            // The waiting messages held no claim: none is found "uncertain" (a claim held through
            // the wait would make every one of them so). Only a kill that fell between a send and
            // its mark — the next slot was a second away — could leave one, sent again (`resend`).
            let uncertain = try await s.metric(#"wechat_worker_messages_total{outcome="uncertain"}"#)
            #expect(uncertain <= 1)
            #expect(try await s.sent(a).count == users.count + 3 + Int(uncertain))
            // Each message counted once against the day's quota, whichever worker sent it.
            let restarted = s
            try await eventually("the quota counts each message once") {
                try await restarted.metric("wechat_worker_quota_used{appid=\"\(a.appID)\"}") == Double(users.count + 3)
            }
        }
    }

    /// Reloading: an account added to the file is served without a restart (ingress, tokend,
    /// workers); an account removed answers 404 from then on, and the messages already accepted
    /// for it are still answered (nothing in flight is lost).
    @Test func reloadingAddsAndRemovesAccountsWithoutLosingMessages() async throws {
        try await AccountsStack.run(accounts: [0, 1]) { s in
            let (a, b, c) = (AccountsStack.accounts[0], AccountsStack.accounts[1], AccountsStack.accounts[2])
            #expect(try await s.push(c, "帮助", from: "oNew") == 404)

            // Added (the file changes on disk; the processes notice within ~2 s).
            try s.writeAccounts([0, 1, 2])
            try await eventually("the ingress serves C") { try await s.push(c, "帮助", from: "oNew") == 200 }
            #expect(try await s.replies(c, to: "oNew", count: 1) == ["C 号的帮助"])

            // Removed, with messages of A accepted just before (and SIGHUP, the other way to reload):
            // A's API answers slowly, so that one user's four messages are still waiting in that
            // user's line (not started) when the workers drop A.
            var request = HTTPClientRequest(url: "\(s.simURL)/sim/faults?appid=\(a.appID)")
            request.method = .POST
            request.body = .bytes(ByteBuffer(string: #"{"latencyMs": 700}"#))
            #expect(try await s.client.execute(request, timeout: .seconds(5)).status == .ok)
            let users = (0..<20).map { "oInFlight\($0)" }
            for u in users { #expect(try await s.push(a, "帮助", from: u) == 200) }
            for text in ["帮助", "菜单", "1", "2"] { #expect(try await s.push(a, text, from: "oQueued") == 200) }
            try s.writeAccounts([1, 2])
            for child in s.children.dropFirst() { child.signal(SIGHUP) }  // not the simulator
            try await eventually("the ingress no longer serves A") { try await s.push(a, "帮助", from: "oLate") == 404 }
            for u in users { #expect(try await s.replies(a, to: u, count: 1) == [help]) }
            #expect(try await s.replies(a, to: "oQueued", count: 4) == [help, "功能列表\n1 我的消息数\n2 退出菜单", "您已发送3条消息", "已退出菜单"])
            #expect(try await s.push(b, "帮助", from: "oStill") == 200)
            #expect(try await s.replies(b, to: "oStill", count: 1) == [help])
            // A file that does not load changes nothing (B is still served).
            try "accounts: [ {appid: 'not valid!'} ]\n".write(toFile: s.file, atomically: true, encoding: .utf8)
            for child in s.children.dropFirst() { child.signal(SIGHUP) }  // not the simulator
            #expect(try await s.push(b, "帮助", from: "oStill2") == 200)
            #expect(try await s.replies(b, to: "oStill2", count: 1) == [help])
        }
    }

    /// Fairness: a flood on A, whose sends are limited to 5 a second (shared by two worker
    /// processes), does not hold up B and C: their replies all go out while most of A's flood
    /// is still waiting for its rate. (The latencies are printed; BENCHMARKS.md measures them.)
    @Test func aFloodOnOneAccountDoesNotHoldUpTheOthers() async throws {
        try await AccountsStack.run(extra: [0: ["send_rate: 5", "send_burst: 1"]], workers: 2) { s in
            let (a, b, c) = (AccountsStack.accounts[0], AccountsStack.accounts[1], AccountsStack.accounts[2])
            let flood = 150
            let stack = s
            try await withThrowingTaskGroup(of: Int.self) { group in
                for i in 0..<flood { group.addTask { try await stack.push(a, "帮助", from: "oFlood\(i)") } }
                for try await status in group { #expect(status == 200) }
            }
            // And one user of A with 20 messages in a row: a per-user line of 16 used to block its
            // shard's dispatch (every other user of that shard, of every account) while that
            // user's messages waited for A's slots one after another.
            for _ in 0..<20 { #expect(try await s.push(a, "帮助", from: "oHeavy") == 200) }
            var latencies: [Double] = []
            for i in 0..<10 {
                for account in [b, c] {
                    let start = ContinuousClock.now
                    #expect(try await s.push(account, "帮助", from: "oCalm\(i)") == 200)
                    _ = try await s.replies(account, to: "oCalm\(i)", count: 1)
                    let d = ContinuousClock.now - start
                    latencies.append(Double(d.components.seconds) + Double(d.components.attoseconds) / 1e18)
                }
            }
            let aSent = try await s.sent(a).count
            print("flood: B and C push→reply \(latencies.sorted().map { String(format: "%.3f", $0) }) s while A had sent \(aSent) of \(flood)")
            // At 5 a second, A's 150 take about 30 s; B's and C's 20 replies were all out long before.
            #expect(aSent < flood / 2)
            // The limiter held A's sends to its rate across both workers: the shared GCRA state
            // is ahead of Redis's clock by (almost) the backlog still waiting.
            #expect(try await s.metric("wechat_worker_rate_wait_seconds_count{appid=\"\(a.appID)\"}") >= Double(flood))
            for i in 0..<flood { _ = try await s.replies(a, to: "oFlood\(i)", count: 1, within: 60) }
            #expect(try await s.replies(a, to: "oHeavy", count: 20, within: 60).count == 20)
        }
    }
}

@Suite("Accounts configuration")
struct AccountsConfigurationTests {
    func write(_ text: String) throws -> String {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("acc-\(UUID().uuidString).yaml").path
        try text.write(toFile: path, atomically: true, encoding: .utf8)
        return path
    }

    @Test func secretsAreInlineFromTheEnvironmentOrFromFiles() throws {
        let secretFile = try write("from-a-file\n")
        let path = try write(
            """
            accounts:
              - appid: wx1
                token: inline-token
                secret: env:MY_SECRET
                aes_key: file:\(secretFile)
                send_rate: 2.5
                daily_quota: 1000
                rules: rules/x.yaml
            """)
        let loaded = try AccountsConfiguration.load(RelayEnvironment(["WECHAT_ACCOUNTS_FILE": path, "MY_SECRET": "s"]))
        #expect(loaded.accounts.count == 1)
        let a = try #require(loaded.account("wx1"))
        #expect(a.token == "inline-token" && a.secret == "s" && a.aesKey == "from-a-file")
        #expect(a.sendRate == 2.5 && a.dailyQuota == 1000)
        #expect(a.rules == URL(fileURLWithPath: path).deletingLastPathComponent().appendingPathComponent("rules/x.yaml").path)
        #expect(loaded.single?.appID == "wx1")
        // Values are the text written: YAML's number and boolean forms are not converted.
        let typed = try write("accounts:\n  - appid: wx2\n    token: 0123456\n    secret: yes\n    aes_key: ~\n    previous_token:\n")
        let b = try #require(try AccountsConfiguration.load(RelayEnvironment(["WECHAT_ACCOUNTS_FILE": typed])).account("wx2"))
        #expect(b.token == "0123456" && b.secret == "yes" && b.aesKey == nil && b.previousToken == nil)
        // With WECHAT_APPID too: two accounts, the variables' first.
        let both = try AccountsConfiguration.load(RelayEnvironment(["WECHAT_ACCOUNTS_FILE": path, "MY_SECRET": "s", "WECHAT_APPID": "wx0"]))
        #expect(both.accounts.map(\.appID) == ["wx0", "wx1"] && both.single == nil)
    }

    @Test func mistakesAreRefusedNamingTheFileAndTheEntry() throws {
        func error(_ yaml: String, _ env: [String: String] = [:]) throws -> String {
            let path = try write(yaml)
            do {
                _ = try AccountsConfiguration.load(RelayEnvironment(env.merging(["WECHAT_ACCOUNTS_FILE": path]) { $1 }))
                return "no error"
            } catch let e as ConfigurationError {
                return e.description
            }
        }
        #expect(try error("accounts:\n  - appid: wx1\n    tokn: x\n").contains("unknown key 'tokn'"))
        #expect(try error("accounts:\n  - appid: wx1\n  - appid: wx1\n").contains("configured twice"))
        #expect(try error("accounts:\n  - appid: 'wx 1'\n").contains("appid"))
        #expect(try error("accounts:\n  - appid: wx1\n    token: env:NOPE\n").contains("NOPE"))
        #expect(try error("accounts:\n  - appid: wx1\n    secret: file:/no/such/file\n").contains("/no/such/file"))
        #expect(try error("accounts:\n  - appid: wx1\n    send_rate: fast\n").contains("send_rate"))
        #expect(try error("accounts: [").contains("YAML"))
        // A broken line with an inline secret: the error says where, never what.
        let leak = try error("accounts:\n  - appid: wx1\n    token: \"s3cretT0ken\n    secret: x\n")
        #expect(leak.contains("YAML") && !leak.contains("s3cretT0ken"), "\(leak)")
        #expect(try error("accounts:\n  - appid: wx1\n    send_rate: 0.0000001\n").contains("send_rate"))
        #expect(try error("accounts:\n  - appid: wx1\n    token: [a, b]\n").contains("token"))
        #expect(throws: ConfigurationError.self) { try AccountsConfiguration.load(RelayEnvironment(["WECHAT_ACCOUNTS_FILE": "/no/such.yaml"])) }
        // Neither variable: the error names WECHAT_APPID, as before accounts files existed.
        #expect { try AccountsConfiguration.load(RelayEnvironment([:])) } throws: { ($0 as? ConfigurationError)?.variable == "WECHAT_APPID" }
        // Per-account settings are checked by the worker at start.
        let bad = try write("accounts:\n  - appid: wx1\n    reply_mode: loud\n")
        #expect { try WorkerConfiguration(RelayEnvironment(["WECHAT_ACCOUNTS_FILE": bad])) } throws: {
            ($0 as? ConfigurationError)?.variable.contains("reply_mode") == true
        }
    }
}

@Suite("Send-rate limiter", .enabled(if: TestServices.redisEnabled))
struct SendRateLimiterTests {
    /// The daily quota is counted right after the finished mark, by the call that marked: once per
    /// message, however often the mark is written again (a Redis error after it succeeded, a redelivery).
    @Test func theQuotaCountsEachSendOnceWithItsFinishedMark() async throws {
        let redis = RedisPool(configuration: try RedisConfiguration(url: try TestServices.redisURL()), size: 2, logger: .init(label: "quota"))
        defer { redis.close() }
        let store = SessionStore(redis: redis, appID: "wxquota", prefix: TestServices.unique("quota"))
        let first = try InboundMessage(xml: PushBuilder.xml(kind: "text", value: "帮助", eventKey: nil, from: "oQ", to: "gh", msgID: 1))
        let second = try InboundMessage(xml: PushBuilder.xml(kind: "text", value: "帮助", eventKey: nil, from: "oQ", to: "gh", msgID: 2))
        let third = try InboundMessage(xml: PushBuilder.xml(kind: "text", value: "帮助", eventKey: nil, from: "oQ", to: "gh", msgID: 3))
        #expect(try await store.markReplied(first, sent: true) == 1)
        #expect(try await store.markReplied(first, sent: true) == 0)  // marked again: not counted again
        #expect(try await store.markReplied(second, sent: false) == 0)  // no send (no reply, a passive one)
        #expect(try await store.markReplied(third, sent: true) == 2)
        #expect(try await redis.send(["GET", .init(store.keys.quota(day: QuotaDay.today()))]).int == 2)
    }

    /// GCRA: the reservations advance the shared schedule by one interval each; a burst is
    /// free, the rest wait in order. Checked on the state in Redis, not on a clock.
    @Test func reservationsAdvanceTheScheduleByOneIntervalEach() async throws {
        let redis = RedisPool(configuration: try RedisConfiguration(url: try TestServices.redisURL()), size: 2, logger: .init(label: "rl"))
        defer { redis.close() }
        do {
            let key = TestServices.unique("rate")
            // 100 s apart, two at once: however slow this machine is, the reservations below
            // are made well within one interval, so the waits are the schedule, not the clock.
            let limiter = SendRateLimiter(redis: redis, key: key, rate: 0.01, burst: 2)
            let time = try await redis.send(["TIME"])
            let before = try #require(time.array.flatMap { a -> Int64? in
                guard a.count == 2, let s = a[0].int, let us = a[1].int else { return nil }
                return s * 1_000_000 + us
            })
            var waits: [Duration] = []
            for _ in 0..<6 { waits.append(try await limiter.reserve()) }
            #expect(waits[0] == .zero && waits[1] == .zero)  // the burst
            #expect(waits[2] > .zero)
            #expect(zip(waits.dropFirst(2), waits.dropFirst(3)).allSatisfy { $0 < $1 })  // in order, later ones longer
            let tat = try #require(try await redis.send(["GET", .init(key)]).int)
            #expect(tat >= before + 6 * 100_000_000)
            #expect(waits[2] > .seconds(90) && waits[5] > .seconds(390))
        }
    }
}
