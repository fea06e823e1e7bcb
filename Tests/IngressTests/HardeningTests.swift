import AMQP
import Foundation
import Hummingbird
import HummingbirdTesting
import Ingress
import NIOCore
import RelayCore
import ServiceLifecycle
import TestSupport
import Testing
import WeChat

#if canImport(Glibc)
import Glibc
import RelayContract
#endif

/// Regression tests of the hardening issue (#13), request surface: each failed on the code before its fix.
@Suite("wechat-ingress hardening", .enabled(if: TestServices.amqpEnabled), .timeLimit(.minutes(6)))
struct IngressHardeningTests {
    /// #1: `timestamp=-9223372036854775808` trapped on `abs(now - t)` before the signature was checked.
    @Test func anyTimestampGives403NeverACrash() async throws {
        let f = try await IngressFixture.make()
        let xml = sampleMessages(openID: "oTs")[0].xml
        try await f.app.test(.router) { client in
            for ts in ["-9223372036854775808", "9223372036854775807", "-9223372036854775807", "99999999999999999999", "-1", "1e9", "%00", ""] {
                // Unsigned: refused by the signature check (which now runs first).
                let unsigned = "signature=x&nonce=y&timestamp=\(ts)"
                let get = try await client.execute(uri: "/wechat?\(unsigned)&echostr=e", method: .get)
                #expect(get.status == .forbidden, "\(ts)")
                let post = try await client.execute(uri: "/wechat?\(unsigned)", method: .post, body: ByteBuffer(string: xml))
                #expect(post.status == .forbidden, "\(ts)")
                // Correctly signed over the absurd timestamp: refused by the window, overflow-free.
                let signature = WeChatSignature.signature(token: token, timestamp: ts.removingPercentEncoding ?? ts, nonce: "y")
                let signed = try await client.execute(uri: "/wechat?signature=\(signature)&nonce=y&timestamp=\(ts)&echostr=e", method: .get)
                #expect(signed.status == .forbidden, "\(ts)")
            }
            // Still serving.
            let alive = try await client.execute(uri: "/wechat?\(query())&echostr=ok", method: .get)
            #expect(alive.text == "ok")
        }
        #expect(try await f.queued() == 0)
        await f.tearDown()
    }

    /// #2: a VIEW event's 1,024-byte menu URL went into AMQP's `message_id` (≤ 255 bytes);
    /// librabbitmq refused the frame and the whole connection was dropped (503 for everyone).
    @Test func aLongMenuURLIsAcceptedAndTheConnectionStays() async throws {
        let f = try await IngressFixture.make()
        let url = "https://example.com/menu?" + String(repeating: "q", count: 1024 - 25)
        var x = XMLBuilder()
        x.header(to: "gh_account", from: "oView", createTime: now, msgType: "event")
        x.cdata("Event", "VIEW")
        x.cdata("EventKey", url)
        let view = x.finish()
        let text = sampleMessages(openID: "oView")[0].xml
        try await f.app.test(.router) { client in
            let r = try await client.execute(uri: "/wechat?\(query(openID: "oView"))", method: .post, body: ByteBuffer(string: view))
            #expect(r.status == .ok && r.text == "success")
            #expect(f.amqp.isConnected)
            let after = try await client.execute(uri: "/wechat?\(query(openID: "oView"))", method: .post, body: ByteBuffer(string: text))
            #expect(after.status == .ok)
        }
        let d = try #require(try await f.take(openID: "oView"))
        let expected = try InboundMessage(xml: view)
        #expect(d.message.properties.messageID == expected.dedupID)
        #expect(d.message.properties.messageID?.utf8.count == 64)
        #expect(d.message.properties.headers[WeChatTopology.Header.dedupKey]?.stringValue == expected.dedupKey)
        try d.ack()
        #expect(try await f.queued() == 1)
        await f.tearDown()
    }

    /// #3: with `WECHAT_ENCRYPTION=safe` a plaintext push under a valid URL signature is refused
    /// (the URL signature does not cover the body); an encrypted one is accepted.
    @Test func safeModeRefusesPlaintextPushes() async throws {
        let f = try await IngressFixture.make(extra: ["WECHAT_ENCRYPTION": "safe"])
        let xml = sampleMessages(openID: "oSafe")[0].xml
        let cipher = try f.crypto.encrypt(xml)
        try await f.app.test(.router) { client in
            let plain = try await client.execute(uri: "/wechat?\(query(openID: "oSafe"))", method: .post, body: ByteBuffer(string: xml))
            #expect(plain.status == .forbidden)
            // Compatible-style body (plaintext fields beside Encrypt) without encrypt_type=aes: refused too.
            let both = xml.replacingOccurrences(of: "</xml>", with: "<Encrypt><![CDATA[\(cipher)]]></Encrypt></xml>")
            #expect(try await client.execute(uri: "/wechat?\(query(openID: "oSafe"))", method: .post, body: ByteBuffer(string: both)).status == .forbidden)
            let envelope = "<xml><ToUserName><![CDATA[gh_account]]></ToUserName><Encrypt><![CDATA[\(cipher)]]></Encrypt></xml>"
            let ok = try await client.execute(uri: "/wechat?\(query(openID: "oSafe", encrypted: cipher))", method: .post, body: ByteBuffer(string: envelope))
            #expect(ok.status == .ok)
            // Safe mode accepts only pushes whose msg_signature covers the body read: no replay
            // check is needed, so no signed query goes to the workers (one Redis round trip less).
            let d = try #require(try await f.take(openID: "oSafe"))
            #expect(d.message.properties.headers[WeChatTopology.Header.signedQuery] == nil)
            try d.ack()
        }
        #expect(try await f.queued() == 0)
        await f.tearDown()
    }

    @Test func encryptionModeConfiguration() throws {
        let base = ["WECHAT_APPID": appID, "WECHAT_TOKEN": token]
        #expect(try IngressConfiguration(RelayEnvironment(base)).encryption == .plaintext)
        #expect(try IngressConfiguration(RelayEnvironment(base.merging(["WECHAT_AES_KEY": aesKey]) { $1 })).encryption == .compatible)
        #expect(
            try IngressConfiguration(RelayEnvironment(base.merging(["WECHAT_AES_KEY": aesKey, "WECHAT_ENCRYPTION": "safe"]) { $1 })).encryption
                == .safe)
        for bad in [["WECHAT_ENCRYPTION": "safe"], ["WECHAT_ENCRYPTION": "compatible"], ["WECHAT_ENCRYPTION": "aes"]] {
            #expect { try IngressConfiguration(RelayEnvironment(base.merging(bad) { $1 })) } throws: {
                ($0 as? ConfigurationError)?.variable == "WECHAT_ENCRYPTION"
            }
        }
    }

    /// #4: no idle or read timeout — a client that connected and sent half a request head held
    /// the connection forever. Checked on the real `wechat-ingress` process.
    @Test(.enabled(if: TestServices.environment["WR_BIN_DIR"] != nil || TestServices.isCI))
    func aSilentClientIsDisconnected() async throws {
        let bin = try #require(TestServices.environment["WR_BIN_DIR"], "WR_BIN_DIR is set by ops/test")
        let port = try freePort()
        let log = FileManager.default.temporaryDirectory.appendingPathComponent("idle-ingress-\(UUID().uuidString).log").path
        let child = try ChildProcess(
            "\(bin)/wechat-ingress",
            environment: [
                "WECHAT_APPID": appID, "WECHAT_TOKEN": token, "AMQP_URL": try TestServices.amqpURL(), "HTTP_HOST": "127.0.0.1",
                "HTTP_PORT": String(port), "HTTP_IDLE_TIMEOUT": "1", "WECHAT_QUEUE_PREFIX": TestServices.unique("idle"),
                "LOG_LEVEL": "warning",
            ], logPath: log)
        try await eventually("the ingress listens") { canConnect(port: port) }
        // Half a request head, then silence; and a connection that sends nothing at all.
        let script = """
            import socket, sys
            for first in (b"POST /wechat HTTP/1.1\\r\\nHost: x\\r\\n", b""):
                s = socket.create_connection(("127.0.0.1", \(port))); s.settimeout(10)
                if first: s.sendall(first)
                try:
                    print("closed" if s.recv(100) == b"" else "answered")
                except ConnectionResetError:
                    print("closed")
                except socket.timeout:
                    print("open")
            """
        let out = try await runCommand("/usr/bin/env", ["python3", "-c", script])
        #expect(out.split(separator: "\n").map(String.init) == ["closed", "closed"], "\(out)")
        child.signal(SIGTERM)
        let status = await child.waitForExit(within: 20)
        #expect(status == 0, "exit status \(status.map(String.init) ?? "none"): \((try? String(contentsOfFile: log, encoding: .utf8)) ?? "")")
    }
}

/// #6: the fuzz corpus (Fuzz/corpus, seeds and what earlier fuzz runs kept) replays through every
/// fuzz target of the normal build without a crash; `ops/fuzz` runs libFuzzer itself.
@Suite("Fuzz corpus replay", .enabled(if: TestServices.environment["WR_BIN_DIR"] != nil || TestServices.isCI))
struct FuzzReplayTests {
    @Test(arguments: ["query", "xml", "decrypt", "inbound"])
    func corpusReplays(target: String) async throws {
        let bin = try #require(TestServices.environment["WR_BIN_DIR"], "WR_BIN_DIR is set by ops/test")
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        let corpus = root.appendingPathComponent("Fuzz/corpus/\(target)").path
        let out = try await runCommand("/usr/bin/env", ["FUZZ_TARGET=\(target)", "\(bin)/relay-fuzz", corpus])
        #expect(out.hasPrefix("\(target): replayed "), "\(out)")
        #expect(!out.hasPrefix("\(target): replayed 0 "))
    }
}


@Suite("Log safety")
struct LogSafetyTests {
    /// #4: rejected requests logged the attacker's `openid` verbatim (newlines, any length) on every request.
    @Test func userValuesAreEscapedAndShortened() {
        #expect(LogSafe.escape("o\nforged=1") == "o\\u{a}forged=1")
        #expect(LogSafe.escape("a\u{1b}[31mb\u{202e}") == "a\\u{1b}[31mb\\u{202e}")
        #expect(LogSafe.escape("用户") == "用户")
        let long = LogSafe.escape(String(repeating: "x", count: 10_000), maxLength: 16)
        #expect(long == String(repeating: "x", count: 16) + "…(9984 more)")
    }

    @Test func rejectionLogsAreRateLimitedAndCountWhatTheyDropped() {
        let start = ContinuousClock.now
        let limiter = LogRateLimiter(burst: 3, perSecond: 1)
        #expect((0..<3).map { _ in limiter.admit(now: start) } == [0, 0, 0])
        #expect((0..<100).allSatisfy { _ in limiter.admit(now: start) == nil })
        #expect(limiter.admit(now: start + .seconds(1)) == 100)
        #expect(limiter.admit(now: start + .seconds(1)) == nil)
    }
}
