/// A passive reply: XML returned in the HTTP response to a push (plain, or
/// wrapped with ``WeChatMessageCrypto/encryptedReply(_:token:timestamp:nonce:random:)``).
///
/// WeChatRelay answers pushes with `success` and replies through the
/// customer-service API; these builders serve handlers that need a passive
/// reply and the simulator.
public struct PassiveReply: Sendable, Equatable {
    public var toUserName: String
    public var fromUserName: String
    public var createTime: Int64
    public var content: Content

    public enum Content: Sendable, Equatable {
        case text(String)
        case image(mediaID: String)
        case voice(mediaID: String)
        case video(mediaID: String, title: String?, description: String?)
        case music(title: String?, description: String?, musicURL: String?, hqMusicURL: String?, thumbMediaID: String)
        case news([Article])
        /// Hands the conversation to human customer service (optionally a given agent).
        case transferCustomerService(kfAccount: String?)
    }

    /// A news item: the same fields as the customer-service API's (`picurl` is `PicUrl` in the XML).
    public typealias Article = CustomerServiceMessage.NewsArticle

    /// - Parameters:
    ///   - toUserName: the user's OpenID (the push's `FromUserName`).
    ///   - fromUserName: our account id (the push's `ToUserName`).
    public init(toUserName: String, fromUserName: String, createTime: Int64, content: Content) {
        self.toUserName = toUserName
        self.fromUserName = fromUserName
        self.createTime = createTime
        self.content = content
    }

    /// The reply to `message`, addressed back to its sender.
    public init(replyingTo message: InboundMessage, createTime: Int64, content: Content) {
        self.init(
            toUserName: message.fromUserName, fromUserName: message.toUserName, createTime: createTime,
            content: content)
    }

    public var msgType: String {
        switch content {
        case .text: return "text"
        case .image: return "image"
        case .voice: return "voice"
        case .video: return "video"
        case .music: return "music"
        case .news: return "news"
        case .transferCustomerService: return "transfer_customer_service"
        }
    }

    /// The reply as XML, every text value in CDATA.
    public var xml: String {
        var x = XMLBuilder()
        x.header(to: toUserName, from: fromUserName, createTime: createTime, msgType: msgType)
        switch content {
        case .text(let text):
            x.cdata("Content", text)
        case .image(let id):
            x.element("Image") { $0.cdata("MediaId", id) }
        case .voice(let id):
            x.element("Voice") { $0.cdata("MediaId", id) }
        case .video(let id, let title, let description):
            x.element("Video") {
                $0.cdata("MediaId", id)
                if let title { $0.cdata("Title", title) }
                if let description { $0.cdata("Description", description) }
            }
        case .music(let title, let description, let url, let hq, let thumb):
            x.element("Music") {
                if let title { $0.cdata("Title", title) }
                if let description { $0.cdata("Description", description) }
                if let url { $0.cdata("MusicUrl", url) }
                if let hq { $0.cdata("HQMusicUrl", hq) }
                $0.cdata("ThumbMediaId", thumb)
            }
        case .news(let articles):
            x.raw("ArticleCount", String(articles.count))
            x.element("Articles") { a in
                for article in articles {
                    a.element("item") {
                        $0.cdata("Title", article.title)
                        $0.cdata("Description", article.description)
                        $0.cdata("PicUrl", article.picurl)
                        $0.cdata("Url", article.url)
                    }
                }
            }
        case .transferCustomerService(let kf):
            if let kf { x.element("TransInfo") { $0.cdata("KfAccount", kf) } }
        }
        return x.finish()
    }
}
