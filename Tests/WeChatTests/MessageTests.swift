import Foundation
import Testing
import WeChat

@Suite("Inbound messages")
struct MessageTests {
    func message(_ type: String, _ extra: [(String, String)]) throws -> InboundMessage {
        try InboundMessage(
            xml: pushXML(
                [("ToUserName", "gh_abc"), ("FromUserName", "oUser1"), ("CreateTime", "1700000000"), ("MsgType", type)]
                    + extra))
    }

    @Test func everyMessageType() throws {
        #expect(try message("text", [("Content", "你好"), ("MsgId", "1")]).kind == .text(content: "你好"))
        #expect(try message("image", [("PicUrl", "http://p"), ("MediaId", "m")]).kind == .image(picURL: "http://p", mediaID: "m"))
        #expect(
            try message("voice", [("MediaId", "m"), ("Format", "amr"), ("Recognition", "帮助")]).kind
                == .voice(mediaID: "m", format: "amr", recognition: "帮助"))
        #expect(try message("voice", [("MediaId", "m"), ("Format", "amr")]).kind == .voice(mediaID: "m", format: "amr", recognition: nil))
        #expect(try message("video", [("MediaId", "m"), ("ThumbMediaId", "t")]).kind == .video(mediaID: "m", thumbMediaID: "t"))
        #expect(try message("shortvideo", [("MediaId", "m"), ("ThumbMediaId", "t")]).kind == .shortVideo(mediaID: "m", thumbMediaID: "t"))
        #expect(
            try message("location", [("Location_X", "23.134521"), ("Location_Y", "113.358803"), ("Scale", "20"), ("Label", "广州")]).kind
                == .location(x: 23.134521, y: 113.358803, scale: 20, label: "广州"))
        #expect(
            try message("link", [("Title", "t"), ("Description", "d"), ("Url", "http://u")]).kind
                == .link(title: "t", description: "d", url: "http://u"))
        #expect(
            try message("file", [("Title", "a.pdf"), ("Description", "d"), ("FileKey", "k"), ("FileMd5", "m"), ("FileTotalLen", "42")]).kind
                == .file(title: "a.pdf", description: "d", fileKey: "k", fileMD5: "m", fileTotalLen: 42))
    }

    func event(_ name: String, _ extra: [(String, String)] = []) throws -> InboundMessage.Event? {
        guard case .event(let e) = try message("event", [("Event", name)] + extra).kind else { return nil }
        return e
    }

    @Test func everyEvent() throws {
        #expect(try event("subscribe") == .subscribe(eventKey: nil, ticket: nil))
        #expect(
            try event("subscribe", [("EventKey", "qrscene_123"), ("Ticket", "TK")])
                == .subscribe(eventKey: "qrscene_123", ticket: "TK"))
        #expect(try event("unsubscribe") == .unsubscribe)
        #expect(try event("SCAN", [("EventKey", "123"), ("Ticket", "TK")]) == .scan(eventKey: "123", ticket: "TK"))
        #expect(
            try event("LOCATION", [("Latitude", "23.1"), ("Longitude", "113.3"), ("Precision", "119.3")])
                == .location(latitude: 23.1, longitude: 113.3, precision: 119.3))
        #expect(try event("CLICK", [("EventKey", "HELP")]) == .click(eventKey: "HELP"))
        #expect(try event("VIEW", [("EventKey", "http://x"), ("MenuId", "9")]) == .view(url: "http://x", menuID: "9"))
        let scanXML = pushXML([
            ("ToUserName", "gh"), ("FromUserName", "o"), ("CreateTime", "1"), ("MsgType", "event"),
            ("Event", "scancode_waitmsg"), ("EventKey", "k"),
        ]).replacingOccurrences(
            of: "</xml>",
            with: "<ScanCodeInfo><ScanType><![CDATA[qrcode]]></ScanType><ScanResult><![CDATA[R]]></ScanResult></ScanCodeInfo></xml>")
        #expect(try InboundMessage(xml: scanXML).kind == .event(.scancodeWaitmsg(eventKey: "k", scanType: "qrcode", scanResult: "R")))
        #expect(
            try InboundMessage(xml: scanXML.replacingOccurrences(of: "scancode_waitmsg", with: "scancode_push")).kind
                == .event(.scancodePush(eventKey: "k", scanType: "qrcode", scanResult: "R")))
        for (name, make) in [
            ("pic_sysphoto", InboundMessage.Event.picSysphoto), ("pic_photo_or_album", InboundMessage.Event.picPhotoOrAlbum),
            ("pic_weixin", InboundMessage.Event.picWeixin),
        ] as [(String, (String, [String]) -> InboundMessage.Event)] {
            let xml = pushXML([
                ("ToUserName", "gh"), ("FromUserName", "o"), ("CreateTime", "1"), ("MsgType", "event"), ("Event", name),
                ("EventKey", "k"),
            ]).replacingOccurrences(
                of: "</xml>",
                with: "<SendPicsInfo><Count>2</Count><PicList><item><PicMd5Sum><![CDATA[a1]]></PicMd5Sum></item><item><PicMd5Sum><![CDATA[b2]]></PicMd5Sum></item></PicList></SendPicsInfo></xml>")
            #expect(try InboundMessage(xml: xml).kind == .event(make("k", ["a1", "b2"])))
        }
        let loc = pushXML([
            ("ToUserName", "gh"), ("FromUserName", "o"), ("CreateTime", "1"), ("MsgType", "event"), ("Event", "location_select"),
            ("EventKey", "k"),
        ]).replacingOccurrences(
            of: "</xml>",
            with: "<SendLocationInfo><Location_X>23</Location_X><Location_Y>113</Location_Y><Scale>15</Scale><Label><![CDATA[L]]></Label><Poiname><![CDATA[P]]></Poiname></SendLocationInfo></xml>")
        #expect(
            try InboundMessage(xml: loc).kind
                == .event(.locationSelect(eventKey: "k", x: 23, y: 113, scale: 15, label: "L", poiname: "P")))
        #expect(try event("view_miniprogram", [("EventKey", "pages/x"), ("MenuId", "3")]) == .viewMiniprogram(pagePath: "pages/x", menuID: "3"))
        #expect(
            try event("TEMPLATESENDJOBFINISH", [("MsgID", "200163836"), ("Status", "success")])
                == .templateSendJobFinish(msgID: "200163836", status: "success"))
        #expect(
            try event(
                "MASSSENDJOBFINISH",
                [("MsgID", "1988"), ("Status", "sendsuccess"), ("TotalCount", "100"), ("FilterCount", "80"), ("SentCount", "75"), ("ErrorCount", "5")])
                == .massSendJobFinish(msgID: "1988", status: "sendsuccess", totalCount: 100, filterCount: 80, sentCount: 75, errorCount: 5))
        #expect(try event("some_future_event") == .unknown(event: "some_future_event"))
    }

    @Test func unknownTypesAndFieldsAreKept() throws {
        let m = try message("miniprogram_card", [("Title", "t"), ("NewField", "v")])
        #expect(m.kind == .unknown(msgType: "miniprogram_card"))
        #expect(m.fields["NewField"] == "v")
        let t = try message("text", [("Content", "x"), ("MsgId", "1"), ("MsgDataId", "9"), ("Idx", "1")])
        #expect(t.fields["MsgDataId"] == "9")
    }

    @Test func dedupKeys() throws {
        #expect(try message("text", [("Content", "x"), ("MsgId", "42")]).dedupKey == "oUser1:42")
        #expect(try message("event", [("Event", "CLICK"), ("EventKey", "HELP")]).dedupKey.hasPrefix("oUser1:1700000000:CLICK:"))
        #expect(try message("event", [("Event", "subscribe")]).dedupKey.hasPrefix("oUser1:1700000000:subscribe:"))
        // WeChat's retry of one push (the same document) matches itself.
        #expect(try message("event", [("Event", "CLICK"), ("EventKey", "HELP")]).dedupKey
            == (try message("event", [("Event", "CLICK"), ("EventKey", "HELP")]).dedupKey))
        // Two users with the same MsgId do not collide.
        let a = try InboundMessage(xml: pushXML([("ToUserName", "g"), ("FromUserName", "A"), ("CreateTime", "1"), ("MsgType", "text"), ("MsgId", "7")]))
        let b = try InboundMessage(xml: pushXML([("ToUserName", "g"), ("FromUserName", "B"), ("CreateTime", "1"), ("MsgType", "text"), ("MsgId", "7")]))
        #expect(a.dedupKey != b.dedupKey)
    }

    /// Hardening #7: distinct events in the same second were merged by `From:CreateTime:Event:EventKey`.
    @Test func distinctEventsInOneSecondAreNotMerged() throws {
        // Two template receipts: each carries its own MsgID.
        let t1 = try message("event", [("Event", "TEMPLATESENDJOBFINISH"), ("MsgID", "200163836"), ("Status", "success")])
        let t2 = try message("event", [("Event", "TEMPLATESENDJOBFINISH"), ("MsgID", "200163840"), ("Status", "success")])
        #expect(t1.dedupKey != t2.dedupKey)
        #expect(t1.dedupKey == "oUser1:TEMPLATESENDJOBFINISH:200163836")
        // Two subscribe-message pops in one second, with different templates.
        func popup(_ template: String, _ status: String) throws -> InboundMessage {
            try InboundMessage(xml: pushXML([
                ("ToUserName", "gh"), ("FromUserName", "oUser1"), ("CreateTime", "1700000000"), ("MsgType", "event"),
                ("Event", "subscribe_msg_popup_event"),
            ]).replacingOccurrences(
                of: "</xml>",
                with: "<SubscribeMsgPopupEvent><List><TemplateId><![CDATA[\(template)]]></TemplateId><SubscribeStatusString><![CDATA[\(status)]]></SubscribeStatusString><PopupScene>0</PopupScene></List></SubscribeMsgPopupEvent></xml>"))
        }
        #expect(try popup("tplA", "accept").dedupKey != popup("tplB", "accept").dedupKey)
        #expect(try popup("tplA", "accept").dedupKey != popup("tplA", "reject").dedupKey)
        #expect(try popup("tplA", "accept").dedupKey == popup("tplA", "accept").dedupKey)
        // Publish receipts all come from mphelper, in the same second, with different publish ids.
        func published(_ id: String) throws -> InboundMessage {
            try InboundMessage(xml: pushXML([
                ("ToUserName", "gh"), ("FromUserName", "mphelper"), ("CreateTime", "1700000000"), ("MsgType", "event"),
                ("Event", "PUBLISHJOBFINISH"),
            ]).replacingOccurrences(
                of: "</xml>", with: "<PublishEventInfo><publish_id>\(id)</publish_id><publish_status>0</publish_status></PublishEventInfo></xml>"))
        }
        #expect(try published("2247503051").dedupKey != published("2247503052").dedupKey)
        // Two VIEW clicks of different long menu URLs.
        let long = "https://example.com/" + String(repeating: "a", count: 1000)
        let v1 = try message("event", [("Event", "VIEW"), ("EventKey", long + "1")])
        let v2 = try message("event", [("Event", "VIEW"), ("EventKey", long + "2")])
        #expect(v1.dedupKey != v2.dedupKey)
        // The digest that goes into AMQP's message_id and Redis keys has a fixed length.
        #expect(v1.dedupID.utf8.count == 64 && v1.dedupID != v2.dedupID)
    }

    @Test(arguments: ["ToUserName", "FromUserName", "CreateTime", "MsgType"])
    func missingRequiredFields(field: String) {
        var fields = [("ToUserName", "gh"), ("FromUserName", "o"), ("CreateTime", "1"), ("MsgType", "text")]
        fields.removeAll { $0.0 == field }
        #expect { try InboundMessage(xml: pushXML(fields)) } throws: { ($0 as? WeChatError)?.code == .missingField }
    }

    @Test func nonNumericCreateTimeIsRejected() {
        #expect {
            try InboundMessage(xml: pushXML([("ToUserName", "gh"), ("FromUserName", "o"), ("CreateTime", "soon"), ("MsgType", "text")]))
        } throws: { ($0 as? WeChatError)?.code == .missingField }
    }
}
