import Foundation
import Hummingbird
import HummingbirdTesting
import Logging
import NIOCore
import Simulator
import Synchronization
import Testing
import WeChat

/// A clock the tests move by hand.
final class ManualClock: Sendable {
    private let time = Mutex(Date(timeIntervalSince1970: 1_700_000_000))
    var now: Date { time.withLock { $0 } }
    func advance(_ seconds: Double) { time.withLock { $0 = $0.addingTimeInterval(seconds) } }
}

struct Fixture {
    let clock = ManualClock()
    let platform: FakePlatform
    let app: Application<RouterResponder<BasicRequestContext>>

    init(lifetime: Int = 7200, overlap: Int = 300) {
        var settings = FakePlatform.Settings(appID: "wx_sim", secret: "s3cret")
        settings.tokenLifetime = .seconds(lifetime)
        settings.overlap = .seconds(overlap)
        let clock = self.clock
        platform = FakePlatform(settings: settings, now: { clock.now })
        app = Application(router: FakeAPI(platform: platform, logger: Logger(label: "sim-test")).router())
    }
}

struct Answer: Decodable {
    var errcode: Int?
    var errmsg: String?
    var access_token: String?
    var expires_in: Int?
    var ticket: String?
}

extension TestClientProtocol {
    func call(_ uri: String, _ method: HTTPRequest.Method = .get, _ body: String? = nil) async throws -> Answer {
        let r = try await execute(uri: uri, method: method, body: body.map { ByteBuffer(string: $0) })
        #expect(r.status == .ok)
        return try JSONDecoder().decode(Answer.self, from: Data(r.body.readableBytesView))
    }

    func token() async throws -> String {
        try #require(try await call("/cgi-bin/token?grant_type=client_credential&appid=wx_sim&secret=s3cret").access_token)
    }

    func send(_ token: String, _ json: String) async throws -> Int {
        try #require(try await call("/cgi-bin/message/custom/send?access_token=\(token)", .post, json).errcode)
    }
}

func text(_ user: String, _ content: String) -> String {
    #"{"touser":"\#(user)","msgtype":"text","text":{"content":"\#(content)"}}"#
}

@Suite("Fake WeChat API")
struct FakeAPITests {
    @Test func credentialsAreChecked() async throws {
        let f = Fixture()
        try await f.app.test(.router) { c in
            #expect(try await c.call("/cgi-bin/token?grant_type=client_credential&appid=wx_other&secret=s3cret").errcode == 40013)
            #expect(try await c.call("/cgi-bin/token?grant_type=client_credential&appid=wx_sim&secret=wrong").errcode == 40125)
            #expect(try await c.call("/cgi-bin/token?grant_type=password&appid=wx_sim&secret=s3cret").errcode == 40002)
            let ok = try await c.call("/cgi-bin/token?grant_type=client_credential&appid=wx_sim&secret=s3cret")
            #expect(ok.access_token?.count ?? 0 >= 64 && ok.expires_in == 7200 && ok.errcode == nil)
        }
    }

    @Test func tokenLifecycleWithOverlap() async throws {
        let f = Fixture(lifetime: 7200, overlap: 300)
        f.platform.userPushed(openID: "oA", msgType: "text", event: nil)
        try await f.app.test(.router) { c in
            let first = try await c.token()
            #expect(try await c.send(first, text("oA", "1")) == 0)
            let second = try await c.token()
            #expect(second != first)
            // Both work during the overlap…
            f.clock.advance(299)
            #expect(try await c.send(first, text("oA", "2")) == 0)
            #expect(try await c.send(second, text("oA", "3")) == 0)
            // …then the old one is invalid (40001) and the new one still works.
            f.clock.advance(2)
            #expect(try await c.send(first, text("oA", "4")) == 40001)
            #expect(try await c.send(second, text("oA", "4")) == 0)
            // A token never issued is 40014, a missing one 41001, an expired one 42001.
            #expect(try await c.send("made-up", text("oA", "x")) == 40014)
            #expect(try await c.call("/cgi-bin/message/custom/send", .post, text("oA", "x")).errcode == 41001)
            f.clock.advance(7200)
            #expect(try await c.send(second, text("oA", "x")) == 42001)
        }
        #expect(f.platform.tokenCalls.token == 2)
    }

    @Test func stableTokenIsStableUntilForced() async throws {
        let f = Fixture()
        try await f.app.test(.router) { c in
            let body = #"{"grant_type":"client_credential","appid":"wx_sim","secret":"s3cret","force_refresh":false}"#
            let a = try #require(try await c.call("/cgi-bin/stable_token", .post, body).access_token)
            let b = try #require(try await c.call("/cgi-bin/stable_token", .post, body).access_token)
            #expect(a == b)
            // Renewed in its last five minutes.
            f.clock.advance(7200 - 299)
            let renewed = try #require(try await c.call("/cgi-bin/stable_token", .post, body).access_token)
            #expect(renewed != a)
            let forced = try #require(
                try await c.call("/cgi-bin/stable_token", .post, body.replacingOccurrences(of: "false", with: "true")).access_token)
            #expect(forced != renewed)
            // The forced refresh invalidated the previous stable token at once.
            #expect(try await c.call("/cgi-bin/ticket/getticket?type=jsapi&access_token=\(renewed)").errcode == 40014)
            let ticket = try await c.call("/cgi-bin/ticket/getticket?type=jsapi&access_token=\(forced)")
            #expect(ticket.errcode == 0 && ticket.ticket != nil && ticket.expires_in == 7200)
            #expect(try await c.call("/cgi-bin/stable_token", .post, "not json").errcode == 47001)
            #expect(try await c.call("/cgi-bin/stable_token", .post, body.replacingOccurrences(of: "s3cret", with: "x")).errcode == 40125)
        }
    }

    @Test func windowAndQuotaFollowThePushes() async throws {
        let f = Fixture()
        try await f.app.test(.router) { c in
            var t = try await c.token()
            // Never pushed: outside the window.
            #expect(try await c.send(t, text("oNew", "hi")) == 45015)
            // After a message: five in 48 hours, then 45047.
            f.platform.userPushed(openID: "oMsg", msgType: "text", event: nil)
            for i in 0..<5 { #expect(try await c.send(t, text("oMsg", "\(i)")) == 0) }
            #expect(try await c.send(t, text("oMsg", "6th")) == 45047)
            // A new message opens a new window.
            f.platform.userPushed(openID: "oMsg", msgType: "text", event: nil)
            #expect(try await c.send(t, text("oMsg", "again")) == 0)
            f.clock.advance(48 * 3600)
            t = try await c.token()  // the old token expired with the clock
            #expect(try await c.send(t, text("oMsg", "too late")) == 45015)
            // After a follow: three within a minute.
            f.platform.userPushed(openID: "oFollow", msgType: "event", event: "subscribe")
            for _ in 0..<3 { #expect(try await c.send(t, text("oFollow", "welcome")) == 0) }
            #expect(try await c.send(t, text("oFollow", "4th")) == 45047)
            f.platform.userPushed(openID: "oFollow2", msgType: "event", event: "CLICK")
            f.clock.advance(61)
            t = try await c.token()
            #expect(try await c.send(t, text("oFollow2", "late")) == 45015)
            // Unsubscribed: 43004.
            f.platform.userPushed(openID: "oGone", msgType: "text", event: nil)
            f.platform.userPushed(openID: "oGone", msgType: "event", event: "unsubscribe")
            #expect(try await c.send(t, text("oGone", "bye")) == 43004)
            // Over HTTP, as `wechat-sim send` in another process reports pushes.
            let r = try await c.execute(uri: "/sim/users/oRemote/pushed?msgtype=text", method: .post)
            #expect(r.status == .ok)
            #expect(try await c.send(t, text("oRemote", "hi")) == 0)
        }
        // Only accepted messages are recorded, in order.
        let recorded = f.platform.messages(touser: "oMsg")
        #expect(recorded.map(\.content) == ["0", "1", "2", "3", "4", "again"])
        #expect(recorded.map(\.seq) == recorded.map(\.seq).sorted())
    }

    @Test func messagesAreValidated() async throws {
        let f = Fixture()
        f.platform.userPushed(openID: "oV", msgType: "text", event: nil)
        try await f.app.test(.router) { c in
            let t = try await c.token()
            #expect(try await c.send(t, #"{"touser":"oV","msgtype":"sticker","sticker":{}}"#) == 40008)
            #expect(try await c.send(t, #"{"touser":"oV","msgtype":"text","text":{}}"#) == 44002)
            #expect(try await c.send(t, #"{"touser":"oV","msgtype":"image"}"#) == 44002)
            #expect(try await c.send(t, "{not json") == 47001)
            #expect(try await c.call("/cgi-bin/message/custom/send?access_token=\(t)", .post).errcode == 44002)
            let twoArticles = #"{"touser":"oV","msgtype":"news","news":{"articles":[{"title":"a","description":"","url":"u","picurl":"p"},{"title":"b","description":"","url":"u","picurl":"p"}]}}"#
            #expect(try await c.send(t, twoArticles) == 45008)
            let oneArticle = #"{"touser":"oV","msgtype":"news","news":{"articles":[{"title":"a","description":"","url":"u","picurl":"p"}]}}"#
            #expect(try await c.send(t, oneArticle) == 0)
            #expect(try await c.send(t, #"{"touser":"oV","msgtype":"image","image":{"media_id":"M"}}"#) == 0)
            // Typing, template and menu.
            #expect(try await c.call("/cgi-bin/message/custom/typing?access_token=\(t)", .post, #"{"touser":"oV","command":"Typing"}"#).errcode == 0)
            #expect(try await c.call("/cgi-bin/message/custom/typing?access_token=\(t)", .post, #"{"touser":"oV","command":"Dance"}"#).errcode == 47001)
            #expect(try await c.call("/cgi-bin/message/template/send?access_token=\(t)", .post, #"{"touser":"oV","template_id":"T","data":{}}"#).errcode == 0)
            #expect(try await c.call("/cgi-bin/message/template/send?access_token=\(t)", .post, #"{"touser":"oV","template_id":"","data":{}}"#).errcode == 40037)
            #expect(try await c.call("/cgi-bin/menu/get?access_token=\(t)").errcode == 46003)
            #expect(try await c.call("/cgi-bin/menu/create?access_token=\(t)", .post, #"{"button":[]}"#).errcode == 40016)
            #expect(try await c.call("/cgi-bin/menu/create?access_token=\(t)", .post, #"{"button":[{"type":"click","name":"帮助","key":"HELP"}]}"#).errcode == 0)
            let menu = try await c.execute(uri: "/cgi-bin/menu/get?access_token=\(t)", method: .get)
            #expect(String(buffer: menu.body).contains("HELP"))
            #expect(try await c.call("/cgi-bin/menu/delete?access_token=\(t)").errcode == 0)
            #expect(try await c.call("/cgi-bin/menu/get?access_token=\(t)").errcode == 46003)
            // Inspection over HTTP, then clearing.
            let listed = try await c.execute(uri: "/sim/messages?touser=oV", method: .get)
            let recorded = try JSONDecoder().decode([FakePlatform.Recorded].self, from: Data(listed.body.readableBytesView))
            #expect(recorded.map(\.api) == ["custom", "custom", "typing", "template"])
            #expect(recorded.first?.msgtype == "news")
            #expect(try await c.execute(uri: "/sim/messages", method: .delete).status == .ok)
        }
        #expect(f.platform.messages().isEmpty)
    }

    @Test func faultsAreInjected() async throws {
        let f = Fixture()
        f.platform.userPushed(openID: "oF", msgType: "text", event: nil)
        try await f.app.test(.router) { c in
            let t = try await c.token()
            let set = try await c.execute(
                uri: "/sim/faults", method: .post, body: ByteBuffer(string: #"{"errorRate":1,"latencyMs":0,"dropRate":0,"expireTokens":false,"quotaExhausted":false}"#))
            #expect(set.status == .ok)
            #expect(try await c.send(t, text("oF", "x")) == -1)
            f.platform.faults = FakePlatform.Faults()
            var faults = FakePlatform.Faults()
            faults.expireTokens = true
            f.platform.faults = faults
            #expect(try await c.send(t, text("oF", "x")) == 42001)
            faults = FakePlatform.Faults()
            faults.quotaExhausted = true
            f.platform.faults = faults
            #expect(try await c.send(t, text("oF", "x")) == 45009)
            f.platform.faults = FakePlatform.Faults()
            #expect(try await c.send(t, text("oF", "x")) == 0)
            #expect(try await c.execute(uri: "/sim/faults", method: .post, body: ByteBuffer(string: "{")).status == .badRequest)
            // Partial JSON sets just those faults; failNext runs out by itself.
            #expect(try await c.execute(uri: "/sim/faults", method: .post, body: ByteBuffer(string: #"{"failNextWith":-1,"failNextCount":2}"#)).status == .ok)
            #expect(try await c.send(t, text("oF", "a")) == -1)
            #expect(try await c.send(t, text("oF", "b")) == -1)
            #expect(try await c.send(t, text("oF", "c")) == 0)
            // Refusals by the send rules are counted by errcode (the bench reports them).
            #expect(f.platform.refusals == [45009: 1, -1: 2])
        }
    }
}
