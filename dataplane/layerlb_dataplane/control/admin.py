"""The admin server: liveness, readiness, Prometheus metrics and the served configuration over plain HTTP.

Kubernetes probes and Prometheus scrapes need four GET endpoints and nothing else, so this is a few
dozen lines on asyncio streams instead of a framework: one request per connection, `Connection: close`.

- `/healthz`: 200 while the process answers;
- `/readyz`: 200 only when the current Plans are applied (every listener bound and serving), else 503
  with the reasons, one per line;
- `/metrics`: Prometheus text format 0.0.4;
- `/config`: the Plans being served, as JSON, private keys replaced by `REDACTED`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Protocol

from layerlb import plan

log = logging.getLogger("layerlb.admin")

READ_SECONDS = 5.0
MAX_REQUEST_HEAD = 16384
PROMETHEUS_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class View(Protocol):
    """What the admin server reads; `runtime.Dataplane` and `workers.Supervisor` provide it."""

    def ready(self) -> tuple[bool, list[str]]:
        """Whether the current Plans are applied, and the reasons when not."""
        ...

    async def metrics_text(self) -> str:
        """The Prometheus exposition."""
        ...

    def plans(self) -> list[plan.Plan]:
        """The Plans being served."""
        ...


def redacted(p: plan.Plan) -> dict[str, object]:
    """The Plan as JSON data with every private key replaced: `/config` is for reading, not for stealing."""
    data = p.model_dump(mode="json")
    for listener in data.get("listeners", ()):
        for certificate in listener.get("certificates", ()):
            certificate["key_pem"] = "REDACTED"
    return data


class AdminServer:
    """A listening admin endpoint; `close()` stops it."""

    def __init__(self, view: View) -> None:
        self.view = view
        self.server: asyncio.Server | None = None

    @property
    def address(self) -> tuple[str, int]:
        """Where it listens (tests and logs need the port chosen for port 0)."""
        assert self.server is not None
        name = self.server.sockets[0].getsockname()
        return (str(name[0]), int(name[1]))

    def close(self) -> None:
        if self.server is not None:
            self.server.close()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Answer one request and close."""
        try:
            async with asyncio.timeout(READ_SECONDS):
                head = await reader.readuntil(b"\r\n\r\n")
            status, content_type, body = await self.respond(head)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError):
            writer.close()
            return
        except Exception:  # an admin page must never take the process down
            log.exception("admin request failed")
            status, content_type, body = 500, "text/plain; charset=utf-8", b"internal error\n"
        reason = {
            200: "OK",
            400: "Bad Request",
            404: "Not Found",
            405: "Method Not Allowed",
            500: "Internal Server Error",
            503: "Service Unavailable",
        }[status]
        writer.write(
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode("ascii")
        )
        if not head.startswith(b"HEAD "):
            writer.write(body)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()

    async def respond(self, head: bytes) -> tuple[int, str, bytes]:
        """(status, content type, body) for a request head."""
        text = "text/plain; charset=utf-8"
        parts = head.split(b"\r\n", 1)[0].split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            return 400, text, b"bad request\n"
        method, target = parts[0], parts[1].split(b"?", 1)[0].decode("latin-1")
        if method not in (b"GET", b"HEAD"):
            return 405, text, b"only GET and HEAD\n"
        if target == "/healthz":
            return 200, text, b"ok\n"
        if target == "/readyz":
            ready, problems = self.view.ready()
            if ready:
                return 200, text, b"ready\n"
            return 503, text, ("".join(f"{line}\n" for line in problems) or "not ready\n").encode()
        if target == "/metrics":
            return 200, PROMETHEUS_TYPE, (await self.view.metrics_text()).encode()
        if target == "/config":
            data = [redacted(p) for p in self.view.plans()]
            return 200, "application/json", (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()
        return 404, text, b"not found: try /healthz, /readyz, /metrics, /config\n"


async def start(view: View, address: tuple[str, int]) -> AdminServer:
    """Listen on `address` (port 0: any free port, see `AdminServer.address`); raises OSError when it cannot."""
    admin = AdminServer(view)
    admin.server = await asyncio.start_server(admin.handle, address[0], address[1], limit=MAX_REQUEST_HEAD)
    log.info("admin server on http://%s:%d/", *admin.address)
    return admin


def parse_address(text: str) -> tuple[str, int]:
    """`HOST:PORT` (or `[V6]:PORT`, or `:PORT` for localhost) as the CLI takes it; raises ValueError."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    host = host.strip("[]") or "127.0.0.1"
    return host, int(port)
