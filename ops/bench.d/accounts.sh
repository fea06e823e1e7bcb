#!/usr/bin/env bash
# Many accounts (BENCHMARKS.md "Many accounts"): release wechat-ingress + 2 wechat-workers +
# wechat-tokend + wechat-sim api serving three plaintext accounts; account A's sends limited to
# RATE a second (send_rate, burst 1). Measures (ops/bench.d/accounts.py):
#   - the limiter across the two worker processes: 20 s worth of A's messages at once;
#   - fairness: B and C at 10 pushes/s each, alone, then while A gets a burst that fits in the
#     workers' prefetch windows, then one far beyond them (the bound docs/operations.md states).
#   swift build -c release && ops/services run -- ops/bench.d/accounts.sh [RATE]
set -u
B=$(cd "$(dirname "$0")/../.." && swift build -c release --show-bin-path)
RATE=${1:-50}
dir=$(mktemp -d)
cat > "$dir/accounts.yaml" <<EOF
accounts:
  - { appid: wxbenchA, account_id: gh_wxbenchA, token: tok, secret: secA, send_rate: $RATE, send_burst: 1 }
  - { appid: wxbenchB, account_id: gh_wxbenchB, token: tok, secret: secB }
  - { appid: wxbenchC, account_id: gh_wxbenchC, token: tok, secret: secC }
EOF
export WECHAT_ACCOUNTS_FILE=$dir/accounts.yaml TOKEND_SECRET=bear LOG_LEVEL=warning WECHAT_API_URL=http://127.0.0.1:18195
export WECHAT_QUEUE_PREFIX=benchacc$$ HTTP_HOST=127.0.0.1
HTTP_PORT=18195 $B/wechat-sim api --message-quota 100000 > /tmp/acc-sim.log 2>&1 & S=$!
for _ in $(seq 1 100); do curl -sf http://127.0.0.1:18195/healthz >/dev/null && break; sleep 0.1; done
HTTP_PORT=18180 $B/wechat-ingress > /tmp/acc-ingress.log 2>&1 & I=$!
HTTP_PORT=18181 $B/wechat-tokend > /tmp/acc-tokend.log 2>&1 & T=$!
METRICS_PORT=19201 TOKEND_URL=http://127.0.0.1:18181 $B/wechat-worker > /tmp/acc-w1.log 2>&1 & W1=$!
METRICS_PORT=19202 TOKEND_URL=http://127.0.0.1:18181 $B/wechat-worker > /tmp/acc-w2.log 2>&1 & W2=$!
for url in http://127.0.0.1:18180/readyz http://127.0.0.1:18181/readyz http://127.0.0.1:19201/readyz http://127.0.0.1:19202/readyz; do
  for _ in $(seq 1 150); do curl -sf "$url" >/dev/null && break; sleep 0.2; done
done
# Ready means each worker consumes a shard; the second one's share is handed over to it in
# the next seconds. A hand-over during the limiter run gives the waiting messages back and they
# reserve their slots again (the first ones are lost: the rate only drops), so let it settle.
sleep 8
py=ops/bench.d/accounts.py
echo "| run | setting | volume | result | |"
echo "|---|---|---|---|---|"
python3 $py limiter "$RATE" $((RATE * 20)) --histogram
python3 $py fairness 20 0
python3 $py fairness 20 $((RATE * 10))
python3 $py fairness 20 4000
kill $I $T $W1 $W2 $S; wait $I $T $W1 $W2 $S 2>/dev/null
rm -rf "$dir"
