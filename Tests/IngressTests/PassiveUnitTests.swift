import Ingress
import RelayCore
import Testing

/// The passive-reply handshake's pieces that need no broker.
@Suite("Passive replies: rendezvous and settings")
struct PassiveUnitTests {
    @Test func aValueHandedOverBeforeTheWaitIsReturnedAtOnce() async {
        let r = Rendezvous<Int>()
        r.open("a")
        #expect(r.put(1, for: "a"))
        #expect(!r.put(2, for: "a"))  // one value per slot
        #expect(await r.wait("a", for: .seconds(30)) == 1)
    }

    @Test func aWaitingTaskGetsTheValue() async {
        let r = Rendezvous<Int>()
        r.open("a")
        async let got = r.wait("a", for: .seconds(30))
        // Keeps handing over until the slot accepts (it accepts before and during the wait alike).
        #expect(r.put(7, for: "a"))
        #expect(await got == 7)
    }

    @Test func theDeadlineClosesTheSlotForGood() async {
        let r = Rendezvous<Int>()
        r.open("a")
        #expect(await r.wait("a", for: .milliseconds(10)) == nil)
        #expect(!r.put(1, for: "a"))  // too late: refused, so the sender learns it was declined
        #expect(!r.put(1, for: "never-opened"))
    }

    @Test func aCancelledWaitClosesTheSlot() async {
        let r = Rendezvous<Int>()
        r.open("a")
        let waiting = Task { await r.wait("a", for: .seconds(600)) }
        waiting.cancel()
        #expect(await waiting.value == nil)
        #expect(!r.put(1, for: "a"))
    }

    @Test func closingReturnsAValueAlreadyAccepted() {
        let r = Rendezvous<Int>()
        r.open("a")
        r.open("b")
        #expect(r.put(3, for: "a"))
        #expect(r.close("a") == 3)
        #expect(r.close("b") == nil)
        #expect(!r.put(4, for: "b"))
    }

    @Test(arguments: [("", 0), ("0", 0), ("4", 4_000), ("4.5", 4_500), ("2.25", 2_250), ("0.001", 1), ("15", 15_000)])
    func replyWaitIsParsed(text: String, ms: Int64) throws {
        let env = RelayEnvironment(["WECHAT_APPID": "wx1", "WECHAT_TOKEN": "t", "INGRESS_REPLY_WAIT": text])
        #expect(try IngressConfiguration(env).replyWait == .milliseconds(ms))
    }

    @Test(arguments: ["-1", "16", "15.1", "1.2345", "abc", "+3", "1.", ".5", "１", "99999999999999999999"])
    func aBadReplyWaitNamesTheVariable(text: String) {
        let env = RelayEnvironment(["WECHAT_APPID": "wx1", "WECHAT_TOKEN": "t", "INGRESS_REPLY_WAIT": text])
        #expect { try IngressConfiguration(env) } throws: { ($0 as? ConfigurationError)?.variable == "INGRESS_REPLY_WAIT" }
    }
}
