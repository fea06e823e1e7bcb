import HummingbirdCore
import NIOCore
import NIOHTTPTypes

/// The HTTP server settings every service uses: connections idle for `idleTimeout` are
/// closed, and so is one that does not deliver a whole request within it (a request head
/// that never completes, a body that trickles), so slow clients cannot hold connections.
public enum RelayHTTP {
    public static func server(idleTimeout: Duration) -> HTTPServerBuilder {
        let timeout = TimeAmount.nanoseconds(idleTimeout.wholeNanoseconds)
        return .http1(
            configuration: .init(additionalChannelHandlers: [RequestReadTimeout(timeout: timeout)], idleTimeout: timeout))
    }
}

/// Closes a connection that has not delivered a complete request within `timeout` of
/// connecting or of the request's head. (Hummingbird's idle timeout starts counting only
/// after the first response, so a client that connects and sends half a head would
/// otherwise hold the connection forever.) Between requests the idle timeout applies.
final class RequestReadTimeout: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = HTTPRequestPart
    typealias InboundOut = HTTPRequestPart

    private let timeout: TimeAmount
    private var deadline: Scheduled<Void>?

    init(timeout: TimeAmount) { self.timeout = timeout }

    func handlerAdded(context: ChannelHandlerContext) {
        if context.channel.isActive { arm(context) }
    }

    func channelActive(context: ChannelHandlerContext) {
        arm(context)
        context.fireChannelActive()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head: arm(context)  // the whole request (head and body) within the timeout
        case .end: disarm()
        case .body: break
        }
        context.fireChannelRead(data)
    }

    func channelInactive(context: ChannelHandlerContext) {
        disarm()
        context.fireChannelInactive()
    }

    func handlerRemoved(context: ChannelHandlerContext) { disarm() }

    private func arm(_ context: ChannelHandlerContext) {
        disarm()
        let channel = context.channel
        deadline = context.eventLoop.scheduleTask(in: timeout) { channel.close(promise: nil) }
    }

    private func disarm() {
        deadline?.cancel()
        deadline = nil
    }
}
