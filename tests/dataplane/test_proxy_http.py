"""The L7 proxy over real loopback sockets: raw clients (every byte chosen), asyncio backends, a real Plan.

Each test shows one behaviour and fails without it; waits are on conditions (reads, backend events) with
generous timeouts. Throughput is measured by bench/, never here.
"""

from __future__ import annotations

import asyncio
import resource
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from layerlb_dataplane.core import affinity
from layerlb_dataplane.core.state import BackendPool
from layerlb_dataplane.core.targets import Target
from layerlb_dataplane.http.h1 import request as h1_request
from layerlb_dataplane.http.h1 import response as h1_response
from layerlb_dataplane.net import proxy_protocol, transparent

from layerlb import plan
from layerlb.api import Algorithm, Protocol, ProxyProtocolVersion
from tests.dataplane import lenient_llhttp
from tests.dataplane.conftest import (
    TIMEOUT,
    Backend,
    LoopThread,
    ProxyUnderTest,
    Seen,
    get,
    lb_document,
    read_body,
    respond,
)
from tests.dataplane.helpers_runtime import make_certificate, wait_until

Backends = Callable[..., Backend]
Proxies = Callable[[dict[str, Any]], ProxyUnderTest]


def one(backend: Backend, **spec: Any) -> dict[str, Any]:
    """A LoadBalancer whose only backend `app` is `backend`."""
    return lb_document({"app": [("127.0.0.1", backend.port)]}, **spec)


def free_port() -> int:
    """A loopback port nothing listens on (connections are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# --- keep-alive and connection pools ---------------------------------------------------------------------


def test_keep_alive_on_both_sides_reuses_one_upstream_connection(
    backends: Backends, proxies: Proxies
) -> None:
    backend = backends("a")
    proxy = proxies(one(backend))
    first = proxy.client()
    for path in ("/1", "/2", "/3"):
        first.send(get(path))
        assert first.response().body == b"ok a"
    first.close()
    second = proxy.client()  # another client: the pooled connection serves it too
    second.send(get("/4"))
    assert second.response().status == 200
    assert backend.accepted == 1
    assert [seen.target for seen in backend.requests] == ["/1", "/2", "/3", "/4"]


def test_idle_pooled_connections_close_after_the_idle_timeout(backends: Backends, proxies: Proxies) -> None:
    backend = backends()
    proxy = proxies(one(backend, timeouts={"idleSeconds": 0.3}))
    client = proxy.client()
    client.send(get())
    assert client.response().status == 200
    backend.wait(lambda: backend.open == 0)  # the proxy closed its idle upstream connection
    assert client.closed()  # and the idle client connection too


def test_no_reuse_after_connection_close_or_an_error(backends: Backends, proxies: Proxies) -> None:
    replies = [
        respond(headers=("Connection: close",)),  # the backend says close (but leaves the connection open)
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokEXTRA",  # out of step: bytes after the response
        respond(),
        respond(),
    ]

    async def handler(seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(replies.pop(0))

    backend = backends(handler=handler)
    proxy = proxies(one(backend))
    client = proxy.client()
    for _ in range(4):
        client.send(get())
        assert client.response().status == 200
    assert backend.accepted == 3  # a new connection after the close and after the junk, then reuse


def test_http10_clients(backends: Backends, proxies: Proxies) -> None:
    async def handler(seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if seen.target == "/chunked":
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
        else:
            writer.write(respond())

    backend = backends(handler=handler)
    proxy = proxies(one(backend))
    closing = proxy.client()
    closing.send(b"GET / HTTP/1.0\r\n\r\n")
    response = closing.response()
    assert response.status == 200 and response.raw_head.startswith(b"HTTP/1.1 200")
    assert response.header("connection") == "close" and closing.closed()
    kept = proxy.client()
    kept.send(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    assert kept.response().header("connection") == "keep-alive"
    kept.send(b"GET /chunked HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    response = kept.response()  # no chunked coding for HTTP/1.0: the body ends with the connection
    assert response.header("transfer-encoding") is None and response.body == b"hello"
    assert backend.requests[0].version == "HTTP/1.1" and backend.requests[0].header("host") == ""


def test_a_repeated_backend_head_is_framed_for_each_request(backends: Backends, proxies: Proxies) -> None:
    """Backends repeat their heads and the proxy reuses what it made of one: only for requests alike."""

    async def handler(seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Same: 1\r\n\r\n"
        writer.write(head if seen.method == "HEAD" else head + b"5\r\nhello\r\n0\r\n\r\n")

    backend = backends(handler=handler)
    proxy = proxies(one(backend))
    client = proxy.client()
    for _ in range(2):
        client.send(get("/"))
        response = client.response()
        assert response.header("transfer-encoding") == "chunked" and response.body == b"hello"
        assert response.header("connection") is None
        client.send(b"HEAD / HTTP/1.1\r\nHost: h\r\n\r\n")
        head = client.response(head_request=True)
        assert head.header("transfer-encoding") is None and head.header("x-same") == "1"
    old = proxy.client()  # the pooled upstream connection again: the same head, an HTTP/1.0 client
    old.send(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    response = old.response()
    assert response.header("transfer-encoding") is None and response.header("connection") == "close"
    assert response.body == b"hello" and old.closed()
    client.send(get("/", extra="Connection: close\r\n"))
    response = client.response()
    assert response.header("transfer-encoding") == "chunked" and response.header("connection") == "close"
    assert response.body == b"hello" and client.closed()
    assert backend.accepted == 1


def test_connection_close_from_the_client(backends: Backends, proxies: Proxies) -> None:
    backend = backends()
    proxy = proxies(one(backend))
    client = proxy.client()
    client.send(get(extra="Connection: close\r\n"))
    assert client.response().header("connection") == "close"
    assert client.closed()
    assert backend.requests[0].header("connection") is None


def test_pipelined_requests_are_answered_in_order(backends: Backends, proxies: Proxies) -> None:
    release = threading.Event()

    async def handler(seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if seen.target == "/slow":
            await asyncio.get_running_loop().run_in_executor(None, release.wait, TIMEOUT)
        writer.write(respond(body=seen.target.encode()))

    backend = backends(handler=handler)
    proxy = proxies(one(backend))
    client = proxy.client()
    client.send(
        get("/slow") + get("/a") + b"POST /b HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nxyz" + get("/c")
    )
    backend.wait(lambda: len(backend.requests) == 1)
    assert client.silent_for(0.2)  # nothing overtakes the slow first answer
    release.set()
    assert [client.response().body for _ in range(4)] == [b"/slow", b"/a", b"/b", b"/c"]
    assert backend.requests[2].body == b"xyz"


# --- bodies, both ways --------------------------------------------------------------------------------------


def test_bodies_by_length_and_chunked_both_ways(backends: Backends, proxies: Proxies) -> None:
    async def handler(seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if seen.target == "/chunked":
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            for piece in (seen.body[:3], seen.body[3:]):
                writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            writer.write(b"0\r\n\r\n")
        else:
            writer.write(respond(body=seen.body))

    backend = backends(handler=handler)
    proxy = proxies(one(backend))
    client = proxy.client()
    client.send(b"POST /length HTTP/1.1\r\nHost: h\r\nContent-Length: 11\r\n\r\nhello world")
    assert client.response().body == b"hello world"
    client.send(
        b"POST /chunked HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n4;ext=1\r\nabcd\r\n2\r\nef\r\n0\r\n\r\n"
    )
    response = client.response()
    assert response.header("transfer-encoding") == "chunked" and response.body == b"abcdef"
    chunked_up = backend.requests[1]
    assert chunked_up.header("transfer-encoding") == "chunked" and chunked_up.body == b"abcdef"
    assert b"ext=1" not in chunked_up.raw_head
    assert backend.requests[0].header("content-length") == "11"


def test_uploads_and_downloads_stream_with_backpressure(backends: Backends, proxies: Proxies) -> None:
    """A receiver that stops reading stops the sender: the proxy never holds the body."""
    reading, written = threading.Event(), threading.Event()
    size = 64 << 20
    received: list[int] = []

    async def handler(seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        if seen.method == "POST":
            await loop.run_in_executor(None, reading.wait, TIMEOUT)  # not reading yet
            total = 0
            while total < size:
                total += len(await reader.read(1 << 20))
            received.append(total)
            writer.write(respond(body=b"%d" % total))
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
            chunk = b"x" * (1 << 20)
            for _ in range(size >> 20):
                writer.write(chunk)
                await writer.drain()
                received.append(len(chunk))
            written.set()

    backend = backends(handler=handler)
    backend.read_bodies = False
    proxy = proxies(one(backend))
    client = proxy.client()
    client.send(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n" % size)
    chunk = memoryview(b"y" * (1 << 20))
    sent = 0
    client.sock.settimeout(0.5)
    with pytest.raises(TimeoutError):  # the backend does not read, so the proxy stops reading
        while sent < size:
            sent += client.sock.send(chunk[: min(len(chunk), size - sent)])
    assert sent < 24 << 20  # socket buffers and a write buffer each side: the rest waited at the client
    client.sock.settimeout(TIMEOUT)
    reading.set()
    while sent < size:
        sent += client.sock.send(chunk[: min(len(chunk), size - sent)])
    assert client.response().body == b"%d" % size
    received.clear()
    client.send(get())
    assert b"Content-Length: %d" % size in client.read_until(b"\r\n\r\n")
    assert not written.wait(
        1.0
    )  # the client does not read: the backend stalls instead of the proxy buffering
    assert sum(received) < 24 << 20
    left = size - len(client.buffer)
    client.buffer = b""
    while left:
        left -= len(client.sock.recv(min(left, 1 << 20)))
    assert written.wait(TIMEOUT)


def test_a_large_upload_and_download_keep_memory_flat(backends: Backends, proxies: Proxies) -> None:
    """256 MiB each way through the proxy (1 GiB is measured by hand: too slow for this suite)."""
    size = 256 << 20

    async def handler(seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if seen.method == "POST":  # the proxy sends the body chunked: decode it as it streams
            total = 0
            while length := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
                left = length
                while left:
                    left -= len(await reader.read(min(left, 1 << 20)))
                await reader.readexactly(2)
                total += length
            await reader.readuntil(b"\r\n")
            writer.write(respond(body=b"%d" % total))
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            piece = b"z" * (1 << 20)
            for _ in range(size >> 20):
                writer.write(b"100000\r\n" + piece + b"\r\n")
                await writer.drain()
            writer.write(b"0\r\n\r\n")

    backend = backends(handler=handler)
    backend.read_bodies = False
    proxy = proxies(one(backend))
    client = proxy.client()
    before = rss()
    peak = before
    client.send(b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n")
    piece = b"%x\r\n%s\r\n" % (1 << 20, b"w" * (1 << 20))
    for index in range(size >> 20):
        client.send(piece)
        if index % 16 == 0:
            peak = max(peak, rss())
    client.send(b"0\r\n\r\n")
    assert client.response().body == b"%d" % size
    client.send(get())
    client.read_until(b"\r\n\r\n")
    total = 0
    while True:
        size_line = client.read_until(b"\r\n")
        length = int(size_line, 16)
        if length == 0:
            client.read_until(b"\r\n")
            break
        total += len(client.read_exactly(length))
        client.read_exactly(2)
        if total % (16 << 20) == 0:
            peak = max(peak, rss())
    assert total == size
    assert peak - before < 64 << 20, f"RSS grew by {(peak - before) >> 20} MiB"


def rss() -> int:
    """This process's resident set (proxy, backend and client all live here), bytes."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize()


# --- HEAD, 1xx, 204, 304, Expect, Upgrade ---------------------------------------------------------------


def test_head_204_304_and_1xx_have_no_body_and_keep_the_connection_in_step(
    backends: Backends, proxies: Proxies
) -> None:
    async def handler(seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if seen.method == "HEAD":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
        elif seen.target == "/204":
            writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
        elif seen.target == "/304":
            writer.write(b'HTTP/1.1 304 Not Modified\r\nContent-Length: 1000\r\nETag: "x"\r\n\r\n')
        else:
            writer.write(
                b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n" + respond(body=b"final")
            )

    backend = backends(handler=handler)
    proxy = proxies(one(backend))
    client = proxy.client()
    client.send(b"HEAD / HTTP/1.1\r\nHost: h\r\n\r\n")
    head = client.response(head_request=True)
    assert head.status == 200 and head.header("content-length") == "1000"
    client.send(get("/204"))
    assert client.response().status == 204
    client.send(get("/304"))
    not_modified = client.response()
    assert not_modified.status == 304 and not_modified.header("etag") == '"x"'
    client.send(get("/hints"))
    final = client.response()
    assert final.informational == [103] and final.body == b"final"
    assert client.buffer == b""  # no stray body bytes anywhere
    assert backend.accepted == 1


def test_expect_100_continue(backends: Backends, proxies: Proxies) -> None:
    async def handler(seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert seen.header("expect") == "100-continue"
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        await writer.drain()
        body = await read_body(reader, seen.headers)
        writer.write(respond(body=body.upper()))

    backend = backends(handler=handler)
    backend.read_bodies = False
    proxy = proxies(one(backend))
    client = proxy.client()
    client.send(b"PUT /f HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
    assert client.read_until(b"\r\n\r\n").startswith(b"HTTP/1.1 100 Continue")
    client.send(b"hello")
    assert client.response().body == b"HELLO"


def test_websocket_upgrade_is_tunnelled_both_ways(backends: Backends, proxies: Proxies) -> None:
    async def handler(seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\nhello from the server"
        )
        while data := await reader.read(65536):
            writer.write(b"echo:" + data)
        writer.write(b"bye")  # after the client's EOF: the other direction still works
        writer.write_eof()

    backend = backends(handler=handler)
    proxy = proxies(one(backend))
    client = proxy.client()
    client.send(
        b"GET /chat HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    response = client.response()
    assert response.status == 101 and response.header("upgrade") == "websocket"
    assert response.header("sec-websocket-accept") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    assert client.read_exactly(21) == b"hello from the server"
    client.send(b"ping")
    assert client.read_exactly(9) == b"echo:ping"
    client.sock.shutdown(socket.SHUT_WR)  # a half-close passes through, the server still answers
    assert client.read_exactly(3) == b"bye"
    assert client.closed()
    upstream = backend.requests[0]
    assert upstream.header("upgrade") == "websocket" and upstream.header("connection") == "upgrade"


# --- headers -------------------------------------------------------------------------------------------


def test_hop_by_hop_headers_are_stripped_both_ways(backends: Backends, proxies: Proxies) -> None:
    async def handler(seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(
            respond(
                headers=(
                    "Connection: X-Internal",
                    "X-Internal: 1",
                    "Keep-Alive: timeout=5",
                    "Proxy-Authenticate: Basic",
                    "Trailer: X-T",
                    "Upgrade: h2c",
                    "X-Kept: yes",
                )
            )
        )

    backend = backends(handler=handler)
    proxy = proxies(one(backend))
    client = proxy.client()
    client.send(
        get(
            extra="Connection: keep-alive, X-Secret\r\nX-Secret: 1\r\nKeep-Alive: 5\r\nTE: trailers\r\n"
            "Proxy-Connection: keep-alive\r\nProxy-Authorization: Basic eDp5\r\nTrailer: X-T\r\n"
            "Upgrade: h2c\r\nX-Kept: yes\r\n"
        )
    )
    response = client.response()
    upstream = backend.requests[0]
    for name in (
        "connection",
        "x-secret",
        "keep-alive",
        "te",
        "proxy-connection",
        "proxy-authorization",
        "trailer",
        "upgrade",
    ):
        assert upstream.header(name) is None, name
    for name in ("x-internal", "keep-alive", "proxy-authenticate", "trailer", "upgrade", "connection"):
        assert response.header(name) is None, name
    assert upstream.header("x-kept") == "yes" and response.header("x-kept") == "yes"


def test_forwarding_headers(backends: Backends, proxies: Proxies) -> None:
    backend = backends()
    proxy = proxies(one(backend))
    client = proxy.client()
    client.send(
        get(
            host="Shop.Example:8080",
            extra="X-Forwarded-For: 203.0.113.9\r\nForwarded: for=203.0.113.9\r\n"
            "X-Forwarded-Proto: https\r\nX-Forwarded-Host: spoofed\r\n",
        )
    )
    assert client.response().status == 200
    client.send(get())
    client.response()
    first, second = backend.requests
    assert first.all("x-forwarded-for") == ["203.0.113.9, 127.0.0.1"]
    assert first.all("x-forwarded-proto") == ["http"]  # the client's claim is replaced
    assert first.all("x-forwarded-host") == ["Shop.Example:8080"]
    assert first.all("forwarded") == ['for=203.0.113.9, for=127.0.0.1;proto=http;host="Shop.Example:8080"']
    assert first.header("host") == "Shop.Example:8080"
    assert second.all("x-forwarded-for") == ["127.0.0.1"]
    assert second.all("forwarded") == ["for=127.0.0.1;proto=http;host=example.com"]


# --- routing, balancing, affinity ---------------------------------------------------------------------------


class RecordingRouter:
    """A Router stand-in (the `match` signature only): routes by path, remembers what it was asked."""

    def __init__(self, table: dict[str, str]) -> None:
        self.table = table
        self.calls: list[tuple[str, str, str, str | None]] = []

    def match(self, method: str, host: str, path: str, header: Callable[[str], str | None]) -> str | None:
        self.calls.append((method, host, path, header("x-canary")))
        return self.table.get(path)


def test_routing_through_the_router_and_no_route_404(backends: Backends, proxies: Proxies) -> None:
    web, api = backends("web"), backends("api")
    document = lb_document(
        {"web": [("127.0.0.1", web.port)], "api": [("127.0.0.1", api.port)]},
        routes=[{"match": {"pathPrefix": "/api"}, "backend": "api"}],
    )
    proxy = proxies(document)
    router = RecordingRouter({"/api/x": "api", "/": "web"})
    proxy.loop_thread.call(lambda: setattr(proxy.snapshot, "router", router))
    client = proxy.client()
    client.send(get("/api/x?q=1", host="API.example.com", extra="X-Canary: yes\r\n"))
    assert client.response().body == b"ok api"
    client.send(get("/"))
    assert client.response().body == b"ok web"
    client.send(get("/nowhere"))
    missing = client.response()
    assert missing.status == 404 and missing.body.startswith(b"no route")
    client.send(get("/"))  # the connection survives a 404
    assert client.response().status == 200
    assert router.calls[0] == ("GET", "api.example.com", "/api/x", "yes")


def test_a_repeated_head_is_routed_once_per_plan(backends: Backends, proxies: Proxies) -> None:
    """A kept-alive client repeating its head is routed once; another head, or a reload, routes anew."""
    web, api = backends("web"), backends("api")
    endpoints = {"web": [("127.0.0.1", web.port)], "api": [("127.0.0.1", api.port)]}
    proxy = proxies(lb_document(endpoints, routes=[{"match": {"pathPrefix": "/api"}, "backend": "api"}]))
    router = RecordingRouter({"/api/x": "api", "/": "web"})
    proxy.loop_thread.call(lambda: setattr(proxy.snapshot, "router", router))
    client = proxy.client()
    for _ in range(3):
        client.send(get("/api/x"))
        assert client.response().body == b"ok api"
    assert len(router.calls) == 1
    client.send(get("/"))
    assert client.response().body == b"ok web" and len(router.calls) == 2
    proxy.reload(
        lb_document(endpoints, routes=[{"match": {"pathPrefix": "/api"}, "backend": "web"}], generation=2)
    )
    client.send(get("/api/x"))  # the same head as before, under the new Plan's routes
    assert client.response().body == b"ok web"


def test_hash_key_from_header_or_cookie(backends: Backends, proxies: Proxies) -> None:
    backend = backends()
    options = {"app": {"algorithm": "ring-hash", "hashOn": {"type": "Header", "name": "X-User"}}}
    proxy = proxies(one(backend, backend_options=options))
    keys: list[bytes | None] = []
    pool = proxy.snapshot.pool("app")
    assert pool is not None
    original = pool.pick

    def pick(client_ip: str, hash_key: bytes | None = None, exclude: Any = ()) -> Target | None:
        keys.append(hash_key)
        return original(client_ip, hash_key, exclude)

    pool.pick = pick  # type: ignore[method-assign]
    client = proxy.client()
    client.send(get(extra="X-User: alice\r\n"))
    client.response()
    client.send(get())
    client.response()
    assert keys == [b"alice", None]
    cookie_options = {"app": {"algorithm": "maglev", "hashOn": {"type": "Cookie", "name": "sid"}}}
    proxy.reload(one(backend, backend_options=cookie_options, generation=2))
    pool = proxy.snapshot.pool("app")
    assert pool is not None
    original = pool.pick
    pool.pick = pick  # type: ignore[method-assign]
    client.send(get(extra="Cookie: theme=dark; sid=s-42\r\n"))
    client.response()
    assert keys[-1] == b"s-42"


def test_cookie_affinity_is_opaque_httponly_and_honoured_while_usable(
    backends: Backends, proxies: Proxies
) -> None:
    a, b = backends("a"), backends("b")
    document = lb_document(
        {"app": [("127.0.0.1", a.port), ("127.0.0.1", b.port)]},
        sessionAffinity={"type": "Cookie", "cookieName": "sticky", "timeoutSeconds": 600},
    )
    proxy = proxies(document)
    client = proxy.client()
    client.send(get())
    first = client.response()
    cookie = first.header("set-cookie")
    assert (
        cookie is not None
        and cookie.startswith("sticky=")
        and "HttpOnly" in cookie
        and "Max-Age=600" in cookie
    )
    value = cookie.split(";")[0].split("=", 1)[1]
    assert "127.0.0.1" not in value and str(a.port) not in value and str(b.port) not in value
    for _ in range(6):
        client.send(get(extra=f"Cookie: sticky={value}\r\n"))
        response = client.response()
        assert response.body == first.body and response.header("set-cookie") is None
    # Its target leaves the Plan: the cookie is no longer honoured; a new one names the other target.
    stays = b if first.body == b"ok a" else a
    proxy.reload(
        lb_document(
            {"app": [("127.0.0.1", stays.port)]},
            generation=2,
            sessionAffinity={"type": "Cookie", "cookieName": "sticky"},
        )
    )
    client.send(get(extra=f"Cookie: sticky={value}\r\n"))
    moved = client.response()
    assert moved.body == b"ok " + stays.name.encode() and moved.header("set-cookie") not in (None, cookie)


def test_client_ip_affinity_keeps_a_client_on_one_target(backends: Backends, proxies: Proxies) -> None:
    a, b, c = backends("a"), backends("b"), backends("c")
    document = lb_document(
        {"app": [("127.0.0.1", a.port), ("127.0.0.1", b.port), ("127.0.0.1", c.port)]},
        sessionAffinity={"type": "ClientIP", "timeoutSeconds": 60},
    )
    proxy = proxies(document)
    bodies = set()
    for _ in range(6):
        client = proxy.client()  # new connections each time
        client.send(get())
        bodies.add(client.response().body)
        client.close()
    assert len(bodies) == 1


def test_client_ip_table_keeps_a_client_while_its_target_is_usable_and_workers_agree() -> None:
    backend = plan.Backend(name="app", algorithm=Algorithm.round_robin, endpoints=())
    first = Target("app", "10.0.0.1", 80, 1)
    others = [Target("app", f"10.0.0.{index}", 80, 1) for index in range(2, 12)]
    table = affinity.Affinity()
    assert table.by_client(BackendPool(backend, [first]), "192.0.2.1", now=0.0, timeout=10) is first
    grown = BackendPool(backend, [first, *others])
    fresh_choice = affinity.rendezvous(grown, "192.0.2.1")
    assert fresh_choice is not first  # ten new targets: the hash alone would move this client
    assert table.by_client(grown, "192.0.2.1", now=5.0, timeout=10) is first  # the table keeps it
    first.draining = True
    assert table.by_client(grown, "192.0.2.1", now=6.0, timeout=10) is fresh_choice
    table.expire(now=100.0)
    assert table.clients == {}
    # Another worker (its own table) puts the same clients on the same targets.
    other_worker = affinity.Affinity()
    for index in range(20):
        ip = f"198.51.100.{index}"
        assert table.by_client(grown, ip, 0.0, 10) is other_worker.by_client(grown, ip, 0.0, 10)
    assert affinity.token("ns/lb", first) != affinity.token("ns/lb", others[0])


def test_active_counts_requests_in_flight(backends: Backends, proxies: Proxies) -> None:
    release = threading.Event()

    async def handler(seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.get_running_loop().run_in_executor(None, release.wait, TIMEOUT)
        writer.write(respond())

    backend = backends(handler=handler)
    proxy = proxies(one(backend))
    (target,) = proxy.targets("app")
    client = proxy.client()
    client.send(get())
    backend.wait(lambda: len(backend.requests) == 1)
    assert proxy.loop_thread.call(lambda: target.active) == 1
    release.set()
    client.response()
    assert proxy.loop_thread.call(lambda: target.active) == 0


# --- failures --------------------------------------------------------------------------------------------


class HealthLog:
    """Wraps targets' `health.record_passive` to see what the proxy reported."""

    def __init__(self, targets: list[Target]) -> None:
        self.results: list[tuple[int, bool]] = []
        for target in targets:
            original = target.health.record_passive

            def record(success: bool, target: Target = target, original: Any = original) -> bool:
                self.results.append((target.port or 0, success))
                result: bool = original(success)
                return result

            target.health.record_passive = record  # type: ignore[method-assign,assignment]


def test_a_dead_target_is_skipped_for_idempotent_requests_and_reported(
    backends: Backends, proxies: Proxies
) -> None:
    alive, dead = backends("alive"), free_port()
    proxy = proxies(lb_document({"app": [("127.0.0.1", dead), ("127.0.0.1", alive.port)]}))
    log = HealthLog(proxy.targets("app"))
    client = proxy.client()
    for _ in range(4):
        client.send(get())
        assert client.response().body == b"ok alive"
    assert (dead, False) in log.results
    backends("revived", port=dead)  # the dead target comes back: its first answered request is reported
    for _ in range(8):
        client.send(get())
        if client.response().body == b"ok revived":
            break
    assert (dead, True) in log.results


def test_dead_backend_502_slow_backend_504_nothing_usable_503(backends: Backends, proxies: Proxies) -> None:
    dead = free_port()
    proxy = proxies(lb_document({"app": [("127.0.0.1", dead)]}))
    client = proxy.client()
    client.send(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\nhi")
    response = client.response()
    assert response.status == 502 and response.header("content-type") == "text/plain; charset=utf-8"
    client.send(get())  # the connection is kept for the next request
    assert client.response().status == 502

    async def slow(seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)  # never answers (until the proxy gives up and closes)

    sleepy = backends("slow", handler=slow)
    proxy.reload(one(sleepy, timeouts={"requestSeconds": 0.3}, generation=2))
    client.send(get())
    assert client.response().status == 504
    sleepy.wait(lambda: sleepy.open == 0)  # that connection is not reused
    proxy.reload(
        lb_document(
            {"app": [("127.0.0.1", dead)]},
            generation=3,
            backend_options={"app": {"endpoints": [{"address": "127.0.0.1", "port": dead, "weight": 0}]}},
        )
    )
    client.send(get())
    unusable = client.response()
    assert unusable.status == 503 and unusable.body == b"no healthy backend\n"


def test_connect_timeout_gives_504(backends: Backends, proxies: Proxies) -> None:
    blackhole = socket.socket()
    blackhole.bind(("127.0.0.1", 0))
    blackhole.listen(0)
    port = blackhole.getsockname()[1]
    fillers = []
    for _ in range(4):  # fill the accept queue: further SYNs are dropped, connects hang
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(("127.0.0.1", port))
        fillers.append(filler)
    try:
        proxy = proxies(lb_document({"app": [("127.0.0.1", port)]}, timeouts={"connectSeconds": 0.3}))
        client = proxy.client()
        client.send(b"DELETE /x HTTP/1.1\r\nHost: h\r\n\r\n")
        assert client.response().status == 504
    finally:
        for filler in fillers:
            filler.close()
        blackhole.close()


def test_a_reused_connection_closed_by_the_backend_is_retried_once_for_idempotent_requests(
    backends: Backends, proxies: Proxies
) -> None:
    served: dict[tuple[str, int], int] = {}

    async def handler(seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        served[seen.peer] = served.get(seen.peer, 0) + 1
        if served[seen.peer] % 2 == 0:  # every second request on a connection: the backend hangs up instead
            writer.close()
            return
        writer.write(respond())

    backend = backends(handler=handler)
    proxy = proxies(one(backend))
    client = proxy.client()
    client.send(get())
    assert client.response().status == 200
    client.send(get())
    assert client.response().status == 200  # retried on a fresh connection
    assert backend.accepted == 2
    client.send(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\n\r\nx")
    assert client.response().status == 502  # not idempotent: not retried


def test_bad_backend_responses_give_502(backends: Backends, proxies: Proxies) -> None:
    async def handler(seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
        )

    backend = backends(handler=handler)
    proxy = proxies(one(backend))
    client = proxy.client()
    client.send(get())
    assert client.response().status == 502


def test_slow_request_heads_get_408_and_idle_clients_are_closed(backends: Backends, proxies: Proxies) -> None:
    backend = backends()
    proxy = proxies(one(backend, timeouts={"headerSeconds": 0.3, "idleSeconds": 0.6}))
    slow = proxy.client()
    slow.send(b"GET / HTTP/1.1\r\nHost: h\r\n")  # the blank line never comes
    response = slow.response()
    assert response.status == 408 and slow.closed()
    idle = proxy.client()
    idle.send(get())
    assert idle.response().status == 200
    assert idle.closed()  # after the idle timeout, without an answer
    assert backend.requests and len(backend.requests) == 1


def test_connections_beyond_the_cap_wait_for_a_slot(backends: Backends, proxies: Proxies) -> None:
    backend = backends()
    proxy = proxies(one(backend, listener={"maxConnections": 1}))
    first = proxy.client()
    first.send(get())
    assert first.response().status == 200
    second = proxy.client()
    second.send(get("/second"))
    assert second.silent_for(0.3)  # accepted, but not served while the first holds the only slot
    first.close()
    assert second.response().status == 200
    third = proxy.client()  # waiting
    fourth = proxy.client()  # beyond the waiting room (as large as the cap): refused
    assert fourth.response().status == 503
    second.close()
    third.send(get())
    assert third.response().status == 200


def test_one_address_beyond_its_cap_gets_503_unless_it_is_a_trusted_proxy(
    backends: Backends, proxies: Proxies
) -> None:
    backend = backends()
    capped = proxies(one(backend, listener={"maxConnectionsPerClient": 2}))
    first, second = capped.client(), capped.client()
    third = capped.client()
    assert third.response().status == 503 and third.closed()
    for client in (first, second):  # the two under the cap are served
        client.send(get())
        assert client.response().status == 200
    first.close()
    wait_until(lambda: _served(capped.client()), what="a slot of the address freed")
    trusted = {"maxConnectionsPerClient": 2, "acceptProxyProtocol": {"trustedCIDRs": ["127.0.0.0/8"]}}
    behind = proxies(one(backend, listener=trusted))
    header = proxy_protocol.encode(
        ProxyProtocolVersion.v1, ("203.0.113.7", 40000), ("127.0.0.1", behind.port)
    )
    clients = [behind.client() for _ in range(4)]  # a trusted proxy carries many clients: not counted
    for client in clients:
        client.send(header + get())
        assert client.response().status == 200


def _served(client: Any) -> bool:
    client.send(get())
    return bool(client.response().status == 200)


# --- strict parsing --------------------------------------------------------------------------------------

H = b"Host: h\r\n"
MALICIOUS = [
    (
        "CL and TE",
        b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    (
        "TE and CL",
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
        400,
    ),
    ("two lengths", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello", 400),
    ("length list differs", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 5, 6\r\n\r\nhello", 400),
    ("length +5", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: +5\r\n\r\nhello", 400),
    ("length 0x5", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 0x5\r\n\r\nhello", 400),
    ("length -1", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: -1\r\n\r\n", 400),
    ("length with space", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 5 5\r\n\r\nhello", 400),
    ("length empty", b"POST / HTTP/1.1\r\n" + H + b"Content-Length:\r\n\r\n", 400),
    ("TE gzip last", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked, gzip\r\n\r\n", 400),
    ("TE unknown", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: xchunked\r\n\r\n", 400),
    (
        "TE unknown first",
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: foo, chunked\r\n\r\n0\r\n\r\n",
        501,
    ),
    (
        "TE twice chunked",
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
        400,
    ),
    ("TE in HTTP/1.0", b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    (
        "chunk size +",
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n+5\r\nhello\r\n0\r\n\r\n",
        400,
    ),
    (
        "chunk size junk",
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n5x\r\nhello\r\n0\r\n\r\n",
        400,
    ),
    (
        "chunk ext bad",
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n5;a b\r\nhello\r\n0\r\n\r\n",
        400,
    ),
    (
        "chunk bare LF",
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n",
        400,
    ),
    ("obs-fold", b"GET / HTTP/1.1\r\n" + H + b"X-A: a\r\n b\r\n\r\n", 400),
    ("obs-fold tab", b"GET / HTTP/1.1\r\n" + H + b"X-A: a\r\n\tb\r\n\r\n", 400),
    ("space before colon", b"GET / HTTP/1.1\r\n" + H + b"X-A : a\r\n\r\n", 400),
    ("space in a name", b"GET / HTTP/1.1\r\n" + H + b"X A: a\r\n\r\n", 400),
    ("NUL in a value", b"GET / HTTP/1.1\r\n" + H + b"X-A: a\x00b\r\n\r\n", 400),
    ("DEL in a value", b"GET / HTTP/1.1\r\n" + H + b"X-A: a\x7fb\r\n\r\n", 400),
    ("CTL in a name", b"GET / HTTP/1.1\r\n" + H + b"X\x01A: a\r\n\r\n", 400),
    ("bare LF", b"GET / HTTP/1.1\n" + b"Host: h\n\n", 400),
    ("bare CR", b"GET / HTTP/1.1\r\nHost: h\rX-A: a\r\n\r\n", 400),
    ("bare LF in a header", b"GET / HTTP/1.1\r\nHost: h\nX-A: a\r\n\r\n", 400),
    ("no Host", b"GET / HTTP/1.1\r\n\r\n", 400),
    ("two Hosts", b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    ("bad Host", b"GET / HTTP/1.1\r\nHost: a b@c\r\n\r\n", 400),
    ("space in target", b"GET /a b HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("bad method", b"G(T / HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("HTTP/2.0", b"GET / HTTP/2.0\r\n" + H + b"\r\n", 505),
    ("RTSP", b"GET / RTSP/1.0\r\n" + H + b"\r\n", 400),
    ("not HTTP", b"hello there\r\n\r\n", 400),
    ("CONNECT", b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n", 405),
    ("request line too long", b"GET /" + b"a" * 300 + b" HTTP/1.1\r\n" + H + b"\r\n", 414),
    ("header block too large", b"GET / HTTP/1.1\r\n" + H + b"X-A: " + b"a" * 1100 + b"\r\n\r\n", 431),
    (
        "upgrade with a body",
        b"POST / HTTP/1.1\r\n" + H + b"Connection: upgrade\r\nUpgrade: ws\r\nContent-Length: 1\r\n\r\nx",
        400,
    ),
]


@pytest.fixture(params=["llhttp", "raw-checks-first", "lenient-llhttp"])
def strict_proxy(
    request: pytest.FixtureRequest, backends: Backends, proxies: Proxies, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Backend, ProxyUnderTest]]:
    """The proxy with small limits; a second time with the raw-head checks on (as for a lenient llhttp);
    a third time over a lenient llhttp, so the proxy's own checks are the ones that refuse."""
    if request.param == "raw-checks-first":
        monkeypatch.setattr(h1_request, "LLHTTP_STRICT", False)
        monkeypatch.setattr(h1_response, "LLHTTP_STRICT", False)
    elif request.param == "lenient-llhttp":
        lenient_llhttp.install(monkeypatch)
    backend = backends()
    yield backend, proxies(one(backend, limits={"maxRequestLineBytes": 256, "maxHeaderBytes": 1024}))


@pytest.mark.parametrize(("name", "data", "status"), MALICIOUS, ids=[case[0] for case in MALICIOUS])
def test_malicious_and_malformed_requests_are_refused_and_never_forwarded(
    strict_proxy: tuple[Backend, ProxyUnderTest], name: str, data: bytes, status: int
) -> None:
    backend, proxy = strict_proxy
    client = proxy.client()
    client.send(data)
    response = client.response()
    assert response.status == status, (name, response.body)
    assert response.header("connection") == "close"
    assert client.closed()
    assert backend.requests == []
    if not name.startswith("chunk"):  # a bad chunk is found after a valid head went out (then aborted)
        assert backend.accepted == 0


def test_a_valid_request_passes_the_strict_proxy(strict_proxy: tuple[Backend, ProxyUnderTest]) -> None:
    """The control case of the table above: same proxy, a well-formed chunked request."""
    backend, proxy = strict_proxy
    client = proxy.client()
    client.send(
        b"POST / HTTP/1.1\r\n"
        + H
        + b"Transfer-Encoding: chunked\r\nContent-Length-X: 1\r\n\r\n1\r\nx\r\n0\r\n\r\n"
    )
    assert client.response().status == 200
    assert backend.requests[0].header("transfer-encoding") == "chunked"


def test_smuggling_after_a_valid_request_is_refused_too(strict_proxy: tuple[Backend, ProxyUnderTest]) -> None:
    backend, proxy = strict_proxy
    client = proxy.client()
    client.send(
        get()
        + b"GET / HTTP/1.1\r\n"
        + H
        + b"Content-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    )
    assert client.response().status == 200
    assert client.response().status == 400
    assert len(backend.requests) == 1


# --- PROXY protocol, transparent mode, TLS -------------------------------------------------------------------


def test_proxy_protocol_from_trusted_clients_only(backends: Backends, proxies: Proxies) -> None:
    backend = backends()
    trusting = proxies(one(backend, listener={"acceptProxyProtocol": {"trustedCIDRs": ["127.0.0.0/8"]}}))
    client = trusting.client()
    header = proxy_protocol.encode(
        ProxyProtocolVersion.v1, ("203.0.113.7", 40000), ("127.0.0.1", trusting.port)
    )
    client.send(header + get())
    assert client.response().status == 200
    assert backend.requests[0].header("x-forwarded-for") == "203.0.113.7"
    distrusting = proxies(one(backend, listener={"acceptProxyProtocol": {"trustedCIDRs": ["10.0.0.0/8"]}}))
    plain = distrusting.client()
    plain.send(get())  # an untrusted peer's bytes are HTTP
    assert plain.response().status == 200
    assert backend.requests[1].header("x-forwarded-for") == "127.0.0.1"
    spoofing = distrusting.client()
    spoofing.send(header + get())
    assert spoofing.response().status == 400


def test_proxy_protocol_to_backends_is_sent_first_and_never_shared(
    backends: Backends, proxies: Proxies
) -> None:
    backend = backends()
    backend.proxy_protocol = True
    proxy = proxies(one(backend, backend_options={"app": {"proxyProtocol": "v2"}}))
    first, second = proxy.client(), proxy.client()
    for client in (first, second, first):
        client.send(get())
        assert client.response().status == 200
    assert backend.accepted == 2  # one per client: the header describes that client only
    for client, header in zip((first, second), backend.first_bytes, strict=True):
        local = client.sock.getsockname()
        assert header == proxy_protocol.encode(
            ProxyProtocolVersion.v2, (local[0], local[1]), ("127.0.0.1", proxy.port)
        )


def test_transparent_mode_connects_from_the_client_address(
    backends: Backends, proxies: Proxies, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str, socket.AddressFamily]] = []

    def bound_socket(source_ip: str, family: socket.AddressFamily) -> socket.socket:
        """A stand-in with the contract's signature: no IP_TRANSPARENT needed on loopback."""
        calls.append((source_ip, family))
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.bind((source_ip, 0))
        return sock

    monkeypatch.setattr(transparent, "bound_socket", bound_socket)
    backend = backends()
    proxy = proxies(one(backend, architecture="transparent"))
    first, second = proxy.client(), proxy.client()
    for client in (first, second, first):
        client.send(get())
        assert client.response().status == 200
    assert calls == [("127.0.0.1", socket.AF_INET)] * 2
    assert backend.accepted == 2


def test_https_listeners_say_so(backends: Backends, loop_thread: LoopThread, tmp_path: Path) -> None:
    make_certificate(tmp_path, "localhost", ["localhost"])
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tmp_path / "localhost.crt", tmp_path / "localhost.key")
    backend = backends()
    proxy = ProxyUnderTest(loop_thread, one(backend), ssl=context, protocol=Protocol.HTTPS)
    try:
        client_context = ssl.create_default_context(cafile=tmp_path / "localhost.crt")
        raw = socket.create_connection(("127.0.0.1", proxy.port), timeout=TIMEOUT)
        with client_context.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(get())
            assert tls.recv(65536).startswith(b"HTTP/1.1 200")
        assert backend.requests[0].header("x-forwarded-proto") == "https"
    finally:
        proxy.close()


# --- reloads and draining --------------------------------------------------------------------------------


def test_a_reload_applies_to_the_next_request_while_requests_in_flight_finish(
    backends: Backends, proxies: Proxies
) -> None:
    release = threading.Event()

    async def slow(seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if seen.target == "/slow":
            await asyncio.get_running_loop().run_in_executor(None, release.wait, TIMEOUT)
        writer.write(respond(body=b"old"))

    old, new = backends("old", handler=slow), backends("new")
    proxy = proxies(one(old))
    busy, kept = proxy.client(), proxy.client()
    busy.send(get("/slow"))
    old.wait(lambda: len(old.requests) == 1)
    kept.send(get())  # a second upstream connection, idle in the pool afterwards
    assert kept.response().body == b"old"
    assert old.open == 2
    proxy.reload(one(new, generation=2))
    kept.send(get())  # the same kept-alive client connection follows the new Plan
    assert kept.response().body == b"ok new"
    old.wait(lambda: old.open == 1)  # the idle pooled connection to the removed target is closed
    release.set()
    assert busy.response().body == b"old"  # the request in flight finished on its old target
    old.wait(lambda: old.open == 0)  # and its connection is not pooled


def test_reload_changes_limits_and_timeouts(backends: Backends, proxies: Proxies) -> None:
    backend = backends()
    proxy = proxies(one(backend))
    client = proxy.client()
    big = get(extra="X-Big: " + "a" * 2000 + "\r\n")
    client.send(big)
    assert client.response().status == 200
    proxy.reload(one(backend, limits={"maxHeaderBytes": 1024}, generation=2))
    client.send(get())  # the limit applies from the connection's next request
    assert client.response().status == 200
    client.send(big)
    assert client.response().status == 431


def test_close_drains(backends: Backends, proxies: Proxies, loop_thread: LoopThread) -> None:
    release = threading.Event()

    async def handler(seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if seen.target == "/slow":
            await asyncio.get_running_loop().run_in_executor(None, release.wait, TIMEOUT)
        writer.write(respond())

    backend = backends(handler=handler)
    proxy = proxies(one(backend))
    idle, busy = proxy.client(), proxy.client()
    idle.send(get())
    idle.response()
    busy.send(get("/slow"))
    backend.wait(lambda: len(backend.requests) == 2)
    closing = asyncio.run_coroutine_threadsafe(proxy.listener.close(TIMEOUT), loop_thread.loop)
    assert idle.closed()
    release.set()
    response = busy.response()
    assert response.status == 200 and response.header("connection") == "close"
    closing.result(TIMEOUT)
    assert busy.closed()


def test_requests_arriving_while_connecting_are_buffered(backends: Backends, proxies: Proxies) -> None:
    """A body that arrives before the upstream connection is open is held, then sent in order."""
    backend = backends()

    async def handler(seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(respond(body=seen.body))

    backend.handler = handler
    proxy = proxies(one(backend))
    client = proxy.client()
    client.send(b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
    client.send(b"3\r\ndef\r\n0\r\n\r\n")
    assert client.response().body == b"abcdef"
