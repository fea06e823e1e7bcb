import Crypto
import Foundation
import WeChat

func sha1Hex(_ s: String) -> String {
    Insecure.SHA1.hash(data: Array(s.utf8)).map { String(format: "%02x", $0) }.joined()
}

/// The text of a field of a pushed message built by the tests.
func pushXML(_ fields: [(String, String)], cdata: Bool = true) -> String {
    var x = XMLBuilder()
    for (k, v) in fields {
        if cdata { x.cdata(k, v) } else { x.raw(k, v) }
    }
    return x.finish()
}
