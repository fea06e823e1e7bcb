import ArgumentParser
import Foundation
import WeChat

#if canImport(FoundationXML)
import FoundationXML
#endif

/// Single-core protocol throughput: signature verification, decrypt+parse of a
/// typical safe-mode text message, plaintext parse with our parser and with
/// Foundation's `XMLParser` for comparison. Prints `name ops/s` lines.
struct ProtocolBench: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "protocol")
    @Option(help: "Iterations per workload.") var iterations: Int = 200_000

    static let plain = """
        <xml><ToUserName><![CDATA[gh_1234567890ab]]></ToUserName><FromUserName><![CDATA[oABCD1234567890abcdefghijkl]]></FromUserName><CreateTime>1700000000</CreateTime><MsgType><![CDATA[text]]></MsgType><Content><![CDATA[你好，请问今天的活动几点开始？]]></Content><MsgId>24512345678901234</MsgId></xml>
        """

    func run() throws {
        let token = "benchtoken", timestamp = "1700000000", nonce = "123456789"
        let signature = WeChatSignature.signature(token: token, timestamp: timestamp, nonce: nonce)
        measure("signature verify") {
            if !WeChatSignature.verify(signature, parts: [token, timestamp, nonce]) { fatalError("bad signature") }
        }
        let crypto = WeChatMessageCrypto(
            appID: "wxb11529c136998cb6", key: try EncodingAESKey("abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG"))
        let encrypted = try crypto.encrypt(Self.plain)
        let msgSignature = WeChatSignature.messageSignature(token: token, timestamp: timestamp, nonce: nonce, encrypted: encrypted)
        measure("msg_signature verify + decrypt + parse (\(Self.plain.utf8.count) B text message)") {
            try WeChatSignature.verifyMessageSignature(msgSignature, token: token, timestamp: timestamp, nonce: nonce, encrypted: encrypted)
            let m = try InboundMessage(xml: crypto.decrypt(encrypted))
            if m.msgType != "text" { fatalError() }
        }
        let bytes = Array(Self.plain.utf8)
        measure("parse plaintext (WeChatXML + InboundMessage)") {
            let m = try InboundMessage(xml: bytes)
            if m.msgType != "text" { fatalError() }
        }
        #if canImport(FoundationXML)
        let data = Data(bytes)
        measure("parse plaintext (Foundation XMLParser, for comparison)") {
            let delegate = CollectingDelegate()
            let parser = XMLParser(data: data)
            parser.delegate = delegate
            if !parser.parse() || delegate.fields["MsgType"] != "text" { fatalError() }
        }
        #endif
    }

    func measure(_ name: String, _ body: () throws -> Void) {
        do {
            for _ in 0..<min(iterations / 10, 10_000) { try body() }  // warm-up
            let start = ContinuousClock.now
            for _ in 0..<iterations { try body() }
            let elapsed = (ContinuousClock.now - start).seconds
            print(String(format: "| %@ | %.0f |", name, Double(iterations) / elapsed))
        } catch {
            print("| \(name) | failed: \(error) |")
        }
    }
}

#if canImport(FoundationXML)
final class CollectingDelegate: NSObject, XMLParserDelegate {
    var fields: [String: String] = [:]
    var current = ""
    var text = ""
    func parser(_ parser: XMLParser, didStartElement name: String, namespaceURI: String?, qualifiedName: String?, attributes: [String: String] = [:]) {
        current = name
        text = ""
    }
    func parser(_ parser: XMLParser, foundCharacters string: String) { text += string }
    func parser(_ parser: XMLParser, foundCDATA block: Data) { text += String(decoding: block, as: UTF8.self) }
    func parser(_ parser: XMLParser, didEndElement name: String, namespaceURI: String?, qualifiedName: String?) {
        fields[name] = text
    }
}
#endif
