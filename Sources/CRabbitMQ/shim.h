// Shim over librabbitmq (apt: librabbitmq-dev, pkg-config: librabbitmq).
//
// Swift cannot call C variadic functions, so the variadic login entry point
// is wrapped here in a fixed-signature inline function. Two small helpers
// below tell how full the socket's send buffer is (flow control).
#ifndef WECHATRELAY_CRABBITMQ_SHIM_H
#define WECHATRELAY_CRABBITMQ_SHIM_H

#include <amqp.h>
#include <amqp_framing.h>
#include <amqp_tcp_socket.h>
#include <sys/ioctl.h>
#include <sys/socket.h>

/// `amqp_login_with_properties` with SASL PLAIN, without varargs.
static inline amqp_rpc_reply_t wr_amqp_login_plain(
    amqp_connection_state_t state, const char *vhost, int channel_max,
    int frame_max, int heartbeat, const amqp_table_t *properties,
    const char *user, const char *password) {
  return amqp_login_with_properties(state, vhost, channel_max, frame_max,
                                    heartbeat, properties,
                                    AMQP_SASL_METHOD_PLAIN, user, password);
}

/// Bytes written to `fd` that the peer has not acknowledged yet (TIOCOUTQ), or -1.
static inline int wr_unsent_bytes(int fd) {
  int n = 0;
  if (ioctl(fd, TIOCOUTQ, &n) != 0) return -1;
  return n;
}

/// The socket's send buffer size (SO_SNDBUF; Linux reports twice the data it holds), or 0.
static inline int wr_send_buffer_size(int fd) {
  int n = 0;
  socklen_t len = sizeof n;
  if (getsockopt(fd, SOL_SOCKET, SO_SNDBUF, &n, &len) != 0) return 0;
  return n;
}

#endif
