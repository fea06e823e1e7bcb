#!/usr/bin/env python3
"""A decision service for WeChatRelay in a few dozen lines of standard-library Python.

Run it, point the workers at it, and every message no rule matched is decided here:
    python3 examples/decision-service/app.py --port 8095
    WORKER_DECIDE_URL=http://127.0.0.1:8095/decide wechat-worker run

The request and the answer are described by docs/decision.schema.json. This one keeps a
to-do list per user in the session's fields: "add X", "list", "clear"; anything else gets help.
"""
import argparse
import json
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def decide(request):
    message, session = request["message"], request["session"]
    if message["MsgType"] == "event":
        if message.get("Event") == "subscribe":
            return {"reply": {"text": "Welcome! Try: add milk / list / clear"}}
        return {"reply": None}  # other events: no reply
    if message["MsgType"] != "text":
        return {"reply": {"text": "I only read text."}}
    text = message.get("Content", "").strip()
    todo = json.loads(session["fields"].get("todo", "[]"))
    if text.startswith("add "):
        if len(todo) >= 20 or len(text) > 100:  # a session field holds at most 4,096 characters
            return {"reply": {"text": "The list is full (20 short items)."}}
        todo.append(text[4:])
        return {"reply": {"text": f"Added ({len(todo)} items)."}, "set_fields": {"todo": json.dumps(todo, ensure_ascii=False)}}
    if text == "list":
        return {"reply": {"text": "\n".join(f"{i + 1}. {t}" for i, t in enumerate(todo)) or "Nothing to do."}}
    if text == "clear":
        return {"reply": {"text": "Cleared."}, "set_fields": {"todo": ""}}
    return {"reply": {"msgtype": "text", "text": {"content": "Try: add milk / list / clear"}}}


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        try:
            request = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            body, status = json.dumps(decide(request), ensure_ascii=False).encode(), 200
        except (ValueError, KeyError) as e:  # the worker retries a non-200 answer
            body, status = json.dumps({"error": str(e)}).encode(), 400
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8095)
    args = parser.parse_args()
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    print(f"listening on {server.server_address[1]}", flush=True)
    server.serve_forever()
