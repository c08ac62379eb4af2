"""Backends for the examples: HTTP and UDP servers that answer who they are, and whom they saw.

Every HTTP answer is one line, `<name>:<port> <METHOD> <path> host=<Host> from=<peer address>`, so a
test or a curl tells which backend served it and whether the client's own address reached it (NAT,
transparent proxying) or the proxy's did. `/healthz` and `/status` answer too (the examples' health
checks). A UDP datagram is answered with `<name>:<port> <payload>`.

    python examples/backends.py                        # 127.0.0.1:9001-9003, as `layerlb serve` examples use
    python examples/backends.py --name b1 --http 8080 --udp 5353 --host 0.0.0.0
"""

from __future__ import annotations

import argparse
import http.server
import socket
import socketserver
import sys
import threading


def http_server(host: str, port: int, name: str) -> http.server.ThreadingHTTPServer:
    """An HTTP/1.1 server on (host, port) in a daemon thread."""

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            peer = self.client_address[0]
            line = f"{name}:{port} {self.command} {self.path} host={self.headers.get('Host')} from={peer}\n"
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)
            body = line.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        do_HEAD = do_POST = do_PUT = do_DELETE = do_GET

        def log_message(self, format: str, *args: object) -> None:
            pass

    class Server(http.server.ThreadingHTTPServer):
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        daemon_threads = True

    server = Server((host, port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def udp_server(host: str, port: int, name: str) -> socketserver.UDPServer:
    """A UDP server on (host, port) answering each datagram with `<name>:<port> <payload>`."""

    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            data, sock = self.request
            sock.sendto(f"{name}:{port} ".encode() + data, self.client_address)

    server = socketserver.ThreadingUDPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def run(name: str, http_ports: list[int], udp_ports: list[int], host: str = "0.0.0.0") -> None:
    """Serves until stdin closes or the process is killed; prints `ready` once every port listens.

    Module-level, so that `tests.netns` can spawn it in a network namespace."""
    for port in http_ports:
        http_server(host, port, name)
    for port in udp_ports:
        udp_server(host, port, name)
    print("ready", flush=True)
    threading.Event().wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="backend")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--http", type=int, action="append", default=[], metavar="PORT")
    parser.add_argument("--udp", type=int, action="append", default=[], metavar="PORT")
    args = parser.parse_args(argv)
    if not args.http and not args.udp:  # the `layerlb serve` examples' three local backends
        for port in (9001, 9002, 9003):
            http_server(args.host, port, f"backend-{port}")
    for port in args.http:
        http_server(args.host, port, args.name)
    for port in args.udp:
        udp_server(args.host, port, args.name)
    print("ready", flush=True)
    sys.stdin.read()  # until the caller closes our stdin
    return 0


if __name__ == "__main__":
    sys.exit(main())
