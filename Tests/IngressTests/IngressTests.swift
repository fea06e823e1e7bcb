import AMQP
import Foundation
import Hummingbird
import HummingbirdTesting
import Ingress
import NIOCore
import RelayCore
import TestSupport
import Testing
import WeChat
import RelayContract

@Suite("wechat-ingress", .enabled(if: TestServices.amqpEnabled), .timeLimit(.minutes(6)))
struct IngressTests {
    @Test func urlVerification() async throws {
        let f = try await IngressFixture.make()
        try await f.app.test(.router) { client in
            let ok = try await client.execute(uri: "/wechat?\(query())&echostr=a%2Bb%20c", method: .get)
            #expect(ok.status == .ok)
            #expect(ok.text == "a+b c")
            #expect(ok.headers[.contentType]?.hasPrefix("text/plain") == true)
            let bad = try await client.execute(uri: "/wechat?\(query(signature: String(repeating: "0", count: 40)))&echostr=x", method: .get)
            #expect(bad.status == .forbidden)
            let missing = try await client.execute(uri: "/wechat?echostr=x", method: .get)
            #expect(missing.status == .forbidden)
            #expect(try await client.execute(uri: "/healthz", method: .get).status == .ok)
            #expect(try await client.execute(uri: "/readyz", method: .get).status == .ok)
        }
        await f.tearDown()
    }

    @Test func everyMessageTypeInEveryModeReachesTheQueueIntact() async throws {
        let f = try await IngressFixture.make()
        try await f.app.test(.router) { client in
            for mode in ["plaintext", "compatible", "safe"] {
                for (name, xml) in sampleMessages(openID: "oUser-\(mode)") {
                    let body: String
                    var q = query(openID: "oUser-\(mode)")
                    if mode == "plaintext" {
                        body = xml
                    } else {
                        let encrypted = try f.crypto.encrypt(xml)
                        q = query(openID: "oUser-\(mode)", encrypted: encrypted)
                        var x = XMLBuilder()
                        x.cdata("ToUserName", "gh_account")
                        x.cdata("Encrypt", encrypted)
                        // Compatible mode sends the plaintext fields beside the ciphertext.
                        body = mode == "safe" ? x.finish() : xml.replacingOccurrences(of: "</xml>", with: "<Encrypt><![CDATA[\(encrypted)]]></Encrypt></xml>")
                    }
                    let r = try await client.execute(uri: "/wechat?\(q)", method: .post, body: ByteBuffer(string: body))
                    #expect(r.status == .ok, "\(mode) \(name)")
                    #expect(r.text == "success")
                    let d = try #require(try await f.take(openID: "oUser-\(mode)"), "\(mode) \(name) not queued")
                    let expected = try InboundMessage(xml: xml)
                    #expect(d.message.bodyString == xml, "\(mode) \(name): body is the plaintext XML")
                    let p = d.message.properties
                    #expect(p.persistent)
                    #expect(p.messageID == expected.dedupID)
                    #expect(p.headers[WeChatTopology.Header.dedupKey]?.stringValue == expected.dedupKey)
                    // In every mode: this (compatible) account also accepts plaintext pushes, and an
                    // encrypted push's URL replayed as plaintext must find its query taken.
                    #expect(p.headers[WeChatTopology.Header.signedQuery]?.stringValue?.hasPrefix("\(now):nonce1:") == true)
                    #expect(p.appID == appID)
                    #expect(p.contentType == "application/xml")
                    #expect(p.timestamp != nil)
                    #expect(p.headers[WeChatTopology.Header.msgType]?.stringValue == expected.msgType)
                    #expect(p.headers[WeChatTopology.Header.event]?.stringValue == expected.event)
                    #expect(p.headers[WeChatTopology.Header.openID]?.stringValue == "oUser-\(mode)")
                    #expect(p.headers[WeChatTopology.Header.mode]?.stringValue == mode)
                    #expect(p.headers[WeChatTopology.Header.receivedAtMs]?.intValue != nil)
                    #expect(d.routingKey == f.topology.routingKey(appID: appID, openID: "oUser-\(mode)"))
                    try d.ack()
                }
            }
        }
        #expect(try await f.queued() == 0)
        await f.tearDown()
    }

    @Test func everyErrorStatusPublishesNothing() async throws {
        let f = try await IngressFixture.make(extra: ["INGRESS_MAX_BODY": "2048", "WECHAT_ACCOUNT_ID": "gh_account"])
        let good = sampleMessages(openID: "oErr")[0].xml
        let otherApp = WeChatMessageCrypto(appID: "wx0000000000000000", key: try EncodingAESKey(aesKey))
        let wrongAppCipher = try otherApp.encrypt(good)
        let cipher = try f.crypto.encrypt(good)
        @Sendable func envelope(_ c: String) -> String { "<xml><ToUserName><![CDATA[gh_account]]></ToUserName><Encrypt><![CDATA[\(c)]]></Encrypt></xml>" }
        let undecryptable = String(cipher.dropLast(8)) + "AAAAAAA="
        let cases: [(String, String, String, HTTPResponse.Status)] = [
            ("bad signature", query(signature: String(repeating: "a", count: 40)), good, .forbidden),
            ("signature of another token", query(token: "other"), good, .forbidden),
            ("missing signature", "timestamp=\(now)&nonce=n", good, .forbidden),
            ("stale timestamp", query(timestamp: now - 301), good, .forbidden),
            ("future timestamp", query(timestamp: now + 301), good, .forbidden),
            ("wrong msg_signature", query(encrypted: cipher, msgSignature: String(repeating: "b", count: 40)), envelope(cipher), .forbidden),
            ("missing msg_signature", query() + "&encrypt_type=aes", envelope(cipher), .forbidden),
            ("empty body", query(), "", .badRequest),
            ("malformed XML", query(), "<xml><ToUserName>gh</xml>", .badRequest),
            ("not XML", query(), "hello", .badRequest),
            ("DTD", query(), "<!DOCTYPE xml [<!ENTITY x \"y\">]>" + good, .badRequest),
            ("external entity", query(), good.replacingOccurrences(of: "<xml>", with: "<!DOCTYPE xml SYSTEM \"file:///etc/passwd\"><xml>"), .badRequest),
            ("undefined entity", query(), good.replacingOccurrences(of: "<MsgType>", with: "<X>&xxe;</X><MsgType>"), .badRequest),
            ("missing FromUserName", query(), "<xml><ToUserName>gh_account</ToUserName><CreateTime>1</CreateTime><MsgType>text</MsgType></xml>", .badRequest),
            ("missing MsgType", query(), "<xml><ToUserName>gh_account</ToUserName><FromUserName>o</FromUserName><CreateTime>1</CreateTime></xml>", .badRequest),
            ("oversized body", query(), good.replacingOccurrences(of: "</xml>", with: "<Pad>\(String(repeating: "x", count: 3000))</Pad></xml>"), .contentTooLarge),
            ("wrong appid", query(encrypted: wrongAppCipher), envelope(wrongAppCipher), .badRequest),
            ("undecryptable ciphertext", query(encrypted: undecryptable), envelope(undecryptable), .badRequest),
            ("not Base64", query(encrypted: "%%%"), envelope("%%%"), .badRequest),
            ("aes without Encrypt", query(encrypted: ""), good, .badRequest),
            ("ToUserName is not WECHAT_ACCOUNT_ID", query(), good.replacingOccurrences(of: "gh_account", with: "gh_other"), .badRequest),
        ]
        try await f.app.test(.router) { client in
            for (name, q, body, status) in cases {
                let r = try await client.execute(uri: "/wechat?\(q)", method: .post, body: ByteBuffer(string: body))
                #expect(r.status == status, "\(name)")
            }
            // The happy path still works after all that, in both modes.
            #expect(try await client.execute(uri: "/wechat?\(query(openID: "oErr"))", method: .post, body: ByteBuffer(string: good)).status == .ok)
            #expect(try await client.execute(uri: "/wechat?\(query(encrypted: cipher))", method: .post, body: ByteBuffer(string: envelope(cipher))).status == .ok)
            let metrics = try await client.execute(uri: "/metrics", method: .get).text
            #expect(metrics.contains(#"wechat_ingress_requests_total{outcome="forbidden"} 7"#))
            #expect(metrics.contains(#"wechat_ingress_requests_total{outcome="too_large"} 1"#))
            #expect(metrics.contains(#"wechat_ingress_requests_total{outcome="accepted"} 2"#))
        }
        // Only the two good requests were published.
        #expect(try await f.queued() == 2)
        await f.tearDown()
    }

    @Test func keyAndTokenRotationAcceptTheOldValues() async throws {
        let newKey = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopq"
        let f = try await IngressFixture.make(extra: [
            "WECHAT_TOKEN": "newtoken", "WECHAT_PREVIOUS_TOKEN": token,
            "WECHAT_AES_KEY": newKey, "WECHAT_PREVIOUS_AES_KEY": aesKey,
        ])
        let xml = sampleMessages(openID: "oRot")[0].xml
        let oldCipher = try f.crypto.encrypt(xml)  // old key
        let newCipher = try WeChatMessageCrypto(appID: appID, key: try EncodingAESKey(newKey)).encrypt(xml)
        @Sendable func envelope(_ c: String) -> ByteBuffer { ByteBuffer(string: "<xml><Encrypt><![CDATA[\(c)]]></Encrypt></xml>") }
        try await f.app.test(.router) { client in
            for (tok, c) in [(token, oldCipher), ("newtoken", newCipher), (token, newCipher), ("newtoken", oldCipher)] {
                let r = try await client.execute(uri: "/wechat?\(query(openID: "oRot", token: tok, encrypted: c))", method: .post, body: envelope(c))
                #expect(r.status == .ok)
            }
            #expect(try await client.execute(uri: "/wechat?\(query(token: "third"))", method: .post, body: ByteBuffer(string: xml)).status == .forbidden)
        }
        #expect(try await f.queued() == 4)
        await f.tearDown()
    }

    @Test func retriesOfOneMessageAreAllAnsweredSuccess() async throws {
        let f = try await IngressFixture.make()
        let xml = sampleMessages(openID: "oRetry")[0].xml
        try await f.app.test(.router) { client in
            for _ in 0..<3 {
                let r = try await client.execute(uri: "/wechat?\(query(openID: "oRetry"))", method: .post, body: ByteBuffer(string: xml))
                #expect(r.status == .ok && r.text == "success")
            }
        }
        // All three are queued with the same message id; the workers drop the duplicates.
        var ids: [String?] = []
        for _ in 0..<(try await f.queued()) {
            let d = try #require(try await f.take(openID: "oRetry"))
            ids.append(d.message.properties.messageID)
            try d.ack()
        }
        #expect(ids == Array(repeating: try InboundMessage(xml: xml).dedupID, count: 3))
        await f.tearDown()
    }

    @Test func plaintextOnlyWithoutAnAESKey() async throws {
        var env = ["WECHAT_APPID": appID, "WECHAT_TOKEN": token]
        env["AMQP_URL"] = try TestServices.amqpURL()
        #expect(try IngressConfiguration(RelayEnvironment(env)).accounts[0].crypto == nil)
        // Configuration errors name the variable.
        #expect { try IngressConfiguration(RelayEnvironment(["WECHAT_TOKEN": "t"])) } throws: {
            ($0 as? ConfigurationError)?.variable == "WECHAT_APPID"
        }
        #expect { try IngressConfiguration(RelayEnvironment(env.merging(["INGRESS_MAX_BODY": "lots"]) { $1 })) } throws: {
            ($0 as? ConfigurationError)?.variable == "INGRESS_MAX_BODY"
        }
        #expect { try IngressConfiguration(RelayEnvironment(env.merging(["AMQP_URL": "http://x"]) { $1 })) } throws: {
            ($0 as? ConfigurationError)?.variable == "AMQP_URL"
        }
        #expect { try IngressConfiguration(RelayEnvironment(env.merging(["WECHAT_PREVIOUS_AES_KEY": aesKey]) { $1 })) } throws: {
            ($0 as? ConfigurationError)?.variable == "WECHAT_PREVIOUS_AES_KEY"
        }
    }

    /// passive-only replies only to a push that waits: without a wait every reply would be
    /// dropped, so it is refused — in an accounts-file entry, and (read from WORKER_REPLY_MODE,
    /// as the workers do, when the ingress shares their variables) for the variables' account;
    /// the variables' account with WORKER_REPLY_MODE=customer-service is not held for a reply.
    @Test func passiveOnlyWithoutAWaitIsRefused() async throws {
        let env = ["WECHAT_APPID": appID, "WECHAT_TOKEN": token, "AMQP_URL": try TestServices.amqpURL()]
        let file = FileManager.default.temporaryDirectory.appendingPathComponent("passive-only-\(UUID().uuidString).yaml").path
        defer { try? FileManager.default.removeItem(atPath: file) }
        try "accounts:\n  - appid: wxpassiveonly01\n    token: t\n    reply_mode: passive-only\n".write(toFile: file, atomically: true, encoding: .utf8)
        #expect { try IngressConfiguration(RelayEnvironment(env.merging(["WECHAT_ACCOUNTS_FILE": file]) { $1 })) } throws: {
            (($0 as? ConfigurationError)?.variable ?? "").contains("reply_wait")
        }
        #expect(try IngressConfiguration(RelayEnvironment(env.merging(["WECHAT_ACCOUNTS_FILE": file, "INGRESS_REPLY_WAIT": "5"]) { $1 })).accounts.count == 2)
        #expect { try IngressConfiguration(RelayEnvironment(env.merging(["WORKER_REPLY_MODE": "passive-only"]) { $1 })) } throws: {
            ($0 as? ConfigurationError)?.variable == "INGRESS_REPLY_WAIT"
        }
        let waiting = try IngressConfiguration(RelayEnvironment(env.merging(["WORKER_REPLY_MODE": "passive-only", "INGRESS_REPLY_WAIT": "5"]) { $1 }))
        #expect(waiting.accounts[0].replyWait == .seconds(5))
        let apiOnly = try IngressConfiguration(RelayEnvironment(env.merging(["WORKER_REPLY_MODE": "customer-service", "INGRESS_REPLY_WAIT": "5"]) { $1 }))
        #expect(apiOnly.accounts[0].replyWait == .zero)
    }
}
