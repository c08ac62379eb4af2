"""Tiny demo backends on 127.0.0.1:9001-9003: each answers who it is, and /healthz, so the examples serve."""

from __future__ import annotations

import http.server
import sys
import threading


def serve(port: int) -> http.server.ThreadingHTTPServer:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            body = f"backend {port} saw {self.command} {self.path} host={self.headers.get('Host')}\n".encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_HEAD = do_POST = do_GET

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


if __name__ == "__main__":
    for port in (9001, 9002, 9003):
        serve(port)
    print("ready", flush=True)
    sys.stdin.read()  # until the demo closes our stdin
