/// The one error type of the WeChat protocol module.
///
/// Codes follow the official sample library's -40001…-40011 where one applies
/// (``Code/officialCode``); a few are finer-grained so that callers and tests can
/// tell causes apart (bad padding and a bad length field are both "decrypt
/// failed" to WeChat's library).
public struct WeChatError: Error, Sendable, Equatable, CustomStringConvertible {
    public enum Code: String, Sendable, Equatable {
        /// -40001: `signature` or `msg_signature` does not match.
        case validateSignature
        /// -40001 as well: the request's timestamp is outside the accepted window.
        case timestampOutOfWindow
        /// -40002: the XML is malformed, truncated, too deep or too large.
        case parseXML
        /// -40002 as well: the XML contains a DTD or an entity declaration (never processed).
        case forbiddenXML
        /// -40002 as well: a required element (ToUserName, FromUserName, CreateTime, MsgType) is missing or invalid.
        case missingField
        /// -40004: the EncodingAESKey is not 43 characters of Base64.
        case illegalAESKey
        /// -40005: the appid at the end of the decrypted frame is not ours.
        case validateAppID
        /// -40006: encryption failed.
        case encryptAES
        /// -40007: the ciphertext is empty or not a whole number of AES blocks.
        case decryptAES
        /// -40007 as well: PKCS#7 padding (to 32 bytes) is invalid — typically a wrong key.
        case invalidPadding
        /// -40008: the frame's length field does not fit the decrypted buffer.
        case illegalBuffer
        /// -40010: the ciphertext is not valid Base64.
        case decodeBase64
        /// -40011: building reply XML failed.
        case generateXML

        /// The matching error code of WeChat's official sample library.
        public var officialCode: Int {
            switch self {
            case .validateSignature, .timestampOutOfWindow: return -40001
            case .parseXML, .forbiddenXML, .missingField: return -40002
            case .illegalAESKey: return -40004
            case .validateAppID: return -40005
            case .encryptAES: return -40006
            case .decryptAES, .invalidPadding: return -40007
            case .illegalBuffer: return -40008
            case .decodeBase64: return -40010
            case .generateXML: return -40011
            }
        }
    }

    public var code: Code
    /// What exactly is wrong; never contains keys, tokens or message bodies.
    public var message: String

    public init(_ code: Code, _ message: String) {
        self.code = code
        self.message = message
    }

    public var description: String { "WeChatError.\(code.rawValue)(\(code.officialCode)): \(message)" }
}
