import CRabbitMQ

/// AMQP method ids (class << 16 | method), from the AMQP 0-9-1 spec.
enum Method {
    static let connectionClose: UInt32 = 0x000A_0032
    static let connectionCloseOk: UInt32 = 0x000A_0033
    static let connectionBlocked: UInt32 = 0x000A_003C
    static let connectionUnblocked: UInt32 = 0x000A_003D
    static let channelClose: UInt32 = 0x0014_0028
    static let channelCloseOk: UInt32 = 0x0014_0029
    static let basicCancel: UInt32 = 0x003C_001E
    static let basicReturn: UInt32 = 0x003C_0032
    static let basicDeliver: UInt32 = 0x003C_003C
    static let basicGetOk: UInt32 = 0x003C_0047
    static let basicAck: UInt32 = 0x003C_0050
    static let basicNack: UInt32 = 0x003C_0078
}

/// The librabbitmq status codes we branch on.
enum Status {
    static let ok = AMQP_STATUS_OK.rawValue
    static let timeout = AMQP_STATUS_TIMEOUT.rawValue
    /// librabbitmq's statuses for a connection that broke (the socket, the peer, a timeout), as
    /// opposed to those about what we asked it to send (bad data, a table too big, an invalid
    /// parameter), which would fail again.
    static let connectionBroke: Set<Int32> = Set(
        [
            AMQP_STATUS_CONNECTION_CLOSED, AMQP_STATUS_SOCKET_ERROR, AMQP_STATUS_TIMEOUT, AMQP_STATUS_HEARTBEAT_TIMEOUT,
            AMQP_STATUS_SOCKET_CLOSED, AMQP_STATUS_TCP_ERROR,
        ].map(\.rawValue))

    static func describe(_ code: Int32) -> String {
        guard let s = amqp_error_string2(code) else { return "librabbitmq status \(code)" }
        return String(cString: s)
    }
}

extension Wire {
    /// A clear error for a failed login: refused credentials or virtual host, or why the connection failed.
    static func loginError(_ reply: amqp_rpc_reply_t, place: String, configuration c: AMQPConfiguration) -> AMQPError {
        switch reply.reply_type {
        case AMQP_RESPONSE_SERVER_EXCEPTION:
            guard reply.reply.id == Method.connectionClose, let d = reply.reply.decoded else {
                return AMQPError(.connectionFailed, "broker refused the connection at \(place)")
            }
            let close = d.assumingMemoryBound(to: amqp_connection_close_t.self).pointee
            let text = close.reply_text.string
            switch close.reply_code {
            case 403:
                return AMQPError(.authenticationFailed, "broker at \(place) refused user '\(c.user)': \(text)", status: 403)
            case 530:
                return AMQPError(
                    .authenticationFailed, "user '\(c.user)' may not use virtual host '\(c.virtualHost)': \(text)", status: 530)
            default:
                return AMQPError(.connectionFailed, "broker closed the connection: \(text)", status: Int32(close.reply_code))
            }
        case AMQP_RESPONSE_LIBRARY_EXCEPTION:
            let code = reply.library_error
            if code == AMQP_STATUS_CONNECTION_CLOSED.rawValue || code == AMQP_STATUS_SOCKET_CLOSED.rawValue {
                return AMQPError(
                    .authenticationFailed,
                    "broker at \(place) closed the connection during login (bad credentials or virtual host?)", status: code)
            }
            return AMQPError(.connectionFailed, "login to \(place) failed: \(Status.describe(code))", status: code)
        default:
            return AMQPError(.connectionFailed, "login to \(place) failed")
        }
    }
}
