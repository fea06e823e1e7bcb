/* Baseline for `ops/bench amqp`: the same workload as relay-bench, written
 * directly against librabbitmq in C, so the Swift client can be compared with
 * what the C library does on the same machine in the same run.
 *
 *   amqp_baseline publish HOST PORT QUEUE COUNT INFLIGHT [BYTES]  -> prints msgs/s
 *   amqp_baseline consume HOST PORT QUEUE COUNT PREFETCH          -> prints msgs/s
 *
 * BYTES (default 1024) persistent messages to the default exchange; publisher
 * confirms with at most INFLIGHT unconfirmed; consume with basic.qos(PREFETCH)
 * and one ack each. QUEUE may be a comma-separated list of queues that already
 * exist (for example the ingress's quorum shard queues, declared by it): they
 * are not declared, and the publishes go to them in turn.
 */
#include <amqp.h>
#include <amqp_tcp_socket.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec / 1e9;
}

static void die_reply(amqp_rpc_reply_t r, const char *what) {
  if (r.reply_type == AMQP_RESPONSE_NORMAL) return;
  fprintf(stderr, "%s failed (reply type %d, library error %d)\n", what, r.reply_type, r.library_error);
  exit(1);
}

int main(int argc, char **argv) {
  if (argc != 7 && argc != 8) {
    fprintf(stderr, "usage: %s publish|consume HOST PORT QUEUE[,QUEUE...] COUNT INFLIGHT|PREFETCH [BYTES]\n", argv[0]);
    return 2;
  }
  const char *mode = argv[1], *host = argv[2], *queue = argv[4];
  int port = atoi(argv[3]);
  long count = atol(argv[5]);
  int window = atoi(argv[6]);
  size_t bytes = argc == 8 ? (size_t)atol(argv[7]) : 1024;
  if (count <= 0 || window <= 0 || bytes == 0 || bytes > 1 << 20) { fprintf(stderr, "bad COUNT, INFLIGHT or BYTES\n"); return 2; }
  /* Split a list of existing queues; a single name is declared as before. */
  char *names[64];
  int nqueues = 0;
  char *list = strdup(queue);
  for (char *tok = strtok(list, ","); tok && nqueues < 64; tok = strtok(NULL, ",")) names[nqueues++] = tok;
  if (nqueues == 0) { fprintf(stderr, "no queue\n"); return 2; }

  amqp_connection_state_t conn = amqp_new_connection();
  amqp_socket_t *sock = amqp_tcp_socket_new(conn);
  if (amqp_socket_open(sock, host, port) != AMQP_STATUS_OK) { fprintf(stderr, "connect failed\n"); return 1; }
  die_reply(amqp_login(conn, "/", 0, 131072, 0, AMQP_SASL_METHOD_PLAIN, "guest", "guest"), "login");
  amqp_channel_open(conn, 1);
  die_reply(amqp_get_rpc_reply(conn), "channel.open");
  if (nqueues == 1) {
    amqp_queue_declare(conn, 1, amqp_cstring_bytes(queue), 0, 1, 0, 0, amqp_empty_table);
    die_reply(amqp_get_rpc_reply(conn), "queue.declare");
  }

  if (strcmp(mode, "publish") == 0) {
    amqp_confirm_select(conn, 1);
    die_reply(amqp_get_rpc_reply(conn), "confirm.select");
    char *body = malloc(bytes);
    if (!body) return 1;
    memset(body, 'x', bytes);
    amqp_basic_properties_t props;
    props._flags = AMQP_BASIC_DELIVERY_MODE_FLAG | AMQP_BASIC_CONTENT_TYPE_FLAG;
    props.delivery_mode = 2;
    props.content_type = amqp_cstring_bytes("application/xml");
    amqp_bytes_t b = {bytes, body};
    long sent = 0, confirmed = 0;
    double t0 = now();
    while (confirmed < count) {
      while (sent < count && sent - confirmed < window) {
        if (amqp_basic_publish(conn, 1, amqp_empty_bytes, amqp_cstring_bytes(names[sent % nqueues]), 0, 0, &props, b) != 0) {
          fprintf(stderr, "publish failed\n");
          return 1;
        }
        sent++;
      }
      amqp_frame_t f;
      if (amqp_simple_wait_frame(conn, &f) != AMQP_STATUS_OK) { fprintf(stderr, "wait failed\n"); return 1; }
      if (f.frame_type == AMQP_FRAME_METHOD && f.payload.method.id == AMQP_BASIC_ACK_METHOD) {
        amqp_basic_ack_t *a = f.payload.method.decoded;
        confirmed = a->multiple ? (long)a->delivery_tag : confirmed + 1;
      }
      amqp_maybe_release_buffers(conn);
    }
    printf("%.0f\n", count / (now() - t0));
  } else {
    amqp_basic_qos(conn, 1, 0, (uint16_t)window, 0);
    die_reply(amqp_get_rpc_reply(conn), "basic.qos");
    amqp_basic_consume(conn, 1, amqp_cstring_bytes(queue), amqp_empty_bytes, 0, 0, 0, amqp_empty_table);
    die_reply(amqp_get_rpc_reply(conn), "basic.consume");
    double t0 = now();
    for (long i = 0; i < count; i++) {
      amqp_envelope_t env;
      amqp_maybe_release_buffers(conn);
      die_reply(amqp_consume_message(conn, &env, NULL, 0), "consume");
      amqp_basic_ack(conn, 1, env.delivery_tag, 0);
      amqp_destroy_envelope(&env);
    }
    printf("%.0f\n", count / (now() - t0));
  }
  amqp_channel_close(conn, 1, AMQP_REPLY_SUCCESS);
  amqp_connection_close(conn, AMQP_REPLY_SUCCESS);
  amqp_destroy_connection(conn);
  return 0;
}
