import Foundation
import Testing
import WeChat

/// The hand-written JSON of a text send body must be what `JSONEncoder` writes, byte for byte.
@Suite("Hand-written JSON")
struct JSONTextTests {
    /// Every ASCII character (controls, quotes, backslash, slash), Chinese, emoji and U+2028.
    static let alphabet: [Character] = (0..<128).map { Character(Unicode.Scalar(UInt8($0))) } + ["中", "文", "😀", "\u{2028}", "é"]

    static func randomString(_ rng: inout some RandomNumberGenerator) -> String {
        String((0..<Int.random(in: 1...24, using: &rng)).map { _ in alphabet.randomElement(using: &rng) ?? "x" })
    }

    @Test func aTextBodyIsWhatJSONEncoderWrites() throws {
        var rng = SystemRandomNumberGenerator()
        for _ in 0..<3000 {
            let message = CustomerServiceMessage.text(to: Self.randomString(&rng), Self.randomString(&rng))
            let fast = try message.jsonBody()
            let slow = try WeChatJSON.encode(message)
            #expect(fast == slow, "\(String(decoding: fast, as: UTF8.self)) vs \(String(decoding: slow, as: UTF8.self))")
            #expect(try WeChatJSON.decode(CustomerServiceMessage.self, from: fast) == message)
        }
    }

    @Test func otherMessagesGoThroughTheEncoder() throws {
        let messages: [CustomerServiceMessage] = [
            .init(toUser: "o/1", content: .text(content: "hi"), kfAccount: "kf@gh"),
            .init(toUser: "o1", content: .image(mediaID: "m/1")),
            .init(toUser: "o1", content: .news(articles: [.init(title: "t", description: "d", url: "http://u/", picurl: "")])),
        ]
        for m in messages { #expect(try m.jsonBody() == WeChatJSON.encode(m)) }
    }
}
