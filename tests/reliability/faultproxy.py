"""A fault-injecting HTTP proxy on loopback, in front of the moto S3 server.

Each request, by a seeded draw: answered 503 SlowDown-style without reaching the server, dropped
before forwarding (connection closed, no reply), forwarded and its reply dropped (the request took
effect but the client never hears so: a "lost reply"), or forwarded normally. Counts what it did.
"""

from __future__ import annotations

import http.client
import random
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

_HOP = {
    "connection",
    "keep-alive",
    "transfer-encoding",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
}


class FaultProxy:
    """`FaultProxy(upstream, error=0.1, drop=0.05, lost_reply=0.05, seed=0)`; `.url`; `.counts`; `.close()`.

    `targeted`: {(HTTP method, path substring): n}: the first n matching requests are answered 503
    (before any drawn fault); `.targeted_failed` counts them per entry."""

    def __init__(
        self,
        upstream: str,
        *,
        error: float = 0.0,
        drop: float = 0.0,
        lost_reply: float = 0.0,
        seed: int = 0,
        targeted: dict[tuple[str, str], int] | None = None,
    ) -> None:
        up = urlsplit(upstream)
        self.targeted_left = dict(targeted or {})
        self.targeted_failed = {k: 0 for k in self.targeted_left}
        self.host, self.port = up.hostname, up.port
        self.rates = (error, drop, lost_reply)
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.counts = {"requests": 0, "error": 0, "drop": 0, "lost_reply": 0}
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                fault = proxy._targeted(self.command, self.path) or proxy._draw()
                if fault == "error":
                    payload = b"<?xml version='1.0'?><Error><Code>ServiceUnavailable</Code><Message>injected</Message></Error>"
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                if fault == "drop":
                    self.close_connection = True
                    return
                conn = http.client.HTTPConnection(proxy.host, proxy.port, timeout=30)
                headers = {
                    k: v
                    for k, v in self.headers.items()
                    if k.lower() not in _HOP and k.lower() != "expect"
                }
                conn.request(
                    self.command,
                    self.path,
                    body=body if body or self.command in ("PUT", "POST") else None,
                    headers=headers,
                )
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                if fault == "lost_reply":
                    self.close_connection = True
                    return
                self.send_response(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() not in _HOP and k.lower() != "content-length":
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def _targeted(self, method: str, path: str) -> str | None:
        with self.lock:
            for (m, part), left in self.targeted_left.items():
                if m == method and part in path and left > 0:
                    self.targeted_left[(m, part)] -= 1
                    self.targeted_failed[(m, part)] += 1
                    return "error"
        return None

    def _draw(self) -> str | None:
        with self.lock:
            self.counts["requests"] += 1
            r = self.rng.random()
            error, drop, lost = self.rates
            for name, edge in (
                ("error", error),
                ("drop", error + drop),
                ("lost_reply", error + drop + lost),
            ):
                if r < edge:
                    self.counts[name] += 1
                    return name
            return None

    def set_rates(self, *, error: float = 0.0, drop: float = 0.0, lost_reply: float = 0.0) -> None:
        with self.lock:
            self.rates = (error, drop, lost_reply)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
