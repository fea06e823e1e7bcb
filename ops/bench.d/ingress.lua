-- wrk script for `ops/bench ingress`: POSTs one pre-signed message (plaintext or
-- safe mode) over and over. The ingress runs with INGRESS_TIMESTAMP_WINDOW=0, so
-- one signature stays valid. With WR_RATE set, each connection waits between
-- requests so that all connections together offer about WR_RATE requests/s.
local body = os.getenv("WR_BODY")
local path = os.getenv("WR_PATH")
local rate = tonumber(os.getenv("WR_RATE") or "0")
local conns = tonumber(os.getenv("WR_CONNECTIONS") or "64")

wrk.method = "POST"
wrk.body = body
wrk.headers["Content-Type"] = "text/xml"

function request()
  return wrk.format(nil, path)
end

function delay()
  if rate > 0 then
    return 1000 * conns / rate
  end
  return 0
end

done = function(summary, latency, requests)
  io.write(string.format("WR_RESULT requests=%d duration_s=%.2f non2xx=%d errors=%d p50_ms=%.2f p99_ms=%.2f max_ms=%.2f\n",
    summary.requests, summary.duration / 1e6, summary.errors.status,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    latency:percentile(50) / 1000, latency:percentile(99) / 1000, latency.max / 1000))
end
