"""Strict HTTP/1.1 request framing for the L7 proxy, sans-IO: one request at a time, nothing unparsed forwarded.

llhttp validates each head as a whole; Content-Length, Transfer-Encoding, Connection, Upgrade, Host and
the forwarding headers are interpreted here from the same bytes, and bodies are decoded here (length
counting, the strict chunked decoder), so a pipelined request is never parsed before its turn.

Heads are forwarded, not rebuilt: the header block goes on as received, minus the lines the proxy
interprets (hop-by-hop, framing, forwarding), plus the proxy's own lines. This is per request, so it is
built for speed: one `lower()` copy and a few regular-expression searches find the interesting lines
instead of a Python call per header, and the last head parsed in full is remembered, since a client
repeats its header block (often its whole head) on a kept-alive connection and equal bytes parse equally.
"""

from __future__ import annotations

import re
from typing import Final, Protocol

import httptools

from layerlb_dataplane.http.h1.framing import (
    HOP_BY_HOP,
    IDEMPOTENT,
    LLHTTP_STRICT,
    VALIDATOR,
    ChunkedDecoder,
    ParseError,
    check_head,
    cut,
    listed_lines,
    parse_codings,
    parse_length,
    tokens,
)

# Searched in the lower-cased head, from the CRLF before each line: the lines the proxy interprets.
_REQUEST_LINES: Final = re.compile(
    rb"\r\n(host|cookie|content-length|expect|x-forwarded-for|x-forwarded-proto|x-forwarded-host|forwarded|"
    + HOP_BY_HOP
    + rb"):([^\r]*)"
)
# A request line the memo may take without llhttp: a method llhttp accepted before (`_METHODS`) and an
# origin-form target of RFC 3986 characters only (a subset of what llhttp accepts).
_TARGET_CHARS: Final = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~!$&'()*+,;=:@%/?"
_METHODS: set[bytes] = set()
# A method is any token (RFC 9110 9.1, 5.6.2), case-sensitive; those llhttp does not know are checked here.
_METHOD: Final = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# What llhttp sees in place of such a method: a method llhttp frames by Content-Length and
# Transfer-Encoding only, as the proxy frames every request.
_STAND_IN: Final = b"GET"
_VERSION: Final = re.compile(rb" HTTP/([0-9])\.[0-9]")
# reg-name, IPv4 or IP-literal, and an optional port: what a Host header may hold (RFC 3986 3.2.2).
_HOST_VALUE: Final = re.compile(rb"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+,;=%]*)(?::[0-9]{0,5})?")


class Request:
    """One parsed request head, kept as bytes because heads are forwarded rather than rebuilt: `block` is
    the header block to forward (CRLF-led lines, without the lines the proxy interprets: hop-by-hop,
    framing, X-Forwarded-*, Forwarded; without the final CRLF). Read-only once parsed (it may be reused)."""

    # Defaults at class level: a request sets only what it has (cheaper than setting every field).
    version = b"1.1"
    host = b""  # as sent (routes compare it lower-cased)
    has_host = False
    host_in_block = False  # the Host line is forwarded in place (not for absolute-form or HTTP/1.0 without)
    content_length: int | None = None
    chunked = False
    codings = b""
    upgrade: bytes | None = None
    keep_alive = True
    expect_continue = False
    cookie: bytes | None = None
    forwarded_for: bytes | None = None
    forwarded: bytes | None = None
    has_body = False
    hop: list[tuple[bytes, bytes]] | None = None  # hop-by-hop lines as (name, value), for `header()`

    def __init__(self, method: bytes, target: bytes) -> None:
        self.method = method
        self.target = target
        self.block = b""

    def again(self, method: bytes, target: bytes) -> Request:
        """The same head with another request line (the header block was parsed before)."""
        request = object.__new__(Request)
        request.__dict__.update(self.__dict__)
        request.method = method
        request.target = target
        return request

    @property
    def idempotent(self) -> bool:
        """Safe to send twice (RFC 9110 9.2.2): only these are retried on another target."""
        return self.method in IDEMPOTENT

    @property
    def path(self) -> bytes:
        """The target's path without the query: what routes match."""
        return self.target.partition(b"?")[0]

    def header(self, name: str) -> str | None:
        """The first value of header `name` (lower case), for routes and hashing; None when absent."""
        key = name.encode("latin-1").lower()
        known = {
            b"host": self.host if self.has_host else None,
            b"x-forwarded-for": self.forwarded_for,
            b"forwarded": self.forwarded,
            b"content-length": None if self.content_length is None else b"%d" % self.content_length,
        }
        if key in known:
            value = known[key]
        else:
            value = next((v for n, v in self.hop or () if n == key), None)
            if value is None:
                match = re.search(rb"\r\n" + re.escape(key) + rb":[ \t]*([^\r]*)", self.block, re.IGNORECASE)
                value = match.group(1).rstrip(b" \t") if match is not None else None
        return value.decode("latin-1") if value is not None else None

    def cookie_value(self, name: bytes) -> bytes | None:
        """The value of cookie `name` in the Cookie header(s), or None."""
        if self.cookie is None:
            return None
        for pair in self.cookie.split(b";"):
            key, sep, value = pair.strip(b" \t").partition(b"=")
            if sep and key == name:
                return value.strip(b'"')
        return None


class RequestHandler(Protocol):
    """What the request parser calls, in order, for each request."""

    def on_request(self, request: Request) -> None: ...

    def on_body(self, data: bytes | bytearray) -> None: ...

    def on_request_end(self) -> None: ...


_HEAD, _LENGTH_BODY, _CHUNKED_BODY, _CLOSED = range(4)


class RequestParser:
    """Frames a client's byte stream into requests, one at a time: after each request it pauses until
    `resume()`, so pipelined requests wait, unparsed, until the previous response is done.

    `feed` and `resume` raise `ParseError`; after one the stream is unusable (the proxy answers and closes).
    """

    __slots__ = (
        "_buf",
        "_chunks",
        "_last_host",
        "_llhttp",
        "_memo_block",
        "_memo_head",
        "_memo_request",
        "_processing",
        "_remaining",
        "_scanned",
        "_state",
        "handler",
        "max_header",
        "max_request_line",
        "paused",
    )

    def __init__(
        self, handler: RequestHandler, max_request_line: int = 8192, max_header: int = 65536
    ) -> None:
        self.handler = handler
        self.max_request_line = max_request_line
        self.max_header = max_header
        self.paused = False
        self._llhttp = httptools.HttpRequestParser(VALIDATOR)
        self._buf = bytearray()
        self._scanned = 0
        self._state = _HEAD
        self._remaining = 0
        self._chunks: ChunkedDecoder | None = None
        self._processing = False
        self._last_host = b""
        # The last HTTP/1.1 head parsed in full: clients repeat their header block (often the whole head)
        # on a kept-alive connection, and equal bytes parse equally.
        self._memo_head = b""
        self._memo_block = b""
        self._memo_request: Request | None = None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet parsed (a partial head, or pipelined requests while paused)."""
        return len(self._buf)

    @property
    def partial_head(self) -> bool:
        """A request head has begun but is not complete (the header timeout runs)."""
        return self._state == _HEAD and bool(self._buf)

    def feed(self, data: bytes | bytearray) -> None:
        """Take bytes from the client; calls the handler for whatever they complete."""
        if self.paused or self._processing:
            self._buf += data
            return
        memo = self._memo_head
        if memo and len(data) == len(memo) and self._state == _HEAD and not self._buf and data == memo:
            # Exactly the last head again, alone: the common keep-alive request takes the shortest way.
            request = self._memo_request
            assert request is not None  # set with _memo_head
            self._processing = True
            try:
                if request.has_body:
                    self._dispatch(request)
                else:  # `_dispatch` and `_end`, inline
                    handler = self.handler
                    handler.on_request(request)
                    if self._state == _HEAD:
                        self.paused = True
                        handler.on_request_end()
            finally:
                self._processing = False
            return
        if self._buf:
            self._buf += data
            data = self._buf
            self._buf = bytearray()
        self._process(data)

    def resume(self) -> None:
        """The previous response is done: parse the next request (maybe already buffered)."""
        self.paused = False
        if self._processing or not self._buf or self._state == _CLOSED:
            return
        data = self._buf
        self._buf = bytearray()
        self._process(data)

    def take_buffer(self) -> bytes:
        """Stop parsing for good (the connection became a tunnel) and hand over what was buffered."""
        self._state = _CLOSED
        data = bytes(self._buf)
        self._buf = bytearray()
        return data

    def close(self) -> None:
        """Parse nothing more (the connection is closing)."""
        self._state = _CLOSED
        self._buf = bytearray()

    def _process(self, data: bytes | bytearray) -> None:
        self._processing = True
        try:
            while data and not self.paused:
                state = self._state
                if state == _HEAD:
                    rest = self._head(data)
                    if rest is None:
                        return
                    data = rest
                elif state == _LENGTH_BODY:
                    remaining = self._remaining
                    if len(data) <= remaining:
                        self._remaining = remaining - len(data)
                        self.handler.on_body(data)
                        data = b""
                    else:
                        self._remaining = 0
                        self.handler.on_body(data[:remaining])
                        data = data[remaining:]
                    if not self._remaining:
                        self._end()
                elif state == _CHUNKED_BODY:
                    assert self._chunks is not None
                    after = self._chunks.feed(data, self.handler.on_body)
                    if after is None:
                        return
                    data = after
                    self._end()
                else:
                    return
            if data and self._state != _CLOSED:
                self._buf = data if isinstance(data, bytearray) else bytearray(data)
        except ParseError:
            self._state = _CLOSED
            self._buf = bytearray()
            raise
        finally:
            self._processing = False

    def _end(self) -> None:
        self._state = _HEAD
        self._chunks = None
        self.paused = True
        self.handler.on_request_end()

    def _incomplete(self, data: bytes | bytearray) -> None:
        """Keep a partial head, refusing it early when it is already too long or malformed."""
        line = data.find(b"\r\n")
        if (line < 0 and len(data) > self.max_request_line) or line > self.max_request_line:
            raise ParseError(414, "request line too long")
        if line >= 0 and len(data) - line - 2 > self.max_header:
            raise ParseError(431, "request header block too large")
        if b"\n" in data and data.count(b"\n") != data.count(b"\r\n"):
            raise ParseError(400, "bare LF in the request head")
        if line >= 0:
            version = data[line - 9 : line]
            if version != b" HTTP/1.1" and version != b" HTTP/1.0":
                _check_version(data, line)  # an HTTP/0.9 line is refused now, not at the header timeout
        self._scanned = max(0, len(data) - 3)
        self._buf = data if isinstance(data, bytearray) else bytearray(data)

    def _head(self, data: bytes | bytearray) -> bytes | bytearray | None:
        """Parse one head from `data` if complete: returns the bytes after it, or None (data kept)."""
        memo = self._memo_head
        if memo and data.startswith(memo):  # the last head again (it has one CRLFCRLF: at its end)
            request = self._memo_request
            assert request is not None
            self._dispatch(request)
            return data[len(memo) :]
        # RFC 9112 2.2: ignore empty lines (CRLF) before a request line. A lone CR or LF there is refused:
        # llhttp skips it, and the request line as cut here would start with it (a method of "\rGET").
        if data[:1] == b"\r" or data[:1] == b"\n":
            stripped = data.lstrip(b"\r\n")
            skipped = len(data) - len(stripped)
            if not stripped and skipped % 2:  # the read ends inside a CRLF: its LF comes in the next one
                skipped -= 1
                stripped = data[skipped:]
            if data[:skipped] != b"\r\n" * (skipped // 2):
                raise ParseError(400, "bare CR or LF before the request line")
            data = stripped
            if not data:
                return b""
        end = data.find(b"\r\n\r\n", self._scanned)
        if end < 0:
            self._incomplete(data)
            return None
        self._scanned = 0
        head = data[: end + 4]
        if isinstance(head, bytearray):
            head = bytes(head)
        line = head.find(b"\r\n")
        if line > self.max_request_line:
            raise ParseError(414, "request line too long")
        # llhttp ends a request line at a bare LF (as HTTP/0.9) and reads on: `GET /x\nHost: evil HTTP/1.1`
        # would be a Host header to it and to a lenient upstream, and part of the target here.
        if b"\n" in head[:line]:
            raise ParseError(400, "bare LF in the request line")
        if end + 2 - line > self.max_header:
            raise ParseError(431, "request header block too large")
        version = head[line - 9 : line]
        if version != b" HTTP/1.1" and version != b" HTTP/1.0":
            _check_version(head, line)  # HTTP/1.2 to 1.9 pass (as HTTP/1.1), the rest is refused
        request = None
        block = self._memo_block
        if version == b" HTTP/1.1" and block and end + 4 - line == len(block) and head.endswith(block):
            # The last header block with another request line: only the request line is new.
            method, _, target = head[: line - 9].partition(b" ")
            if (
                method in _METHODS
                and target[:1] == b"/"
                and not target.translate(None, _TARGET_CHARS)
                and self._memo_request is not None
            ):
                request = self._memo_request.again(method, target)
        if request is None:
            request = self._parse(head, line, end, version == b" HTTP/1.0")
        self._dispatch(request)
        return data[end + 4 :]

    def _dispatch(self, request: Request) -> None:
        """Hand a parsed head to the handler and frame its body (or end it at once)."""
        if request.chunked:
            self._state = _CHUNKED_BODY
            self._chunks = ChunkedDecoder(self.max_header)
        elif request.content_length:
            self._state = _LENGTH_BODY
            self._remaining = request.content_length
        self.handler.on_request(request)
        if self._state == _HEAD:
            self._end()

    def set_limits(self, max_request_line: int, max_header: int) -> None:
        """New size limits (a reload): heads parsed under the old ones are not taken from memory."""
        if (max_request_line, max_header) != (self.max_request_line, self.max_header):
            self.max_request_line = max_request_line
            self.max_header = max_header
            self._memo_head = self._memo_block = b""
            self._memo_request = None

    def _parse(self, head: bytes, line: int, end: int, http10: bool) -> Request:
        """The whole head through llhttp, then `_interpret`; remembered for the next head (HTTP/1.1)."""
        if not LLHTTP_STRICT:
            check_head(head)
        method, _, target = head[: line - 9].partition(b" ")
        known_method = True
        try:
            self._llhttp.feed_data(head)
        except httptools.HttpParserUpgrade:
            self._llhttp = httptools.HttpRequestParser(VALIDATOR)  # llhttp stays paused after an upgrade
        except httptools.HttpParserError as error:
            self._llhttp = httptools.HttpRequestParser(VALIDATOR)
            known_method = self._check_stand_in(head, method, line, error)
        request = self._interpret(head, method, target, line, end, http10)
        if request.has_body or not request.keep_alive:
            # llhttp would expect the body next (the proxy frames bodies itself), or refuse more after "close"
            self._llhttp = httptools.HttpRequestParser(VALIDATOR)
        if not http10 and target[:1] == b"/":
            if known_method:  # llhttp's table is finite; extension methods would grow the set without bound
                _METHODS.add(method)
            self._memo_head = head
            self._memo_block = head[line:]
            self._memo_request = request
        return request

    def _check_stand_in(self, head: bytes, method: bytes, line: int, error: Exception) -> bool:
        """A head llhttp refused for its method or version alone, checked again by llhttp behind a stand-in
        request line with the same framing; returns whether the method is one llhttp knows.

        llhttp's method table is fixed and it knows HTTP/1.0 and 1.1 only, but any token is a method
        (RFC 9110 9.1: lower-case ones are other methods, kept as sent) and HTTP/1.2 to 1.9 are served as
        HTTP/1.1 (RFC 9112 2.3). The method is checked here; llhttp checks the rest of the head in C, so
        these requests are held to the same rules as every other (this runs only after a refusal: the
        common request pays nothing).
        """
        stand_in = head
        if head[line - 1] > 0x31:  # HTTP/1.2 to 1.9 (`_check_version` let only those through)
            stand_in = head[: line - 1] + b"1" + head[line:]
        known = not isinstance(error, httptools.HttpParserInvalidMethodError)
        if not known:
            if _METHOD.fullmatch(method) is None:
                raise ParseError(400, "malformed method (a token is expected)")
            stand_in = _STAND_IN + stand_in[len(method) :]
        elif stand_in is head:
            raise ParseError(400, f"malformed request: {error}")
        try:
            self._llhttp.feed_data(stand_in)
        except httptools.HttpParserUpgrade:
            self._llhttp = httptools.HttpRequestParser(VALIDATOR)
        except httptools.HttpParserError as again:
            self._llhttp = httptools.HttpRequestParser(VALIDATOR)
            raise ParseError(400, f"malformed request: {again}") from None
        return known

    def _interpret(
        self, head: bytes, method: bytes, target: bytes, line: int, end: int, http10: bool
    ) -> Request:
        """Whole-head rules (Host, framing, Connection, Upgrade, Expect) and the block to forward.

        The common head (Host, maybe Cookie, nothing else the proxy interprets) takes the short way.
        """
        if method == b"CONNECT":
            raise ParseError(405, "CONNECT is not served")
        # llhttp lets a run of spaces before the version through: the target would end in spaces, routed as
        # one path here and read as another by an upstream that splits the line on whitespace. (An int needle
        # is one memchr; `b" " in target` sets up a substring search, several times slower per parsed head.)
        if 0x20 in target:
            raise ParseError(400, "malformed request line (one space between method, target and version)")
        low = head.lower()
        search = _REQUEST_LINES.search
        request = Request(method, target)
        host: bytes | None = None
        others: list[re.Match[bytes]] | None = None
        match = search(low, line, end)
        while match is not None:
            name = match.group(1)
            if name == b"host":
                if host is not None:
                    raise ParseError(400, "more than one Host header")
                host = head[match.start(2) : match.end(2)].strip(b" \t")
            elif name == b"cookie":
                value = head[match.start(2) : match.end(2)].strip(b" \t")
                request.cookie = value if request.cookie is None else request.cookie + b"; " + value
            elif others is None:
                others = [match]
            else:
                others.append(match)
            match = search(low, match.end(), end)
        if host is not None:
            if host != self._last_host:
                if _HOST_VALUE.fullmatch(host) is None:
                    raise ParseError(400, "malformed Host header")
                self._last_host = host
            request.host = host
            request.has_host = True
            request.host_in_block = True
        elif not http10:
            raise ParseError(400, "missing Host header")
        if others is None and not http10 and target[:1] == b"/":
            request.block = head[line:end]
            return request
        self._interpret_more(request, head, low, line, end, http10, others or [])
        return request

    def _interpret_more(
        self,
        request: Request,
        head: bytes,
        low: bytes,
        line: int,
        end: int,
        http10: bool,
        others: list[re.Match[bytes]],
    ) -> None:
        """The rest of `_interpret`: everything but Host and Cookie, HTTP/1.0, absolute-form targets."""
        spans: list[tuple[int, int]] = []
        lengths: list[bytes] | None = None
        codings: list[bytes] | None = None
        connection: list[bytes] | None = None
        for match in others:
            name = match.group(1)
            value = head[match.start(2) : match.end(2)].strip(b" \t")
            if name == b"expect":
                request.expect_continue = value.lower() == b"100-continue"
                continue
            spans.append(match.span())
            if name == b"content-length":
                lengths = [*(lengths or ()), value]
            elif name == b"x-forwarded-for":
                request.forwarded_for = (
                    value if request.forwarded_for is None else request.forwarded_for + b", " + value
                )
            elif name == b"forwarded":
                request.forwarded = value if request.forwarded is None else request.forwarded + b", " + value
            elif name[:2] != b"x-":  # hop-by-hop
                request.hop = [*(request.hop or ()), (name, value)]
                if name == b"transfer-encoding":
                    codings = [*(codings or ()), value]
                elif name == b"connection":
                    connection = [*(connection or ()), value]
                elif name == b"upgrade":
                    request.upgrade = value
        if request.target[:1] != b"/" and request.target != b"*":
            self._absolute_form(request, head, low, line, end, spans)
        if lengths is not None:
            request.content_length = parse_length(lengths, only_one=True)
        if codings is not None:
            if http10:
                raise ParseError(400, "Transfer-Encoding in an HTTP/1.0 request")
            if lengths is not None:
                raise ParseError(400, "both Content-Length and Transfer-Encoding")
            request.codings = parse_codings(codings, only_chunked=True)
            request.chunked = True
        request.has_body = request.chunked or bool(request.content_length)
        listed = tokens(connection) if connection is not None else set()
        if http10:
            request.version = b"1.0"
            request.keep_alive = b"keep-alive" in listed
            if request.expect_continue:  # RFC 9110 10.1.1: ignored in HTTP/1.0
                request.expect_continue = False
                listed.add(b"expect")
        elif b"close" in listed:
            request.keep_alive = False
        if request.upgrade is not None and (http10 or b"upgrade" not in listed):
            request.upgrade = None
        if request.upgrade is not None and request.has_body:
            raise ParseError(400, "a body with an Upgrade request")
        listed -= {b"close", b"keep-alive", b"upgrade"}
        if listed:
            spans = sorted({*spans, *listed_lines(head, low, line, end, listed)})
        request.block = cut(head, line, end, spans)

    @staticmethod
    def _absolute_form(
        request: Request, head: bytes, low: bytes, line: int, end: int, spans: list[tuple[int, int]]
    ) -> None:
        """`http://host/path` (absolute-form): the authority replaces Host (RFC 9112 3.2.2)."""
        scheme, sep, rest = request.target.partition(b"://")
        if not sep or scheme.lower() not in (b"http", b"https"):
            raise ParseError(400, "malformed request target")
        authority, slash, path = rest.partition(b"/")
        authority, question, query = authority.partition(b"?")
        if not authority or b"@" in authority or _HOST_VALUE.fullmatch(authority) is None:
            raise ParseError(400, "malformed request target")
        request.target = b"/" + path if slash else b"/" + (b"?" + query if question else b"")
        request.host = authority
        request.has_host = True
        request.host_in_block = False
        spans += listed_lines(head, low, line, end, {b"host"})
        spans.sort()


def _check_version(head: bytes | bytearray, line: int) -> None:
    """Refuse a request line whose version is not HTTP/1.x: 505 for another major, 400 for none (HTTP/0.9).

    HTTP/1.2 to 1.9 pass: a recipient of a higher minor version than its own processes the message as
    the highest it conforms to (RFC 9112 2.3), and the proxy forwards every request as HTTP/1.1.
    """
    if head.startswith(b"PRI * HTTP/2"):
        raise ParseError(505, "HTTP/2 without TLS is not served")
    match = _VERSION.fullmatch(head, line - 9, line)
    if match is None:
        raise ParseError(400, "not an HTTP/1.x request line (method, target, HTTP/1.x)")
    if match.group(1) != b"1":
        raise ParseError(505, "only HTTP/1.x is served on this connection")
