import Foundation
import Testing
import WeChat

@testable import Worker

/// The snapshot's fast JSON reader agrees with `JSONDecoder` on every input it accepts, and
/// refuses (so that the caller falls back) what is not a flat array of strings.
@Suite("Flat JSON reader")
struct FlatJSONTests {
    static let alphabet: [String] = ["a", "Z", "0", " ", "\"", "\\", "/", "\n", "\t", "\u{1}", "\u{7F}", "é", "中", "😀", "\u{2028}", ":", ",", "[", "]"]

    @Test func agreesWithJSONDecoderOnRandomArrays() throws {
        var rng = SystemRandomNumberGenerator()
        for _ in 0..<2000 {
            let strings = (0..<Int.random(in: 0...8, using: &rng)).map { _ in
                (0..<Int.random(in: 0...12, using: &rng)).map { _ in Self.alphabet.randomElement(using: &rng) ?? "" }.joined()
            }
            let encoded = try JSONEncoder().encode(strings)
            #expect(FlatJSON.stringArray(Array(encoded)) == strings)
        }
    }

    /// What Lua's cjson writes: `\/` for a slash, `\u001f` for control characters; spaces between tokens.
    @Test func readsCJSONsEscapesAndSurrogatePairs() {
        let text = #" [ "a\/b" , "\u001f\"\\" ,"\ud83d\ude00\u4e2d\n" ] "#
        #expect(FlatJSON.stringArray(Array(text.utf8)) == ["a/b", "\u{1F}\"\\", "😀中\n"])
        #expect(FlatJSON.stringArray(Array("[]".utf8)) == [])
    }

    @Test(arguments: [
        "", "[", "[\"a\"", "[\"a\",]", "{\"a\":\"b\"}", "[1]", "[\"a\" \"b\"]", "[\"\\x\"]", "[\"\\ud83d\"]", "[\"\\ude00\"]",
        "[\"\u{1}\"]", "[\"a\"] x", "[null]", "[\"\\u12\"]",
    ])
    func refusesAnythingElse(text: String) {
        #expect(FlatJSON.stringArray(Array(text.utf8)) == nil)
    }

    @Test func refusesInvalidUTF8() {
        #expect(FlatJSON.stringArray([UInt8(ascii: "["), UInt8(ascii: "\""), 0xFF, UInt8(ascii: "\""), UInt8(ascii: "]")]) == nil)
    }
}

/// A stored decision written by hand is what `JSONEncoder` writes for it, and reads back.
@Suite("Decision record JSON")
struct DecisionRecordJSONTests {
    @Test(arguments: [nil, "text \"中\" /\n\u{1}", "a/b"] as [String?], [nil, "", "state/1"] as [String?])
    func theRecordIsWhatJSONEncoderWrites(text: String?, state: String?) throws {
        let decision = ReplyRules.Decision(reply: text.map { CustomerServiceMessage.text(to: "o/\u{2028}", $0) }, setState: state)
        let fast = try WeChatJSON.decisionRecord(reply: decision.reply, setState: decision.setState)
        #expect(fast == (try WeChatJSON.encode(decision)))
        #expect(try JSONDecoder().decode(ReplyRules.Decision.self, from: Data(fast)) == decision)
    }

    @Test func aNonTextReplyIsEncodedToo() throws {
        let decision = ReplyRules.Decision(reply: .init(toUser: "o1", content: .image(mediaID: "m")), setState: nil)
        #expect(try WeChatJSON.decisionRecord(reply: decision.reply, setState: nil) == (try WeChatJSON.encode(decision)))
    }
}
