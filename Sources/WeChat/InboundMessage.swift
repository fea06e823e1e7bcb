import Crypto

/// A message or event that WeChat pushed to the server (protocol page §4).
///
/// Every top-level element is kept in ``fields`` (unknown ones too), and the
/// whole document in ``root``; ``kind`` is the typed view of the known types.
public struct InboundMessage: Sendable, Equatable {
    /// Our account's original ID (`gh_…`).
    public var toUserName: String
    /// The user's OpenID.
    public var fromUserName: String
    public var createTime: Int64
    public var msgType: String
    /// Text of every top-level element, by name.
    public var fields: [String: String]
    /// The parsed document, for nested structures and anything not typed here.
    public var root: XMLElement
    public var kind: Kind

    public enum Kind: Sendable, Equatable {
        case text(content: String)
        case image(picURL: String, mediaID: String)
        case voice(mediaID: String, format: String, recognition: String?)
        case video(mediaID: String, thumbMediaID: String)
        case shortVideo(mediaID: String, thumbMediaID: String)
        case location(x: Double, y: Double, scale: Int, label: String)
        case link(title: String, description: String, url: String)
        case file(title: String, description: String, fileKey: String, fileMD5: String, fileTotalLen: Int64)
        case event(Event)
        /// A message type this library does not know; its fields are in ``InboundMessage/fields``.
        case unknown(msgType: String)
    }

    public enum Event: Sendable, Equatable {
        /// Follow; via a parametric QR code `eventKey` is `qrscene_…` and `ticket` is set.
        case subscribe(eventKey: String?, ticket: String?)
        case unsubscribe
        /// A follower scanned a parametric QR code.
        case scan(eventKey: String, ticket: String?)
        case location(latitude: Double, longitude: Double, precision: Double)
        case click(eventKey: String)
        case view(url: String, menuID: String?)
        case scancodePush(eventKey: String, scanType: String, scanResult: String)
        case scancodeWaitmsg(eventKey: String, scanType: String, scanResult: String)
        case picSysphoto(eventKey: String, picMD5Sums: [String])
        case picPhotoOrAlbum(eventKey: String, picMD5Sums: [String])
        case picWeixin(eventKey: String, picMD5Sums: [String])
        case locationSelect(eventKey: String, x: Double, y: Double, scale: Int, label: String, poiname: String)
        case viewMiniprogram(pagePath: String, menuID: String?)
        case templateSendJobFinish(msgID: String, status: String)
        case massSendJobFinish(msgID: String, status: String, totalCount: Int, filterCount: Int, sentCount: Int, errorCount: Int)
        /// An event this library does not know.
        case unknown(event: String)
    }

    /// Parses a pushed plaintext XML document.
    /// - Throws: ``WeChatError`` `.parseXML`/`.forbiddenXML` for bad XML, `.missingField` when
    ///   ToUserName, FromUserName, CreateTime or MsgType is missing (or CreateTime is not a number).
    public init(xml: [UInt8], limits: XMLLimits = XMLLimits()) throws {
        try self.init(root: WeChatXML.parse(xml, limits: limits))
    }

    public init(xml: String, limits: XMLLimits = XMLLimits()) throws {
        try self.init(xml: Array(xml.utf8), limits: limits)
    }

    public init(root: XMLElement) throws {
        var fields: [String: String] = [:]
        for child in root.children where fields[child.name] == nil { fields[child.name] = child.text }
        func required(_ name: String) throws -> String {
            guard let v = fields[name], !v.isEmpty else { throw WeChatError(.missingField, "missing <\(name)>") }
            return v
        }
        toUserName = try required("ToUserName")
        fromUserName = try required("FromUserName")
        guard let t = Int64(try required("CreateTime").trimmingSpaces) else {
            throw WeChatError(.missingField, "<CreateTime> is not a number")
        }
        createTime = t
        msgType = try required("MsgType")
        self.fields = fields
        self.root = root
        kind = Self.kind(msgType, fields, root)
    }

    /// The OpenID's message id, when this is a message (not an event).
    public var msgID: String? { fields["MsgId"] }
    public var event: String? { fields["Event"] }
    public var eventKey: String? { fields["EventKey"] }
    public var isEvent: Bool { msgType == "event" }

    /// The key that identifies WeChat's retries of this push (protocol page §5), so that a
    /// retry matches itself and two different pushes never match:
    /// - a message with a `MsgId`: `FromUserName:MsgId`;
    /// - an event that carries its own id (`MsgID`/`MsgId`, as template and mass-send receipts do):
    ///   `FromUserName:Event:id`;
    /// - anything else (most events, messages without an id): `FromUserName:CreateTime:Event:` and
    ///   the SHA-256 of every element of the push, so that several `subscribe_msg_*` pushes in one
    ///   second, or two `PUBLISHJOBFINISH` receipts, stay apart while WeChat's retry of one
    ///   (the same document again) still matches.
    ///
    /// Its length is bounded only by the push (a plaintext push is not signed), so queues and
    /// Redis use ``dedupID``, its fixed-length digest.
    public var dedupKey: String {
        if !isEvent, let id = msgID, !id.isEmpty { return "\(fromUserName):\(id)" }
        if isEvent, let id = fields["MsgID"] ?? fields["MsgId"], !id.isEmpty {
            return "\(fromUserName):\(event ?? ""):\(id)"
        }
        return "\(fromUserName):\(createTime):\(event ?? msgType):\(Self.digest(root))"
    }

    /// The SHA-256 of ``dedupKey`` in hex (64 characters): what goes into the AMQP
    /// `message_id` (a short string of at most 255 bytes) and into Redis key names.
    public var dedupID: String { WeChatSignature.hex(SHA256.hash(data: Array(dedupKey.utf8))) }

    /// A digest of the whole document: every element's name, text and children, in order,
    /// each part length-prefixed so that no two different documents serialise alike.
    static func digest(_ root: XMLElement) -> String {
        var hasher = SHA256()
        func add(_ s: String) {
            var n = UInt32(clamping: s.utf8.count).bigEndian
            withUnsafeBytes(of: &n) { hasher.update(bufferPointer: $0) }
            hasher.update(data: Array(s.utf8))
        }
        func walk(_ e: XMLElement) {
            add(e.name)
            add(e.text)
            add(String(e.children.count))
            for c in e.children { walk(c) }
        }
        walk(root)
        return WeChatSignature.hex(hasher.finalize())
    }

    private static func kind(_ type: String, _ f: [String: String], _ root: XMLElement) -> Kind {
        func s(_ k: String) -> String { f[k] ?? "" }
        func d(_ k: String) -> Double { Double(s(k).trimmingSpaces) ?? 0 }
        func i(_ k: String) -> Int { Int(s(k).trimmingSpaces) ?? 0 }
        switch type {
        case "text": return .text(content: s("Content"))
        case "image": return .image(picURL: s("PicUrl"), mediaID: s("MediaId"))
        case "voice": return .voice(mediaID: s("MediaId"), format: s("Format"), recognition: f["Recognition"])
        case "video": return .video(mediaID: s("MediaId"), thumbMediaID: s("ThumbMediaId"))
        case "shortvideo": return .shortVideo(mediaID: s("MediaId"), thumbMediaID: s("ThumbMediaId"))
        case "location":
            return .location(x: d("Location_X"), y: d("Location_Y"), scale: i("Scale"), label: s("Label"))
        case "link": return .link(title: s("Title"), description: s("Description"), url: s("Url"))
        case "file":
            return .file(
                title: s("Title"), description: s("Description"), fileKey: s("FileKey"), fileMD5: s("FileMd5"),
                fileTotalLen: Int64(s("FileTotalLen")) ?? 0)
        case "event": return .event(event(f["Event"] ?? "", f, root))
        default: return .unknown(msgType: type)
        }
    }

    private static func event(_ name: String, _ f: [String: String], _ root: XMLElement) -> Event {
        func s(_ k: String) -> String { f[k] ?? "" }
        func nested(_ parent: String, _ k: String) -> String { root[child: parent]?[child: k]?.text ?? "" }
        func md5s(_ parent: String) -> [String] {
            (root[child: parent]?[child: "PicList"]?.children ?? []).compactMap { $0[child: "PicMd5Sum"]?.text }
        }
        let key = s("EventKey")
        switch name {
        case "subscribe": return .subscribe(eventKey: key.isEmpty ? nil : key, ticket: f["Ticket"])
        case "unsubscribe": return .unsubscribe
        case "SCAN": return .scan(eventKey: key, ticket: f["Ticket"])
        case "LOCATION":
            return .location(
                latitude: Double(s("Latitude")) ?? 0, longitude: Double(s("Longitude")) ?? 0,
                precision: Double(s("Precision")) ?? 0)
        case "CLICK": return .click(eventKey: key)
        case "VIEW": return .view(url: key, menuID: f["MenuId"] ?? f["MenuID"])
        case "scancode_push", "scancode_waitmsg":
            let type = nested("ScanCodeInfo", "ScanType"), result = nested("ScanCodeInfo", "ScanResult")
            return name == "scancode_push"
                ? .scancodePush(eventKey: key, scanType: type, scanResult: result)
                : .scancodeWaitmsg(eventKey: key, scanType: type, scanResult: result)
        case "pic_sysphoto": return .picSysphoto(eventKey: key, picMD5Sums: md5s("SendPicsInfo"))
        case "pic_photo_or_album": return .picPhotoOrAlbum(eventKey: key, picMD5Sums: md5s("SendPicsInfo"))
        case "pic_weixin": return .picWeixin(eventKey: key, picMD5Sums: md5s("SendPicsInfo"))
        case "location_select":
            return .locationSelect(
                eventKey: key, x: Double(nested("SendLocationInfo", "Location_X")) ?? 0,
                y: Double(nested("SendLocationInfo", "Location_Y")) ?? 0,
                scale: Int(nested("SendLocationInfo", "Scale")) ?? 0, label: nested("SendLocationInfo", "Label"),
                poiname: nested("SendLocationInfo", "Poiname"))
        case "view_miniprogram": return .viewMiniprogram(pagePath: key, menuID: f["MenuId"] ?? f["MenuID"])
        case "TEMPLATESENDJOBFINISH": return .templateSendJobFinish(msgID: s("MsgID"), status: s("Status"))
        case "MASSSENDJOBFINISH":
            return .massSendJobFinish(
                msgID: s("MsgID"), status: s("Status"), totalCount: Int(s("TotalCount")) ?? 0,
                filterCount: Int(s("FilterCount")) ?? 0, sentCount: Int(s("SentCount")) ?? 0,
                errorCount: Int(s("ErrorCount")) ?? 0)
        default: return .unknown(event: name)
        }
    }
}

extension String {
    var trimmingSpaces: Substring {
        var s = Substring(self)
        while let f = s.first, f.isWhitespace { s.removeFirst() }
        while let l = s.last, l.isWhitespace { s.removeLast() }
        return s
    }
}
