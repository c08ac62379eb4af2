"""The response side of the differential: layerlb's response framing against h11's client on the same bytes.

A backend's response decides where the next one starts on a kept-alive upstream connection, so the proxy
and an independent reader must agree on it too. The input's first byte says whether the request was a
HEAD; the rest is what the backend sent before closing. When both readers frame a response they must agree
on the status (and the 1xx before it), the body's bytes, and whether bytes follow it (which makes
layerlb drop the connection, and h11 keep them as the next response); an accept/refuse split must match
a row of `RESPONSE_DIFFERENCES`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Final, Literal

import h11
from layerlb_dataplane.http.h1 import framing, response

from tests.fuzz.h11_differential import KnownDifference, _fields, _head
from tests.fuzz.targets import Finding


@dataclass
class Framed:
    """How one reader framed the bytes: `stop` says how it ended, the rest what it framed."""

    stop: Literal["framed", "refused", "tunnel"]
    reason: str = ""
    statuses: list[int] = field(default_factory=list)  # the 1xx, then the final status
    body: bytes = b""
    more: bool = False  # bytes follow the response


def layerlb_framing(data: bytes, head_request: bool) -> Framed:
    framed = Framed("refused")
    ended = False

    class Handler:
        def on_response(self, resp: response.Response) -> None:
            framed.statuses.append(resp.status)

        def on_response_body(self, chunk: bytes | bytearray) -> None:
            framed.body += chunk

        def on_response_end(self) -> None:
            nonlocal ended
            ended = True

    parser = response.ResponseParser(Handler())
    parser.expect(head_request)
    try:
        if parser.feed(data) or framed.statuses[-1:] == [101]:
            framed.stop = "tunnel"
            return framed
        if not ended:
            parser.feed_eof()
    except framing.ParseError as error:
        framed.stop, framed.reason = "refused", f"{error.status} {error.reason}"
        return framed
    if ended:
        framed.stop = "framed"
        framed.more = not parser.reusable
    else:  # the backend closed before a whole response: the proxy answers 502
        framed.stop, framed.reason = "refused", "closed before a whole response"
    return framed


def h11_framing(data: bytes, head_request: bool) -> Framed:
    framed = Framed("refused")
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method=b"HEAD" if head_request else b"GET", target=b"/", headers=[(b"host", b"a")]))
    conn.send(h11.EndOfMessage())
    if data:
        conn.receive_data(data)
    conn.receive_data(b"")  # the backend closed after these bytes
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as error:
            framed.stop, framed.reason = "refused", str(error)
            return framed
        if isinstance(event, h11.InformationalResponse | h11.Response):
            framed.statuses.append(event.status_code)
        elif isinstance(event, h11.Data):
            framed.body += bytes(event.data)
        elif isinstance(event, h11.EndOfMessage):
            framed.stop = "framed"
            framed.more = bool(conn.trailing_data[0])
            return framed
        else:  # NEED_DATA, PAUSED, ConnectionClosed: closed before a whole response
            framed.stop, framed.reason = "refused", "closed before a whole response"
            return framed


def _status_line(message: bytes) -> bytes:
    return re.split(rb"\r?\n", message, maxsplit=1)[0]


_OK: Final = b"HTTP/1.1 200 OK\r\n"

RESPONSE_DIFFERENCES: Final[tuple[KnownDifference, ...]] = (
    KnownDifference(
        "bare LF or CR line endings, in the head or the chunked framing",
        "layerlb",
        lambda m, r: re.search(rb"(?<!\r)\n|\r(?!\n)", m) is not None,
        "as for requests: line ends two readers could split differently are refused (502); h11 takes a "
        "bare LF in heads and after the last chunk",
        b"HTTP/1.1 200 OK\nContent-Length: 0\n\n",
    ),
    KnownDifference(
        "control characters or obs-fold in the head",
        "layerlb",
        lambda m, r: (
            any(word in r.lower() for word in ("control character", " char", "whitespace"))
            or re.search(rb"[\x00-\x08\x0b-\x1f\x7f]|\n[ \t]", _head(m).replace(b"\r\n", b"\n")) is not None
        ),
        "as for requests (RFC 9110 5.5, RFC 9112 4 and 5.2): h11 passes some control bytes (in field values "
        "and reason phrases) and obs-fold; a client behind the proxy might read them otherwise",
        _OK + b"X: a\x01b\r\nContent-Length: 0\r\n\r\n",
    ),
    KnownDifference(
        "Content-Length with Transfer-Encoding",
        "layerlb",
        lambda m, r: bool(_fields(m, b"content-length")) and bool(_fields(m, b"transfer-encoding")),
        "RFC 9112 6.3 (3): chunked would override the length, but a backend sending both is out of step "
        "with itself; the proxy refuses it (502) rather than guess, h11 takes chunked",
        _OK + b"Content-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    ),
    KnownDifference(
        "Content-Length of 19 digits or more, repeated or listed",
        "layerlb",
        lambda m, r: (
            any(re.search(rb"[0-9]{19}|,", v) for v in _fields(m, b"content-length"))
            or len(_fields(m, b"content-length")) > 1
        ),
        "as for requests: lengths past 10^18 are refused, agreeing lists taken as one value only where "
        "llhttp does; h11 reads any number of digits",
        _OK + b"Content-Length: 0000000000000000000\r\n\r\n",
    ),
    KnownDifference(
        "a chunk size line or trailer layerlb's decoder refuses",
        "layerlb",
        lambda m, r: "response body" in r,
        "the strict chunked decoder (sizes of at most 15 hex digits, RFC 9112 7.1.1 extensions, "
        "trailer field lines) is shared with requests",
        _OK + b"Transfer-Encoding: chunked\r\n\r\n1;a=\x01\r\nx\r\n0\r\n\r\n",
    ),
    KnownDifference(
        "a status line of another HTTP version than 1.x",
        "layerlb",
        lambda m, r: "HTTP/1.x" in r,
        "the proxy speaks HTTP/1 to backends: a 0.x or 2+ status line is no answer to its request (502); "
        "h11 takes any digit.digit",
        b"HTTP/0.1 204 No Content\r\n\r\n",
    ),
    KnownDifference(
        "a status code outside 100-599",
        "layerlb",
        lambda m, r: "out of range" in r,
        "RFC 9110 15: status codes are 100 to 599; a client may not know how to frame another (502). h11 "
        "takes any three digits",
        b"HTTP/1.1 600 OK\r\nContent-Length: 0\r\n\r\n",
    ),
    KnownDifference(
        "a response after a 1xx, or any bytes after a close-delimited head, from HTTP/1.0",
        "layerlb",
        lambda m, r: "after `Connection: close`" in r,
        "HTTP/1.0 has no 1xx responses (RFC 9110 15.2) and llhttp takes an HTTP/1.0 head as the last on "
        "its connection: what follows is refused (502); h11 frames the final response after it",
        b"HTTP/1.0 105 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
    ),
    KnownDifference(
        "framing fields in the trailer section",
        "h11",
        lambda m, r: "Content-Length" in r or "Transfer-Encoding" in r,
        "h11 applies header rules to trailer fields; layerlb checks them as field lines and drops them",
        _OK + b"Transfer-Encoding: chunked\r\n\r\n0\r\nContent-Length: 1, 3\r\n\r\n",
    ),
)


def explain(refused_by: Literal["layerlb", "h11"], data: bytes, reason: str) -> KnownDifference | None:
    """The known difference that covers this refusal, or None."""
    for row in RESPONSE_DIFFERENCES:
        if row.refused_by == refused_by and row.applies(data, reason):
            return row
    return None


def response_differential(data: bytes) -> None:
    """layerlb and h11 agree on every response both frame; every accept/refuse split is a known one."""
    head_request = bool(data[:1]) and data[0] & 1 == 1
    rest = data[1:]
    ours, theirs = layerlb_framing(rest, head_request), h11_framing(rest, head_request)
    if ours.stop == "framed" and theirs.stop == "framed":
        if (ours.statuses, ours.body, ours.more) != (theirs.statuses, theirs.body, theirs.more):
            raise Finding(f"response framing differs: layerlb {ours!r}, h11 {theirs!r}")
        return
    for refusing, side, other in ((ours, "layerlb", theirs), (theirs, "h11", ours)):
        if (
            refusing.stop == "refused"
            and other.stop == "framed"
            and explain(side, rest, refusing.reason) is None  # type: ignore[arg-type]
        ):
            raise Finding(
                f"{side} refused ({refusing.reason}) a response the other framed as {other!r}, "
                "and no row of RESPONSE_DIFFERENCES covers it"
            )
