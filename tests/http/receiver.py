#!/usr/bin/env python3
"""A readings receiver for influx-writer's HTTP output tests: what a user's own backend does.

POST <any path>: takes a wattbus.readings.v1 batch, or one reading (one_per_request).
- The token must match --token (Authorization: Bearer <token>), else 401.
- A request holding a reading of measurement "odd" is refused whole with 400 and a message,
  as an API validating its input would; nothing of it is stored.
- Accepted readings are appended to --out, one JSON object per line, flushed per request.
- gzip bodies (Content-Encoding: gzip) are decoded.

Control (no token): POST /_mode with body "ok", "503" (every request), "400all" (every
request refused), "400flood" (a 400 whose body never ends) or "500odd" (a 500 for a request
holding an "odd" reading, a backend bug), "alt502" (every second request 502, a load
balancer with a backend down), "okthen400:N" (N more requests taken, then every one
refused), "429wait" (every request 429 with Retry-After: 4), "hang" (no answer at all),
"400before:T" (a request holding a reading stamped before T, in ms, refused with 400, as an
API refusing readings too old for it) or
"takeall" (as "ok", "odd" readings too) switches the answer to every later request; GET /_stats answers {"requests": n, "readings": n, "gzip": n, "by_status": {...}}.

With --cert/--key it serves HTTPS (and plain HTTP on --control-port, for control). It prints "listening <port>" once it accepts connections.
"""

import argparse
import gzip
import json
import ssl
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

state = {"mode": "ok", "requests": 0, "readings": 0, "gzip": 0, "by_status": {}, "bodies": []}
lock = threading.Lock()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--token", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--cert")
    p.add_argument("--key")
    p.add_argument("--control-port", type=int, help="also serve plain HTTP here (with TLS)")
    args = p.parse_args()
    out = open(args.out, "a", encoding="utf-8")

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def answer(self, status, obj, headers=()):
            body = json.dumps(obj).encode()
            self.send_response(status)
            for k, v in headers:
                self.send_header(k, v)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            with lock:
                k = str(status)
                state["by_status"][k] = state["by_status"].get(k, 0) + 1

        def do_GET(self):
            if self.path == "/_stats":
                with lock:
                    s = {k: state[k] for k in ("mode", "requests", "readings", "gzip", "by_status")}
                self.answer(200, s)
            else:
                self.answer(404, {"error": "not found"})

        def do_POST(self):
            n = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(n)
            if self.path == "/_mode":
                with lock:
                    state["mode"] = raw.decode().strip()
                self.answer(200, {"mode": state["mode"]})
                return
            with lock:
                state["requests"] += 1
                mode = state["mode"]
            if mode == "503":
                self.answer(503, {"error": "down for maintenance"})
                return
            if mode == "hang":
                # Accepts the connection and never answers.
                time.sleep(3600)
                return
            if mode == "429wait":
                self.answer(429, {"error": "slow down"}, [("Retry-After", "4")])
                return
            if mode == "alt502":
                # A load balancer with one of two backends down: every second request fails.
                with lock:
                    state["alt"] = state.get("alt", 0) + 1
                    odd = state["alt"] % 2 == 1
                if odd:
                    self.answer(502, {"error": "bad gateway"})
                    return
            if mode.startswith("okthen400:"):
                # An API deployed mid-stream: N more requests taken, then every one refused.
                with lock:
                    left = int(state.get("left", mode.split(":")[1]))
                    state["left"] = left - 1
                if left <= 0:
                    self.answer(400, {"error": "this API now expects format v2"})
                    return
            if mode == "400all":
                # A proxy or a changed API that refuses every request.
                self.answer(400, {"error": "this API now expects format v2"})
                return
            if mode == "400flood":
                # An error answer whose body never ends.
                self.send_response(400)
                self.send_header("Content-Type", "text/plain")
                self.end_headers()
                chunk = b"x" * (1 << 20)
                try:
                    while True:
                        self.wfile.write(chunk)
                except OSError:
                    pass
                self.close_connection = True
                return
            if self.headers.get("Authorization") != "Bearer " + args.token:
                self.answer(401, {"error": "invalid token"})
                return
            if self.headers.get("Content-Type") != "application/json":
                self.answer(415, {"error": "JSON only"})
                return
            if self.headers.get("Content-Encoding") == "gzip":
                raw = gzip.decompress(raw)
                with lock:
                    state["gzip"] += 1
            try:
                doc = json.loads(raw)
            except ValueError as e:
                self.answer(400, {"error": "not JSON: %s" % e})
                return
            if "readings" in doc:
                if doc.get("format") != "wattbus.readings.v1":
                    self.answer(400, {"error": "unknown format"})
                    return
                readings = doc["readings"]
                if any(r.get("site") != doc.get("site") for r in readings):
                    self.answer(400, {"error": "site mismatch"})
                    return
            else:
                readings = [doc]
            if mode.startswith("400before:"):
                floor = int(mode.split(":")[1])
                if any(r.get("ts_ms", floor) < floor for r in readings):
                    self.answer(400, {"error": "reading too old for this API"})
                    return
            for r in readings:
                if r.get("measurement") == "odd" and mode != "takeall":
                    if mode == "500odd":
                        # A backend bug: one reading makes it fail.
                        self.answer(500, {"error": "KeyError: 'odd'"})
                    else:
                        self.answer(400, {"error": "measurement odd is not accepted by this API"})
                    return
            with lock:
                for r in readings:
                    out.write(json.dumps(r, sort_keys=True) + "\n")
                out.flush()
                state["readings"] += len(readings)
            self.answer(200, {"stored": len(readings)})

    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    if args.cert:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(args.cert, args.key)
        server.socket = ctx.wrap_socket(server.socket, server_side=True)
    if args.control_port:
        control = ThreadingHTTPServer(("127.0.0.1", args.control_port), Handler)
        control.daemon_threads = True
        threading.Thread(target=control.serve_forever, daemon=True).start()
    print("listening %d" % args.port, flush=True)
    server.serve_forever()


if __name__ == "__main__":
    sys.exit(main())
