"""Strict HTTP/1.1 request framing for the L7 proxy, sans-IO, because request smuggling lives where parsers
disagree.

Where a message ends decides what a backend sees, so the proxy frames every message itself and refuses
anything two parsers could read differently (RFC 9112 with no leniency): llhttp (httptools) validates
each head as a whole; Content-Length, Transfer-Encoding, Connection, Upgrade, Host and the forwarding
headers are interpreted here from the same bytes; bodies are decoded here (Content-Length counting, a
strict chunked decoder), so a pipelined request is never parsed before its turn and nothing is
forwarded that was not parsed. At import, llhttp is probed with the patterns it must refuse (bare LF,
obs-fold, control characters, whitespace before a colon); should an llhttp build accept any of them,
the proxy checks the raw head bytes itself (`check_head`).

Heads are forwarded, not rebuilt: the header block goes on as received, minus the lines the proxy
interprets (hop-by-hop, framing, forwarding) and plus the proxy's own lines. Speed matters here (this
is per request): one `lower()` copy and a few regular-expression searches find the interesting lines,
instead of a Python call per header.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Final, Protocol

import httptools

IDEMPOTENT: Final = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})
# Transfer codings a recipient may see before the final `chunked` (RFC 9112 7, IANA registry).
KNOWN_CODINGS: Final = frozenset({b"chunked", b"gzip", b"x-gzip", b"deflate", b"compress", b"x-compress"})
MAX_CHUNK_LINE: Final = 4096
# Hop-by-hop headers (RFC 9110 7.6.1, plus Keep-Alive, Proxy-Connection and Proxy-Auth*), never forwarded.
HOP_BY_HOP: Final = b"connection|keep-alive|proxy-connection|te|trailer|transfer-encoding|upgrade|proxy-authenticate|proxy-authorization"

# Searched in the lower-cased head, from the CRLF before each line: the lines the proxy interprets.
_REQUEST_LINES: Final = re.compile(
    rb"\r\n(host|cookie|content-length|expect|x-forwarded-for|x-forwarded-proto|x-forwarded-host|forwarded|"
    + HOP_BY_HOP
    + rb"):([^\r]*)"
)
_CTL: Final = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_SPACE_BEFORE_COLON: Final = re.compile(rb"\n[^:\r\n]*[ \t]:")
_DIGITS: Final = re.compile(rb"[0-9]{1,18}")
# reg-name, IPv4 or IP-literal, and an optional port: what a Host header may hold (RFC 3986 3.2.2).
_HOST_VALUE: Final = re.compile(rb"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+,;=%]*)(?::[0-9]{0,5})?")
_TOKEN: Final = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_QUOTED: Final = rb'"(?:[^"\\\x00-\x08\x0a-\x1f\x7f]|\\[^\x00-\x08\x0a-\x1f\x7f])*"'
_CHUNK_LINE: Final = re.compile(
    rb"([0-9A-Fa-f]{1,15})(?:[ \t]*;[ \t]*"
    + _TOKEN
    + rb"(?:[ \t]*=[ \t]*(?:"
    + _TOKEN
    + rb"|"
    + _QUOTED
    + rb"))?)*"
)
_TRAILER_LINE: Final = re.compile(_TOKEN + rb":[ \t]*[^\x00-\x08\x0a-\x1f\x7f]*")


_REASONS: Final = {
    400: b"Bad Request",
    404: b"Not Found",
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    414: b"URI Too Long",
    431: b"Request Header Fields Too Large",
    501: b"Not Implemented",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
    505: b"HTTP Version Not Supported",
}


def error_response(status: int, text: str, *, close: bool, head_only: bool = False) -> bytes:
    """A short plain-text response made by the proxy itself (errors, refusals)."""
    body = text.encode() + b"\n"
    head = b"HTTP/1.1 %d %s\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\n%s\r\n" % (
        status,
        _REASONS.get(status, b"Error"),
        len(body),
        b"Connection: close\r\n" if close else b"",
    )
    return head if head_only else head + body


class ParseError(Exception):
    """A message that must not be forwarded: the status to answer with (400, 414, 431, 505, ...) and why."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason


def check_head(head: bytes | bytearray, what: str = "request") -> None:
    """Refuse what a lenient llhttp would pass; `head` ends in CRLFCRLF.

    Every LF must be part of a CRLF and every CR of one (bare LF/CR), no line may start with whitespace
    (obs-fold, RFC 9112 5.2), no control character other than HTAB may appear, and no header name may end
    in whitespace before its colon (RFC 9112 5.1).
    """
    crlf = head.count(b"\r\n")
    if head.count(b"\n") != crlf or head.count(b"\r") != crlf:
        raise ParseError(400, f"bare CR or LF in the {what} head")
    if b"\n " in head or b"\n\t" in head:
        raise ParseError(400, "obsolete line folding")
    if _CTL.search(head) is not None:
        raise ParseError(400, f"control character in the {what} head")
    if (b" :" in head or b"\t:" in head) and _SPACE_BEFORE_COLON.search(head) is not None:
        raise ParseError(400, "whitespace before a header colon")


class _Validator:
    """An llhttp protocol without callbacks: llhttp checks the syntax in C and calls no Python per header."""


_VALIDATOR: Final = _Validator()


def _llhttp_is_strict() -> bool:
    """Whether this llhttp refuses every pattern `check_head` refuses (then checking again is wasted time)."""
    samples = (
        b"GET / HTTP/1.1\nHost: a\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\nX: b\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\rX: b\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nX: b\r\n c\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nX: b\r\n\tc\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nX : b\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nX\t: b\r\n\r\n",
        *(b"GET / HTTP/1.1\r\nHost: a\r\nX: b%sc\r\n\r\n" % bytes([c]) for c in (0, 1, 8, 11, 12, 27, 127)),
        *(b"GET / HTTP/1.1\r\nHost: a\r\nX%s: b\r\n\r\n" % bytes([c]) for c in (0, 1, 9, 127)),
        *(b"GET /%s HTTP/1.1\r\nHost: a\r\n\r\n" % bytes([c]) for c in (0, 1, 9, 127)),
    )
    for sample in samples:
        try:
            httptools.HttpRequestParser(_VALIDATOR).feed_data(sample)
        except httptools.HttpParserError:
            continue
        return False
    return True


LLHTTP_STRICT: Final = _llhttp_is_strict()


def parse_length(values: list[bytes]) -> int:
    """Content-Length: digits only; a list (or repeated header) only when every value agrees."""
    result: int | None = None
    for value in values:
        for part in value.split(b","):
            part = part.strip(b" \t")
            if _DIGITS.fullmatch(part) is None:
                raise ParseError(400, "malformed Content-Length")
            number = int(part)
            if result is not None and number != result:
                raise ParseError(400, "conflicting Content-Length values")
            result = number
    assert result is not None
    return result


def parse_codings(values: list[bytes]) -> bytes:
    """The transfer codings before the final `chunked` (b"" for plain chunked); refuse anything else.

    Only registered codings are known; the last must be `chunked`, and `chunked` may appear once only
    (RFC 9112 6.1): otherwise the message length is unknowable and the message is refused.
    """
    codings = [coding.strip(b" \t").lower() for value in values for coding in value.split(b",")]
    if not codings or codings[-1] != b"chunked":
        raise ParseError(400, "Transfer-Encoding must end with chunked")
    for coding in codings:
        if coding not in KNOWN_CODINGS:
            raise ParseError(400, "unknown transfer coding")
    if codings.count(b"chunked") != 1:
        raise ParseError(400, "chunked applied more than once")
    return b", ".join(codings[:-1])


def tokens(values: list[bytes]) -> set[bytes]:
    """The lower-case tokens of comma-separated header values (Connection)."""
    return {token.strip(b" \t").lower() for value in values for token in value.split(b",")} - {b""}


def cut(head: bytes, start: int, end: int, spans: list[tuple[int, int]]) -> bytes:
    """`head[start:end]` without the (sorted, disjoint) `spans`."""
    if not spans:
        return head[start:end]
    parts = []
    for span_start, span_end in spans:
        parts.append(head[start:span_start])
        start = span_end
    parts.append(head[start:end])
    return b"".join(parts)


def listed_lines(head: bytes, low: bytes, start: int, end: int, names: set[bytes]) -> list[tuple[int, int]]:
    """Spans of the header lines named in `names` (those a Connection header lists)."""
    pattern = re.compile(rb"\r\n(?:" + b"|".join(re.escape(name) for name in names) + rb"):[^\r]*")
    return [match.span() for match in pattern.finditer(low, start, end)]


class Request:
    """One parsed request head. `block` is the header block to forward: CRLF-led lines, without the lines
    the proxy interprets (hop-by-hop, framing, X-Forwarded-*, Forwarded) and without the final CRLF."""

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

    @property
    def idempotent(self) -> bool:
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
        self._llhttp = httptools.HttpRequestParser(_VALIDATOR)
        self._buf = bytearray()
        self._scanned = 0
        self._state = _HEAD
        self._remaining = 0
        self._chunks: ChunkedDecoder | None = None
        self._processing = False
        self._last_host = b""

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
        self._scanned = max(0, len(data) - 3)
        self._buf = data if isinstance(data, bytearray) else bytearray(data)

    def _head(self, data: bytes | bytearray) -> bytes | bytearray | None:
        """Parse one head from `data` if complete: returns the bytes after it, or None (data kept)."""
        if data[:2] == b"\r\n":  # RFC 9112 2.2: ignore empty lines (CRLF) before a request line
            stripped = data.lstrip(b"\r\n")
            skipped = len(data) - len(stripped)
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
        if end + 2 - line > self.max_header:
            raise ParseError(431, "request header block too large")
        version = head[line - 9 : line]
        if version != b" HTTP/1.1" and version != b" HTTP/1.0":
            if head.startswith(b"PRI * HTTP/2"):
                raise ParseError(505, "HTTP/2 without TLS is not served")
            raise ParseError(505 if b" HTTP/" in head[:line] else 400, "not an HTTP/1.x request line")
        if not LLHTTP_STRICT:
            check_head(head)
        try:
            self._llhttp.feed_data(head)
        except httptools.HttpParserUpgrade:
            self._llhttp = httptools.HttpRequestParser(_VALIDATOR)  # llhttp stays paused after an upgrade
        except httptools.HttpParserError as error:
            self._llhttp = httptools.HttpRequestParser(_VALIDATOR)
            raise ParseError(400, f"malformed request: {error}") from None
        method, _, target = head[: line - 9].partition(b" ")
        request = self._interpret(head, method, target, line, end, version == b" HTTP/1.0")
        if request.chunked:
            self._state = _CHUNKED_BODY
            self._chunks = ChunkedDecoder(self.max_header)
            self._llhttp = httptools.HttpRequestParser(_VALIDATOR)  # it would expect the body next
        elif request.content_length:
            self._state = _LENGTH_BODY
            self._remaining = request.content_length
            self._llhttp = httptools.HttpRequestParser(_VALIDATOR)
        elif not request.keep_alive:
            self._llhttp = httptools.HttpRequestParser(_VALIDATOR)  # it refuses data after a "close"
        self.handler.on_request(request)
        if self._state == _HEAD:
            self._end()
        return data[end + 4 :]

    def _interpret(
        self, head: bytes, method: bytes, target: bytes, line: int, end: int, http10: bool
    ) -> Request:
        """Whole-head rules (Host, framing, Connection, Upgrade, Expect) and the block to forward.

        The common head (Host, maybe Cookie, nothing else the proxy interprets) takes the short way.
        """
        if method == b"CONNECT":
            raise ParseError(405, "CONNECT is not served")
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
            request.content_length = parse_length(lengths)
        if codings is not None:
            if http10:
                raise ParseError(400, "Transfer-Encoding in an HTTP/1.0 request")
            if lengths is not None:
                raise ParseError(400, "both Content-Length and Transfer-Encoding")
            request.codings = parse_codings(codings)
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


class ChunkedDecoder:
    """Strict `chunked` decoding (RFC 9112 7.1): hex sizes without sign or space, well-formed extensions
    (dropped), CRLF exactly after each chunk, trailer fields checked (and dropped)."""

    __slots__ = ("_line", "_max_trailers", "_remaining", "_state", "_trailers")

    _SIZE, _DATA, _DATA_END, _TRAILER = range(4)

    def __init__(self, max_trailers: int = 65536) -> None:
        self._state = self._SIZE
        self._remaining = 0
        self._line = b""
        self._trailers = 0
        self._max_trailers = max_trailers

    def feed(
        self, data: bytes | bytearray, sink: Callable[[bytes | bytearray], None]
    ) -> bytes | bytearray | None:
        """Decode `data`, sending chunk data to `sink`; the bytes after the body once it ended, else None."""
        if self._line:
            data = self._line + data
            self._line = b""
        pos, size = 0, len(data)
        while pos < size:
            state = self._state
            if state == self._DATA:
                take = min(self._remaining, size - pos)
                sink(data if take == size else data[pos : pos + take])
                pos += take
                self._remaining -= take
                if not self._remaining:
                    self._state = self._DATA_END
                continue
            if state == self._DATA_END:
                if size - pos < 2:
                    if data[pos:] != b"\r":
                        raise ParseError(400, "chunk data not followed by CRLF")
                    self._line = bytes(data[pos:])
                    return None
                if data[pos : pos + 2] != b"\r\n":
                    raise ParseError(400, "chunk data not followed by CRLF")
                pos += 2
                self._state = self._SIZE
                continue
            end = data.find(b"\r\n", pos)
            if end < 0:
                if size - pos > MAX_CHUNK_LINE:
                    raise ParseError(400, "chunk size line too long")
                self._line = bytes(data[pos:])
                return None
            line = data[pos:end]
            pos = end + 2
            if state == self._SIZE:
                match = _CHUNK_LINE.fullmatch(line)
                if match is None:
                    raise ParseError(400, "malformed chunk size")
                self._remaining = int(match.group(1), 16)
                self._state = self._DATA if self._remaining else self._TRAILER
            elif not line:
                return data[pos:]
            else:
                self._trailers += len(line) + 2
                if self._trailers > self._max_trailers:
                    raise ParseError(431, "trailer section too large")
                if _TRAILER_LINE.fullmatch(line) is None:
                    raise ParseError(400, "malformed trailer field")
        return None
