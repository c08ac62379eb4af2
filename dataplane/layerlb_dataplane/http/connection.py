"""One client connection of the L7 proxy: an asyncio protocol that reads requests, in order, and sends them.

Requests on a connection are served one at a time: after a request, the parser pauses and pipelined
requests wait unparsed until the response is done. Each request is routed with the Snapshot current at
its start, its target chosen (session affinity, the backend's hash key, the balancer), and its head
sent on a pooled upstream connection, or on a new one (a task: the slow path, with retries on another
target). Bodies stream both ways: a full write buffer on one side pauses reading on the other. The
response half is `exchange.Exchange`; see there for what the hot path avoids.
"""

from __future__ import annotations

import asyncio
from typing import cast

from layerlb.api import AffinityType, HashSource
from layerlb_dataplane.core.state import BackendPool
from layerlb_dataplane.core.targets import Target
from layerlb_dataplane.http import upstream
from layerlb_dataplane.http.exchange import (
    CLOSED,
    CONNECT_BUFFER,
    CONNECTING,
    DEADLINE_HEADER,
    DEADLINE_REQUEST,
    IDLE,
    LAST_CHUNK,
    LINGER,
    LOCAL,
    MAX_ATTEMPTS,
    PAUSED_CONNECTING,
    PAUSED_PIPELINE,
    PAUSED_QUEUED,
    PAUSED_UPSTREAM,
    PIPELINE_LIMIT,
    QUEUED,
    RESPONDING,
    TUNNEL,
    WAITING,
    Exchange,
    send,
)
from layerlb_dataplane.http.h1 import request
from layerlb_dataplane.http.h1.framing import ParseError
from layerlb_dataplane.http.listener import Listener, Settings
from layerlb_dataplane.http.upstream import UpstreamConnection
from layerlb_dataplane.net import proxy_protocol


def _forwarded_node(ip: str) -> bytes:
    """An address as a Forwarded `for=` value (RFC 7239 6: IPv6 quoted, in brackets)."""
    return f'"[{ip}]"'.encode() if ":" in ip else ip.encode()


def _forwarded_host(host: bytes) -> bytes:
    return host if host.replace(b".", b"").replace(b"-", b"").isalnum() else b'"' + host + b'"'


class ClientConnection(Exchange, asyncio.Protocol):
    """Responses must leave in the order requests came, so a connection reads and serves one request at a
    time; the `Exchange` base class carries each one to its backend and back."""

    __slots__ = ()

    def __init__(self, lb: Listener) -> None:
        assert lb.loop is not None
        self.lb = lb
        self.loop = lb.loop
        self.transport: asyncio.Transport = None  # type: ignore[assignment]  # set by connection_made
        self.parser = request.RequestParser(self)
        self.state = IDLE
        self.admitted = False
        self.client_ip = ""
        self.client_key = b""  # client_ip encoded: what balancers hash
        self.client_port = 0
        self.local: tuple[str, int] = ("", 0)
        self.proxy_parser: proxy_protocol.HeaderParser | None = None
        self.settings: Settings = None  # type: ignore[assignment]  # set on admission and per request
        self.req: request.Request = None  # type: ignore[assignment]  # set per request
        self.pool: BackendPool | None = None
        self.target: Target | None = None
        self.up: UpstreamConnection | None = None
        self.private: UpstreamConnection | None = None  # kept per client: PROXY protocol or transparent
        self.head = b""  # the request head as sent upstream (kept for a retry, reused for an equal request)
        self.head_of: request.Request | None = None
        self.head_settings: Settings | None = None
        self.tail = b""  # what follows the request line in `head`: reused while the header block repeats
        self.tail_of = b""
        self.isolated = False
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
        # The route of the last routed request: a repeated head (the same Request) routes the same way.
        self.routed_req: request.Request | None = None
        self.routed_settings: Settings | None = None
        self.routed_name: str | None = None
        self.fwd_key: tuple[bytes, Settings] | None = None
        self.fwd_cache = b""
        # Writes made while one read is handled, sent with one write when it is (a syscall each is dear).
        self.out: list[bytes | bytearray] | None = None
        self.up_out: list[bytes | bytearray] | None = None

    # --- asyncio.Protocol: the client side -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass it
        lb = self.lb
        peer = transport.get_extra_info("peername")
        if peer:
            self.client_ip, self.client_port = peer[0], peer[1]
            self.client_key = self.client_ip.encode()
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
            self._pause(PAUSED_QUEUED)

    @property
    def behind_proxy(self) -> bool:
        """The peer must send a PROXY header (a trusted proxy): the per-client cap does not count it."""
        return self.proxy_parser is not None

    def admit(self) -> None:
        """A slot under the connection cap is ours: start reading (the header timeout runs from now)."""
        self.admitted = True
        self.state = IDLE
        self.settings = settings = self.lb.settings()
        self.parser.set_limits(settings.limits.max_request_line, settings.limits.max_header)
        self._set_deadline(DEADLINE_HEADER, settings.timeouts.header)
        self._unpause(PAUSED_QUEUED)
        held = self.pending
        if held:  # bytes read before the pause took hold
            self.pending = None
            self.data_received(b"".join(held))

    def data_received(self, data: bytes) -> None:
        """Client bytes: tunnel data, a PROXY header, or HTTP for the parser (upstream writes batched)."""
        state = self.state
        if state == TUNNEL:
            if self.up is not None:
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
            send(self.up.transport, up_out)
        parser = self.parser
        if parser.buffered:  # a partial head (the header timeout runs), or requests waiting their turn
            if self.state == IDLE and self.deadline_kind != DEADLINE_HEADER and parser.partial_head:
                self._set_deadline(DEADLINE_HEADER, self.settings.timeouts.header)
            if parser.buffered > PIPELINE_LIMIT and self.state < LINGER:
                self._pause(PAUSED_PIPELINE)

    def eof_received(self) -> bool:
        """A client that half-closes after its request still gets the response; a tunnel passes the EOF on."""
        state = self.state
        if state == TUNNEL:
            return self._tunnel_half_close(from_client=True)
        if LOCAL <= state <= RESPONDING and self.body_done:
            self.client_eof = True  # a half-closed client still gets its response
            self.close_after = True
            return True
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        """The client left: drop the exchange in flight (its target's count, its upstream connection)."""
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
        """The client reads slower than the backend sends: stop reading the backend (backpressure)."""
        self.write_paused = True
        if self.up is not None:
            self.up.transport.pause_reading()

    def resume_writing(self) -> None:
        """The client caught up: read the backend again."""
        self.write_paused = False
        if self.up is not None:
            self.up.transport.resume_reading()

    def shutdown(self) -> None:
        """The listener closes: an idle connection closes now, a busy one after its response."""
        if self.state == IDLE and not self.parser.partial_head:
            self.transport.close()
        else:
            self.close_after = True

    # --- requests (request.RequestHandler) ---------------------------------------------------------------

    def on_request(self, req: request.Request) -> None:
        """A request head: route it with the current Snapshot, pick a target, send it (or answer 404/503)."""
        self.req = req
        self.settings = settings = self.lb.settings()
        self.started = self.loop.time()
        self.body_done = not req.has_body
        self.set_cookie = None
        self.tried = None
        if settings.direct:
            name = settings.default
            pool = settings.default_pool
        else:
            if req is self.routed_req and settings is self.routed_settings:
                name = self.routed_name  # the same head again (parsed once): the same route
            else:
                name = settings.snapshot.router.match(
                    req.method.decode("latin-1"),
                    req.host.decode("latin-1").lower(),
                    req.path.decode("latin-1"),
                    req.header,
                )
                self.routed_req, self.routed_settings, self.routed_name = req, settings, name
            pool = settings.pools.get(name) if name is not None else None
        self.pool = pool
        if pool is None:
            self._local(404, "no route for this request") if name is None else self._local(
                503, "no such backend"
            )
            return
        # With no affinity and no hash key, the balancer alone picks (by the client's address).
        target = pool.balancer.pick(self.client_key) if pool in settings.plain else self._choose(pool, req)
        if target is None:
            self._local(503, "no healthy backend")
            return
        self._start(target)

    def on_body(self, data: bytes | bytearray) -> None:
        """Request body bytes stream on (re-chunked for a chunked request), or wait while connecting."""
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
            if self.deadline_kind == DEADLINE_REQUEST:
                self.deadline = self.loop.time() + self.settings.timeouts.request
        elif state == CONNECTING:
            assert self.pending is not None
            self.pending.append(bytes(data))
            self.pending_size += len(data)
            if self.pending_size > CONNECT_BUFFER:
                self._pause(PAUSED_CONNECTING)

    def on_request_end(self) -> None:
        """The request is complete: end a chunked body upstream, or send a pending answer of the proxy."""
        self.body_done = True
        state = self.state
        if state == LOCAL:
            assert self.reply is not None
            status, text = self.reply
            self.reply = None
            self._answer(status, text)
        elif WAITING <= state <= RESPONDING and self.req.chunked:
            if self.up_out is not None:
                self.up_out.append(LAST_CHUNK)
            else:
                assert self.up is not None
                self.up.transport.write(LAST_CHUNK)

    # --- choosing a target and sending ------------------------------------------------------------------

    def _choose(
        self, pool: BackendPool, req: request.Request, exclude: list[Target] | None = None
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

    def _connect_later(self, target: Target) -> None:
        self.state = CONNECTING
        self.pending = []
        self.pending_size = 0
        self.deadline = 0.0
        self.loop.create_task(self._connect(target))

    async def _connect(self, target: Target) -> None:
        """Open an upstream connection (slow path); when it fails, idempotent requests try another target."""
        try:
            await self._connect_to(target)
        except Exception:  # a bug must not leave the client waiting without a deadline
            if self.state == CONNECTING:
                self._fail(502, "internal error while connecting")
            raise

    async def _connect_to(self, target: Target) -> None:
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
                lb.current().record_passive(target, False)
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
        up.owner = up.parser.handler = self
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
                self._unpause(PAUSED_CONNECTING)
            if self.body_done and self.req.chunked:
                parts.append(LAST_CHUNK)
            send(up.transport, parts)
        elif self.body_done:  # nothing follows the head in this read (pipelined requests wait their turn)
            up.transport.write(self.head)
        else:  # body bytes of this read follow: one write for all when the read is handled
            out.append(self.head)
        self.pending = None
        self.state = WAITING
        at = self.deadline = self.started + self.settings.timeouts.request
        self.deadline_kind = DEADLINE_REQUEST
        if self.timer is None or at < self.timer_at:
            self._set_deadline(DEADLINE_REQUEST, self.settings.timeouts.request)
        if up.write_paused:
            self._pause(PAUSED_UPSTREAM)

    # --- the upstream head ------------------------------------------------------------------------------

    def _start(self, target: Target) -> None:
        """Send the request to `target`: on a pooled connection now, else after a connect (a task)."""
        target.active += 1
        self.target = target
        req = self.req
        if req is not self.head_of or self.settings is not self.head_settings:  # else: the same request again
            if req.block is self.tail_of and self.settings is self.head_settings:  # another request line only
                self.head = b"".join((req.method, b" ", req.target, self.tail))
            else:
                self.head = self._request_head(req)
            self.head_of, self.head_settings = req, self.settings
        up: UpstreamConnection | None
        self.isolated = isolated = self.pool in self.settings.isolated
        if isolated:
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

    def _request_head(self, req: request.Request) -> bytes:
        """The head sent upstream, in one join: request line, kept lines, forwarding and framing lines.

        All after the request line is kept as `tail` for the next head with the same header block.
        """
        parts = [b" HTTP/1.1"]
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
        self.tail = b"".join(parts)
        self.tail_of = req.block
        return b"".join((req.method, b" ", req.target, self.tail))

    def _forwarding(self, req: request.Request) -> bytes:
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

    # --- the PROXY header ---------------------------------------------------------------------------------

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
            self.client_key = self.client_ip.encode()
            if header.destination is not None:
                self.local = header.destination
        return rest
