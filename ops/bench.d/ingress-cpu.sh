#!/usr/bin/env bash
# The ingress's CPU per request (BENCHMARKS.md, session 7): a release wechat-ingress under wrk
# (64 connections, 15 s) in plaintext and safe mode, its CPU seconds from /proc over requests,
# then a perf profile of 10 s of plaintext into /tmp/perf-ing.data. Needs `ops/bench ingress`
# to have built relay-bench and wrk (ops/deps --bench):
#   swift build -c release --product wechat-ingress && ops/services run -- ops/bench.d/ingress-cpu.sh
set -u
root=$(cd "$(dirname "$0")/../.." && pwd); bench=$root/Benchmarks/.build/release/relay-bench
port=18180; appid=wxb11529c136998cb6; token=benchtoken; key=abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG
WECHAT_APPID=$appid WECHAT_TOKEN=$token WECHAT_AES_KEY=$key HTTP_HOST=127.0.0.1 HTTP_PORT=$port INGRESS_TIMESTAMP_WINDOW=0 LOG_LEVEL=warning $root/.build/release/wechat-ingress &
pid=$!
for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$port/readyz" >/dev/null && break; sleep 0.1; done
read -r qp plain < <("$bench" sign-push --token $token --appid $appid)
read -r qs safe < <("$bench" sign-push --token $token --appid $appid --aes-key $key)
cpu() { sed 's/^.*) //' /proc/$pid/stat | awk -v hz=$(getconf CLK_TCK) '{print ($12+$13)/hz}'; }
for mode in plain safe; do
  if [ $mode = plain ]; then q=$qp; b=$plain; else q=$qs; b=$safe; fi
  c0=$(cpu)
  out=$(cd $root && WR_PATH="/wechat?$q" WR_BODY="$b" WR_RATE=0 WR_CONNECTIONS=64 wrk -t2 -c64 -d15s -s ops/bench.d/ingress.lua "http://127.0.0.1:$port" 2>&1)
  c1=$(cpu)
  reqs=$(printf '%s\n' "$out" | awk '/^WR_RESULT/{for(i=2;i<=NF;i++){split($i,kv,"="); if(kv[1]=="requests") print kv[2]}}')
  echo "$mode: requests=$reqs cpu_s=$(echo "$c1 - $c0" | bc) us_per_req=$(echo "($c1 - $c0) * 1000000 / $reqs" | bc) rps=$((reqs / 15))"
done
# profile plaintext
(cd $root && WR_PATH="/wechat?$qp" WR_BODY="$plain" WR_RATE=0 WR_CONNECTIONS=64 wrk -t2 -c64 -d14s -s ops/bench.d/ingress.lua "http://127.0.0.1:$port" >/dev/null 2>&1 &)
sleep 2; perf record -F 499 -g -p $pid -o /tmp/perf-ing.data -- sleep 10 >/dev/null 2>&1
sleep 3; kill $pid; wait
