"""Strict HTTP/1.1 for the L7 proxy, sans-IO: the pieces requests and responses share.

Request smuggling lives where two parsers disagree on where a message ends, so the proxy frames every
message itself and refuses anything two parsers could read differently (RFC 9112, no leniency). llhttp
(httptools) validates heads; this module holds what both directions use on top of it: `ParseError`,
the raw-head checks, the Content-Length and Transfer-Encoding rules, the strict chunked decoder, and
the proxy's own short answers. At import, llhttp is probed with the patterns it must refuse (bare LF,
obs-fold, control characters, whitespace before a colon); should an llhttp build accept any of them,
the parsers check the raw head bytes themselves (`check_head`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Final

import httptools

IDEMPOTENT: Final = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})
# Transfer codings a recipient may see before the final `chunked` (RFC 9112 7, IANA registry).
KNOWN_CODINGS: Final = frozenset({b"chunked", b"gzip", b"x-gzip", b"deflate", b"compress", b"x-compress"})
MAX_CHUNK_LINE: Final = 4096
# Hop-by-hop headers (RFC 9110 7.6.1, plus Keep-Alive, Proxy-Connection and Proxy-Auth*), never forwarded.
HOP_BY_HOP: Final = b"connection|keep-alive|proxy-connection|te|trailer|transfer-encoding|upgrade|proxy-authenticate|proxy-authorization"

_CTL: Final = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_SPACE_BEFORE_COLON: Final = re.compile(rb"\n[^:\r\n]*[ \t]:")
_DIGITS: Final = re.compile(rb"[0-9]{1,18}")
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
    """Refuse what a lenient llhttp would pass; `head` ends in CRLFCRLF (a bad response head is a 502).

    Every LF must be part of a CRLF and every CR of one (bare LF/CR), no line may start with whitespace
    (obs-fold, RFC 9112 5.2), no control character other than HTAB may appear, and no header name may end
    in whitespace before its colon (RFC 9112 5.1).
    """
    status = 502 if what == "response" else 400
    crlf = head.count(b"\r\n")
    if head.count(b"\n") != crlf or head.count(b"\r") != crlf:
        raise ParseError(status, f"bare CR or LF in the {what} head")
    if b"\n " in head or b"\n\t" in head:
        raise ParseError(status, "obsolete line folding")
    if _CTL.search(head) is not None:
        raise ParseError(status, f"control character in the {what} head")
    if (b" :" in head or b"\t:" in head) and _SPACE_BEFORE_COLON.search(head) is not None:
        raise ParseError(status, "whitespace before a header colon")


class _Validator:
    """An llhttp protocol without callbacks: llhttp checks the syntax in C and calls no Python per header."""


VALIDATOR: Final = _Validator()


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
            httptools.HttpRequestParser(VALIDATOR).feed_data(sample)
        except httptools.HttpParserError:
            continue
        return False
    return True


LLHTTP_STRICT: Final = _llhttp_is_strict()


def parse_length(values: list[bytes], *, only_one: bool = False) -> int:
    """Content-Length: digits only; a list (or repeated header) only when every value agrees.

    `only_one` (requests) refuses even agreeing lists and repeats (RFC 9110 8.6 lets a recipient refuse
    them): nginx does, so a request that reached a backend behind nginx would not mean the same there.
    """
    if only_one and (len(values) > 1 or b"," in values[0]):
        raise ParseError(400, "more than one Content-Length value")
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


def parse_codings(values: list[bytes], *, only_chunked: bool = False) -> bytes:
    """The transfer codings before the final `chunked` (b"" for plain chunked); refuse anything else.

    The last coding must be `chunked`, and `chunked` may appear once only (RFC 9112 6.1, 6.3): otherwise
    the message length is unknowable (400). Before it, only registered codings are known (400 for others);
    `only_chunked` (requests) refuses every other coding with 501 (RFC 9112 6.1: a coding the server does
    not implement), as nginx (501) and HAProxy (422) do: the proxy does not decode them and will not
    hand a backend a request body in a coding neither common proxy forwards.
    """
    codings = [coding.strip(b" \t").lower() for value in values for coding in value.split(b",")]
    if not codings or codings[-1] != b"chunked":
        raise ParseError(400, "Transfer-Encoding must end with chunked")
    if codings.count(b"chunked") != 1:
        raise ParseError(400, "chunked applied more than once")
    for coding in codings:
        if coding not in KNOWN_CODINGS:
            raise ParseError(501 if only_chunked else 400, "unknown transfer coding")
    if only_chunked and len(codings) > 1:
        raise ParseError(501, "transfer coding other than chunked")
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
