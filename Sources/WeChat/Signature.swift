import Crypto

/// WeChat's request signatures (protocol page §2) and the JS-SDK page signature (§6).
public enum WeChatSignature {
    /// `hex(sha1(join(sorted(parts))))`, the parts sorted as byte strings.
    public static func compute(_ parts: [String]) -> String {
        let sorted = parts.map { Array($0.utf8) }.sorted { $0.lexicographicallyPrecedes($1) }
        var hasher = Insecure.SHA1()
        for p in sorted { hasher.update(data: p) }
        return hex(hasher.finalize())
    }

    /// The `signature` query parameter: over Token, timestamp and nonce.
    public static func signature(token: String, timestamp: String, nonce: String) -> String {
        compute([token, timestamp, nonce])
    }

    /// The `msg_signature` of safe and compatible modes: over Token, timestamp, nonce and the `Encrypt` text.
    public static func messageSignature(token: String, timestamp: String, nonce: String, encrypted: String) -> String {
        compute([token, timestamp, nonce, encrypted])
    }

    /// Whether `provided` matches the signature of `parts`, compared in constant time.
    public static func verify(_ provided: String, parts: [String]) -> Bool {
        constantTimeEquals(Array(provided.utf8), Array(compute(parts).utf8))
    }

    /// Checks a request's `signature`; throws ``WeChatError/Code/validateSignature`` otherwise.
    public static func verifySignature(_ provided: String, token: String, timestamp: String, nonce: String) throws {
        guard verify(provided, parts: [token, timestamp, nonce]) else {
            throw WeChatError(.validateSignature, "signature does not match")
        }
    }

    /// Checks a request's `msg_signature`; throws ``WeChatError/Code/validateSignature`` otherwise.
    public static func verifyMessageSignature(
        _ provided: String, token: String, timestamp: String, nonce: String, encrypted: String
    ) throws {
        guard verify(provided, parts: [token, timestamp, nonce, encrypted]) else {
            throw WeChatError(.validateSignature, "msg_signature does not match")
        }
    }

    /// Checks that a request's timestamp is within `window` seconds of `now`; a window of 0 disables the check.
    /// - Throws: ``WeChatError/Code/timestampOutOfWindow`` (also for a timestamp that is not a number).
    public static func checkTimestamp(_ timestamp: String, now: Int64, window: Int64) throws {
        guard window > 0 else { return }
        guard let t = Int64(timestamp) else {
            throw WeChatError(.timestampOutOfWindow, "timestamp is not a number")
        }
        // Overflow-free: `t` is untrusted and may be any Int64 (Int64.min traps in `abs(now - t)`).
        let (difference, overflow) = now.subtractingReportingOverflow(t)
        guard !overflow, difference.magnitude <= window.magnitude else {
            throw WeChatError(
                .timestampOutOfWindow,
                overflow ? "timestamp is out of range" : "timestamp is \(difference) s away from now (window ±\(window) s)")
        }
    }

    /// The checks of a pushed request's query, in the order that is safe for untrusted input:
    /// the signature against each accepted Token first (cheap, constant time), then the
    /// timestamp window (overflow-free). Any value of any parameter ends in a thrown
    /// ``WeChatError``, never a trap.
    /// - Throws: ``WeChatError/Code/validateSignature`` for a missing or wrong signature,
    ///   ``WeChatError/Code/timestampOutOfWindow`` for a timestamp outside the window.
    public static func verifyPush(
        signature: String?, timestamp: String?, nonce: String?, tokens: [String], now: Int64, window: Int64
    ) throws {
        guard let signature, let timestamp, let nonce else {
            throw WeChatError(.validateSignature, "missing signature, timestamp or nonce")
        }
        guard tokens.contains(where: { verify(signature, parts: [$0, timestamp, nonce]) }) else {
            throw WeChatError(.validateSignature, "signature does not match the Token (or the previous Token)")
        }
        try checkTimestamp(timestamp, now: now, window: window)
    }

    /// The JS-SDK page signature for `wx.config`: `sha1("jsapi_ticket=…&noncestr=…&timestamp=…&url=…")`,
    /// with the URL's `#fragment` removed.
    public static func jsapiSignature(ticket: String, nonceStr: String, timestamp: Int64, url: String) -> String {
        let page = url.split(separator: "#", maxSplits: 1, omittingEmptySubsequences: false).first.map(String.init) ?? url
        let text = "jsapi_ticket=\(ticket)&noncestr=\(nonceStr)&timestamp=\(timestamp)&url=\(page)"
        return hex(Insecure.SHA1.hash(data: Array(text.utf8)))
    }

    /// Compares two byte strings without an early exit on the first difference.
    public static func constantTimeEquals(_ a: [UInt8], _ b: [UInt8]) -> Bool {
        guard a.count == b.count else { return false }
        var diff: UInt8 = 0
        for i in 0..<a.count { diff |= a[i] ^ b[i] }
        return diff == 0
    }

    static func hex<D: Sequence>(_ digest: D) -> String where D.Element == UInt8 {
        let digits = Array("0123456789abcdef".utf8)
        var out = [UInt8]()
        out.reserveCapacity(40)
        for b in digest {
            out.append(digits[Int(b >> 4)])
            out.append(digits[Int(b & 0x0f)])
        }
        return String(decoding: out, as: UTF8.self)
    }
}
