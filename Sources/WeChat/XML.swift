import Foundation

/// An element of a parsed XML document: its name, its text (character data and
/// CDATA sections joined, entities decoded) and its child elements.
///
/// Attributes are parsed for well-formedness and dropped: WeChat's messages have none.
public struct XMLElement: Sendable, Equatable {
    public var name: String
    public var text: String
    public var children: [XMLElement]

    public init(name: String, text: String = "", children: [XMLElement] = []) {
        self.name = name
        self.text = text
        self.children = children
    }

    /// The first child element with this name.
    public subscript(child name: String) -> XMLElement? { children.first { $0.name == name } }
}

/// Bounds on what the parser accepts.
public struct XMLLimits: Sendable {
    public var maxBytes: Int
    public var maxDepth: Int
    public var maxElements: Int

    public init(maxBytes: Int = 1 << 20, maxDepth: Int = 16, maxElements: Int = 4096) {
        self.maxBytes = maxBytes
        self.maxDepth = maxDepth
        self.maxElements = maxElements
    }
}

/// A small, strict XML parser for WeChat's flat message format.
///
/// Chosen over Foundation's `XMLParser` for safety and speed (see BENCHMARKS.md):
/// it never processes a DTD — any `<!DOCTYPE`, `<!ENTITY` or other markup
/// declaration is rejected — knows only the five predefined entities and
/// character references, accepts UTF-8 only, and bounds size, depth and
/// element count. CDATA sections are joined, including a `]]>` split across
/// sections (`]]]]><![CDATA[>`).
public enum WeChatXML {
    /// Parses a document and returns its root element.
    /// - Throws: ``WeChatError`` `.parseXML` (malformed, truncated, too large or deep,
    ///   not UTF-8) or `.forbiddenXML` (DTD, entity declaration).
    public static func parse(_ bytes: [UInt8], limits: XMLLimits = XMLLimits()) throws -> XMLElement {
        guard bytes.count <= limits.maxBytes else {
            throw WeChatError(.parseXML, "document of \(bytes.count) bytes exceeds \(limits.maxBytes)")
        }
        return try bytes.withUnsafeBufferPointer { buffer in
            var parser = XMLByteParser(bytes: buffer, limits: limits)
            return try parser.document()
        }
    }

    public static func parse(_ text: String, limits: XMLLimits = XMLLimits()) throws -> XMLElement {
        try parse(Array(text.utf8), limits: limits)
    }
}

private let LT = UInt8(ascii: "<"), GT = UInt8(ascii: ">"), AMP = UInt8(ascii: "&"), SLASH = UInt8(ascii: "/")
private let BANG = UInt8(ascii: "!"), QUESTION = UInt8(ascii: "?"), EQ = UInt8(ascii: "="), SEMI = UInt8(ascii: ";")

private struct XMLByteParser {
    let b: UnsafeBufferPointer<UInt8>
    let limits: XMLLimits
    var i = 0
    var elements = 0

    init(bytes: UnsafeBufferPointer<UInt8>, limits: XMLLimits) {
        self.b = bytes
        self.limits = limits
    }

    func fail(_ message: String) -> WeChatError { WeChatError(.parseXML, message) }

    func starts(with s: StaticString) -> Bool {
        let n = s.utf8CodeUnitCount
        guard i + n <= b.count else { return false }
        let p = s.utf8Start
        for k in 0..<n where b[i + k] != p[k] { return false }
        return true
    }

    func isSpace(_ c: UInt8) -> Bool { c == 0x20 || c == 0x09 || c == 0x0A || c == 0x0D }

    mutating func skipSpace() { while i < b.count, isSpace(b[i]) { i += 1 } }

    /// Advances past the next occurrence of `terminator`; throws `truncated` if there is none.
    mutating func skip(past terminator: StaticString, what: String) throws -> Range<Int> {
        let start = i
        while i < b.count {
            if starts(with: terminator) {
                let r = start..<i
                i += terminator.utf8CodeUnitCount
                return r
            }
            i += 1
        }
        throw fail("truncated: unterminated \(what)")
    }

    mutating func document() throws -> XMLElement {
        if starts(with: "\u{FEFF}") { i += 3 }
        if b.count >= 2, (b[0] == 0xFE && b[1] == 0xFF) || (b[0] == 0xFF && b[1] == 0xFE) {
            throw fail("UTF-16 documents are not accepted; WeChat sends UTF-8")
        }
        try misc(atStart: true)
        guard i < b.count else { throw fail("empty document: no root element") }
        guard b[i] == LT else { throw fail("text before the root element") }
        let root = try element(depth: 1)
        try misc(atStart: false)
        guard i == b.count else { throw fail("content after the root element") }
        return root
    }

    /// Whitespace, comments and processing instructions outside the root element.
    mutating func misc(atStart: Bool) throws {
        var first = atStart
        while true {
            skipSpace()
            if starts(with: "<?") {
                let declStart = i
                i += 2
                let body = try skip(past: "?>", what: "processing instruction")
                let text = String(decoding: UnsafeBufferPointer(rebasing: b[body]), as: UTF8.self)
                if text.hasPrefix("xml") && (text.count == 3 || text.dropFirst(3).first?.isWhitespace == true) {
                    guard first, declStart <= 3 else { throw fail("XML declaration not at the start") }
                    try checkDeclaration(text)
                }
            } else if starts(with: "<!--") {
                i += 4
                _ = try skip(past: "-->", what: "comment")
            } else if starts(with: "<!") {
                throw WeChatError(.forbiddenXML, "DTD or markup declaration (<!…>) is not allowed")
            } else {
                return
            }
            first = false
        }
    }

    func checkDeclaration(_ text: String) throws {
        guard let range = text.range(of: "encoding") else { return }
        let rest = text[range.upperBound...].drop { $0 == " " || $0 == "=" }
        guard let quote = rest.first, quote == "\"" || quote == "'" else { return }
        let value = rest.dropFirst().prefix { $0 != quote }.lowercased()
        guard value == "utf-8" || value == "utf8" else {
            throw fail("encoding '\(value)' is not supported; WeChat sends UTF-8")
        }
    }

    mutating func name() throws -> String {
        let start = i
        while i < b.count {
            let c = b[i]
            if isSpace(c) || c == GT || c == SLASH || c == EQ { break }
            if c == LT || c == AMP || c == UInt8(ascii: "\"") || c == UInt8(ascii: "'") {
                throw fail("invalid character in a name")
            }
            i += 1
        }
        guard i > start else { throw fail(i < b.count ? "missing element name" : "truncated in a tag") }
        let first = b[start]
        if first == UInt8(ascii: "-") || first == UInt8(ascii: ".") || (first >= 0x30 && first <= 0x39) {
            throw fail("invalid element name")
        }
        guard let s = String(validating: UnsafeBufferPointer(rebasing: b[start..<i]), as: UTF8.self) else {
            throw fail("element name is not UTF-8")
        }
        return s
    }

    mutating func element(depth: Int) throws -> XMLElement {
        guard depth <= limits.maxDepth else { throw fail("elements nested deeper than \(limits.maxDepth)") }
        elements += 1
        guard elements <= limits.maxElements else { throw fail("more than \(limits.maxElements) elements") }
        i += 1  // '<'
        let tag = try name()
        // Attributes: checked for form, not kept.
        while true {
            skipSpace()
            guard i < b.count else { throw fail("truncated in <\(tag)>") }
            if b[i] == GT { i += 1; break }
            if b[i] == SLASH {
                guard i + 1 < b.count, b[i + 1] == GT else { throw fail("malformed empty-element tag <\(tag)/>") }
                i += 2
                return XMLElement(name: tag)
            }
            _ = try name()
            skipSpace()
            guard i < b.count, b[i] == EQ else { throw fail("attribute without a value in <\(tag)>") }
            i += 1
            skipSpace()
            guard i < b.count, b[i] == UInt8(ascii: "\"") || b[i] == UInt8(ascii: "'") else {
                throw fail("unquoted attribute value in <\(tag)>")
            }
            let quote = b[i]
            i += 1
            while i < b.count, b[i] != quote {
                if b[i] == LT { throw fail("'<' in an attribute value") }
                i += 1
            }
            guard i < b.count else { throw fail("truncated in an attribute of <\(tag)>") }
            i += 1
        }
        var text: [UInt8] = []
        var children: [XMLElement] = []
        while true {
            guard i < b.count else { throw fail("truncated: <\(tag)> is not closed") }
            let c = b[i]
            if c == LT {
                if i + 1 < b.count, b[i + 1] == SLASH {
                    i += 2
                    let end = try name()
                    guard end == tag else { throw fail("</\(end)> closes <\(tag)>") }
                    skipSpace()
                    guard i < b.count, b[i] == GT else { throw fail("truncated in </\(tag)>") }
                    i += 1
                    break
                } else if starts(with: "<![CDATA[") {
                    i += 9
                    let r = try skip(past: "]]>", what: "CDATA section")
                    text.append(contentsOf: UnsafeBufferPointer(rebasing: b[r]))
                } else if starts(with: "<!--") {
                    i += 4
                    _ = try skip(past: "-->", what: "comment")
                } else if i + 1 < b.count, b[i + 1] == BANG {
                    throw WeChatError(.forbiddenXML, "markup declaration (<!…>) inside <\(tag)> is not allowed")
                } else if i + 1 < b.count, b[i + 1] == QUESTION {
                    i += 2
                    _ = try skip(past: "?>", what: "processing instruction")
                } else {
                    children.append(try element(depth: depth + 1))
                }
            } else if c == AMP {
                try entity(into: &text)
            } else {
                let start = i
                while i < b.count, b[i] != LT, b[i] != AMP { i += 1 }
                text.append(contentsOf: UnsafeBufferPointer(rebasing: b[start..<i]))
            }
        }
        if !children.isEmpty, text.allSatisfy(isSpace) { text.removeAll() }
        guard let s = String(validating: text, as: UTF8.self) else {
            throw fail("text of <\(tag)> is not UTF-8")
        }
        return XMLElement(name: tag, text: s, children: children)
    }

    mutating func entity(into out: inout [UInt8]) throws {
        let start = i + 1
        var end = start
        while end < b.count, end - start < 12, b[end] != SEMI { end += 1 }
        guard end < b.count, b[end] == SEMI else { throw fail("unterminated entity reference") }
        let ref = String(decoding: UnsafeBufferPointer(rebasing: b[start..<end]), as: UTF8.self)
        i = end + 1
        switch ref {
        case "lt": out.append(LT)
        case "gt": out.append(GT)
        case "amp": out.append(AMP)
        case "quot": out.append(UInt8(ascii: "\""))
        case "apos": out.append(UInt8(ascii: "'"))
        default:
            guard ref.hasPrefix("#") else {
                throw WeChatError(.forbiddenXML, "undefined entity &\(ref); (no DTD entities are processed)")
            }
            let digits = ref.dropFirst()
            let value: UInt32?
            if digits.hasPrefix("x") || digits.hasPrefix("X") {
                value = UInt32(digits.dropFirst(), radix: 16)
            } else {
                value = UInt32(digits, radix: 10)
            }
            guard let v = value, let scalar = Unicode.Scalar(v), v != 0 else {
                throw fail("invalid character reference &\(ref);")
            }
            out.append(contentsOf: Array(String(Character(scalar)).utf8))
        }
    }
}

/// Builds WeChat-style XML: `<xml><Name><![CDATA[value]]></Name>…</xml>`.
public struct XMLBuilder: Sendable {
    private var out: String

    public init(root: String = "xml") {
        out = "<\(root)>"
        self.root = root
    }

    private let root: String

    /// Appends the four fields every push and passive reply starts with:
    /// `ToUserName`, `FromUserName`, `CreateTime`, `MsgType`.
    public mutating func header(to: String, from: String, createTime: Int64, msgType: String) {
        cdata("ToUserName", to)
        cdata("FromUserName", from)
        raw("CreateTime", String(createTime))
        cdata("MsgType", msgType)
    }

    /// Appends `<name><![CDATA[value]]></name>`; a `]]>` inside the value is split across two sections.
    public mutating func cdata(_ name: String, _ value: String) {
        out += "<\(name)><![CDATA[\(Self.escapeCDATA(value))]]></\(name)>"
    }

    /// Appends `<name>value</name>` with `&`, `<` and `>` escaped (for numbers and timestamps).
    public mutating func raw(_ name: String, _ value: String) {
        out += "<\(name)>\(Self.escapeText(value))</\(name)>"
    }

    /// Appends a nested element built by `body`.
    public mutating func element(_ name: String, _ body: (inout XMLBuilder) -> Void) {
        var inner = XMLBuilder(root: name)
        body(&inner)
        out += inner.finish()
    }

    public func finish() -> String { out + "</\(root)>" }

    public static func escapeCDATA(_ s: String) -> String {
        s.contains("]]>") ? s.replacingOccurrences(of: "]]>", with: "]]]]><![CDATA[>") : s
    }

    public static func escapeText(_ s: String) -> String {
        var r = ""
        r.reserveCapacity(s.utf8.count)
        for ch in s {
            switch ch {
            case "&": r += "&amp;"
            case "<": r += "&lt;"
            case ">": r += "&gt;"
            default: r.append(ch)
            }
        }
        return r
    }
}
