"""Strict HTTP/1.1 response framing for the L7 proxy, sans-IO: a backend out of step must never be reused.

A response's length decides where the next one starts on a kept-alive connection, so the proxy frames
responses itself (RFC 9112 6.3: no body after HEAD or for 1xx/204/304; else chunked; else
Content-Length; else until the connection closes) and treats anything unexpected (bytes between
responses, a malformed head or chunk) as the end of that connection. llhttp validates each head; the
header block is forwarded as received, minus hop-by-hop lines, found with one `lower()` and a few
regular-expression searches rather than a Python call per header.
"""

from __future__ import annotations

import re
from typing import Final, Protocol

import httptools

from layerlb_dataplane.http.h1.framing import (
    HOP_BY_HOP,
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

MAX_RESPONSE_HEAD: Final = 65536
_RESPONSE_LINES: Final = re.compile(rb"\r\n(content-length|" + HOP_BY_HOP + rb"):([^\r]*)")
# llhttp lets any byte through in a reason phrase, and the status line is forwarded as received (RFC 9112 4:
# HTAB, SP, VCHAR and obs-text only).
_STATUS_LINE_CTL: Final = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


class Response:
    """One parsed response head. `block` is the header block to forward (CRLF-led lines, hop-by-hop lines
    removed, no final CRLF); it keeps a well-formed Content-Length line (`length_in_block`)."""

    content_length: int | None = None
    length_in_block = False
    chunked = False
    codings = b""
    keep_alive = True
    upgrade: bytes | None = None
    # The head as forwarded to a kept-alive HTTP/1.1 client of a non-HEAD request without a cookie to
    # set, and whether its body is re-chunked: made once per parsed head, which backends repeat.
    proxied: bytes | None = None
    proxied_chunked = False

    def __init__(self, status: int, status_line: bytes, block: bytes) -> None:
        self.status = status
        self.status_line = status_line
        self.block = block


class ResponseHandler(Protocol):
    """What the response parser calls: a head (1xx ones too), body data, the end."""

    def on_response(self, response: Response) -> None: ...

    def on_response_body(self, data: bytes | bytearray) -> None: ...

    def on_response_end(self) -> None: ...


_WAIT, _HEAD, _LENGTH, _CHUNKED, _CLOSE, _DONE, _TUNNEL, _BROKEN = range(8)


class ResponseParser:
    """Frames a backend's responses, one per `expect()`; a 101 ends framing (the rest is a tunnel).

    Anything after a response's end, or out of turn, makes the connection unusable (`reusable` False).
    `feed` raises `ParseError` (status 502) on a malformed response.
    """

    __slots__ = (
        "_buf",
        "_chunks",
        "_clean",
        "_head_request",
        "_llhttp",
        "_memo_head",
        "_memo_response",
        "_memo_whole",
        "_remaining",
        "_state",
        "handler",
        "idle",
    )

    def __init__(self, handler: ResponseHandler) -> None:
        self.handler = handler
        self._llhttp = httptools.HttpResponseParser(VALIDATOR)
        self._clean = True  # llhttp saw whole messages only, so it can parse the next head
        self._state = _WAIT
        self._buf = b""
        self._remaining = 0
        self._chunks: ChunkedDecoder | None = None
        self._head_request = False
        self.idle = True  # between responses and in step: the connection may carry another request
        # The last head parsed in full: a backend often repeats its head (equal bytes parse equally).
        self._memo_head = b""
        self._memo_response: Response | None = None
        # The size of that head with its whole body when the body has a Content-Length: a read of exactly
        # that size starting with the head is the whole response (-1: no such response).
        self._memo_whole = -1

    @property
    def reusable(self) -> bool:
        """Between responses, with nothing unexpected received: the connection may carry another request."""
        return self.idle

    @property
    def started(self) -> bool:
        """Bytes of the awaited response arrived (a retry would no longer be safe)."""
        return self._state != _HEAD or bool(self._buf)

    @property
    def until_close(self) -> bool:
        """The body ends when the backend closes (no length): such a connection is never reused."""
        return self._state == _CLOSE

    def expect(self, head_request: bool) -> None:
        """A request was sent: frame its response (no body after a HEAD request)."""
        self._state = _HEAD
        self._head_request = head_request
        self.idle = False

    def feed(self, data: bytes | bytearray) -> bytes | bytearray:
        """Frame `data`; returns the bytes past a 101 head (the start of the tunnel), else b""."""
        if (
            len(data) == self._memo_whole
            and self._state == _HEAD
            and not self._head_request
            and not self._buf
            and data.startswith(self._memo_head)
        ):
            # The last head again with all its body, alone in one read: the common keep-alive response.
            handler = self.handler
            handler.on_response(self._memo_response)  # type: ignore[arg-type]  # set with _memo_whole
            handler.on_response_body(data[len(self._memo_head) :])
            self._state = _DONE
            self.idle = True
            handler.on_response_end()
            return b""
        while data:
            state = self._state
            if state == _LENGTH:
                remaining = self._remaining
                size = len(data)
                if size < remaining:
                    self._remaining = remaining - size
                    self.handler.on_response_body(data)
                    return b""
                self._remaining = 0
                self.handler.on_response_body(data if size == remaining else data[:remaining])
                self._done(data[remaining:] if size > remaining else b"")
                return b""
            if state == _HEAD:
                rest = self._head(data)
                if rest is None or self._state == _TUNNEL:
                    return rest or b""
                data = rest
            elif state == _CHUNKED:
                assert self._chunks is not None
                try:
                    after = self._chunks.feed(data, self.handler.on_response_body)
                except ParseError as error:
                    raise ParseError(502, f"response body: {error.reason}") from None
                if after is not None:
                    self._done(after)
                return b""
            elif state == _CLOSE:
                self.handler.on_response_body(data)
                return b""
            else:  # bytes between responses: the backend is out of step
                self._state = _BROKEN
                self.idle = False
                raise ParseError(502, "unexpected bytes from the backend")
        return b""

    def feed_eof(self) -> bool:
        """The backend closed: True when that ended a close-delimited response."""
        if self._state == _CLOSE:
            self._done()
            return True
        return False

    def _done(self, rest: bytes | bytearray = b"") -> None:
        """The response ended; bytes after it mean the backend is out of step (never reuse it)."""
        self._state = _BROKEN if rest else _DONE
        self.idle = not rest
        self._chunks = None
        self.handler.on_response_end()

    def _head(self, data: bytes | bytearray) -> bytes | bytearray | None:
        memo = self._memo_head
        if memo and not self._buf and data.startswith(memo):  # the last head again (one CRLFCRLF: its end)
            response = self._memo_response
            assert response is not None
            return self._framing(response, data[len(memo) :])
        if self._buf:
            data = self._buf + data
            self._buf = b""
        end = data.find(b"\r\n\r\n")
        if end < 0:
            if len(data) > MAX_RESPONSE_HEAD:
                raise ParseError(502, "response head too large")
            self._buf = bytes(data)
            return None
        if end > MAX_RESPONSE_HEAD:
            raise ParseError(502, "response head too large")
        head = data[: end + 4]
        if isinstance(head, bytearray):
            head = bytes(head)
        return self._framing(self._parse(head, end), data[end + 4 :])

    def _framing(self, response: Response, rest: bytes | bytearray) -> bytes | bytearray:
        """Hand the head to the handler and frame the body that follows; returns the bytes after the head."""
        status = response.status
        if status == 101:
            self._state = _TUNNEL
            self.handler.on_response(response)
            return rest
        if status < 200:
            self.handler.on_response(response)  # informational: the final response follows
            return rest
        if self._head_request or status == 204 or status == 304:
            self._state = _DONE
        elif response.chunked:
            self._state = _CHUNKED
            self._chunks = ChunkedDecoder()
        elif response.content_length is not None:
            self._remaining = response.content_length
            self._state = _LENGTH if self._remaining else _DONE
        else:
            self._state = _CLOSE  # ends with the connection
        self.handler.on_response(response)
        if self._state == _DONE:
            self._done(rest)  # a response without a body ends with its head
            return b""
        return rest

    def _parse(self, head: bytes, end: int) -> Response:
        """The head through llhttp and the framing rules; remembered for the next head."""
        if head[:7] != b"HTTP/1.":
            raise ParseError(502, "not an HTTP/1.x response")
        if _STATUS_LINE_CTL.search(head, 0, head.find(b"\r\n")) is not None:
            raise ParseError(502, "control character in the response status line")
        if not LLHTTP_STRICT:
            check_head(head, "response")
        if not self._clean:
            self._llhttp = httptools.HttpResponseParser(VALIDATOR)
        llhttp = self._llhttp
        self._clean = False
        try:
            llhttp.feed_data(head)
        except httptools.HttpParserUpgrade:
            pass
        except httptools.HttpParserError as error:
            if not 0x32 <= head[7] <= 0x39:
                raise ParseError(502, f"malformed response: {error}") from None
            # llhttp knows HTTP/1.0 and 1.1 only: a later 1.x minor (RFC 9112 2.3) is checked as the
            # HTTP/1.1 the proxy takes it for and forwards it as.
            llhttp = self._llhttp = httptools.HttpResponseParser(VALIDATOR)
            try:
                llhttp.feed_data(b"HTTP/1.1" + head[8:])
            except httptools.HttpParserUpgrade:
                pass
            except httptools.HttpParserError as again:
                raise ParseError(502, f"malformed response: {again}") from None
        status = llhttp.get_status_code()
        if not 100 <= status <= 599:
            raise ParseError(502, "response status out of range")
        # The common head: at most a plain Content-Length and `Connection: keep-alive` or `close`.
        line = head.find(b"\r\n")
        low = head.lower()
        search = _RESPONSE_LINES.search
        length: int | None = None
        close = head[7] == 0x30  # HTTP/1.0
        span: tuple[int, int] | None = None
        common = True
        match = search(low, line, end)
        while match is not None:
            name = match.group(1)
            value = match.group(2).strip(b" \t")
            if name == b"content-length" and length is None and value.isdigit() and len(value) <= 18:
                length = int(value)
            elif name == b"connection" and span is None and (value == b"keep-alive" or value == b"close"):
                span = match.span()
                close = value == b"close"
            else:
                common = False
                break
            match = search(low, match.end(), end)
        if common:
            status_line = head[:line] if head[7] == 0x31 else b"HTTP/1.1" + head[8:line]
            block = head[line:end] if span is None else head[line : span[0]] + head[span[1] : end]
            response = Response(status, status_line, block)
            if close:
                response.keep_alive = False
            if length is not None:
                response.content_length = length
                response.length_in_block = True
        else:
            response = _interpret(head, low, status, line, end)
        # llhttp ends a message with its head only for these (it is fed heads, never bodies):
        self._clean = (
            (100 <= status < 200 and status != 101) or status in (204, 304) or response.content_length == 0
        )
        self._memo_head = head
        self._memo_response = response
        length = response.content_length
        plain = status >= 200 and status not in (204, 304) and not response.chunked
        self._memo_whole = len(head) + length if plain and length else -1
        return response


def _interpret(head: bytes, low: bytes, status: int, line: int, end: int) -> Response:
    """Every hop-by-hop and framing line, in general (repeated or listed headers, codings, Upgrade)."""
    http10 = head[7] == 0x30
    status_line = head[:line] if not http10 else b"HTTP/1.1" + head[8:line]
    spans: list[tuple[int, int]] = []
    lengths: list[bytes] | None = None
    codings: list[bytes] | None = None
    connection: list[bytes] | None = None
    upgrade: bytes | None = None
    for match in _RESPONSE_LINES.finditer(low, line, end):
        name = match.group(1)
        value = head[match.start(2) : match.end(2)].strip(b" \t")
        if name == b"content-length":
            lengths = [*(lengths or ()), value]
            if not value.isdigit() or lengths[1:]:
                spans.append(match.span())
        else:
            spans.append(match.span())
            if name == b"transfer-encoding":
                codings = [*(codings or ()), value]
            elif name == b"connection":
                connection = [*(connection or ()), value]
            elif name == b"upgrade":
                upgrade = value
    listed = tokens(connection) if connection is not None else set()
    keep_alive = b"keep-alive" in listed if http10 else b"close" not in listed
    listed -= {b"close", b"keep-alive", b"upgrade"}
    if listed:
        spans = sorted({*spans, *listed_lines(head, low, line, end, listed)})
    response = Response(status, status_line, cut(head, line, end, spans))
    if not keep_alive:
        response.keep_alive = False
    if upgrade is not None:
        response.upgrade = upgrade
    if lengths is not None:
        try:
            response.content_length = parse_length(lengths)
        except ParseError:
            raise ParseError(502, "malformed Content-Length in a response") from None
        response.length_in_block = len(lengths) == 1 and lengths[0].isdigit()
    if codings is not None and status >= 200 and status not in (204, 304):
        if lengths is not None:
            raise ParseError(502, "both Content-Length and Transfer-Encoding in a response")
        try:
            response.codings = parse_codings(codings)
        except ParseError:
            raise ParseError(502, "unsupported response transfer coding") from None
        response.chunked = True
    return response
