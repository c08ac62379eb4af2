"""The response half of a client connection of the L7 proxy: responses, tunnels, endings, timeouts.

`connection.ClientConnection` reads requests, picks targets and sends; this base class carries the
response back, as protocol callbacks. Throughput decides whether a Python proxy is worth running, so
the common request (a whole head in one read, a pooled upstream connection, a small response) runs in
callbacks only: no task, no closure, no timer operation, and writes made while one read is handled
leave in one write (one syscall). Tasks appear on slow paths only (opening an upstream
connection, retries). Timeouts are one deadline per connection, checked by a timer re-armed lazily.
"""

from __future__ import annotations

import asyncio

from layerlb_dataplane.core.state import BackendPool
from layerlb_dataplane.core.targets import Target
from layerlb_dataplane.http.h1 import request
from layerlb_dataplane.http.h1.framing import ParseError, error_response
from layerlb_dataplane.http.h1.response import Response
from layerlb_dataplane.http.listener import Listener, Settings
from layerlb_dataplane.http.upstream import UpstreamConnection
from layerlb_dataplane.net import proxy_protocol

IDLE, LOCAL, CONNECTING, WAITING, RESPONDING, TUNNEL, LINGER, CLOSED, QUEUED = range(9)
# What the connection's single deadline means when it passes.
DEADLINE_HEADER, DEADLINE_IDLE, DEADLINE_REQUEST, DEADLINE_BODY, DEADLINE_TUNNEL, DEADLINE_LINGER = range(
    1, 7
)
# Why the client's transport is not being read (bits).
PAUSED_UPSTREAM, PAUSED_PIPELINE, PAUSED_CONNECTING, PAUSED_QUEUED = 1, 2, 4, 8

JOIN_LIMIT = 16384  # below this, parts of one write are joined: one buffer takes uvloop's (and the kernel's) cheapest path
PIPELINE_LIMIT = 1 << 20  # unparsed bytes held while a request is in flight, before reading pauses
CONNECT_BUFFER = 1 << 18  # body bytes held while the upstream connection opens, before reading pauses
MAX_ATTEMPTS = 3  # targets tried by one idempotent request whose connects fail
LINGER_SECONDS = 2.0  # after an error answer: read and discard, so the client sees the answer, not a reset
LAST_CHUNK = b"0\r\n\r\n"


def send(transport: asyncio.Transport, out: list[bytes | bytearray]) -> None:
    """Write `out` (not empty) with one call: one buffer when small, as a head with a small body is.

    uvloop writes a single buffer with write(2) at once, several through a write context and writev(2).
    """
    if len(out) == 1:
        transport.write(out[0])
    elif len(out) == 2 and len(out[1]) <= JOIN_LIMIT:
        transport.write(out[0] + out[1])
    else:
        transport.writelines(out)


class Exchange:
    """The exchange half of `ClientConnection`, apart to keep both files readable: every field is one slot
    of the connection (no per-request object on the hot path), set in `ClientConnection.__init__`."""

    __slots__ = (
        "admitted",
        "body_done",
        "client_eof",
        "client_ip",
        "client_key",
        "client_port",
        "close_after",
        "deadline",
        "deadline_kind",
        "fwd_cache",
        "fwd_key",
        "head",
        "head_of",
        "head_settings",
        "isolated",
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
        "routed_name",
        "routed_req",
        "routed_settings",
        "set_cookie",
        "settings",
        "started",
        "state",
        "status",
        "tail",
        "tail_of",
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

    lb: Listener
    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport
    parser: request.RequestParser
    state: int
    admitted: bool
    client_ip: str
    client_key: bytes
    client_port: int
    local: tuple[str, int]
    proxy_parser: proxy_protocol.HeaderParser | None
    settings: Settings
    req: request.Request
    routed_req: request.Request | None
    routed_settings: Settings | None
    routed_name: str | None
    pool: BackendPool | None
    target: Target | None
    up: UpstreamConnection | None
    private: UpstreamConnection | None
    head: bytes
    isolated: bool  # the exchange's upstream connection carries this client only (PROXY header, transparent)
    tried: list[Target] | None
    pending: list[bytes] | None
    pending_size: int
    body_done: bool
    started: float
    status: int
    reply: tuple[int, str] | None
    resp_chunked: bool
    resp_keep_alive: bool
    close_after: bool
    client_eof: bool
    tunnel_eof: int
    set_cookie: bytes | None
    paused: int
    write_paused: bool
    deadline: float
    deadline_kind: int
    timer: asyncio.TimerHandle | None
    timer_at: float
    out: list[bytes | bytearray] | None
    up_out: list[bytes | bytearray] | None

    def _chunk(self, out: list[bytes | bytearray], data: bytes | bytearray) -> None:
        if self.req.chunked:
            out += (b"%x\r\n" % len(data), data, b"\r\n")
        else:
            out.append(data)

    def _connect_later(self, target: Target) -> None:
        """Open a connection to `target` for the request in flight (ClientConnection does it)."""
        raise NotImplementedError

    def _retarget(self, failed: Target) -> Target | None:
        """Another target for the request in flight, or None (ClientConnection does it)."""
        raise NotImplementedError

    # --- responses (response.ResponseHandler, upstream.Owner) --------------------------------------

    def upstream_data(self, connection: UpstreamConnection, data: bytes) -> None:
        """Backend bytes: frame them; what they produce for the client leaves in one write."""
        if self.state == TUNNEL:
            if connection is not self.up:
                return
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
            send(self.transport, out)
        if rest:
            self.transport.write(rest)
        if self.state == RESPONDING:  # more of the body to come: it must keep coming
            self.deadline_kind = DEADLINE_BODY
            self.deadline = self.loop.time() + self.settings.timeouts.idle

    def on_response(self, resp: Response) -> None:
        """A response head: forward it with this side's framing and Connection header (1xx, 101 too)."""
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
        if target.health.passive_failures:  # otherwise a success changes nothing: spare the hot path the call
            self.lb.current().record_passive(target, True)
        self.status = status
        self.resp_keep_alive = resp.keep_alive
        self.state = RESPONDING
        close = self.close_after or not req.keep_alive or not self.body_done or self.lb.closing
        if close or self.set_cookie is not None or req.version != b"1.1" or req.method == b"HEAD":
            self._response_head(resp, close)
            return
        head = resp.proxied
        if head is None:  # the common case, made once per parsed head
            parts: list[bytes | bytearray] = []
            resp.proxied_chunked = _head_lines(parts, resp, req)
            head = resp.proxied = b"".join((resp.status_line, resp.block, *parts, b"\r\n\r\n"))
        out.append(head)
        self.resp_chunked = resp.proxied_chunked

    def _response_head(self, resp: Response, close: bool) -> None:
        """The forwarded head in general: closing, HTTP/1.0, HEAD, a cookie to set."""
        req = self.req
        out = self.out
        assert out is not None
        out += (resp.status_line, resp.block)
        chunked = _head_lines(out, resp, req)
        if (
            resp.content_length is None
            and not chunked
            and req.method != b"HEAD"
            and resp.status not in (204, 304)
        ):
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

    def on_response_body(self, data: bytes | bytearray) -> None:
        """Response body bytes, re-chunked when the client gets chunked framing."""
        out = self.out
        assert out is not None
        if self.resp_chunked:
            out += (b"%x\r\n" % len(data), data, b"\r\n")
        else:
            out.append(data)

    def on_response_end(self) -> None:
        """The response is complete: account, pool or close the upstream connection, then the next request."""
        out = self.out
        if self.resp_chunked:
            self.resp_chunked = False
            if out is not None:
                out.append(LAST_CHUNK)
            else:
                self.transport.write(LAST_CHUNK)
        if out:  # before anything else may write (an answer to a pipelined request, a close)
            if len(out) == 2 and len(out[1]) <= JOIN_LIMIT:  # a head and a small body: `send`, inline
                self.transport.write(out[0] + out[1])
            else:
                send(self.transport, out)
            out.clear()
        up = self.up
        self.up = None
        target = self.target
        lb = self.lb
        if target is not None:
            target.active -= 1
            self.target = None
        pool = self.pool
        now = self.loop.time()
        name = pool.backend.name if pool is not None else ""
        series = lb.request_series.get(name) or lb.series(name)
        series.done(self.status, now - self.started)
        if up is not None:
            if self.write_paused:
                up.transport.resume_reading()
            if not (self.resp_keep_alive and self.body_done):
                up.close()
            elif self.isolated:
                up.owner = None
                if up.usable:
                    self.private = up
                else:
                    up.close()
            elif lb.pool.release(up, now) and lb.sweeper is None:
                lb.schedule_sweep()
        if not self.close_after:
            self._next(now)
        elif self.body_done and not self.parser.buffered:
            self.state = LINGER  # all read, nothing pending: a plain close cannot reset the answer away
            self.transport.close()
        else:
            self._linger()

    def upstream_eof(self, connection: UpstreamConnection) -> bool:
        """A tunnel passes the backend's EOF to the client; otherwise the connection closes."""
        if self.state == TUNNEL and connection is self.up:
            return self._tunnel_half_close(from_client=False)
        return False

    def upstream_lost(self, connection: UpstreamConnection) -> None:
        """The backend closed: end a close-delimited body, or fail the exchange (retry, 502, or abort)."""
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
                send(self.transport, out)
        elif WAITING <= state <= RESPONDING:
            self._upstream_failed(connection, "reset", "backend closed the connection", closed=True)

    def upstream_write_paused(self, paused: bool) -> None:
        """The backend reads slower than the client sends: stop (or resume) reading the client."""
        if paused:
            self._pause(PAUSED_UPSTREAM)
        else:
            self._unpause(PAUSED_UPSTREAM)

    def _upstream_failed(
        self,
        up: UpstreamConnection | None,
        kind: str,
        text: str,
        timed_out: bool = False,
        closed: bool = False,
    ) -> None:
        """The backend failed this exchange: retry, answer 502/504, or (mid-response) abort the client.

        `closed`: the backend closed or reset the connection. Before any byte of an answer, an idempotent
        request without a body goes to another endpoint (RFC 9110 §9.2.2; nginx's default
        `proxy_next_upstream error` does the same): a backend that dies or resets under load costs the
        client nothing. A timeout is not resent (the backend may still be executing the request, and the
        client would wait twice), nor is anything with a body or a non-idempotent method."""
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
        self.lb.current().record_passive(target, False)
        if closed and up is not None and not up.parser.started and req.idempotent and not req.has_body:
            retry = self._retarget(target)
            if retry is not None:
                self._connect_later(retry)
                return
        self._fail(504 if timed_out else 502, text)

    # --- tunnels (after 101 Switching Protocols) -------------------------------------------------------

    def _tunnel(self, resp: Response) -> None:
        up, target, out = self.up, self.target, self.out
        assert up is not None and target is not None and out is not None
        upgrade = resp.upgrade or self.req.upgrade or b""
        out += (resp.status_line, resp.block, b"\r\nConnection: upgrade\r\nUpgrade: ", upgrade, b"\r\n\r\n")
        self.state = TUNNEL
        self.status = 101
        self.lb.current().record_passive(target, True)
        self.lb.metrics.request_done(self.lb.name, self._backend_name(), 101, self.loop.time() - self.started)
        buffered = self.parser.take_buffer()
        if buffered:
            up.transport.write(buffered)
        self._set_deadline(DEADLINE_TUNNEL, self.settings.timeouts.idle)

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
        return self.pool.backend.name if self.pool is not None else ""

    def _client_stalled(self) -> None:
        """The client read nothing for the idle timeout while its response waited (a send timeout).

        Its write buffer is full and the backend is paused behind it, so memory stayed bounded; the stall
        is the client's, so nothing counts against the backend: both connections are cut.
        """
        up = self.up
        if up is not None:
            self.up = None
            up.abort()
        self._end_exchange(self.status)
        self.transport.abort()

    def _end_exchange(self, status: int) -> None:
        """Account for a finished exchange: the target's active count and the request metrics."""
        target = self.target
        if target is not None:
            target.active -= 1
            self.target = None
        if self.state != TUNNEL:
            pool = self.pool
            self.lb.metrics.request_done(
                self.lb.name,
                pool.backend.name if pool is not None else "",
                status,
                self.loop.time() - self.started,
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

    def _next(self, now: float = 0.0) -> None:
        """Ready for the next request on this connection (maybe one already buffered); `now`: loop time."""
        self.state = IDLE
        self.pool = None
        if self.paused & (PAUSED_UPSTREAM | PAUSED_CONNECTING):
            self._unpause(PAUSED_UPSTREAM | PAUSED_CONNECTING)
        settings = self.settings
        parser = self.parser
        limits = settings.limits
        if parser.max_header != limits.max_header or parser.max_request_line != limits.max_request_line:
            parser.set_limits(limits.max_request_line, limits.max_header)
        at = (now or self.loop.time()) + settings.timeouts.idle
        self.deadline = at
        self.deadline_kind = DEADLINE_IDLE
        if self.timer is None or at < self.timer_at:
            self._set_deadline(DEADLINE_IDLE, settings.timeouts.idle)
        if not parser.buffered:
            parser.paused = False  # nothing waits: what `resume` would do
            return
        try:
            parser.resume()
        except ParseError as error:
            self._reject(error)
            return
        if self.paused & PAUSED_PIPELINE and parser.buffered <= PIPELINE_LIMIT:
            self._unpause(PAUSED_PIPELINE)

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
            self._set_deadline(DEADLINE_LINGER, LINGER_SECONDS)
        else:
            transport.close()

    # --- reading control and deadlines ------------------------------------------------------

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
            if self.deadline_kind == DEADLINE_HEADER and (
                self.parser.partial_head or self.proxy_parser is not None
            ):
                self.lb.metrics.request_done(self.lb.name, "", 408, 0.0)
                self.transport.write(error_response(408, "request head not received in time", close=True))
                self._linger()
            else:
                self.transport.close()
        elif state == WAITING:
            if not self.body_done:  # the client's body stalled, not the backend (which waits for it)
                self._fail(408, "request body not received in time")
            else:
                self._upstream_failed(self.up, "timeout", "backend did not answer in time", timed_out=True)
        elif state == RESPONDING:
            if self.write_paused:
                self._client_stalled()
            else:
                self._upstream_failed(self.up, "timeout", "backend stalled")
        elif state == TUNNEL:
            if self.up is not None:
                self.up.close()
            self.transport.close()
        elif state == LINGER:
            self.transport.close()


def _head_lines(out: list[bytes | bytearray], resp: Response, req: request.Request) -> bool:
    """The framing lines of a forwarded response head (after its block); True when its body is re-chunked."""
    status = resp.status
    if resp.content_length is not None:
        if not resp.length_in_block and status != 204:
            out.append(b"\r\nContent-Length: %d" % resp.content_length)
    elif req.method == b"HEAD" or status == 204 or status == 304:
        pass
    elif req.version == b"1.1":
        out.append(
            b"\r\nTransfer-Encoding: %s, chunked" % resp.codings
            if resp.codings
            else b"\r\nTransfer-Encoding: chunked"
        )
        return True
    return False
