// relay-fuzz: coverage-guided fuzz targets for everything the ingress parses.
//
// Built by `ops/fuzz` with libFuzzer (`swift build --sanitize=fuzzer -Xswiftc -DFUZZING`); the
// target is chosen with FUZZ_TARGET=query|xml|decrypt|inbound. Without FUZZING (the normal
// build), it runs the files or folders named on the command line through the same target,
// which is how `ops/test` replays the corpus in Fuzz/corpus.
import Foundation
import HummingbirdCore
import WeChat

enum FuzzTarget: String, CaseIterable {
    case query, xml, decrypt, inbound

    static let current: FuzzTarget = {
        let name = ProcessInfo.processInfo.environment["FUZZ_TARGET"] ?? ""
        guard let t = FuzzTarget(rawValue: name) else {
            FileHandle.standardError.write(Data("FUZZ_TARGET must be one of \(allCases.map(\.rawValue))\n".utf8))
            exit(2)
        }
        return t
    }()

    static let token = "pamtest"
    static let crypto = WeChatMessageCrypto(
        appID: "wxb11529c136998cb6", key: (try? EncodingAESKey("abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG"))!)

    func run(_ bytes: [UInt8]) {
        switch self {
        case .query:
            // The ingress's path: Hummingbird parses the query, then the signature (first) and the window.
            let uri = URI("/wechat?" + String(decoding: bytes, as: UTF8.self))
            let params = uri.queryParameters
            func get(_ name: Substring) -> String? { params[name].map(String.init) }
            _ = try? WeChatSignature.verifyPush(
                signature: get("signature"), timestamp: get("timestamp"), nonce: get("nonce"),
                tokens: [Self.token, "previous"], now: 1_700_000_000, window: 300)
            // Also with a correct signature over whatever timestamp and nonce came in, so the
            // window check sees every timestamp string, not only those behind a lucky signature.
            let ts = get("timestamp") ?? "", nonce = get("nonce") ?? ""
            _ = try? WeChatSignature.verifyPush(
                signature: WeChatSignature.signature(token: Self.token, timestamp: ts, nonce: nonce), timestamp: ts, nonce: nonce,
                tokens: [Self.token], now: 1_700_000_000, window: 300)
        case .xml:
            _ = try? WeChatXML.parse(bytes, limits: XMLLimits(maxBytes: 65536))
        case .decrypt:
            let text = String(decoding: bytes, as: UTF8.self)
            if let plain = try? Self.crypto.decrypt(text) { _ = try? InboundMessage(xml: plain) }
            _ = WeChatSignature.verify(text, parts: [Self.token, "1", "2", text])
        case .inbound:
            if let m = try? InboundMessage(xml: bytes, limits: XMLLimits(maxBytes: 65536)) {
                _ = m.dedupKey
                _ = m.dedupID
                _ = m.kind
            }
        }
    }
}

@_cdecl("LLVMFuzzerTestOneInput")
public func relayFuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    FuzzTarget.current.run(Array(UnsafeBufferPointer(start: data, count: size)))
    return 0
}

#if !FUZZING
/// Replay mode (the normal build): every file named, or every file in the folders named.
/// Under libFuzzer (`-DFUZZING`) there is no `@main`: libFuzzer's own `main` drives the target.
@main
struct Replay {
    static func main() {
        var files: [String] = []
        for arg in CommandLine.arguments.dropFirst() {
            var isDirectory: ObjCBool = false
            guard FileManager.default.fileExists(atPath: arg, isDirectory: &isDirectory) else { continue }
            if isDirectory.boolValue {
                let names = (try? FileManager.default.contentsOfDirectory(atPath: arg)) ?? []
                files += names.sorted().map { "\(arg)/\($0)" }
            } else {
                files.append(arg)
            }
        }
        for f in files {
            guard let data = FileManager.default.contents(atPath: f) else { continue }
            FuzzTarget.current.run(Array(data))
        }
        print("\(FuzzTarget.current.rawValue): replayed \(files.count) inputs")
    }
}
#endif
