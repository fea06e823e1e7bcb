import Foundation
import Glibc
import Synchronization

/// A TCP proxy on loopback in front of a broker, for fault tests: it reads the AMQP frames
/// the client sends and can cut the connection (both directions, at once) just before
/// forwarding a given method — after login, during `confirm.select`, a declaration or a
/// re-subscribe — or cut every connection on demand.
///
/// Each client connection gets two threads of its own (blocking sockets); the proxy is for
/// tests only and handles a few hundred connections in a run.
public final class AMQPProxy: Sendable {
    /// AMQP method ids (class << 16 | method) a cut rule can name.
    public enum Method {
        public static let connectionOpen: UInt32 = 0x000A_0028
        public static let channelOpen: UInt32 = 0x0014_000A
        public static let exchangeDeclare: UInt32 = 0x0028_000A
        public static let queueDeclare: UInt32 = 0x0032_000A
        public static let basicQos: UInt32 = 0x003C_000A
        public static let basicConsume: UInt32 = 0x003C_0014
        public static let basicPublish: UInt32 = 0x003C_0028
        public static let confirmSelect: UInt32 = 0x0055_000A
    }

    /// Decides, for each method frame a client sends, whether to cut that connection instead
    /// of forwarding it. Arguments: the connection's number (0, 1, …) and the method id.
    public typealias CutRule = @Sendable (_ connection: Int, _ method: UInt32) -> Bool

    /// Decides, for each method frame a client sends, how long to hold it (and everything the
    /// client sends after it) before forwarding: a slow broker, as the client sees it.
    public typealias DelayRule = @Sendable (_ connection: Int, _ method: UInt32) -> Duration?

    public let port: Int
    public var url: String { "amqp://guest:guest@127.0.0.1:\(port)/%2F" }
    private let targetPort: Int
    private let listener: Int32
    private let rule: Mutex<CutRule>
    private let delayRule = Mutex<DelayRule>({ _, _ in nil })
    private let state = Mutex<(accepted: Int, cuts: Int, live: [Int: (Int32, Int32)], stopped: Bool)>((0, 0, [:], false))

    /// Listens on a free loopback port and forwards to `targetPort` on 127.0.0.1.
    public init(targetPort: Int, cut: @escaping CutRule = { _, _ in false }) throws {
        self.targetPort = targetPort
        self.rule = Mutex(cut)
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw POSIXError(.EMFILE) }
        var one: Int32 = 1
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        var bound = 0
        let ok = withLoopbackAddress(port: 0, boundPort: &bound) { address, length in
            bind(fd, address, length.pointee) == 0 && listen(fd, 128) == 0 && getsockname(fd, address, length) == 0
        }
        guard ok else {
            close(fd)
            throw POSIXError(.EADDRINUSE)
        }
        listener = fd
        port = bound
        let thread = Thread { [self] in acceptLoop() }
        thread.name = "amqp-proxy-accept"
        thread.start()
    }

    /// Replaces the cut rule (for connections already open too).
    public func setRule(_ cut: @escaping CutRule) { rule.withLock { $0 = cut } }

    /// Replaces the delay rule (for connections already open too).
    public func setDelay(_ delay: @escaping DelayRule) { delayRule.withLock { $0 = delay } }

    /// How many client connections were accepted, and how many were cut by the rule.
    public var accepted: Int { state.withLock { $0.accepted } }
    public var cuts: Int { state.withLock { $0.cuts } }

    /// Cuts every open connection now (as a network failure would).
    public func cutAll() {
        // Under the lock: a descriptor is closed only after it left `live`, so none is reused here.
        state.withLock { s in
            for (a, b) in s.live.values {
                shutdown(a, Int32(SHUT_RDWR))
                shutdown(b, Int32(SHUT_RDWR))
            }
        }
    }

    /// Stops accepting and cuts every connection.
    public func stop() {
        let first = state.withLock { s -> Bool in
            defer { s.stopped = true }
            return !s.stopped
        }
        guard first else { return }
        shutdown(listener, Int32(SHUT_RDWR))
        cutAll()
    }

    deinit { stop() }

    private func acceptLoop() {
        while true {
            let client = accept(listener, nil, nil)
            if client < 0 {
                if errno == EINTR { continue }
                break
            }
            if state.withLock({ $0.stopped }) {
                close(client)
                break
            }
            let upstream = Self.connectLoopback(port: targetPort)
            guard upstream >= 0 else {
                close(client)
                continue
            }
            let index = state.withLock { s -> Int in
                defer { s.accepted += 1 }
                s.live[s.accepted] = (client, upstream)
                return s.accepted
            }
            // The descriptors are closed when both directions are done, never while one still uses them.
            let directions = Locked(2)
            let finish: @Sendable () -> Void = { [self] in
                guard directions.withLock({ n -> Int in n -= 1; return n }) == 0 else { return }
                state.withLock { _ = $0.live.removeValue(forKey: index) }
                close(client)
                close(upstream)
            }
            let down = Thread {
                Self.pump(from: upstream, to: client)
                finish()
            }
            down.name = "amqp-proxy-down"
            down.start()
            let up = Thread { [self] in
                clientToBroker(index: index, client: client, upstream: upstream)
                finish()
            }
            up.name = "amqp-proxy-up"
            up.start()
        }
        close(listener)
    }

    /// Forwards frames from the client, parsing them to apply the cut rule.
    private func clientToBroker(index: Int, client: Int32, upstream: Int32) {
        var buffer: [UInt8] = []
        var headerSent = false
        var chunk = [UInt8](repeating: 0, count: 65_536)
        defer {
            shutdown(client, Int32(SHUT_RDWR))
            shutdown(upstream, Int32(SHUT_RDWR))
        }
        while true {
            let n = chunk.withUnsafeMutableBytes { recv(client, $0.baseAddress, $0.count, 0) }
            if n <= 0 { return }
            buffer.append(contentsOf: chunk[0..<n])
            if !headerSent {
                guard buffer.count >= 8 else { continue }
                guard Self.sendAll(upstream, buffer[0..<8]) else { return }
                buffer.removeFirst(8)
                headerSent = true
            }
            // Whole frames: type (1), channel (2), size (4), payload, frame-end (1).
            var start = 0
            while buffer.count - start >= 7 {
                let size = Int(buffer[start + 3]) << 24 | Int(buffer[start + 4]) << 16 | Int(buffer[start + 5]) << 8 | Int(buffer[start + 6])
                let total = 7 + size + 1
                guard buffer.count - start >= total else { break }
                if buffer[start] == 1, size >= 4 {
                    let method = UInt32(buffer[start + 7]) << 24 | UInt32(buffer[start + 8]) << 16 | UInt32(buffer[start + 9]) << 8 | UInt32(buffer[start + 10])
                    let cut = rule.withLock { $0 }(index, method)
                    if cut {
                        state.withLock { $0.cuts += 1 }
                        return
                    }
                    if let delay = delayRule.withLock({ $0 })(index, method) {
                        // The latency itself, on the proxy's own thread (no test waits on it).
                        Thread.sleep(forTimeInterval: Double(delay.components.seconds) + Double(delay.components.attoseconds) / 1e18)
                    }
                }
                guard Self.sendAll(upstream, buffer[start..<(start + total)]) else { return }
                start += total
            }
            buffer.removeFirst(start)
        }
    }

    private static func pump(from: Int32, to: Int32) {
        var chunk = [UInt8](repeating: 0, count: 65_536)
        while true {
            let n = chunk.withUnsafeMutableBytes { recv(from, $0.baseAddress, $0.count, 0) }
            if n <= 0 { break }
            guard sendAll(to, chunk[0..<n]) else { break }
        }
        shutdown(from, Int32(SHUT_RDWR))
        shutdown(to, Int32(SHUT_RDWR))
    }

    private static func sendAll(_ fd: Int32, _ bytes: ArraySlice<UInt8>) -> Bool {
        var rest = bytes
        while !rest.isEmpty {
            let n = rest.withUnsafeBytes { send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
            if n <= 0 {
                if n < 0, errno == EINTR { continue }
                return false
            }
            rest = rest.dropFirst(n)
        }
        return true
    }

    private static func connectLoopback(port: Int) -> Int32 {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { return -1 }
        let ok = withLoopbackAddress(port: port) { address, length in connect(fd, address, length.pointee) == 0 }
        if !ok {
            close(fd)
            return -1
        }
        return fd
    }
}
