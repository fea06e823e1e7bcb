/// JSON of a small fixed shape written directly into bytes, for the few documents a worker
/// writes per message (the send body of a text reply, its decision record). Foundation's
/// `JSONEncoder` costs about 6 % of a worker's CPU per reply for them: a boxed container
/// per level, key sorting and a `Data` copy. The output is byte for byte what
/// ``WeChatJSON/encoder()`` writes (sorted keys, slashes not escaped; checked by a test on
/// random strings), so either may read what the other wrote.
struct JSONText {
    private(set) var bytes: [UInt8] = []

    private static func hex(_ nibble: UInt8) -> UInt8 { nibble < 10 ? 0x30 + nibble : UInt8(ascii: "a") + nibble - 10 }

    init(capacity: Int = 128) { bytes.reserveCapacity(capacity) }

    /// Appends `s` as is (punctuation and keys the caller knows need no escaping).
    mutating func raw(_ s: StaticString) {
        s.withUTF8Buffer { bytes.append(contentsOf: $0) }
    }

    mutating func raw(_ b: [UInt8]) { bytes.append(contentsOf: b) }

    /// Appends `s` as a JSON string: quotes, backslashes and control characters escaped as
    /// `JSONEncoder` escapes them; everything else, non-ASCII included, as UTF-8.
    mutating func string(_ s: String) {
        bytes.append(UInt8(ascii: "\""))
        for b in s.utf8 {
            switch b {
            case UInt8(ascii: "\""): bytes.append(contentsOf: [0x5C, 0x22])
            case UInt8(ascii: "\\"): bytes.append(contentsOf: [0x5C, 0x5C])
            case 0x08: bytes.append(contentsOf: [0x5C, UInt8(ascii: "b")])
            case 0x0C: bytes.append(contentsOf: [0x5C, UInt8(ascii: "f")])
            case 0x0A: bytes.append(contentsOf: [0x5C, UInt8(ascii: "n")])
            case 0x0D: bytes.append(contentsOf: [0x5C, UInt8(ascii: "r")])
            case 0x09: bytes.append(contentsOf: [0x5C, UInt8(ascii: "t")])
            case 0..<0x20:
                bytes.append(contentsOf: [0x5C, UInt8(ascii: "u"), 0x30, 0x30, Self.hex(b >> 4), Self.hex(b & 0xF)])
            default: bytes.append(b)
            }
        }
        bytes.append(UInt8(ascii: "\""))
    }
}

extension CustomerServiceMessage {
    /// The body of `POST /cgi-bin/message/custom/send`, as ``WeChatJSON/encode(_:)`` writes it.
    /// A text message without `kf_account` (what rules and handlers send nearly always) is
    /// written directly; every other kind goes through `JSONEncoder`.
    public func jsonBody() throws -> [UInt8] {
        guard case .text(let content) = content, kfAccount == nil else { return try WeChatJSON.encode(self) }
        var j = JSONText(capacity: 48 + content.utf8.count + toUser.utf8.count)
        j.raw(#"{"msgtype":"text","text":{"content":"#)
        j.string(content)
        j.raw(#"},"touser":"#)
        j.string(toUser)
        j.raw("}")
        return j.bytes
    }
}

extension WeChatJSON {
    /// `{"reply":…,"setState":…}` (either left out when nil) around a message's ``CustomerServiceMessage/jsonBody()``:
    /// the shape of a worker's stored decision, byte for byte what ``encoder()`` writes for it.
    public static func decisionRecord(reply: CustomerServiceMessage?, setState: String?) throws -> [UInt8] {
        var j = JSONText()
        j.raw("{")
        if let reply {
            j.raw(#""reply":"#)
            j.raw(try reply.jsonBody())
        }
        if let setState {
            if reply != nil { j.raw(",") }
            j.raw(#""setState":"#)
            j.string(setState)
        }
        j.raw("}")
        return j.bytes
    }
}
