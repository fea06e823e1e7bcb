import Testing
import WeChat

@Suite("XML parser")
struct XMLTests {
    let sample = """
        <?xml version="1.0" encoding="UTF-8"?>
        <xml>
          <ToUserName><![CDATA[gh_123]]></ToUserName>
          <FromUserName><![CDATA[oUser]]></FromUserName>
          <CreateTime>1348831860</CreateTime>
          <MsgType><![CDATA[text]]></MsgType>
          <Content><![CDATA[this is a test]]></Content>
          <MsgId>1234567890123456</MsgId>
        </xml>
        """

    @Test func parsesAFlatMessage() throws {
        let root = try WeChatXML.parse(sample)
        #expect(root.name == "xml")
        #expect(root.text == "")
        #expect(root.children.map(\.name) == ["ToUserName", "FromUserName", "CreateTime", "MsgType", "Content", "MsgId"])
        #expect(root[child: "Content"]?.text == "this is a test")
        #expect(root[child: "CreateTime"]?.text == "1348831860")
    }

    @Test func cdataSplitAcrossSectionsAndEntities() throws {
        let root = try WeChatXML.parse(
            "<xml><A><![CDATA[x]]]]><![CDATA[>y]]></A><B>a &lt;b&gt; &amp; &quot;c&quot; &apos;d&apos; &#20320;&#x597D;</B><C>pre<![CDATA[<mid>]]>post</C></xml>")
        #expect(root[child: "A"]?.text == "x]]>y")
        #expect(root[child: "B"]?.text == "a <b> & \"c\" 'd' 你好")
        #expect(root[child: "C"]?.text == "pre<mid>post")
    }

    @Test func builderEscapesAndRoundTrips() throws {
        let tricky = "a]]>b<c>&d]]]>]]>e 中文 🎉"
        var x = XMLBuilder()
        x.cdata("Content", tricky)
        x.raw("N", "1<2&3")
        let root = try WeChatXML.parse(x.finish())
        #expect(root[child: "Content"]?.text == tricky)
        #expect(root[child: "N"]?.text == "1<2&3")
    }

    @Test func nestedElementsAttributesCommentsAndEmptyElements() throws {
        let root = try WeChatXML.parse(
            "<!-- c --><xml a=\"1\" b='2'><!-- x --><ScanCodeInfo><ScanType>qrcode</ScanType><ScanResult>1</ScanResult></ScanCodeInfo><E/><F></F><?pi ok?></xml>\n")
        #expect(root[child: "ScanCodeInfo"]?[child: "ScanType"]?.text == "qrcode")
        #expect(root[child: "E"] == XMLElement(name: "E"))
        #expect(root[child: "F"]?.text == "")
    }

    @Test(arguments: [
        "<!DOCTYPE xml [<!ENTITY x \"y\">]><xml><A>&x;</A></xml>",
        "<!DOCTYPE xml SYSTEM \"file:///etc/passwd\"><xml/>",
        "<xml><!ENTITY x SYSTEM \"file:///etc/passwd\"><A/></xml>",
        "<xml><A>&xxe;</A></xml>",
        "<?xml version=\"1.0\"?><!DOCTYPE lolz [<!ENTITY lol \"lol\"><!ENTITY lol2 \"&lol;&lol;\">]><xml>&lol2;</xml>",
    ])
    func dtdsAndEntitiesAreForbidden(doc: String) {
        #expect { try WeChatXML.parse(doc) } throws: { ($0 as? WeChatError)?.code == .forbiddenXML }
    }

    @Test(arguments: [
        "", "   ", "not xml", "<xml>", "<xml></XML>", "<xml><A></B></xml>", "<xml><A></xml>", "<xml>text",
        "<xml></xml><xml></xml>", "<xml></xml>junk", "text<xml/>", "<xml><![CDATA[unterminated</xml>",
        "<xml><!-- unterminated</xml>", "<xml a=1></xml>", "<xml a></xml>", "<xml a=\"1></xml>", "<>", "</xml>",
        "<xml><1A/></xml>", "<xml>&#0;</xml>", "<xml>&#xD800;</xml>", "<xml>&#99999999;</xml>", "<xml>&amp</xml>",
        "<xml/ >", "<?xml version=\"1.0\" encoding=\"GBK\"?><xml/>", " <xml/><?xml version=\"1.0\"?>",
    ])
    func malformedDocumentsAreRejected(doc: String) {
        #expect { try WeChatXML.parse(doc) } throws: { ($0 as? WeChatError)?.code == .parseXML }
    }

    @Test func everyTruncationOfAValidDocumentIsRejected() {
        let bytes = Array(sample.utf8)
        for n in 0..<bytes.count {
            // Cutting inside the trailing newline-free document always loses the closing tag.
            #expect(throws: WeChatError.self) { try WeChatXML.parse(Array(bytes[0..<n])) }
        }
    }

    @Test func invalidUTF8AndUTF16AreRejected() {
        #expect(throws: WeChatError.self) { try WeChatXML.parse([UInt8]("<xml><A>".utf8) + [0xC3, 0x28] + [UInt8]("</A></xml>".utf8)) }
        #expect(throws: WeChatError.self) { try WeChatXML.parse([0xFF, 0xFE] + Array("<\0x\0/\0>\0".utf8)) }
        // A UTF-8 byte-order mark is fine.
        #expect(throws: Never.self) { try WeChatXML.parse([0xEF, 0xBB, 0xBF] + Array("<xml/>".utf8)) }
    }

    @Test func depthSizeAndElementCountAreBounded() {
        let deep = String(repeating: "<a>", count: 17) + String(repeating: "</a>", count: 17)
        #expect(throws: WeChatError.self) { try WeChatXML.parse(deep) }
        let ok = String(repeating: "<a>", count: 16) + String(repeating: "</a>", count: 16)
        #expect(throws: Never.self) { try WeChatXML.parse(ok) }
        let big = "<xml>" + String(repeating: "x", count: 2000) + "</xml>"
        #expect(throws: WeChatError.self) { try WeChatXML.parse(big, limits: XMLLimits(maxBytes: 1000)) }
        let many = "<xml>" + String(repeating: "<a/>", count: 100) + "</xml>"
        #expect(throws: WeChatError.self) { try WeChatXML.parse(many, limits: XMLLimits(maxElements: 50)) }
    }

    @Test func randomMutationsNeverCrash() {
        var rng = SystemRandomNumberGenerator()
        let base = Array(sample.utf8)
        let alphabet = Array("<>/!?[]&;#x\"'= CDATA".utf8) + [0, 0xFF, 0xC3]
        for _ in 0..<3000 {
            var b = base
            for _ in 0..<Int.random(in: 1...4, using: &rng) {
                let i = Int.random(in: 0..<b.count, using: &rng)
                switch Int.random(in: 0..<3, using: &rng) {
                case 0: b[i] = alphabet.randomElement(using: &rng) ?? 0
                case 1: b.remove(at: i)
                default: b.insert(alphabet.randomElement(using: &rng) ?? 0, at: i)
                }
                if b.isEmpty { break }
            }
            // Either a document or a WeChatError; never a crash or another error.
            do { _ = try WeChatXML.parse(b) } catch { #expect(error is WeChatError) }
        }
    }
}
