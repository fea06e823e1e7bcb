import Glibc

/// The supervisor's own output. Written with `write(2)`, whose errors are ignored: when the
/// reader of a pipe is gone (`ops/dev | tee log`, Ctrl-C kills `tee` too) the stop must still
/// run to its end (SIGPIPE is ignored, so a write just fails with EPIPE).
enum Console {
    /// A status line on standard error, prefixed `ops/dev:` (the command users run).
    static func say(_ line: String) { write(2, "ops/dev: \(line)\n") }

    /// Text on standard output (the banner).
    static func show(_ text: String) { write(1, text) }

    private static func write(_ fd: Int32, _ text: String) {
        var bytes = Array(text.utf8)[...]
        while !bytes.isEmpty {
            let n = bytes.withUnsafeBytes { Glibc.write(fd, $0.baseAddress, $0.count) }
            if n < 0, errno == EINTR { continue }
            if n <= 0 { return }
            bytes = bytes.dropFirst(n)
        }
    }
}

/// Whether nothing listens on (or holds) `port` on 127.0.0.1 now.
func portIsFree(_ port: Int) -> Bool {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    guard fd >= 0 else { return false }
    defer { close(fd) }
    var address = sockaddr_in()
    address.sin_family = sa_family_t(AF_INET)
    address.sin_port = in_port_t(UInt16(truncatingIfNeeded: port)).bigEndian
    address.sin_addr.s_addr = inet_addr("127.0.0.1")
    return withUnsafePointer(to: &address) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) == 0 }
    }
}
