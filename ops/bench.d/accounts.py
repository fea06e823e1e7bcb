#!/usr/bin/env python3
"""Many accounts (BENCHMARKS.md): the send-rate limiter across two workers, and fairness.

Run by ops/bench.d/accounts.sh against a running stack (ingress, tokend, 2 workers,
wechat-sim api) serving three plaintext accounts wxbenchA (send_rate RATE), wxbenchB, wxbenchC.

  limiter   push N messages to A at once (different users); from the simulator's receive times
            of A's sends: the achieved rate over the run and the most sends in any 1 s window.
  fairness  B and C push 10/s each for SECONDS (different users), first alone, then while A
            gets a burst of FLOOD messages: B's and C's push->reply latency, and A's progress.
"""
import hashlib
import http.client
import json
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

INGRESS = ("127.0.0.1", 18180)
SIM = "http://127.0.0.1:18195"
TOKEN = "tok"
A, B, C = "wxbenchA", "wxbenchB", "wxbenchC"
local = threading.local()


def push(appid, user, text="帮助"):
    """One signed plaintext push; returns (status, ms epoch when sent)."""
    conn = getattr(local, "conn", None)
    if conn is None:
        conn = local.conn = http.client.HTTPConnection(*INGRESS, timeout=10)
    ts, nonce = str(int(time.time())), str(time.monotonic_ns())
    sig = hashlib.sha1("".join(sorted([TOKEN, ts, nonce])).encode()).hexdigest()
    msgid = time.time_ns() // 1000
    body = (f"<xml><ToUserName><![CDATA[gh_{appid}]]></ToUserName><FromUserName><![CDATA[{user}]]></FromUserName>"
            f"<CreateTime>{ts}</CreateTime><MsgType><![CDATA[text]]></MsgType><Content><![CDATA[{text}]]></Content>"
            f"<MsgId>{msgid}</MsgId></xml>").encode()
    sent = time.time() * 1000
    for attempt in range(2):
        try:
            conn.request("POST", f"/wechat/{appid}?signature={sig}&timestamp={ts}&nonce={nonce}&openid={user}", body,
                         {"Content-Type": "text/xml"})
            r = conn.getresponse()
            r.read()
            return r.status, sent
        except (http.client.HTTPException, OSError):
            conn.close()
            conn = local.conn = http.client.HTTPConnection(*INGRESS, timeout=10)
    return 0, sent


def opened(appid, user):
    """Tells the simulator about the push (opens the user's 48-hour window)."""
    req = urllib.request.Request(f"{SIM}/sim/users/{user}/pushed?msgtype=text&appid={appid}", method="POST")
    urllib.request.urlopen(req).read()


def sent(appid):
    with urllib.request.urlopen(f"{SIM}/sim/messages?appid={appid}") as r:
        return json.loads(r.read())


def wait_for(appid, count, seconds):
    deadline = time.time() + seconds
    while time.time() < deadline:
        got = sent(appid)
        if len(got) >= count:
            return got
        time.sleep(0.2)
    return sent(appid)


def clear():
    for appid in (A, B, C):
        urllib.request.urlopen(urllib.request.Request(f"{SIM}/sim/messages?appid={appid}", method="DELETE")).read()


def pct(values, p):
    if not values:
        return float("nan")
    v = sorted(values)
    return v[min(len(v) - 1, int(round(p / 100 * (len(v) - 1))))]


def limiter(rate, n):
    clear()
    users = [f"oLim{i}" for i in range(n)]
    with ThreadPoolExecutor(32) as pool:
        list(pool.map(lambda u: opened(A, u), users))
        statuses = list(pool.map(lambda u: push(A, u)[0], users))
    got = wait_for(A, n, n / rate + 60)
    t = sorted(m["receivedAtMs"] for m in got)
    span = (t[-1] - t[0]) / 1000 if len(t) > 1 else float("nan")
    window, j = 0, 0
    for i in range(len(t)):
        while t[i] - t[j] >= 1000:
            j += 1
        window = max(window, i - j + 1)
    if "--histogram" in sys.argv:
        per = {}
        for x in t:
            per[int((x - t[0]) // 1000)] = per.get(int((x - t[0]) // 1000), 0) + 1
        print("sends per second:", [per.get(i, 0) for i in range(int(span) + 1)], file=sys.stderr)
    print(f"| limiter | {rate}/s, burst 1, 2 worker processes | {n} pushed ({statuses.count(200)} accepted), "
          f"{len(got)} sent | achieved {(len(t) - 1) / span:.2f}/s over {span:.1f} s | most in any 1 s: {window} |")


def fairness(seconds, flood):
    clear()
    latencies = {B: [], C: []}
    lock = threading.Lock()
    pushed = {B: {}, C: {}}
    flood_users = [f"oFlood{i}" for i in range(flood)]
    with ThreadPoolExecutor(64) as pool:
        if flood:
            list(pool.map(lambda u: opened(A, u), flood_users))
            flood_started = time.time()
            list(pool.map(lambda u: push(A, u), flood_users))
            flood_pushed = time.time() - flood_started
        start = time.time()
        k = 0
        while time.time() - start < seconds:
            for appid in (B, C):
                user = f"oCalm{flood}-{k}"
                opened(appid, user)
                pool.submit(lambda a=appid, u=user: pushed[a].__setitem__(u, push(a, u)[1]))
            k += 1
            time.sleep(max(0, start + k / 10 - time.time()))
    for appid in (B, C):
        got = wait_for(appid, k, 120)
        for m in got:
            if m["touser"] in pushed[appid]:
                latencies[appid].append(m["receivedAtMs"] - pushed[appid][m["touser"]])
    a_done = len(sent(A))
    both = latencies[B] + latencies[C]
    label = f"A flooded with {flood} at once (pushed in {flood_pushed:.1f} s)" if flood else "no flood"
    print(f"| fairness | {label} | B+C {len(both)} of {2 * k} replies | p50 {pct(both, 50):.0f} ms, p99 {pct(both, 99):.0f} ms, "
          f"max {max(both) if both else float('nan'):.0f} ms | A sent {a_done} of {flood} meanwhile |")


if __name__ == "__main__":
    what = sys.argv[1]
    if what == "limiter":
        limiter(float(sys.argv[2]), int(sys.argv[3]))
    else:
        fairness(float(sys.argv[2]), int(sys.argv[3]))
