import Foundation

/// JSON as WeChat's API wants it: UTF-8, Chinese not `\u`-escaped, slashes not escaped.
public enum WeChatJSON {
    public static func encoder() -> JSONEncoder {
        let e = JSONEncoder()
        e.outputFormatting = [.withoutEscapingSlashes, .sortedKeys]
        return e
    }

    public static func encode<T: Encodable>(_ value: T) throws -> [UInt8] {
        Array(try encoder().encode(value))
    }

    public static func decode<T: Decodable>(_ type: T.Type, from bytes: some DataProtocol) throws -> T {
        try JSONDecoder().decode(type, from: Data(bytes))
    }
}

// MARK: - Customer-service messages (protocol page §7)

/// A customer-service message for `POST /cgi-bin/message/custom/send`.
public struct CustomerServiceMessage: Codable, Sendable, Equatable {
    public var toUser: String
    public var content: Content
    /// Sends as this customer-service account (`customservice.kf_account`).
    public var kfAccount: String?

    public enum Content: Sendable, Equatable {
        case text(content: String)
        case image(mediaID: String)
        case voice(mediaID: String)
        case video(mediaID: String, thumbMediaID: String, title: String?, description: String?)
        case music(title: String?, description: String?, musicURL: String, hqMusicURL: String, thumbMediaID: String)
        /// One article (WeChat allows only one for customer-service news).
        case news(articles: [NewsArticle])
        case mpnews(mediaID: String)
        case mpnewsArticle(articleID: String)
        case msgMenu(headContent: String, list: [MenuItem], tailContent: String)
        case wxcard(cardID: String)
        case miniProgramPage(title: String, appID: String, pagePath: String, thumbMediaID: String)

        public var msgType: String {
            switch self {
            case .text: return "text"
            case .image: return "image"
            case .voice: return "voice"
            case .video: return "video"
            case .music: return "music"
            case .news: return "news"
            case .mpnews: return "mpnews"
            case .mpnewsArticle: return "mpnewsarticle"
            case .msgMenu: return "msgmenu"
            case .wxcard: return "wxcard"
            case .miniProgramPage: return "miniprogrampage"
            }
        }
    }

    public struct NewsArticle: Codable, Sendable, Equatable {
        public var title: String
        public var description: String
        public var url: String
        public var picurl: String

        public init(title: String, description: String, url: String, picurl: String) {
            self.title = title
            self.description = description
            self.url = url
            self.picurl = picurl
        }
    }

    public struct MenuItem: Codable, Sendable, Equatable {
        public var id: String
        public var content: String

        public init(id: String, content: String) {
            self.id = id
            self.content = content
        }
    }

    public init(toUser: String, content: Content, kfAccount: String? = nil) {
        self.toUser = toUser
        self.content = content
        self.kfAccount = kfAccount
    }

    public static func text(to user: String, _ text: String) -> CustomerServiceMessage {
        CustomerServiceMessage(toUser: user, content: .text(content: text))
    }

    private enum Keys: String, CodingKey {
        case touser, msgtype, customservice
        case text, image, voice, video, music, news, mpnews, mpnewsarticle, msgmenu, wxcard, miniprogrampage
    }

    private struct Fields: Codable, Equatable {
        var content: String?
        var media_id: String?
        var thumb_media_id: String?
        var title: String?
        var description: String?
        var musicurl: String?
        var hqmusicurl: String?
        var articles: [NewsArticle]?
        var article_id: String?
        var head_content: String?
        var list: [MenuItem]?
        var tail_content: String?
        var card_id: String?
        var appid: String?
        var pagepath: String?
    }

    private struct CustomService: Codable { var kf_account: String }

    /// A message whose JSON is not a valid customer-service message.
    public struct InvalidMessage: Error, Sendable, CustomStringConvertible {
        public var description: String
    }

    public func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: Keys.self)
        try c.encode(toUser, forKey: .touser)
        try c.encode(content.msgType, forKey: .msgtype)
        var f = Fields()
        switch content {
        case .text(let text): f.content = text
        case .image(let id), .voice(let id), .mpnews(let id): f.media_id = id
        case .video(let id, let thumb, let title, let description):
            f.media_id = id; f.thumb_media_id = thumb; f.title = title; f.description = description
        case .music(let title, let description, let url, let hq, let thumb):
            f.title = title; f.description = description; f.musicurl = url; f.hqmusicurl = hq; f.thumb_media_id = thumb
        case .news(let articles): f.articles = articles
        case .mpnewsArticle(let id): f.article_id = id
        case .msgMenu(let head, let list, let tail): f.head_content = head; f.list = list; f.tail_content = tail
        case .wxcard(let id): f.card_id = id
        case .miniProgramPage(let title, let appid, let path, let thumb):
            f.title = title; f.appid = appid; f.pagepath = path; f.thumb_media_id = thumb
        }
        guard let key = Keys(rawValue: content.msgType) else { return }
        try c.encode(f, forKey: key)
        if let kfAccount { try c.encode(CustomService(kf_account: kfAccount), forKey: .customservice) }
    }

    /// Decodes and validates: an unknown `msgtype` or a missing required field throws ``InvalidMessage``.
    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: Keys.self)
        toUser = try c.decode(String.self, forKey: .touser)
        let type = try c.decode(String.self, forKey: .msgtype)
        kfAccount = try c.decodeIfPresent(CustomService.self, forKey: .customservice)?.kf_account
        guard let key = Keys(rawValue: type), ![.touser, .msgtype, .customservice].contains(key) else {
            throw InvalidMessage(description: "unknown msgtype '\(type)'")
        }
        guard let f = try c.decodeIfPresent(Fields.self, forKey: key) else {
            throw InvalidMessage(description: "msgtype '\(type)' without a '\(type)' object")
        }
        func need(_ v: String?, _ name: String) throws -> String {
            guard let v, !v.isEmpty else { throw InvalidMessage(description: "\(type).\(name) is missing") }
            return v
        }
        switch type {
        case "text": content = .text(content: try need(f.content, "content"))
        case "image": content = .image(mediaID: try need(f.media_id, "media_id"))
        case "voice": content = .voice(mediaID: try need(f.media_id, "media_id"))
        case "mpnews": content = .mpnews(mediaID: try need(f.media_id, "media_id"))
        case "video":
            content = .video(
                mediaID: try need(f.media_id, "media_id"), thumbMediaID: try need(f.thumb_media_id, "thumb_media_id"),
                title: f.title, description: f.description)
        case "music":
            content = .music(
                title: f.title, description: f.description, musicURL: try need(f.musicurl, "musicurl"),
                hqMusicURL: try need(f.hqmusicurl, "hqmusicurl"),
                thumbMediaID: try need(f.thumb_media_id, "thumb_media_id"))
        case "news":
            guard let articles = f.articles, !articles.isEmpty else {
                throw InvalidMessage(description: "news.articles is missing")
            }
            content = .news(articles: articles)
        case "mpnewsarticle": content = .mpnewsArticle(articleID: try need(f.article_id, "article_id"))
        case "msgmenu":
            guard let list = f.list, !list.isEmpty else { throw InvalidMessage(description: "msgmenu.list is missing") }
            content = .msgMenu(headContent: f.head_content ?? "", list: list, tailContent: f.tail_content ?? "")
        case "wxcard": content = .wxcard(cardID: try need(f.card_id, "card_id"))
        default:  // miniprogrampage
            content = .miniProgramPage(
                title: try need(f.title, "title"), appID: try need(f.appid, "appid"),
                pagePath: try need(f.pagepath, "pagepath"), thumbMediaID: try need(f.thumb_media_id, "thumb_media_id"))
        }
    }
}

/// `POST /cgi-bin/message/custom/typing`.
public struct TypingCommand: Codable, Sendable, Equatable {
    public enum Command: String, Codable, Sendable { case typing = "Typing", cancelTyping = "CancelTyping" }
    public var touser: String
    public var command: Command

    public init(touser: String, command: Command) {
        self.touser = touser
        self.command = command
    }
}

/// `POST /cgi-bin/message/template/send`.
public struct TemplateMessage: Codable, Sendable, Equatable {
    public struct MiniProgram: Codable, Sendable, Equatable {
        public var appid: String
        public var pagepath: String?
        public init(appid: String, pagepath: String? = nil) {
            self.appid = appid
            self.pagepath = pagepath
        }
    }

    public struct Value: Codable, Sendable, Equatable {
        public var value: String
        public var color: String?
        public init(_ value: String, color: String? = nil) {
            self.value = value
            self.color = color
        }
    }

    public var touser: String
    public var templateID: String
    public var url: String?
    public var miniprogram: MiniProgram?
    public var data: [String: Value]

    enum CodingKeys: String, CodingKey {
        case touser, templateID = "template_id", url, miniprogram, data
    }

    public init(touser: String, templateID: String, url: String? = nil, miniprogram: MiniProgram? = nil, data: [String: Value]) {
        self.touser = touser
        self.templateID = templateID
        self.url = url
        self.miniprogram = miniprogram
        self.data = data
    }
}

// MARK: - Tokens and tickets (protocol page §6)

/// The answer of `/cgi-bin/token` and `/cgi-bin/stable_token`.
public struct AccessTokenResponse: Codable, Sendable, Equatable {
    public var accessToken: String
    public var expiresIn: Int

    enum CodingKeys: String, CodingKey { case accessToken = "access_token", expiresIn = "expires_in" }

    public init(accessToken: String, expiresIn: Int) {
        self.accessToken = accessToken
        self.expiresIn = expiresIn
    }
}

/// The body of `POST /cgi-bin/stable_token`.
public struct StableTokenRequest: Codable, Sendable, Equatable {
    public var grantType: String
    public var appid: String
    public var secret: String
    public var forceRefresh: Bool

    enum CodingKeys: String, CodingKey {
        case grantType = "grant_type", appid, secret, forceRefresh = "force_refresh"
    }

    public init(appid: String, secret: String, forceRefresh: Bool = false) {
        self.grantType = "client_credential"
        self.appid = appid
        self.secret = secret
        self.forceRefresh = forceRefresh
    }
}

/// The answer of `/cgi-bin/ticket/getticket?type=jsapi`.
public struct TicketResponse: Codable, Sendable, Equatable {
    public var errcode: Int
    public var errmsg: String
    public var ticket: String
    public var expiresIn: Int

    enum CodingKeys: String, CodingKey { case errcode, errmsg, ticket, expiresIn = "expires_in" }

    public init(ticket: String, expiresIn: Int) {
        self.errcode = 0
        self.errmsg = "ok"
        self.ticket = ticket
        self.expiresIn = expiresIn
    }
}

// MARK: - Errors (protocol page §8)

/// WeChat's error envelope `{"errcode": …, "errmsg": "…"}`.
public struct APIErrorResponse: Codable, Sendable, Equatable, Error {
    public var errcode: Int
    public var errmsg: String

    public init(errcode: Int, errmsg: String) {
        self.errcode = errcode
        self.errmsg = errmsg
    }

    public var disposition: APIErrorDisposition { APIErrorDisposition(errcode: errcode) }
}

/// What a caller should do about an API error code.
public enum APIErrorDisposition: String, Sendable, Equatable {
    /// 0: done.
    case success
    /// -1 (system busy), 45011 (frequency limit): retry with backoff.
    case retry
    /// 40001, 40014, 42001: the access_token is invalid or expired — compare-and-refresh, retry once.
    case refreshToken
    /// 43004, 45015, 45047 and other request-specific errors: this message will never succeed.
    case permanent
    /// 40013, 40125, 40164, 45009, 48001: configuration or quota problems — stop and alert an operator.
    case alert

    public init(errcode: Int) {
        switch errcode {
        case 0: self = .success
        case -1, 45011: self = .retry
        case 40001, 40014, 42001: self = .refreshToken
        case 40013, 40125, 40164, 45009, 48001: self = .alert
        default: self = .permanent
        }
    }
}

/// The error codes WeChatRelay handles by name.
public enum WeChatErrorCode {
    public static let systemBusy = -1
    public static let invalidCredential = 40001
    public static let invalidAppID = 40013
    public static let invalidAccessToken = 40014
    public static let invalidAppSecret = 40125
    public static let ipNotWhitelisted = 40164
    public static let accessTokenExpired = 42001
    public static let userNotSubscribed = 43004
    public static let dailyQuotaExceeded = 45009
    public static let apiFrequencyLimit = 45011
    public static let outsideWindow = 45015
    public static let customerServiceCountExhausted = 45047
    public static let apiUnauthorized = 48001
    public static let invalidMsgType = 40008
    public static let invalidParameter = 44002
    public static let articleLimitExceeded = 45008
}
