"""Connections to backends, and the keep-alive pools that make reusing one the common case.

A new TCP connection per request would cost a handshake and a socket on both sides for every request;
with pools, the steady state is one write and one read per request. A pooled connection is reused only
when its last response ended cleanly (`ResponseParser.reusable`), never after an error, a
`Connection: close` or a half-read body; pooled connections that sit idle longer than the Plan's idle
timeout, or whose target is draining, are closed.

Connections that carry something of one client (a PROXY protocol header, or a transparent source
address) are never put in the shared pool: the proxy keeps them per client connection instead.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Protocol, cast

from layerlb_dataplane.core.targets import Target
from layerlb_dataplane.http.h1.framing import ParseError
from layerlb_dataplane.http.h1.response import Response, ResponseHandler, ResponseParser
from layerlb_dataplane.net import transparent


class Owner(ResponseHandler, Protocol):
    """The client side an upstream connection currently serves."""

    def upstream_data(self, connection: UpstreamConnection, data: bytes) -> None: ...

    def upstream_eof(self, connection: UpstreamConnection) -> bool: ...

    def upstream_lost(self, connection: UpstreamConnection) -> None: ...

    def upstream_write_paused(self, paused: bool) -> None: ...


class _Silent:
    """The response handler of a connection nobody owns (never called: idle data closes the connection)."""

    def on_response(self, response: Response) -> None:
        raise ParseError(502, "response without a request")

    def on_response_body(self, data: bytes | bytearray) -> None:
        raise ParseError(502, "response without a request")

    def on_response_end(self) -> None:
        raise ParseError(502, "response without a request")


_SILENT = _Silent()


class UpstreamConnection(asyncio.Protocol):
    """One TCP connection to a target, reused across requests: `owner` is the client connection it serves
    (None while pooled), and its response parser says whether it is still in step."""

    __slots__ = (
        "closed",
        "idle_since",
        "owner",
        "parser",
        "pool",
        "reused",
        "target",
        "transport",
        "write_paused",
    )

    def __init__(self, target: Target) -> None:
        self.target = target
        self.transport: asyncio.Transport = None  # type: ignore[assignment]  # set by connection_made
        self.owner: Owner | None = None
        self.parser = ResponseParser(_SILENT)
        self.pool: UpstreamPool | None = None
        self.idle_since = 0.0
        self.reused = False  # has served a response before: a reset may be the backend's idle close
        self.closed = False
        self.write_paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass it

    def data_received(self, data: bytes) -> None:
        owner = self.owner
        if owner is None:  # a pooled connection must stay silent until asked
            self.close()
            return
        owner.upstream_data(self, data)

    def eof_received(self) -> bool:
        owner = self.owner
        return owner is not None and owner.upstream_eof(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        owner = self.owner
        if owner is not None:
            owner.upstream_lost(self)
        elif self.pool is not None:
            self.pool.discard(self)

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.owner is not None:
            self.owner.upstream_write_paused(True)

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.owner is not None:
            self.owner.upstream_write_paused(False)

    def attach(self, owner: Owner) -> None:
        """Serve `owner` next."""
        self.owner = owner
        self.parser.handler = owner

    def close(self) -> None:
        """Close after pending writes; never reused."""
        self.closed = True
        self.owner = None
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        """Close at once (reset): the exchange failed, the backend must not take a half request as whole."""
        self.closed = True
        self.owner = None
        if self.transport is not None:
            self.transport.abort()

    @property
    def usable(self) -> bool:
        """Idle, open and in step: may carry the next request."""
        return not self.closed and not self.transport.is_closing() and self.parser.reusable


class UpstreamPool:
    """Idle keep-alive connections by target, so most requests skip a TCP handshake; the most recently
    used is taken first (the one least likely to have been closed by the backend)."""

    def __init__(self) -> None:
        self.idle: dict[Target, list[UpstreamConnection]] = {}
        self.count = 0

    def acquire(self, target: Target) -> UpstreamConnection | None:
        """An idle connection to `target`, or None; never one to a draining target."""
        connections = self.idle.get(target)
        if not connections:
            return None
        if target.draining:
            self._close_target(target)
            return None
        while connections:
            connection = connections.pop()
            self.count -= 1
            connection.pool = None
            if not connection.closed and connection.parser.idle:  # closed: set by connection_lost and close
                return connection
            connection.close()
        return None

    def release(self, connection: UpstreamConnection, now: float) -> bool:
        """Keep `connection` for reuse (True), or close it when it cannot be reused (False)."""
        connection.owner = None
        if connection.closed or not connection.parser.idle or connection.target.draining:
            connection.close()
            return False
        connection.reused = True
        connection.idle_since = now
        connection.pool = self
        connections = self.idle.get(connection.target)
        if connections is None:
            self.idle[connection.target] = [connection]
        else:
            connections.append(connection)
        self.count += 1
        return True

    def discard(self, connection: UpstreamConnection) -> None:
        """A pooled connection closed by itself (the backend's own idle timeout)."""
        connection.pool = None
        connections = self.idle.get(connection.target)
        if connections is not None and connection in connections:
            connections.remove(connection)
            self.count -= 1

    def sweep(self, now: float, idle_timeout: float) -> None:
        """Close connections idle for `idle_timeout` seconds or longer, and every one to a draining target."""
        for target in list(self.idle):
            if target.draining:
                self._close_target(target)
                continue
            connections = self.idle[target]
            stale = [c for c in connections if now - c.idle_since >= idle_timeout]
            for connection in stale:
                connections.remove(connection)
                self.count -= 1
                connection.pool = None
                connection.close()
            if not connections:
                del self.idle[target]

    def close(self) -> None:
        """Close every idle connection (the listener closes)."""
        for target in list(self.idle):
            self._close_target(target)

    def _close_target(self, target: Target) -> None:
        for connection in self.idle.pop(target, ()):
            self.count -= 1
            connection.pool = None
            connection.close()


async def connect(
    target: Target,
    port: int,
    *,
    timeout: float,
    source_ip: str | None = None,
    proxy_header: bytes | None = None,
) -> UpstreamConnection:
    """A new connection to `target`, from `source_ip` when transparent, its PROXY header already sent.

    Raises OSError (refused, unreachable) or TimeoutError (no answer within `timeout`).
    """
    loop = asyncio.get_running_loop()
    connection = UpstreamConnection(target)
    async with asyncio.timeout(timeout):
        if source_ip is None:
            await loop.create_connection(lambda: connection, target.address, port)
        else:
            family = socket.AF_INET6 if ":" in target.address else socket.AF_INET
            sock = transparent.bound_socket(source_ip, family)
            try:
                await loop.sock_connect(sock, (target.address, port))
                await loop.create_connection(lambda: connection, sock=sock)
            except BaseException:
                sock.close()
                raise
    if proxy_header:
        connection.transport.write(proxy_header)
    return connection
