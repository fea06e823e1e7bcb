// Shim over librabbitmq (apt: librabbitmq-dev, pkg-config: librabbitmq).
//
// Swift cannot call C variadic functions, so the variadic login entry point
// is wrapped here in a fixed-signature inline function. The two small
// helpers below give the connection thread a wake-up pipe and a two-fd poll.
#ifndef WECHATRELAY_CRABBITMQ_SHIM_H
#define WECHATRELAY_CRABBITMQ_SHIM_H

#include <amqp.h>
#include <amqp_framing.h>
#include <amqp_tcp_socket.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <unistd.h>

/// `amqp_login_with_properties` with SASL PLAIN, without varargs.
static inline amqp_rpc_reply_t wr_amqp_login_plain(
    amqp_connection_state_t state, const char *vhost, int channel_max,
    int frame_max, int heartbeat, const amqp_table_t *properties,
    const char *user, const char *password) {
  return amqp_login_with_properties(state, vhost, channel_max, frame_max,
                                    heartbeat, properties,
                                    AMQP_SASL_METHOD_PLAIN, user, password);
}

/// Creates a non-blocking, close-on-exec pipe; returns 0 or -errno.
static inline int wr_wake_pipe(int fds[2]) {
  if (pipe(fds) != 0) return -errno;
  for (int i = 0; i < 2; i++) {
    int flags = fcntl(fds[i], F_GETFL, 0);
    fcntl(fds[i], F_SETFL, flags | O_NONBLOCK);
    fcntl(fds[i], F_SETFD, FD_CLOEXEC);
  }
  return 0;
}

/// Writes one byte to the wake pipe (ignores EAGAIN: a wake-up is pending).
static inline void wr_wake(int fd) {
  char b = 1;
  ssize_t r = write(fd, &b, 1);
  (void)r;
}

/// Drains the wake pipe.
static inline void wr_drain(int fd) {
  char buf[64];
  while (read(fd, buf, sizeof buf) > 0) {
  }
}

/// Polls `sock` (may be -1) and `wake` for input for at most `timeout_ms`.
/// Returns a bit set: 1 = socket readable or in error, 2 = wake-up pending;
/// 0 on timeout, -errno on failure (EINTR is reported as 0).
static inline int wr_poll2(int sock, int wake, int timeout_ms) {
  struct pollfd p[2];
  int n = 0;
  p[n].fd = wake; p[n].events = POLLIN; p[n].revents = 0; n++;
  if (sock >= 0) { p[n].fd = sock; p[n].events = POLLIN; p[n].revents = 0; n++; }
  int r = poll(p, (nfds_t)n, timeout_ms);
  if (r < 0) return errno == EINTR ? 0 : -errno;
  int out = 0;
  if (p[0].revents) out |= 2;
  if (n > 1 && p[1].revents) out |= 1;
  return out;
}

#endif
