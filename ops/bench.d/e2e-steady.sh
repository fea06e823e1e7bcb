#!/usr/bin/env bash
# End-to-end at a steady rate (BENCHMARKS.md): release wechat-ingress + 2 wechat-workers +
# wechat-tokend, with `wechat-sim bench` pushing RATE/s for 20 s and serving the fake API; prints the
# latencies, lost/duplicated replies, the ingress's and workers' CPU seconds during the run, and RSS.
# FAULT (optional, on brokers started with `ops/services --cluster --sentinel`):
#   node-loss       6 s into the run, the RabbitMQ node the ingress is connected to (node 1, which
#                   also leads the shard queues) stops for 10 s, then starts and rejoins
#   redis-failover  6 s into the run, the Redis primary stops; the sentinels promote the replica;
#                   the old primary comes back 10 s later as a replica
#   swift build -c release && ops/services run [--cluster --sentinel] -- ops/bench.d/e2e-steady.sh 1000 [FAULT]
# PASSIVE=1: passive-first replies (INGRESS_REPLY_WAIT=4 on the ingress, WORKER_REPLY_MODE=passive-first on
# the workers); the bench counts a reply in the HTTP response as the push's reply.
# (`ops/bench e2e` runs all of these; `ops/bench e2e-passive` the single node with PASSIVE=0 and 1.)
set -u
B=$(cd "$(dirname "$0")/../.." && swift build -c release --show-bin-path)
RATE=${1:-1000}
FAULT=${2:-}
export WECHAT_APPID=wxbench WECHAT_TOKEN=tok WECHAT_SECRET=sec TOKEND_SECRET=bear LOG_LEVEL=warning WECHAT_API_URL=http://127.0.0.1:18095
PASSIVE_INGRESS="" PASSIVE_WORKER=""
if [ "${PASSIVE:-0}" = 1 ]; then PASSIVE_INGRESS="INGRESS_REPLY_WAIT=4" PASSIVE_WORKER="WORKER_REPLY_MODE=passive-first"; fi
env $PASSIVE_INGRESS HTTP_HOST=127.0.0.1 HTTP_PORT=18080 $B/wechat-ingress > /tmp/e2e-ingress.log 2>&1 & I=$!
HTTP_HOST=127.0.0.1 HTTP_PORT=18081 $B/wechat-tokend > /tmp/e2e-tokend.log 2>&1 & T=$!
env $PASSIVE_WORKER METRICS_PORT=19101 TOKEND_URL=http://127.0.0.1:18081 $B/wechat-worker > /tmp/e2e-w1.log 2>&1 & W1=$!
env $PASSIVE_WORKER METRICS_PORT=19102 TOKEND_URL=http://127.0.0.1:18081 $B/wechat-worker > /tmp/e2e-w2.log 2>&1 & W2=$!
for _ in $(seq 1 100); do curl -sf http://127.0.0.1:18080/readyz >/dev/null && break; sleep 0.2; done
for _ in $(seq 1 100); do curl -sf http://127.0.0.1:19101/readyz >/dev/null && curl -sf http://127.0.0.1:19102/readyz >/dev/null && break; sleep 0.2; done
cpu() { for p in "$@"; do sed 's/^.*) //' /proc/$p/stat | awk '{print $12 + $13}'; done | awk -v hz=$(getconf CLK_TCK) '{t+=$1} END {print t/hz}'; }
fault() {
  sleep 10 # the bench's 4 s warm-up, then 6 s of pushing
  case "$FAULT" in
    node-loss)
      "$WR_SERVICES" rabbitmq-stop "$WR_SERVICES_DIR" 1
      sleep 10
      "$WR_SERVICES" rabbitmq-start "$WR_SERVICES_DIR" 1 ;;
    redis-failover)
      local primary
      primary=$("$WR_SERVICES" redis-primary "$WR_SERVICES_DIR")
      "$WR_SERVICES" redis-stop "$WR_SERVICES_DIR" "$primary"
      sleep 10
      "$WR_SERVICES" redis-start "$WR_SERVICES_DIR" "$primary" ;;
  esac
  echo "fault $FAULT done" >&2
}
F=""
if [ -n "$FAULT" ]; then fault & F=$!; fi
i0=$(cpu $I); w0=$(cpu $W1 $W2)
$B/wechat-sim bench --url http://127.0.0.1:18080/wechat --rate $RATE --duration 20 --users 2000 --api-port 18095 --warmup 4 --drain-timeout 60
i1=$(cpu $I); w1=$(cpu $W1 $W2)
[ -n "$F" ] && wait $F
echo "ingress CPU s: $(echo "$i1 - $i0" | bc)  workers CPU s: $(echo "$w1 - $w0" | bc)"
for p in $I $W1 $W2 $T; do awk '/VmRSS/{printf "%s MB ", $2/1024}' /proc/$p/status; done; echo
kill $I $T $W1 $W2; wait $I $T $W1 $W2 2>/dev/null
