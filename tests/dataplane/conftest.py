"""Real-socket helpers for data plane tests: a loop thread, HTTP, TCP and UDP backends, raw clients, Plans.

Tests stay synchronous and talk to loopback sockets with blocking calls and timeouts, so they control
every byte a client sends; servers (backends, the proxy under test) run on one uvloop event loop in a
background thread. Every wait is on a condition (a read, an event) with a generous timeout; nothing sleeps.

- `loop_thread` (fixture): `LoopThread.run(coroutine)` runs on the loop and returns its result;
  `ServerThread`: a server on a loop thread of its own.
- `Backend`: an HTTP/1.1 server; `handler(request, reader, writer)` answers (default: 200 "ok <name>").
  `TcpBackend` (`tcp`: three of them) greets and echoes, `UdpBackend` answers datagrams; all count
  connections and can be waited on.
- `RawClient`: a socket with `send`, `response()` (parses one response), `read_exactly`, `closed()`.
- `lb_document(...)` and `plan_of(document)`: a LoadBalancer and its Plan with static endpoints.
"""

from __future__ import annotations

import asyncio
import socket
import ssl as ssl_module
import threading
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest
import uvloop
from layerlb_dataplane.core.metrics import Metrics
from layerlb_dataplane.core.state import Registry, Snapshot
from layerlb_dataplane.core.targets import Target
from layerlb_dataplane.http.proxy import HttpListener

from layerlb import api, plan, resolve, validation

T = TypeVar("T")
TIMEOUT = 10.0
WAIT = 20.0  # for a backend to reach a condition: generous, as the machine is shared


class LoopThread:
    """An event loop (uvloop unless `new_loop` says otherwise) running in a daemon thread."""

    def __init__(self, new_loop: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop) -> None:
        self.loop = new_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float = TIMEOUT) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def call(self, function: Callable[[], T], timeout: float = TIMEOUT) -> T:
        async def call() -> T:
            return function()

        return self.run(call(), timeout)

    def stop(self) -> None:
        async def cancel_all() -> None:
            tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        self.run(cancel_all())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(TIMEOUT)
        self.loop.close()


@pytest.fixture
def loop_thread() -> Iterator[LoopThread]:
    thread = LoopThread()
    yield thread
    thread.stop()


class ServerThread:
    """A stream server on 127.0.0.1 with a plain asyncio loop of its own, apart from `loop_thread`: for
    servers that stand beside the code under test (a TLS echo server, a PROXY header sink)."""

    def __init__(
        self,
        serve: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
        ssl: ssl_module.SSLContext | None = None,
    ) -> None:
        self.loop_thread = LoopThread(asyncio.new_event_loop)
        self.server = self.loop_thread.run(asyncio.start_server(serve, "127.0.0.1", 0, ssl=ssl))
        self.port: int = self.server.sockets[0].getsockname()[1]

    def close(self) -> None:
        async def stop() -> None:
            self.server.close()
            await self.server.wait_closed()

        self.loop_thread.run(stop())
        self.loop_thread.stop()


# --- backends ---------------------------------------------------------------------------------------------


@dataclass
class Seen:
    """A request as a backend received it."""

    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]
    raw_head: bytes
    body: bytes = b""
    peer: tuple[str, int] = ("", 0)

    def header(self, name: str) -> str | None:
        values = self.all(name)
        return values[0] if values else None

    def all(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key.lower() == name.lower()]


async def read_head(reader: asyncio.StreamReader) -> bytes | None:
    """One head (through the blank line), or None at a clean end of stream."""
    try:
        return await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as error:
        if error.partial:
            raise
        return None


async def read_proxy_header(reader: asyncio.StreamReader) -> bytes:
    """A PROXY protocol header, v1 (a text line) or v2 (binary), exactly as received."""
    start = await reader.readexactly(6)
    if start == b"PROXY ":
        return start + await reader.readuntil(b"\r\n")
    fixed = start + await reader.readexactly(10)
    return fixed + await reader.readexactly(int.from_bytes(fixed[14:16], "big"))


def parse_head(raw: bytes) -> tuple[str, list[tuple[str, str]]]:
    lines = raw.decode("latin-1").split("\r\n")
    headers = []
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers.append((name, value.strip()))
    return lines[0], headers


async def read_body(reader: asyncio.StreamReader, headers: list[tuple[str, str]]) -> bytes:
    """The body a Content-Length or chunked framing announces (chunked: decoded)."""
    names = {name.lower(): value for name, value in headers}
    if "chunked" in names.get("transfer-encoding", "").lower():
        body = bytearray()
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                while await reader.readuntil(b"\r\n") != b"\r\n":
                    pass
                return bytes(body)
            body += await reader.readexactly(size)
            assert await reader.readexactly(2) == b"\r\n"
    length = int(names.get("content-length", "0"))
    return await reader.readexactly(length) if length else b""


Handler = Callable[[Seen, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def respond(status: int = 200, body: bytes = b"ok", headers: tuple[str, ...] = ()) -> bytes:
    extra = "".join(f"{header}\r\n" for header in headers)
    return f"HTTP/1.1 {status} X\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode() + body


class CountedServer:
    """What the test backends share: a server on the test's loop, its connection counts (`accepted`,
    `open`) and a Condition notified on every change, so that a test waits for a count, never sleeps."""

    def __init__(self, loop_thread: LoopThread, name: str) -> None:
        self.loop_thread = loop_thread
        self.name = name
        self.accepted = 0
        self.open = 0
        self.changed = threading.Condition()
        self.server: asyncio.Server | None = None

    async def _listen(self, port: int) -> int:
        self.server = await asyncio.start_server(self._counted, "127.0.0.1", port)
        bound: int = self.server.sockets[0].getsockname()[1]
        return bound

    async def _counted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One connection, counted open while `_serve` handles it, then closed."""

        def opened() -> None:
            self.accepted += 1
            self.open += 1

        def closed() -> None:
            self.open -= 1

        self._note(opened)
        try:
            await self._serve(reader, writer)
        finally:
            writer.close()
            self._note(closed)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    def _note(self, change: Callable[[], None]) -> None:
        with self.changed:
            change()
            self.changed.notify_all()

    def wait(self, predicate: Callable[[], bool], timeout: float = WAIT) -> None:
        """Block until `predicate()` holds (checked on every change), or fail."""
        with self.changed:
            assert self.changed.wait_for(predicate, timeout), f"backend {self.name}: condition not met"

    def close(self) -> None:
        async def close() -> None:
            assert self.server is not None
            self.server.close()

        self.loop_thread.run(close())


class Backend(CountedServer):
    """An HTTP/1.1 keep-alive server on 127.0.0.1 that records what it receives.

    `read_bodies` False leaves bodies to the handler (streaming tests). A handler that closes the
    writer ends the connection.
    """

    def __init__(
        self, loop_thread: LoopThread, name: str = "b", handler: Handler | None = None, port: int = 0
    ) -> None:
        super().__init__(loop_thread, name)
        self.handler: Handler = handler or self.default
        self.read_bodies = True
        self.proxy_protocol = False  # connections start with a PROXY header (v1 or v2): kept in first_bytes
        self.requests: list[Seen] = []
        self.first_bytes: list[bytes] = []
        self.port = loop_thread.run(self._listen(port))

    async def default(
        self, request: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        writer.write(respond(body=f"ok {self.name}".encode()))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        try:
            if self.proxy_protocol:
                header = await read_proxy_header(reader)
                self._note(lambda: self.first_bytes.append(header))
            while not writer.is_closing():
                raw = await read_head(reader)
                if raw is None:
                    break
                line, headers = parse_head(raw)
                method, target, version = line.split(" ")
                seen = Seen(method, target, version, headers, raw, peer=(peer[0], peer[1]))
                if self.read_bodies and method != "PRI":
                    seen.body = await read_body(reader, headers)
                self._note(lambda seen=seen: self.requests.append(seen))  # type: ignore[misc]
                await self.handler(seen, reader, writer)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass


@pytest.fixture
def backends(loop_thread: LoopThread) -> Iterator[Callable[..., Backend]]:
    """A factory of backends, all closed at the end of the test."""
    made: list[Backend] = []

    def make(name: str = "b", handler: Handler | None = None, port: int = 0) -> Backend:
        backend = Backend(loop_thread, name, handler, port)
        made.append(backend)
        return backend

    yield make
    for backend in made:
        backend.close()


class TcpBackend(CountedServer):
    """A TCP server that greets each connection with `NAME\\n` and then echoes.

    `eof_reply` is sent after the client's EOF (before closing), to show the other direction goes on.
    """

    def __init__(self, loop_thread: LoopThread, name: str, eof_reply: bytes = b"", port: int = 0) -> None:
        super().__init__(loop_thread, name)
        self.eof_reply = eof_reply
        self.received = 0
        self.first: list[bytes] = []  # the first chunk of each connection (PROXY headers)
        self.port: int = loop_thread.run(self._listen(port))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        first = True
        try:
            writer.write(f"{self.name}\n".encode())
            while data := await reader.read(65536):
                if first:
                    self._note(lambda: self.first.append(data))
                    first = False
                self.received += len(data)
                writer.write(data)
                await writer.drain()
            if self.eof_reply:
                writer.write(self.eof_reply)
                await writer.drain()
        except ConnectionError:
            pass


@pytest.fixture
def tcp(loop_thread: LoopThread) -> Iterator[list[TcpBackend]]:
    """Three greeting echo backends: a, b, c."""
    made = [TcpBackend(loop_thread, name) for name in "abc"]
    yield made
    for backend in made:
        backend.close()


class UdpBackend:
    """A UDP server answering every datagram with `NAME:` + the datagram; records the peers it saw."""

    def __init__(self, loop_thread: LoopThread, name: str) -> None:
        self.loop_thread = loop_thread
        self.name = name.encode()
        self.peers: set[tuple[str, int]] = set()
        self.transport: asyncio.DatagramTransport | None = None
        self.port: int = loop_thread.run(self._start())

    async def _start(self) -> int:
        backend = self

        class Echo(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
                backend.peers.add((str(addr[0]), int(addr[1])))
                assert backend.transport is not None
                backend.transport.sendto(backend.name + b":" + data, addr)

        loop = asyncio.get_running_loop()
        self.transport, _ = await loop.create_datagram_endpoint(Echo, local_addr=("127.0.0.1", 0))
        port: int = self.transport.get_extra_info("sockname")[1]
        return port

    def close(self) -> None:
        async def close() -> None:
            assert self.transport is not None
            self.transport.close()

        self.loop_thread.run(close())


# --- clients ----------------------------------------------------------------------------------------------


@dataclass
class Response:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes
    raw_head: bytes = b""
    informational: list[int] = field(default_factory=list)

    def header(self, name: str) -> str | None:
        values = self.all(name)
        return values[0] if values else None

    def all(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key.lower() == name.lower()]


class RawClient:
    """A blocking socket whose every byte the test chooses; reads time out instead of hanging."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = TIMEOUT) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _more(self) -> bool:
        data = self.sock.recv(1 << 20)
        self.buffer += data
        return bool(data)

    def read_exactly(self, size: int) -> bytes:
        while len(self.buffer) < size:
            if not self._more():
                raise EOFError(f"closed after {len(self.buffer)} of {size} bytes")
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data

    def read_until(self, marker: bytes) -> bytes:
        while marker not in self.buffer:
            if not self._more():
                raise EOFError(f"closed before {marker!r}; got {self.buffer[:200]!r}")
        index = self.buffer.index(marker) + len(marker)
        data, self.buffer = self.buffer[:index], self.buffer[index:]
        return data

    def response(self, head_request: bool = False) -> Response:
        """One whole response (1xx heads before it are recorded in `informational`)."""
        informational = []
        while True:
            raw = self.read_until(b"\r\n\r\n")
            line, headers = parse_head(raw)
            _, status_text, reason = ([*line.split(" ", 2), ""])[:3]
            status = int(status_text)
            if 100 <= status < 200 and status != 101:
                informational.append(status)
                continue
            break
        response = Response(status, reason, headers, b"", raw, informational)
        if head_request or status in (101, 204, 304):
            return response
        coding = (response.header("transfer-encoding") or "").lower()
        if "chunked" in coding:
            body = bytearray()
            while True:
                size = int(self.read_until(b"\r\n").split(b";")[0], 16)
                if size == 0:
                    while self.read_until(b"\r\n") != b"\r\n":
                        pass
                    break
                body += self.read_exactly(size)
                assert self.read_exactly(2) == b"\r\n"
            response.body = bytes(body)
        elif response.header("content-length") is not None:
            response.body = self.read_exactly(int(response.header("content-length") or 0))
        else:
            while self._more():
                pass
            response.body, self.buffer = self.buffer, b""
        return response

    def closed(self) -> bool:
        """True when the peer closes (EOF or reset) before the timeout; buffered bytes are kept."""
        try:
            while self._more():
                pass
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False
        return True

    def silent_for(self, seconds: float) -> bool:
        """Nothing arrives (and no close) within `seconds`: for showing that something waits."""
        self.sock.settimeout(seconds)
        try:
            data = self.sock.recv(1)
        except TimeoutError:
            return True
        finally:
            self.sock.settimeout(TIMEOUT)
        self.buffer += data
        return False

    def close(self) -> None:
        self.sock.close()


def get(path: str = "/", host: str = "example.com", extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode()


# --- LoadBalancer documents and Plans ---------------------------------------------------------------------


def lb_document(
    backends: dict[str, list[tuple[str, int]]],
    *,
    default: str | None = None,
    routes: list[dict[str, Any]] | None = None,
    listener: dict[str, Any] | None = None,
    architecture: str = "proxy",
    generation: int = 1,
    backend_options: dict[str, dict[str, Any]] | None = None,
    **spec: Any,
) -> dict[str, Any]:
    """An L7 LoadBalancer with static endpoints; extra keyword arguments go into `spec` as they are."""
    options = backend_options or {}
    document: dict[str, Any] = {
        "apiVersion": "layerlb.dev/v1alpha1",
        "kind": "LoadBalancer",
        "metadata": {"name": "test", "namespace": "default", "generation": generation},
        "spec": {
            "mode": "L7",
            "architecture": architecture,
            "vip": "127.0.0.1",
            "listeners": [{"name": "http", "port": 8080, "protocol": "HTTP", **(listener or {})}],
            "backends": [
                {
                    "name": name,
                    "endpoints": [{"address": a, "port": p} for a, p in endpoints],
                    **options.get(name, {}),
                }
                for name, endpoints in backends.items()
            ],
            **spec,
        },
    }
    if default is not None or routes is None:
        document["spec"]["defaultBackend"] = default or next(iter(backends))
    if routes is not None:
        document["spec"]["routes"] = routes
    return document


def plan_of(document: dict[str, Any]) -> plan.Plan:
    resource = validation.validate(document)
    assert isinstance(resource, api.LoadBalancer)
    return resolve.resolve(resource, resolve.StaticView())


class ProxyUnderTest:
    """An `HttpListener` serving a Plan on 127.0.0.1 (a free port), with `reload` as the runtime does it."""

    def __init__(
        self,
        loop_thread: LoopThread,
        document: dict[str, Any],
        ssl: ssl_module.SSLContext | None = None,
        protocol: api.Protocol | None = None,
    ) -> None:
        """`ssl` and `protocol` stand in for an HTTPS listener (the runtime brings the TLS context)."""
        self.loop_thread = loop_thread
        self.registry = Registry()
        first = plan_of(document)
        self.snapshot = self.registry.snapshot(first)
        self.metrics = Metrics()
        listener = first.listeners[0]
        if protocol is not None:
            listener = listener.model_copy(update={"protocol": protocol})
        self.ssl = ssl
        self.listener = HttpListener(listener, lambda: self.snapshot, self.metrics)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]
        self.server: asyncio.Server = loop_thread.run(self._start())

    async def _start(self) -> asyncio.Server:
        loop = asyncio.get_running_loop()
        return await loop.create_server(
            self.listener.protocol_factory, sock=self.sock, backlog=1024, ssl=self.ssl
        )

    def reload(self, document: dict[str, Any]) -> Snapshot:
        new = plan_of(document)

        def apply() -> Snapshot:
            self.snapshot = self.registry.snapshot(new)
            self.listener.update(new.listeners[0])
            return self.snapshot

        return self.loop_thread.call(apply)

    def targets(self, backend: str) -> list[Target]:
        pool = self.snapshot.pool(backend)
        assert pool is not None
        return pool.targets

    def client(self) -> RawClient:
        return RawClient(self.port)

    def close(self, drain: float = 1.0) -> None:
        async def close() -> None:
            self.server.close()
            await self.listener.close(drain)

        self.loop_thread.run(close(), timeout=drain + TIMEOUT)


@pytest.fixture
def proxies(loop_thread: LoopThread) -> Iterator[Callable[[dict[str, Any]], ProxyUnderTest]]:
    """A factory of proxies under test, closed at the end of the test."""
    made: list[ProxyUnderTest] = []

    def make(document: dict[str, Any]) -> ProxyUnderTest:
        proxy = ProxyUnderTest(loop_thread, document)
        made.append(proxy)
        return proxy

    yield make
    for proxy in made:
        proxy.close()
