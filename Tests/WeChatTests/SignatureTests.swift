import Testing
import WeChat

@Suite("Signatures")
struct SignatureTests {
    @Test func protocolPageVector() throws {
        #expect(
            WeChatSignature.signature(token: "test", timestamp: "1410685589", nonce: "test")
                == "f21891de399b4e33a1a93c9a7b8a8fffb5a443ff")
        try WeChatSignature.verifySignature(
            "f21891de399b4e33a1a93c9a7b8a8fffb5a443ff", token: "test", timestamp: "1410685589", nonce: "test")
    }

    @Test func wrongSignaturesFail() {
        for bad in ["", "f21891de399b4e33a1a93c9a7b8a8fffb5a443fe", "F21891DE399B4E33A1A93C9A7B8A8FFFB5A443FF", "x"] {
            #expect(throws: WeChatError(.validateSignature, "signature does not match")) {
                try WeChatSignature.verifySignature(bad, token: "test", timestamp: "1410685589", nonce: "test")
            }
        }
        // Another token gives another signature.
        #expect(!WeChatSignature.verify("f21891de399b4e33a1a93c9a7b8a8fffb5a443ff", parts: ["test2", "1410685589", "test"]))
    }

    @Test func messageSignatureVector() throws {
        let encrypt = SafeModeVector.encrypt
        #expect(
            WeChatSignature.messageSignature(
                token: "pamtest", timestamp: "1458300676", nonce: "260774613", encrypted: encrypt)
                == "4f3ad57b6989f09f4eb392acce4f9e93942ed890")
        #expect(throws: WeChatError.self) {
            try WeChatSignature.verifyMessageSignature(
                "4f3ad57b6989f09f4eb392acce4f9e93942ed890", token: "pamtest", timestamp: "1458300676",
                nonce: "260774613", encrypted: encrypt + "x")
        }
    }

    @Test func sortingIsByBytes() {
        // "B" (0x42) sorts before "a" (0x61) as bytes.
        #expect(WeChatSignature.compute(["a", "B"]) == WeChatSignature.compute(["B", "a"]))
        #expect(WeChatSignature.compute(["a", "B"]) == sha1Hex("Ba"))
    }

    @Test func timestampWindow() throws {
        try WeChatSignature.checkTimestamp("1000", now: 1300, window: 300)
        try WeChatSignature.checkTimestamp("1600", now: 1300, window: 300)
        #expect(throws: WeChatError.self) { try WeChatSignature.checkTimestamp("999", now: 1300, window: 300) }
        #expect(throws: WeChatError.self) { try WeChatSignature.checkTimestamp("1601", now: 1300, window: 300) }
        #expect(throws: WeChatError.self) { try WeChatSignature.checkTimestamp("abc", now: 1300, window: 300) }
        // A window of 0 disables the check.
        try WeChatSignature.checkTimestamp("1", now: 1_700_000_000, window: 0)
    }

    /// Hardening #1: `abs(now - t)` trapped on overflow for an untrusted timestamp.
    @Test(arguments: ["-9223372036854775808", "9223372036854775807", "-9223372036854775807", "99999999999999999999", "+1", " 1", ""])
    func absurdTimestampsAreOutOfTheWindowNeverACrash(timestamp: String) {
        #expect(throws: WeChatError.self) { try WeChatSignature.checkTimestamp(timestamp, now: 1_700_000_000, window: 300) }
        #expect(throws: WeChatError.self) { try WeChatSignature.checkTimestamp(timestamp, now: -1_700_000_000, window: 300) }
        // Even with the widest window, Int64.min against now = Int64.max is refused, not a trap.
        #expect(throws: WeChatError.self) { try WeChatSignature.checkTimestamp("-9223372036854775808", now: .max, window: .max) }
    }

    @Test func jsapiSignatureOfficialExample() {
        // The worked example of WeChat's JS-SDK documentation (appendix 1).
        let sig = WeChatSignature.jsapiSignature(
            ticket: "sM4AOVdWfPE4DxkXGEs8VMCPGGVi4C3VM0P37wVUCFvkVAy_90u5h9nbSlYy3-Sl-HhTdfl2fzFy1AOcHKP7qg",
            nonceStr: "Wm3WZYTPz0wzccnW", timestamp: 1_414_587_457, url: "http://mp.weixin.qq.com?params=value")
        #expect(sig == "0f9de62fce790f9a083d5c99e95740ceb90c27ed")
        // The fragment is not signed.
        #expect(
            WeChatSignature.jsapiSignature(
                ticket: "sM4AOVdWfPE4DxkXGEs8VMCPGGVi4C3VM0P37wVUCFvkVAy_90u5h9nbSlYy3-Sl-HhTdfl2fzFy1AOcHKP7qg",
                nonceStr: "Wm3WZYTPz0wzccnW", timestamp: 1_414_587_457,
                url: "http://mp.weixin.qq.com?params=value#section") == sig)
    }

    @Test func constantTimeEquals() {
        #expect(WeChatSignature.constantTimeEquals([1, 2, 3], [1, 2, 3]))
        #expect(!WeChatSignature.constantTimeEquals([1, 2, 3], [1, 2, 4]))
        #expect(!WeChatSignature.constantTimeEquals([1, 2], [1, 2, 3]))
    }
}

enum SafeModeVector {
    static let token = "pamtest"
    static let key = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG"
    static let appID = "wxb11529c136998cb6"
    static let timestamp = "1458300676"
    static let nonce = "260774613"
    static let msgSignature = "4f3ad57b6989f09f4eb392acce4f9e93942ed890"
    static let encrypt =
        "rTNFcsut4LfGuAFKEUVVpwcaCOTJzOd9twZdIW910jb3k+iicx2uvhttIZ3Qg9Qgty3BEF2xbOrz6boTfb30dMomcgrkTqdFPwnhqbk+kIQ7rZiwny9D7NUrTgA5kpX3KsZvrXzUZyP2x9YOlxbgm572lmxKvM7HAQQhIQ/p6HBmoY30bGXFK0BtIu1pW9TjhOYrLQoU18nWYjWqDA1ynkmOytpv7QRI1P1+0NoxL0q2zO1DgeSvnE8CZGo/o5Ap/WHK5W2RAsinpzN4/LjPnmB6U01I5XCoJoC0GK/yMZycd2Oh8Nq6+wBkC1U85oy0ktOY4nLvsQMLrourmMGdZHuTbqpeJ8Ao/5PRYJ+WBvRUwPfGKBL2+2IKZF49vAJqkcGWSHGE76ZN2erXeuNazf/o9o3lIE3q739o4c8t9QGPe31GT2Go/rOz1BsrASwvauNulCh+++yz+CQzBIuikA=="
}
