#!/usr/bin/env python3
"""HTTP-level fuzzing of a running wechat-ingress (ops/bench fuzz-http).

Sends N requests with random methods, paths, query strings, headers and bodies, and
among them signed valid pushes (unique MsgId) every --valid-every requests. Checks:
every answer is one of the contract's statuses (200 only for a valid push or a valid
URL verification), no request hangs (socket timeout), the ingress stays up; prints a
JSON summary. The caller compares the number of messages queued with `valid_accepted`
(nothing is enqueued for an invalid request).
"""
import argparse, hashlib, http.client, json, multiprocessing, random, socket, sys, time, urllib.parse

ALLOWED = {200, 400, 403, 404, 405, 413}
KEYS = ["signature", "timestamp", "nonce", "openid", "encrypt_type", "msg_signature", "echostr"]
INTS = ["0", "-1", "1", "9223372036854775807", "-9223372036854775808", "9223372036854775808",
        "99999999999999999999999", "1e9", "0x10", "+5", " 1", "１２３", "NaN", ""]


def sign(token, ts, nonce):
    return hashlib.sha1("".join(sorted([token, ts, nonce])).encode()).hexdigest()


def rand_text(r, n=None):
    n = r.randint(0, 40) if n is None else n
    pools = ["abcXYZ019", "%&=?#+/ ", "\x00\x01\x7f", "用户微信", "\u202e\ud7ff", "<>'\"]]>"]
    return "".join(r.choice(r.choice(pools)) for _ in range(n))


def rand_value(r):
    c = r.random()
    if c < 0.3:
        return r.choice(INTS)
    if c < 0.5:
        return rand_text(r)
    if c < 0.6:
        return "A" * r.choice([255, 256, 1024, 8192])
    if c < 0.7:
        return "%" + rand_text(r, 2)
    return rand_text(r)


def raw(text):
    return "".join(ch if 33 <= ord(ch) < 127 else urllib.parse.quote(ch.encode("utf-8", "surrogatepass")) for ch in text)


def rand_query(r):
    parts = []
    for _ in range(r.randint(0, 9)):
        k = r.choice(KEYS) if r.random() < 0.8 else raw(rand_text(r, r.randint(0, 8)))
        v = rand_value(r)
        # Percent-encoded, or raw where HTTP allows (printable ASCII as is, the rest escaped).
        enc = urllib.parse.quote(v.encode("utf-8", "surrogatepass"), safe="") if r.random() < 0.7 else raw(v)
        parts.append(k + ("=" + enc if r.random() < 0.9 else ""))
    return "&".join(parts)


def rand_body(r, valid_xml):
    c = r.random()
    if c < 0.2:
        return b""
    if c < 0.45:
        b = bytearray(valid_xml)
        for _ in range(r.randint(1, 8)):
            op = r.random()
            i = r.randrange(len(b) + 1)
            if op < 0.4 and b:
                del b[r.randrange(len(b))]
            elif op < 0.8:
                b[i:i] = bytes([r.randrange(256)])
            else:
                b[i:i] = r.choice([b"<!DOCTYPE x [<!ENTITY a 'b'>]>", b"&a;", b"<Encrypt>x</Encrypt>", b"]]>", b"<![CDATA["])
        return bytes(b)
    if c < 0.5:
        return b"<xml>" + b"<a>x</a>" * r.randint(1000, 12000) + b"</xml>"
    return bytes(r.randrange(256) for _ in range(r.randint(1, 600)))


def worker(args):
    index, opts = args
    r = random.Random(opts["seed"] * 1000 + index)
    host, port = opts["host"], opts["port"]
    counts = {"requests": 0, "by_status": {}, "bad_status": 0, "timeouts": 0, "conn_errors": 0,
              "valid_sent": 0, "valid_accepted": 0, "unexpected_200": 0, "max_ms": 0.0}
    conn = None
    n = opts["requests"] // opts["workers"] + (1 if index < opts["requests"] % opts["workers"] else 0)
    for i in range(n):
        valid = opts["valid_every"] and i % opts["valid_every"] == 0
        now = str(int(time.time()))
        msgid = f"{opts['seed']}{index:02d}{i:09d}"
        user = f"oFuzz{index}_{r.randrange(50)}"
        xml = (f"<xml><ToUserName><![CDATA[gh_fuzz]]></ToUserName><FromUserName><![CDATA[{user}]]></FromUserName>"
               f"<CreateTime>{now}</CreateTime><MsgType><![CDATA[text]]></MsgType><Content><![CDATA[fuzz]]></Content>"
               f"<MsgId>{msgid}</MsgId></xml>").encode()
        if valid:
            nonce = str(r.randrange(10**9))
            method, path = "POST", f"/wechat?signature={sign(opts['token'], now, nonce)}&timestamp={now}&nonce={nonce}&openid={user}"
            body, headers = xml, {"Content-Type": "text/xml"}
        else:
            method = r.choice(["GET", "POST", "POST", "POST", "PUT", "HEAD", "DELETE"])
            path = r.choice(["/wechat", "/wechat", "/wechat", "/wechat/", "/Wechat", "/wechat/x", "/readyz", "/"]) + "?" + rand_query(r)
            body = rand_body(r, xml) if method in ("POST", "PUT") else b""
            headers = {}
            for _ in range(r.randint(0, 4)):
                headers[r.choice(["X-Real-IP", "X-Forwarded-For", "Content-Type", "X-" + rand_text(r, 5).encode("ascii", "ignore").decode()])] = \
                    rand_text(r).encode("ascii", "ignore").decode()
        start = time.monotonic()
        try:
            if conn is None:
                conn = http.client.HTTPConnection(host, port, timeout=opts["timeout"])
            conn.putrequest(method, path, skip_accept_encoding=True)
            for k, v in headers.items():
                try:
                    conn.putheader(k, v)
                except ValueError:
                    pass
            conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body)
            resp = conn.getresponse()
            resp.read()
            status = resp.status
            if resp.getheader("Connection", "").lower() == "close":
                conn.close()
                conn = None
        except socket.timeout:
            counts["timeouts"] += 1
            conn = None
            continue
        except (ConnectionError, http.client.HTTPException, OSError):
            counts["conn_errors"] += 1
            conn = None
            continue
        finally:
            counts["max_ms"] = max(counts["max_ms"], (time.monotonic() - start) * 1000)
        counts["requests"] += 1
        counts["by_status"][str(status)] = counts["by_status"].get(str(status), 0) + 1
        if status not in ALLOWED:
            counts["bad_status"] += 1
        if valid:
            counts["valid_sent"] += 1
            if status == 200:
                counts["valid_accepted"] += 1
        elif status == 200 and not path.startswith("/readyz") and method == "POST":
            counts["unexpected_200"] += 1
    return counts


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True)
    p.add_argument("--token", required=True)
    p.add_argument("--requests", type=int, default=1_000_000)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--valid-every", type=int, default=100)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--timeout", type=float, default=10.0)
    a = p.parse_args()
    u = urllib.parse.urlparse(a.url)
    opts = {"host": u.hostname, "port": u.port, "token": a.token, "requests": a.requests, "workers": a.workers,
            "valid_every": a.valid_every, "seed": a.seed, "timeout": a.timeout}
    t0 = time.time()
    with multiprocessing.Pool(a.workers) as pool:
        parts = pool.map(worker, [(i, opts) for i in range(a.workers)])
    total = {"requests": 0, "by_status": {}, "bad_status": 0, "timeouts": 0, "conn_errors": 0,
             "valid_sent": 0, "valid_accepted": 0, "unexpected_200": 0, "max_ms": 0.0}
    for c in parts:
        for k, v in c.items():
            if k == "by_status":
                for s, n in v.items():
                    total["by_status"][s] = total["by_status"].get(s, 0) + n
            elif k == "max_ms":
                total[k] = max(total[k], v)
            else:
                total[k] += v
    total["seconds"] = round(time.time() - t0, 1)
    total["max_ms"] = round(total["max_ms"], 1)
    print(json.dumps(total, sort_keys=True))
    ok = total["bad_status"] == 0 and total["timeouts"] == 0 and total["unexpected_200"] == 0
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
