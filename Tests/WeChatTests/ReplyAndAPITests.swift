import Foundation
import Testing
import WeChat

@Suite("Passive replies")
struct ReplyTests {
    let inbound = try! InboundMessage(
        xml: pushXML([("ToUserName", "gh_me"), ("FromUserName", "oUser"), ("CreateTime", "1"), ("MsgType", "text"), ("Content", "hi"), ("MsgId", "1")]))

    @Test(arguments: [
        PassiveReply.Content.text("回复 ]]> <b>&"),
        .image(mediaID: "img"),
        .voice(mediaID: "v"),
        .video(mediaID: "m", title: "t", description: "d"),
        .music(title: "t", description: "d", musicURL: "http://m", hqMusicURL: "http://hq", thumbMediaID: "th"),
        .news([.init(title: "a", description: "b", url: "http://u", picurl: "http://p"), .init(title: "c", description: "", url: "", picurl: "")]),
        .transferCustomerService(kfAccount: nil),
        .transferCustomerService(kfAccount: "kf2001@gh"),
    ])
    func everyReplyTypeRoundTrips(content: PassiveReply.Content) throws {
        let reply = PassiveReply(replyingTo: inbound, createTime: 1_700_000_001, content: content)
        let root = try WeChatXML.parse(reply.xml)
        #expect(root[child: "ToUserName"]?.text == "oUser")
        #expect(root[child: "FromUserName"]?.text == "gh_me")
        #expect(root[child: "CreateTime"]?.text == "1700000001")
        #expect(root[child: "MsgType"]?.text == reply.msgType)
        switch content {
        case .text(let t): #expect(root[child: "Content"]?.text == t)
        case .image(let id): #expect(root[child: "Image"]?[child: "MediaId"]?.text == id)
        case .voice(let id): #expect(root[child: "Voice"]?[child: "MediaId"]?.text == id)
        case .video(let id, let t, let d):
            #expect(root[child: "Video"]?[child: "MediaId"]?.text == id)
            #expect(root[child: "Video"]?[child: "Title"]?.text == t)
            #expect(root[child: "Video"]?[child: "Description"]?.text == d)
        case .music(_, _, let url, let hq, let thumb):
            #expect(root[child: "Music"]?[child: "MusicUrl"]?.text == url)
            #expect(root[child: "Music"]?[child: "HQMusicUrl"]?.text == hq)
            #expect(root[child: "Music"]?[child: "ThumbMediaId"]?.text == thumb)
        case .news(let articles):
            #expect(root[child: "ArticleCount"]?.text == String(articles.count))
            let items = root[child: "Articles"]?.children ?? []
            #expect(items.map { $0[child: "Title"]?.text } == articles.map(\.title))
            #expect(items.map { $0[child: "Url"]?.text } == articles.map(\.url))
        case .transferCustomerService(let kf):
            #expect(root[child: "TransInfo"]?[child: "KfAccount"]?.text == kf)
        }
    }

    @Test func encryptedReplyDecryptsToThePlainReply() throws {
        let crypto = WeChatMessageCrypto(appID: SafeModeVector.appID, key: try EncodingAESKey(SafeModeVector.key))
        let reply = PassiveReply(replyingTo: inbound, createTime: 5, content: .text("加密 ]]>"))
        let envelope = try crypto.encryptedReply(reply.xml, token: "tok", timestamp: "5", nonce: "n")
        let encrypted = try #require(try WeChatXML.parse(envelope)[child: "Encrypt"]?.text)
        #expect(try crypto.decrypt(encrypted) == reply.xml)
    }
}

@Suite("API models")
struct APIModelTests {
    func json(_ m: CustomerServiceMessage) throws -> String { String(decoding: try WeChatJSON.encode(m), as: UTF8.self) }

    @Test func textIsNotEscaped() throws {
        let s = try json(.text(to: "oUser", "您好!输入“菜单”查看 http://a/b"))
        #expect(s == #"{"msgtype":"text","text":{"content":"您好!输入“菜单”查看 http://a/b"},"touser":"oUser"}"#)
    }

    @Test(arguments: [
        CustomerServiceMessage.Content.text(content: "hi"),
        .image(mediaID: "m"), .voice(mediaID: "m"), .mpnews(mediaID: "m"),
        .video(mediaID: "m", thumbMediaID: "t", title: "T", description: nil),
        .music(title: "t", description: nil, musicURL: "http://m", hqMusicURL: "http://h", thumbMediaID: "th"),
        .news(articles: [.init(title: "t", description: "d", url: "http://u", picurl: "http://p")]),
        .mpnewsArticle(articleID: "a1"),
        .msgMenu(headContent: "您对本次服务是否满意呢?", list: [.init(id: "101", content: "满意"), .init(id: "102", content: "不满意")], tailContent: "欢迎再次光临"),
        .wxcard(cardID: "c1"),
        .miniProgramPage(title: "t", appID: "wxapp", pagePath: "pages/index", thumbMediaID: "th"),
    ])
    func everyMsgTypeRoundTrips(content: CustomerServiceMessage.Content) throws {
        let m = CustomerServiceMessage(toUser: "oUser", content: content, kfAccount: "kf@gh")
        let bytes = try WeChatJSON.encode(m)
        let object = try #require(try JSONSerialization.jsonObject(with: Data(bytes)) as? [String: Any])
        #expect(object["msgtype"] as? String == content.msgType)
        #expect(object[content.msgType] is [String: Any])
        #expect((object["customservice"] as? [String: Any])?["kf_account"] as? String == "kf@gh")
        #expect(try WeChatJSON.decode(CustomerServiceMessage.self, from: bytes) == m)
    }

    @Test(arguments: [
        (#"{"touser":"o","msgtype":"sticker","sticker":{}}"#, "unknown msgtype"),
        (#"{"touser":"o","msgtype":"text"}"#, "without a 'text' object"),
        (#"{"touser":"o","msgtype":"text","text":{}}"#, "text.content is missing"),
        (#"{"touser":"o","msgtype":"video","video":{"media_id":"m"}}"#, "video.thumb_media_id is missing"),
        (#"{"touser":"o","msgtype":"news","news":{"articles":[]}}"#, "news.articles is missing"),
    ])
    func invalidMessagesAreRejected(json: String, expected: String) {
        #expect {
            try WeChatJSON.decode(CustomerServiceMessage.self, from: Array(json.utf8))
        } throws: { "\($0)".contains(expected) }
    }

    @Test func otherModels() throws {
        let typing = String(decoding: try WeChatJSON.encode(TypingCommand(touser: "o", command: .typing)), as: UTF8.self)
        #expect(typing == #"{"command":"Typing","touser":"o"}"#)
        let stable = String(decoding: try WeChatJSON.encode(StableTokenRequest(appid: "wx1", secret: "s")), as: UTF8.self)
        #expect(stable == #"{"appid":"wx1","force_refresh":false,"grant_type":"client_credential","secret":"s"}"#)
        let token = try WeChatJSON.decode(AccessTokenResponse.self, from: Array(#"{"access_token":"T","expires_in":7200}"#.utf8))
        #expect(token == AccessTokenResponse(accessToken: "T", expiresIn: 7200))
        let ticket = try WeChatJSON.decode(TicketResponse.self, from: Array(#"{"errcode":0,"errmsg":"ok","ticket":"K","expires_in":7200}"#.utf8))
        #expect(ticket.ticket == "K")
        let tpl = TemplateMessage(touser: "o", templateID: "T1", url: "http://x/y", data: ["first": .init("你好", color: "#173177")])
        let tplJSON = String(decoding: try WeChatJSON.encode(tpl), as: UTF8.self)
        #expect(tplJSON == ##"{"data":{"first":{"color":"#173177","value":"你好"}},"template_id":"T1","touser":"o","url":"http://x/y"}"##)
        #expect(try WeChatJSON.decode(TemplateMessage.self, from: Array(tplJSON.utf8)) == tpl)
    }

    @Test func errorCodesAreClassified() {
        let table: [(Int, APIErrorDisposition)] = [
            (0, .success), (-1, .retry), (45011, .retry), (40001, .refreshToken), (40014, .refreshToken), (42001, .refreshToken),
            (43004, .permanent), (45015, .permanent), (45047, .permanent), (40003, .permanent),
            (45009, .alert), (48001, .alert), (40164, .alert), (40013, .alert), (40125, .alert),
        ]
        for (code, disposition) in table { #expect(APIErrorDisposition(errcode: code) == disposition, Comment(rawValue: "errcode \(code)")) }
        let e = try? WeChatJSON.decode(APIErrorResponse.self, from: Array(#"{"errcode":45015,"errmsg":"response out of time limit"}"#.utf8))
        #expect(e?.disposition == .permanent)
    }
}
