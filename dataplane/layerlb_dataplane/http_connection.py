"""One client connection of the L7 proxy and the exchange in flight on it, as asyncio protocol callbacks.

Throughput decides whether a Python proxy is worth running, so the common request (a whole head in one
read, a pooled upstream connection, a small response) runs in callbacks only: no task, no closure, no
timer operation; writes made while one read is handled leave in one `writelines` (one syscall). Tasks
appear on slow paths only (opening an upstream connection, retries). Timeouts are one deadline per
connection, checked by a timer that is re-armed lazily when it fires.

Requests on a connection are served one at a time, in order: after a request, the parser pauses and
pipelined requests wait unparsed until the response is done. Bodies stream both ways: a full write
buffer on one side pauses reading on the other.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, cast

from layerlb.api import AffinityType, HashSource
from layerlb_dataplane import http1, proxy_protocol, upstream
from layerlb_dataplane.http1 import ParseError, error_response
from layerlb_dataplane.http1_response import Response
from layerlb_dataplane.state import BackendPool, Target
from layerlb_dataplane.upstream import UpstreamConnection

if TYPE_CHECKING:
    from layerlb_dataplane.proxy_http import HttpListener, Settings

IDLE, LOCAL, CONNECTING, WAITING, RESPONDING, TUNNEL, LINGER, CLOSED, QUEUED = range(9)
# What the connection's single deadline means when it passes.
_D_HEADER, _D_IDLE, _D_REQUEST, _D_BODY, _D_TUNNEL, _D_LINGER = range(1, 7)
# Why the client's transport is not being read (bits).
_P_UPSTREAM, _P_PIPELINE, _P_CONNECTING, _P_QUEUED = 1, 2, 4, 8

PIPELINE_LIMIT = 1 << 20  # unparsed bytes held while a request is in flight, before reading pauses
CONNECT_BUFFER = 1 << 18  # body bytes held while the upstream connection opens, before reading pauses
MAX_ATTEMPTS = 3  # targets tried by one idempotent request whose connects fail
LINGER_SECONDS = 2.0  # after an error answer: read and discard, so the client sees the answer, not a reset
_ZERO_CHUNK = b"0\r\n\r\n"


def _forwarded_node(ip: str) -> bytes:
    """An address as a Forwarded `for=` value (RFC 7239 6: IPv6 quoted, in brackets)."""
    return f'"[{ip}]"'.encode() if ":" in ip else ip.encode()


def _forwarded_host(host: bytes) -> bytes:
    return host if host.replace(b".", b"").replace(b"-", b"").isalnum() else b'"' + host + b'"'


class ClientConnection(asyncio.Protocol):
    """One client connection: requests in, responses out, in order; see the module notes."""

    __slots__ = (
        "admitted",
        "body_done",
        "client_eof",
        "client_ip",
        "client_port",
        "close_after",
        "deadline",
        "deadline_kind",
        "fwd_cache",
        "fwd_key",
        "head",
        "lb",
        "local",
        "loop",
        "out",
        "parser",
        "paused",
        "pending",
        "pending_size",
        "pool",
        "private",
        "proxy_parser",
        "reply",
        "req",
        "resp_chunked",
        "resp_keep_alive",
        "set_cookie",
        "settings",
        "started",
        "state",
        "status",
        "target",
        "timer",
        "timer_at",
        "transport",
        "tried",
        "tunnel_eof",
        "up",
        "up_out",
        "write_paused",
    )

    def __init__(self, lb: HttpListener) -> None:
        assert lb.loop is not None
        self.lb = lb
        self.loop = lb.loop
        self.transport: asyncio.Transport = None  # type: ignore[assignment]  # set by connection_made
        self.parser = http1.RequestParser(self)
        self.state = IDLE
        self.admitted = False
        self.client_ip = ""
        self.client_port = 0
        self.local: tuple[str, int] = ("", 0)
        self.proxy_parser: proxy_protocol.HeaderParser | None = None
        self.settings: Settings = None  # type: ignore[assignment]  # set on admission and per request
        self.req: http1.Request = None  # type: ignore[assignment]  # set per request
        self.pool: BackendPool | None = None
        self.target: Target | None = None
        self.up: UpstreamConnection | None = None
        self.private: UpstreamConnection | None = None  # kept per client: PROXY protocol or transparent
        self.head = b""
        self.tried: list[Target] | None = None
        self.pending: list[bytes] | None = None
        self.pending_size = 0
        self.body_done = True
        self.started = 0.0
        self.status = 0
        self.reply: tuple[int, str] | None = None
        self.resp_chunked = False
        self.resp_keep_alive = True
        self.close_after = False
        self.client_eof = False
        self.tunnel_eof = 0
        self.set_cookie: bytes | None = None
        self.paused = 0
        self.write_paused = False
        self.deadline = 0.0
        self.deadline_kind = 0
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at = 0.0
        self.fwd_key: tuple[bytes, Settings] | None = None
        self.fwd_cache = b""
        # Writes made while one read is handled, sent with one writelines when it is (a syscall each is dear).
        self.out: list[bytes | bytearray] | None = None
        self.up_out: list[bytes | bytearray] | None = None

    # --- asyncio.Protocol: the client side -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass it
        lb = self.lb
        peer = transport.get_extra_info("peername")
        if peer:
            self.client_ip, self.client_port = peer[0], peer[1]
        sockname = transport.get_extra_info("sockname")
        if sockname:
            self.local = (sockname[0], sockname[1])
        accept = lb.listener.accept_proxy_protocol
        if accept is not None and proxy_protocol.trusted(self.client_ip, accept.trusted_cidrs):
            self.proxy_parser = proxy_protocol.HeaderParser()
        self.state = QUEUED
        if lb.opened(self):
            self.admit()
        elif not self.transport.is_closing():
            self._pause(_P_QUEUED)

    def admit(self) -> None:
        """A slot under the connection cap is ours: start reading (the header timeout runs from now)."""
        self.admitted = True
        self.state = IDLE
        self.settings = settings = self.lb.settings()
        self.parser.max_request_line = settings.limits.max_request_line
        self.parser.max_header = settings.limits.max_header
        self._set_deadline(_D_HEADER, settings.timeouts.header)
        self._unpause(_P_QUEUED)
        held = self.pending
        if held:  # bytes read before the pause took hold
            self.pending = None
            self.data_received(b"".join(held))

    def data_received(self, data: bytes) -> None:
        state = self.state
        if state == TUNNEL:
            assert self.up is not None
            self.up.transport.write(data)
            self.deadline = self.loop.time() + self.settings.timeouts.idle
            return
        if state >= LINGER:
            if state == QUEUED:  # not admitted yet: hold (uvloop may deliver a read before the pause holds)
                self.pending = [*(self.pending or ()), data]
                self.transport.pause_reading()
            return
        if self.proxy_parser is not None:
            data = self._proxy_header(data)
            if not data:
                return
        up_out: list[bytes | bytearray] = []
        self.up_out = up_out
        try:
            self.parser.feed(data)
        except ParseError as error:
            self.up_out = None
            self._reject(error)
            return
        self.up_out = None
        if up_out and self.up is not None:
            self.up.transport.writelines(up_out)
        if self.state == IDLE and self.deadline_kind != _D_HEADER and self.parser.partial_head:
            self._set_deadline(_D_HEADER, self.settings.timeouts.header)
        if self.parser.buffered > PIPELINE_LIMIT and self.state < LINGER:
            self._pause(_P_PIPELINE)

    def eof_received(self) -> bool:
        state = self.state
        if state == TUNNEL:
            return self._tunnel_half_close(from_client=True)
        if LOCAL <= state <= RESPONDING and self.body_done:
            self.client_eof = True  # a half-closed client still gets its response
            self.close_after = True
            return True
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        state = self.state
        self.state = CLOSED
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.parser.close()
        up = self.up
        if up is not None:
            self.up = None
            up.close() if state == TUNNEL else up.abort()
        if self.target is not None:
            target = self.target
            self.target = None
            target.active -= 1
            if state != TUNNEL:
                self.lb.metrics.request_done(
                    self.lb.name, self._backend_name(), 499, self.loop.time() - self.started
                )
        if self.private is not None:
            self.private.close()
            self.private = None
        self.lb.closed(self)

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.up is not None:
            self.up.transport.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.up is not None:
            self.up.transport.resume_reading()

    def shutdown(self) -> None:
        """The listener closes: an idle connection closes now, a busy one after its response."""
        if self.state == IDLE and not self.parser.partial_head:
            self.transport.close()
        else:
            self.close_after = True

    # --- requests (http1.RequestHandler) ---------------------------------------------------------------

    def on_request(self, req: http1.Request) -> None:
        self.req = req
        self.settings = settings = self.lb.settings()
        self.started = self.loop.time()
        self.body_done = not req.has_body
        self.set_cookie = None
        self.tried = None
        if settings.direct:
            name = settings.default
        else:
            name = settings.snapshot.router.match(
                req.method.decode("latin-1"),
                req.host.decode("latin-1").lower(),
                req.path.decode("latin-1"),
                req.header,
            )
        pool = settings.snapshot.pools.get(name) if name is not None else None
        self.pool = pool
        if pool is None:
            self._local(404, "no route for this request") if name is None else self._local(
                503, "no such backend"
            )
            return
        target = self._choose(pool, req)
        if target is None:
            self._local(503, "no healthy backend")
            return
        self._start(target)

    def on_body(self, data: bytes | bytearray) -> None:
        state = self.state
        if WAITING <= state <= RESPONDING:
            out = self.up_out
            if out is None:
                assert self.up is not None
                out = []
                self._chunk(out, data)
                self.up.transport.writelines(out)
            else:
                self._chunk(out, data)
            if self.deadline_kind == _D_REQUEST:
                self.deadline = self.loop.time() + self.settings.timeouts.request
        elif state == CONNECTING:
            assert self.pending is not None
            self.pending.append(bytes(data))
            self.pending_size += len(data)
            if self.pending_size > CONNECT_BUFFER:
                self._pause(_P_CONNECTING)

    def on_request_end(self) -> None:
        self.body_done = True
        state = self.state
        if state == LOCAL:
            assert self.reply is not None
            status, text = self.reply
            self.reply = None
            self._answer(status, text)
        elif WAITING <= state <= RESPONDING and self.req.chunked:
            if self.up_out is not None:
                self.up_out.append(_ZERO_CHUNK)
            else:
                assert self.up is not None
                self.up.transport.write(_ZERO_CHUNK)

    def _chunk(self, out: list[bytes | bytearray], data: bytes | bytearray) -> None:
        if self.req.chunked:
            out += (b"%x\r\n" % len(data), data, b"\r\n")
        else:
            out.append(data)

    # --- choosing a target and sending ---------------------------------------------------------------------

    def _choose(
        self, pool: BackendPool, req: http1.Request, exclude: list[Target] | None = None
    ) -> Target | None:
        """Session affinity first, then the balancer with the backend's hash key."""
        settings = self.settings
        kind = settings.affinity
        if kind is AffinityType.None_ and pool.backend.hash_on.type is HashSource.SourceIP:
            return pool.pick(self.client_ip, None, exclude or ())
        lb = self.lb
        if kind is AffinityType.ClientIP:
            lb.watch_affinity()
            return lb.affinity.by_client(
                pool, self.client_ip, self.loop.time(), settings.cookie_age, exclude or ()
            )
        if kind is AffinityType.Cookie:
            value = req.cookie_value(settings.cookie_name)
            target = lb.affinity.by_cookie(settings.plan_key, pool, value) if value else None
            if target is not None and (exclude is None or target not in exclude):
                return target
        hash_on = pool.backend.hash_on
        key: bytes | None = None
        if hash_on.name and hash_on.type is HashSource.Header:
            text = req.header(hash_on.name)
            key = text.encode("latin-1") if text is not None else None
        elif hash_on.name and hash_on.type is HashSource.Cookie:
            key = req.cookie_value(hash_on.name.encode())
        target = pool.pick(self.client_ip, key, exclude or ())
        if target is not None and kind is AffinityType.Cookie:
            token = lb.affinity.cookie_token(settings.plan_key, target)
            self.set_cookie = b"\r\nSet-Cookie: %s=%s; Path=/; Max-Age=%d; HttpOnly; SameSite=Lax%s" % (
                settings.cookie_name,
                token,
                settings.cookie_age,
                b"; Secure" if lb.proto == b"https" else b"",
            )
        return target

    def _start(self, target: Target) -> None:
        """Send the request to `target`: on a pooled connection now, else after a connect (a task)."""
        target.active += 1
        self.target = target
        self.head = self._request_head(self.req)
        up: UpstreamConnection | None
        if self._private_upstream():
            up = self.private
            self.private = None
            if up is not None and (up.target is not target or not up.usable):
                up.close()
                up = None
        else:
            up = self.lb.pool.acquire(target)
        if up is not None:
            self._send(up)
        else:
            self._connect_later(target)

    def _private_upstream(self) -> bool:
        """PROXY-protocol and transparent connections carry this client's identity: never shared."""
        pool = self.pool
        return self.settings.transparent or (pool is not None and pool.backend.proxy_protocol is not None)

    def _connect_later(self, target: Target) -> None:
        self.state = CONNECTING
        self.pending = []
        self.pending_size = 0
        self.deadline = 0.0
        self.loop.create_task(self._connect(target))

    async def _connect(self, target: Target) -> None:
        """Open an upstream connection (slow path); when it fails, idempotent requests try another target."""
        lb, settings, pool = self.lb, self.settings, self.pool
        assert pool is not None
        version = pool.backend.proxy_protocol
        while True:
            try:
                header = None
                if version is not None:
                    header = proxy_protocol.encode(version, (self.client_ip, self.client_port), self.local)
                up = await upstream.connect(
                    target,
                    target.port_for(lb.listener.port),
                    timeout=settings.timeouts.connect,
                    source_ip=self.client_ip if settings.transparent else None,
                    proxy_header=header,
                )
            except (OSError, TimeoutError, ValueError) as error:
                timed_out = isinstance(error, TimeoutError)
                lb.metrics.upstream_failure(target.backend, "timeout" if timed_out else "connect")
                lb._report(target, False)
                if self.state != CONNECTING or self.target is not target:
                    return
                retry = self._retarget(target) if self.req.idempotent else None
                if retry is None:
                    self._fail(
                        504 if timed_out else 502, "backend timed out" if timed_out else "backend unreachable"
                    )
                    return
                target = retry
                continue
            if self.state != CONNECTING or self.target is not target:  # the client left meanwhile
                if version is None and not settings.transparent:
                    lb.release(up)
                else:
                    up.close()
                return
            self._send(up)
            return

    def _retarget(self, failed: Target) -> Target | None:
        """Another target for a retry, or None when tries are exhausted or no other target is left."""
        tried = self.tried = [*(self.tried or ()), failed]
        if len(tried) >= MAX_ATTEMPTS or self.pool is None:
            return None
        target = self._choose(self.pool, self.req, tried)
        if target is None or target in tried:
            return None
        failed.active -= 1
        target.active += 1
        self.target = target
        return target

    def _send(self, up: UpstreamConnection) -> None:
        """Write the request head, and the body bytes held during a connect, to `up`."""
        self.up = up
        up.attach(self)
        up.parser.expect(self.req.method == b"HEAD")
        if self.write_paused:
            up.transport.pause_reading()
        pending = self.pending
        out = self.up_out
        if out is None or pending:
            parts: list[bytes | bytearray] = [self.head]
            if pending:
                for data in pending:
                    self._chunk(parts, data)
                self._unpause(_P_CONNECTING)
            if self.body_done and self.req.chunked:
                parts.append(_ZERO_CHUNK)
            up.transport.writelines(parts)
        else:
            out.append(self.head)
        self.pending = None
        self.state = WAITING
        self._set_deadline(_D_REQUEST, self.settings.timeouts.request)
        if up.write_paused:
            self._pause(_P_UPSTREAM)

    def _request_head(self, req: http1.Request) -> bytes:
        """The head sent upstream, in one join: request line, kept lines, forwarding and framing lines."""
        parts = [req.method, b" ", req.target, b" HTTP/1.1"]
        if not req.host_in_block:
            parts += (b"\r\nHost: ", req.host)
        parts += (req.block, self._forwarding(req))
        if req.chunked:
            parts.append(
                b"\r\nTransfer-Encoding: %s, chunked" % req.codings
                if req.codings
                else b"\r\nTransfer-Encoding: chunked"
            )
        elif req.content_length is not None:
            parts.append(b"\r\nContent-Length: %d" % req.content_length)
        if req.upgrade is not None:
            parts += (b"\r\nConnection: upgrade\r\nUpgrade: ", req.upgrade)
        parts.append(b"\r\n\r\n")
        return b"".join(parts)

    def _forwarding(self, req: http1.Request) -> bytes:
        """X-Forwarded-For (appended), X-Forwarded-Proto, X-Forwarded-Host, Forwarded (appended)."""
        fresh = req.forwarded_for is None and req.forwarded is None
        if (
            fresh
            and self.fwd_key is not None
            and self.fwd_key[0] == req.host
            and self.fwd_key[1] is self.settings
        ):
            return self.fwd_cache
        ip = self.client_ip.encode()
        proto = self.lb.proto
        xff = ip if req.forwarded_for is None else req.forwarded_for + b", " + ip
        element = b"for=%s;proto=%s" % (_forwarded_node(self.client_ip), proto)
        if req.host:
            element += b";host=" + _forwarded_host(req.host)
        forwarded = element if req.forwarded is None else req.forwarded + b", " + element
        lines = b"\r\nX-Forwarded-For: %s\r\nX-Forwarded-Proto: %s" % (xff, proto)
        if req.host:
            lines += b"\r\nX-Forwarded-Host: " + req.host
        lines += b"\r\nForwarded: " + forwarded
        if fresh:
            self.fwd_key, self.fwd_cache = (req.host, self.settings), lines
        return lines

    # --- responses (http1_response.ResponseHandler, upstream.Owner) --------------------------------------

    def upstream_data(self, connection: UpstreamConnection, data: bytes) -> None:
        if self.state == TUNNEL:
            self.transport.write(data)
            self.deadline = self.loop.time() + self.settings.timeouts.idle
            return
        if connection is not self.up:
            connection.close()
            return
        out: list[bytes | bytearray] = []
        self.out = out
        try:
            rest = connection.parser.feed(data)
        except ParseError as error:
            self.out = None
            self._upstream_failed(connection, "reset", f"bad response from the backend: {error.reason}")
            return
        self.out = None
        if out:
            self.transport.writelines(out)
        if rest:
            self.transport.write(rest)

    def on_response(self, resp: Response) -> None:
        status = resp.status
        req = self.req
        out = self.out
        assert out is not None
        if status < 200:
            if status == 101:
                if req.upgrade is None:
                    raise ParseError(502, "101 without an Upgrade request")
                self._tunnel(resp)
            elif req.version == b"1.1":  # 1xx are not for HTTP/1.0 clients
                out += (resp.status_line, resp.block, b"\r\n\r\n")
            return
        target = self.target
        assert target is not None
        self.lb._report(target, True)
        self.status = status
        self.resp_keep_alive = resp.keep_alive
        close = self.close_after or not req.keep_alive or not self.body_done or self.lb.closing
        out += (resp.status_line, resp.block)
        chunked = False
        if resp.content_length is not None:
            if not resp.length_in_block and status != 204:
                out.append(b"\r\nContent-Length: %d" % resp.content_length)
        elif req.method == b"HEAD" or status == 204 or status == 304:
            pass
        elif req.version == b"1.1":
            chunked = True
            out.append(
                b"\r\nTransfer-Encoding: %s, chunked" % resp.codings
                if resp.codings
                else b"\r\nTransfer-Encoding: chunked"
            )
        else:
            close = True  # an HTTP/1.0 client reads a body of unknown length until the close
        if close:
            out.append(b"\r\nConnection: close")
            self.close_after = True
        elif req.version == b"1.0":
            out.append(b"\r\nConnection: keep-alive")
        if self.set_cookie is not None:
            out.append(self.set_cookie)
        out.append(b"\r\n\r\n")
        self.resp_chunked = chunked
        self.state = RESPONDING
        self.deadline_kind = _D_BODY
        self.deadline = self.loop.time() + self.settings.timeouts.idle

    def on_response_body(self, data: bytes | bytearray) -> None:
        out = self.out
        assert out is not None
        if self.resp_chunked:
            out += (b"%x\r\n" % len(data), data, b"\r\n")
        else:
            out.append(data)

    def on_response_end(self) -> None:
        out = self.out
        if self.resp_chunked:
            self.resp_chunked = False
            if out is not None:
                out.append(_ZERO_CHUNK)
            else:
                self.transport.write(_ZERO_CHUNK)
        if out:  # before anything else may write (an answer to a pipelined request, a close)
            self.transport.writelines(out)
            out.clear()
        up = self.up
        self.up = None
        self._end_exchange(self.status)
        if up is not None:
            if self.write_paused:
                up.transport.resume_reading()
            if not (self.resp_keep_alive and self.body_done):
                up.close()
            elif self._private_upstream():
                up.owner = None
                if up.usable:
                    self.private = up
                else:
                    up.close()
            else:
                self.lb.release(up)
        if self.close_after:
            self._linger()
        else:
            self._next()

    def upstream_eof(self, connection: UpstreamConnection) -> bool:
        if self.state == TUNNEL and connection is self.up:
            return self._tunnel_half_close(from_client=False)
        return False

    def upstream_lost(self, connection: UpstreamConnection) -> None:
        if connection is self.private:
            self.private = None
            return
        if connection is not self.up:
            return
        state = self.state
        if state == TUNNEL:
            self.up = None
            self.transport.close()
        elif state == RESPONDING and connection.parser.until_close:
            out: list[bytes | bytearray] = []
            self.out = out
            connection.parser.feed_eof()
            self.out = None
            if out:
                self.transport.writelines(out)
        elif WAITING <= state <= RESPONDING:
            self._upstream_failed(connection, "reset", "backend closed the connection")

    def upstream_write_paused(self, paused: bool) -> None:
        if paused:
            self._pause(_P_UPSTREAM)
        else:
            self._unpause(_P_UPSTREAM)

    def _upstream_failed(
        self, up: UpstreamConnection | None, kind: str, text: str, timed_out: bool = False
    ) -> None:
        """The backend failed this exchange: retry, answer 502/504, or (mid-response) abort the client."""
        target = self.target
        assert target is not None
        if up is not None:
            up.abort()
        self.up = None
        self.lb.metrics.upstream_failure(target.backend, kind)
        if self.state == RESPONDING:
            self._end_exchange(self.status)
            self.transport.abort()
            return
        req = self.req
        stale = up is not None and up.reused and not up.parser.started and kind == "reset"
        if stale and req.idempotent and not req.has_body and self.tried is None:
            # The backend closed an idle keep-alive connection as the request went out: once more, anew.
            self.tried = []
            self._connect_later(target)
            return
        self.lb._report(target, False)
        self._fail(504 if timed_out else 502, text)

    # --- tunnels (after 101 Switching Protocols) -------------------------------------------------------

    def _tunnel(self, resp: Response) -> None:
        up, target, out = self.up, self.target, self.out
        assert up is not None and target is not None and out is not None
        upgrade = resp.upgrade or self.req.upgrade or b""
        out += (resp.status_line, resp.block, b"\r\nConnection: upgrade\r\nUpgrade: ", upgrade, b"\r\n\r\n")
        self.state = TUNNEL
        self.status = 101
        self.lb._report(target, True)
        self.lb.metrics.request_done(self.lb.name, self._backend_name(), 101, self.loop.time() - self.started)
        buffered = self.parser.take_buffer()
        if buffered:
            up.transport.write(buffered)
        self._set_deadline(_D_TUNNEL, self.settings.timeouts.idle)

    def _tunnel_half_close(self, from_client: bool) -> bool:
        """One side of a tunnel finished sending: pass the EOF on, and close once both have."""
        up = self.up
        assert up is not None
        self.tunnel_eof |= 1 if from_client else 2
        other = up.transport if from_client else self.transport
        if self.tunnel_eof != 3 and other.can_write_eof():
            other.write_eof()
            return True
        up.close()
        self.transport.close()
        return False

    # --- ending exchanges ----------------------------------------------------------------------------------

    def _backend_name(self) -> str:
        return self.pool.name if self.pool is not None else ""

    def _end_exchange(self, status: int) -> None:
        """Account for a finished exchange: the target's active count and the request metrics."""
        target = self.target
        if target is not None:
            target.active -= 1
            self.target = None
        if self.state != TUNNEL:
            pool = self.pool
            self.lb.metrics.request_done(
                self.lb.name, pool.name if pool is not None else "", status, self.loop.time() - self.started
            )

    def _local(self, status: int, text: str) -> None:
        """Answer from the proxy itself before any backend was involved (404, 503)."""
        if self.body_done:  # the parser reports the request's end right after this callback: answer then
            self.state = LOCAL
            self.reply = (status, text)
        else:
            self._answer(status, text)

    def _fail(self, status: int, text: str) -> None:
        up = self.up
        if up is not None:
            self.up = None
            up.abort()
        self.pending = None
        self._answer(status, text)

    def _answer(self, status: int, text: str) -> None:
        """Send a canned response for the current request; keep the connection when that is safe."""
        req = self.req
        close = not self.body_done or not req.keep_alive or self.close_after or self.lb.closing
        self.transport.write(error_response(status, text, close=close, head_only=req.method == b"HEAD"))
        self.status = status
        self._end_exchange(status)
        if close:
            self._linger()
        else:
            self._next()

    def _reject(self, error: ParseError) -> None:
        """The client sent something unparseable: answer (unless a response is under way) and close."""
        if self.up is not None:
            self.up.abort()
            self.up = None
        if self.state == RESPONDING:
            self._end_exchange(self.status)
            self.transport.abort()
            return
        if self.target is not None:
            self._end_exchange(error.status)
        else:
            self.lb.metrics.request_done(self.lb.name, "", error.status, 0.0)
        self.transport.write(error_response(error.status, error.reason, close=True))
        self._linger()

    def _next(self) -> None:
        """Ready for the next request on this connection (maybe one already buffered)."""
        self.state = IDLE
        self.pool = None
        if self.paused & (_P_UPSTREAM | _P_CONNECTING):
            self._unpause(_P_UPSTREAM | _P_CONNECTING)
        settings = self.settings
        parser = self.parser
        limits = settings.limits
        parser.max_request_line = limits.max_request_line
        parser.max_header = limits.max_header
        self._set_deadline(_D_IDLE, settings.timeouts.idle)
        try:
            parser.resume()
        except ParseError as error:
            self._reject(error)
            return
        if self.paused & _P_PIPELINE and parser.buffered <= PIPELINE_LIMIT:
            self._unpause(_P_PIPELINE)

    def _linger(self) -> None:
        """Close after an answer, reading and discarding for a moment so the client sees the answer."""
        self.state = LINGER
        self.parser.close()
        self.pending = None
        transport = self.transport
        if self.paused:
            self.paused = 0
            transport.resume_reading()
        if transport.can_write_eof() and not transport.is_closing():
            transport.write_eof()
            self._set_deadline(_D_LINGER, LINGER_SECONDS)
        else:
            transport.close()

    # --- reading control, deadlines, the PROXY header ------------------------------------------------------

    def _pause(self, reason: int) -> None:
        if not self.paused:
            self.transport.pause_reading()
        self.paused |= reason

    def _unpause(self, reason: int) -> None:
        if self.paused & reason:
            self.paused &= ~reason
            if not self.paused:
                self.transport.resume_reading()

    def _set_deadline(self, kind: int, seconds: float) -> None:
        """One timer per connection, re-armed lazily: moving a deadline later costs no timer operation."""
        at = self.loop.time() + seconds
        self.deadline = at
        self.deadline_kind = kind
        timer = self.timer
        if timer is None or at < self.timer_at:
            if timer is not None:
                timer.cancel()
            self.timer = self.loop.call_at(at, self._on_timer)
            self.timer_at = at

    def _on_timer(self) -> None:
        self.timer = None
        deadline = self.deadline
        if not deadline or self.state == CLOSED:
            return
        if self.loop.time() + 0.001 < deadline:
            self.timer = self.loop.call_at(deadline, self._on_timer)
            self.timer_at = deadline
            return
        self.deadline = 0.0
        self._timeout()

    def _timeout(self) -> None:
        state = self.state
        if state == IDLE:
            if self.deadline_kind == _D_HEADER and (
                self.parser.partial_head or self.proxy_parser is not None
            ):
                self.lb.metrics.request_done(self.lb.name, "", 408, 0.0)
                self.transport.write(error_response(408, "request head not received in time", close=True))
                self._linger()
            else:
                self.transport.close()
        elif state == WAITING:
            self._upstream_failed(self.up, "timeout", "backend did not answer in time", timed_out=True)
        elif state == RESPONDING:
            self._upstream_failed(self.up, "timeout", "backend stalled")
        elif state == TUNNEL:
            if self.up is not None:
                self.up.close()
            self.transport.close()
        elif state == LINGER:
            self.transport.close()

    def _proxy_header(self, data: bytes) -> bytes:
        """Read the PROXY header of a trusted peer first; its source becomes the client's address."""
        assert self.proxy_parser is not None
        try:
            result = self.proxy_parser.feed(data)
        except proxy_protocol.ProxyProtocolError:
            self.proxy_parser = None
            self.state = LINGER
            self.transport.close()
            return b""
        if result is None:
            return b""
        header, rest = result
        self.proxy_parser = None
        if not header.local and header.source is not None:
            self.client_ip, self.client_port = header.source
            if header.destination is not None:
                self.local = header.destination
        return rest
