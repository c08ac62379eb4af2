"""The real HAProxy and nginx installed here, started on loopback in front of a recording origin, so the
HTTP/1 strictness table (docs/security.md) states what they do from a run, not from memory.

`ReferenceProxy.ask(raw)` sends bytes exactly as given and returns the status answered (0 for an HTTP/0.9
style answer without a status line, None when nothing came before the timeout) and the bytes the origin
received for it (None when the proxy forwarded nothing).
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

ANSWER_TIMEOUT: Final = 5.0  # a proxy waiting for more bytes (it never answers) shows as None after this
START_TIMEOUT: Final = 20.0


@dataclass
class Answer:
    """What a proxy did with one request: the status it answered and what its origin received."""

    status: int | None
    forwarded: bytes | None


def _read_message(sock: socket.socket) -> bytes:
    """One request as the origin receives it: the head, then a Content-Length or chunked body."""
    data = b""
    while b"\r\n\r\n" not in data:
        more = sock.recv(65536)
        if not more:
            return data
        data += more
    head, _, body = data.partition(b"\r\n\r\n")
    low = head.lower()
    if b"\r\ntransfer-encoding:" in low:
        while not body.endswith(b"0\r\n\r\n"):
            more = sock.recv(65536)
            if not more:
                break
            body += more
    else:
        for line in low.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name == b"content-length":
                while len(body) < int(value.strip()):
                    more = sock.recv(65536)
                    if not more:
                        break
                    body += more
    return head + b"\r\n\r\n" + body


class Origin:
    """A loopback origin that records each request it receives and answers 200 `ok`, then closes."""

    def __init__(self) -> None:
        self.received: list[bytes] = []
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._server.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(ANSWER_TIMEOUT)
                try:
                    message = _read_message(conn)
                    with self._lock:
                        self.received.append(message)
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
                except OSError:
                    pass

    def take(self) -> list[bytes]:
        with self._lock:
            received, self.received = self.received, []
        return received

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._server.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept (close alone does not)
        self._server.close()
        self._thread.join(timeout=ANSWER_TIMEOUT)


_HAPROXY_CONFIG: Final = """global
    maxconn 64
defaults
    mode http
    timeout connect 5s
    timeout client 5s
    timeout server 5s
    timeout http-request 3s
frontend front
    bind 127.0.0.1:{port}
    default_backend origin
backend origin
    server origin 127.0.0.1:{origin}
"""

_NGINX_CONFIG: Final = """daemon off;
master_process off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log info;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    client_header_timeout 3s;
    client_body_timeout 3s;
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://127.0.0.1:{origin};
            proxy_http_version 1.1;
        }}
    }}
}}
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


class ReferenceProxy:
    """HAProxy or nginx (`kind`) as a reverse proxy on loopback in front of its own `Origin`."""

    def __init__(self, kind: str, directory: Path) -> None:
        self.kind = kind
        self.origin = Origin()
        self.port = _free_port()
        directory.mkdir(parents=True, exist_ok=True)
        if kind == "haproxy":
            config = directory / "haproxy.cfg"
            config.write_text(_HAPROXY_CONFIG.format(port=self.port, origin=self.origin.port))
            command = [_binary("haproxy"), "-db", "-f", str(config)]
        else:
            config = directory / "nginx.conf"
            config.write_text(_NGINX_CONFIG.format(dir=directory, port=self.port, origin=self.origin.port))
            command = [
                _binary("nginx"),
                "-p",
                str(directory),
                "-e",
                str(directory / "error.log"),
                "-c",
                str(config),
            ]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._wait_listening()

    def _wait_listening(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.kind} exited with {self.process.returncode} at start")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)  # polling a condition (the port), not waiting a fixed time

    def ask(self, raw: bytes) -> Answer:
        """Send `raw` on a fresh connection; the answer's status and what the origin received for it."""
        self.origin.take()
        data = b""
        with socket.create_connection(("127.0.0.1", self.port), timeout=ANSWER_TIMEOUT) as sock:
            sock.sendall(raw)
            try:
                while b"\r\n" not in data and not (data and not data.startswith(b"HTTP/"[: len(data)])):
                    more = sock.recv(65536)
                    if not more:
                        break
                    data += more
            except (TimeoutError, ConnectionResetError):
                pass
        if not data:
            status = None
        elif data.startswith(b"HTTP/"):
            status = int(data.split(b" ", 2)[1])
        else:
            status = 0
        received = self.origin.take()
        return Answer(status, received[0] if received else None)

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=START_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.origin.close()


def _binary(name: str) -> str:
    path = shutil.which(name) or (f"/usr/sbin/{name}" if Path(f"/usr/sbin/{name}").exists() else None)
    if path is None:
        raise FileNotFoundError(f"{name} is not installed (bench/packages.sh installs it)")
    return path


def available() -> bool:
    """Both HAProxy and nginx are installed."""
    try:
        _binary("haproxy")
        _binary("nginx")
    except FileNotFoundError:
        return False
    return True
