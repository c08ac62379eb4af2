"""The differential target: layerlb's request framing against h11's on the same bytes.

Request smuggling is two readers disagreeing on where a message ends. h11 (python-hyper's sans-IO
HTTP/1.1) is an independent implementation, so on every input both read, message by message:
- when both accept a message, they must agree on its framing: method, target, version, how the body is
  delimited, the body's bytes, where the message ends (so where the next one starts), whether the
  connection stays open, and which header fields go upstream (h11's fields minus the hop-by-hop and
  forwarding ones layerlb interprets must be exactly the lines layerlb forwards);
- when one accepts what the other refuses, the input must match a row of `KNOWN_DIFFERENCES`, each a
  deliberate decision with its reason; anything else is a finding.
A message one side still waits on ends the comparison unless the other already framed it whole: a body
one side thinks complete and the other does not is a desync.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, Literal

import h11
from layerlb_dataplane.http.h1 import framing, request

from tests.fuzz.targets import Finding

# What layerlb interprets and does not forward as received: hop-by-hop fields and the forwarding headers
# it rewrites (framing.HOP_BY_HOP plus Content-Length, X-Forwarded-*, Forwarded).
_NOT_FORWARDED: Final = frozenset(framing.HOP_BY_HOP.split(b"|")) | {
    b"content-length",
    b"x-forwarded-for",
    b"x-forwarded-proto",
    b"x-forwarded-host",
    b"forwarded",
}


@dataclass
class Message:
    """One request as a reader framed it."""

    method: bytes
    target: bytes
    version: bytes
    headers: list[tuple[bytes, bytes]]  # the fields forwarded upstream as (lower-case name, value)
    length: int | None  # Content-Length, None when chunked or absent
    chunked: bool
    body: bytes = b""
    end: int = -1  # the offset just past the message; -1 while incomplete
    keep_alive: bool = True
    upgrade: bool = False

    def framing(self) -> tuple[object, ...]:
        # RFC 9112 2.3: a 1.x message with x above 1 is processed as HTTP/1.1
        version = (
            b"1.1" if self.version[:2] == b"1." and self.version[2:] not in (b"0", b"1") else self.version
        )
        return (self.method, version, self.length, self.chunked, self.body, self.end)


@dataclass
class Reading:
    """A reader's view of a byte stream: the messages framed, and how reading stopped."""

    messages: list[Message] = field(default_factory=list)
    stop: Literal["refused", "incomplete", "closed", "upgrade", "done"] = "done"
    reason: str = ""
    start: int = 0  # where the message the reader stopped at begins


def layerlb_reading(data: bytes) -> Reading:
    """How layerlb's `RequestParser` frames `data`, arriving in one read, each request answered at once."""
    reading = Reading()
    messages = reading.messages

    class Handler:
        def on_request(self, req: request.Request) -> None:
            lines = [line.partition(b":") for line in req.block.split(b"\r\n")[1:]]
            messages.append(
                Message(
                    req.method,
                    req.target,
                    req.version,
                    [(name.lower(), value.strip(b" \t")) for name, _, value in lines],
                    req.content_length if not req.chunked else None,
                    req.chunked,
                    keep_alive=req.keep_alive,
                    upgrade=req.upgrade is not None,
                )
            )

        def on_body(self, chunk: bytes | bytearray) -> None:
            messages[-1].body += chunk

        def on_request_end(self) -> None:
            messages[-1].end = -2  # set below, once the parser says what it kept

    parser = request.RequestParser(Handler())
    step: Callable[[], None] = lambda: parser.feed(data)  # noqa: E731
    while True:
        before = len(messages)
        try:
            step()
        except framing.ParseError as error:
            reading.stop, reading.reason = "refused", f"{error.status} {error.reason}"
            reading.start = messages[-1].end if messages and messages[-1].end >= 0 else 0
            if messages and messages[-1].end < 0:
                messages.pop()  # refused in its body: never complete
            return reading
        if messages and messages[-1].end == -2:
            messages[-1].end = len(data) - parser.buffered
        last = messages[-1] if messages else None
        if last is None or last.end < 0:
            reading.stop = "incomplete"
            reading.start = messages[-2].end if len(messages) > 1 else 0
            return reading
        if last.upgrade or not last.keep_alive:
            reading.stop = "upgrade" if last.upgrade else "closed"
            return reading
        if last.end == len(data) or len(messages) == before:
            reading.stop = "done" if last.end == len(data) else "incomplete"
            reading.start = last.end
            return reading
        step = parser.resume


def h11_reading(data: bytes) -> Reading:
    """How h11's server side frames `data`, each request answered with an empty 200 at once."""
    reading = Reading()
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=1 << 20)
    if data:  # receiving b"" would mean the client closed
        conn.receive_data(data)
    current: Message | None = None
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as error:
            reading.stop, reading.reason = "refused", str(error)
            if current is not None:
                reading.messages.append(current)  # refused in its body: the head was read, compared as such
            return reading
        if event is h11.NEED_DATA:
            reading.stop = "incomplete" if current is not None or conn.trailing_data[0] else "done"
            if current is not None:
                reading.messages.append(current)  # head read, body not complete: compared as it is
            return reading
        if event is h11.PAUSED:
            reading.stop = "upgrade"
            return reading
        if isinstance(event, h11.Request):
            current = Message(
                event.method,
                event.target,
                event.http_version,
                [(bytes(n), bytes(v)) for n, v in event.headers],
                None,
                False,
                upgrade=event.method == b"CONNECT" or any(n == b"upgrade" for n, _ in event.headers),
            )
            connection = b",".join(v for n, v in event.headers if n == b"connection").lower()
            # h11's keep-alive rule (decided for good once answered): HTTP/1.1 and no `close` token
            current.keep_alive = event.http_version == b"1.1" and b"close" not in framing.tokens([connection])
            for name, value in event.headers:
                if name == b"content-length":
                    current.length = int(value)
                elif name == b"transfer-encoding":
                    current.chunked, current.length = True, None
        elif isinstance(event, h11.Data):
            assert current is not None
            current.body += bytes(event.data)
        elif isinstance(event, h11.EndOfMessage):
            assert current is not None
            current.end = len(data) - len(conn.trailing_data[0])
            reading.messages.append(current)
            reading.start = current.end
            if current.upgrade:
                reading.stop = "upgrade"
                return reading
            try:
                conn.send(h11.Response(status_code=200, headers=[(b"content-length", b"0")]))
                conn.send(h11.EndOfMessage())
            except h11.LocalProtocolError:
                reading.stop = "closed"
                return reading
            current.keep_alive = conn.our_state is not h11.MUST_CLOSE
            if not current.keep_alive:
                reading.stop = "closed"
                return reading
            conn.start_next_cycle()
            current = None
        else:  # ConnectionClosed cannot happen: no EOF is given
            raise Finding(f"h11 gave an unexpected event {event!r}")


@dataclass(frozen=True)
class KnownDifference:
    """A deliberate difference: one reader accepts a message the other refuses, and why that is safe.

    `example` is a message that shows it today (a test holds each row to its example, so a row whose
    difference is gone gets noticed and removed)."""

    name: str
    refused_by: Literal["layerlb", "h11"]
    applies: Callable[[bytes, str], bool]  # (the message's bytes from its start, the refusal's reason)
    reason: str
    example: bytes


def _head(message: bytes) -> bytes:
    ends = [i for i in (message.find(b"\r\n\r\n"), message.find(b"\n\n")) if i >= 0]
    return message[: min(ends) + 2] if ends else message


def _fields(message: bytes, name: bytes) -> list[bytes]:
    pattern = rb"(?im)^" + re.escape(name) + rb"[ \t]*:[ \t]*([^\r\n]*)"
    return re.findall(pattern, _head(message))


def _request_line(message: bytes) -> bytes:
    return re.split(rb"\r?\n", message.lstrip(b"\r\n"), maxsplit=1)[0]


_H: Final = b"Host: a\r\n"
_CHUNKED: Final = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"

KNOWN_DIFFERENCES: Final[tuple[KnownDifference, ...]] = (
    KnownDifference(
        "bare LF or CR line endings",
        "layerlb",
        lambda m, r: re.search(rb"(?<!\r)\n|\r(?!\n)", m) is not None,
        "RFC 9112 2.2 lets a recipient accept a bare LF; two readers disagreeing on line ends is a classic "
        "smuggling vector, so layerlb refuses both bare LF and bare CR in a head and in the chunked "
        "framing (h11 accepts bare LF in both)",
        b"GET / HTTP/1.1\n" + _H + b"\r\n",
    ),
    KnownDifference(
        "control characters in the head",
        "layerlb",
        lambda m, r: re.search(rb"[\x00-\x08\x0a-\x1f\x7f]", _head(m).replace(b"\r\n", b"")) is not None,
        "RFC 9110 5.5: a field value holds no control character but HTAB, and RFC 9112 3 none may be in "
        "a request line; h11 lets some through. A byte one upstream strips and another keeps is a "
        "different header to each",
        b"GET / HTTP/1.1\r\n" + _H + b"X: a\x01b\r\n\r\n",
    ),
    KnownDifference(
        "obsolete line folding",
        "layerlb",
        lambda m, r: re.search(rb"\n[ \t]", _head(m)) is not None,
        "RFC 9112 5.2: a server may reject obs-fold with 400; h11 unfolds it into one value. Refusing "
        "means no upstream ever sees a folded line to read its own way",
        b"GET / HTTP/1.1\r\n" + _H + b"X: a\r\n b\r\n\r\n",
    ),
    KnownDifference(
        "Transfer-Encoding in HTTP/1.0",
        "layerlb",
        lambda m, r: b"HTTP/1.0" in _request_line(m) and bool(_fields(m, b"transfer-encoding")),
        "RFC 9112 6.1: a 1.0 message with Transfer-Encoding must be treated as faulty framing (a 1.0 "
        "upstream may not know chunked); h11 frames it as chunked",
        b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    ),
    KnownDifference(
        "Content-Length with Transfer-Encoding",
        "layerlb",
        lambda m, r: bool(_fields(m, b"content-length")) and bool(_fields(m, b"transfer-encoding")),
        "RFC 9112 6.1: a server may reject such a message, and must close after it if not; h11 lets "
        "chunked override the length. Refusing leaves no upstream a message to read by the length",
        _CHUNKED.replace(b"Host", b"Content-Length: 1\r\nHost") + b"0\r\n\r\n",
    ),
    KnownDifference(
        "Transfer-Encoding: chunked followed by a tab",
        "layerlb",
        lambda m, r: "invalid `Transfer-Encoding`" in r,
        "llhttp refuses an HTAB after `chunked` (a space passes), though RFC 9110 5.5 lets OWS end a field "
        "value: stricter than the RFC, never a desync (a refusal); h11 strips it. Left to the request "
        "reader's decisions of #18",
        _CHUNKED.replace(b"chunked", b"chunked\t") + b"0\r\n\r\n",
    ),
    KnownDifference(
        "Content-Length of 19 digits or more",
        "layerlb",
        lambda m, r: any(re.search(rb"[0-9]{19}", v) for v in _fields(m, b"content-length")),
        "a length of 10^18 or more cannot be real and overflows a 64-bit reader upstream (2^64 + 1 reads "
        "as 1 there); h11 reads any number of digits",
        b"POST / HTTP/1.1\r\n" + _H + b"Content-Length: 0000000000000000001\r\n\r\nx",
    ),
    KnownDifference(
        "repeated or listed Content-Length",
        "layerlb",
        lambda m, r: (
            len(_fields(m, b"content-length")) > 1 or any(b"," in v for v in _fields(m, b"content-length"))
        ),
        "RFC 9110 8.6 lets a recipient either refuse or merge identical values; layerlb refuses (as nginx "
        "does: the request-reader decision of #18), h11 merges",
        b"POST / HTTP/1.1\r\n" + _H + b"Content-Length: 1, 1\r\n\r\nx",
    ),
    KnownDifference(
        "a chunk size line layerlb's decoder refuses",
        "layerlb",
        lambda m, r: "chunk" in r,
        "layerlb's decoder takes sizes of at most 15 hex digits (no overflow of a 64-bit reader) and "
        "extensions exactly as RFC 9112 7.1.1 writes them (tokens, quoted strings, no control bytes, no "
        "space after a size); h11 takes 20 digits, trailing whitespace and any bytes after `;`. Both "
        "drop extensions, and layerlb re-chunks what it forwards",
        _CHUNKED + b"1;a=\x01\r\nx\r\n0\r\n\r\n",
    ),
    KnownDifference(
        "a malformed trailer field",
        "layerlb",
        lambda m, r: "trailer" in r,
        "trailer fields are held to the field-line grammar (no control bytes) and dropped, so a trailer "
        "one upstream would read differently is refused rather than passed; h11 takes control bytes",
        _CHUNKED + b"0\r\nX: a\x01b\r\n\r\n",
    ),
    KnownDifference(
        "framing fields in the trailer section",
        "h11",
        lambda m, r: "Content-Length" in r or "Transfer-Encoding" in r,
        "h11 applies header rules to trailer fields; layerlb checks them as field lines and drops them "
        "(never forwarded), so what they say cannot frame anything (RFC 9110 6.5.1)",
        _CHUNKED + b"0\r\nContent-Length: 1, 3\r\n\r\n",
    ),
    KnownDifference(
        "CONNECT",
        "layerlb",
        lambda m, r: r.startswith("405"),
        "an L7 proxy routes requests, not tunnels: 405",
        b"CONNECT a:443 HTTP/1.1\r\n" + _H + b"\r\n",
    ),
    KnownDifference(
        "an HTTP major version other than 1",
        "layerlb",
        lambda m, r: r.startswith("505"),
        "HTTP/1.2 to 1.9 are served as 1.1 (RFC 9112 2.3); a request line saying HTTP/2 or more over "
        "HTTP/1 framing is refused with 505. h11 takes any digit.digit",
        b"GET / HTTP/2.0\r\n" + _H + b"\r\n",
    ),
    KnownDifference(
        "a malformed Host or request target",
        "layerlb",
        lambda m, r: "Host" in r or "request target" in r or " url" in r.lower(),
        "routing reads Host and the target, so layerlb holds them to RFC 3986 (llhttp: origin, absolute "
        "or asterisk form); h11 takes any visible characters",
        b"GET (1 HTTP/1.1\r\n" + _H + b"\r\n",
    ),
    KnownDifference(
        "a body with an Upgrade request",
        "layerlb",
        lambda m, r: "Upgrade" in r,
        "after an upgrade the bytes are a tunnel: a body before it would be ambiguous",
        b"POST / HTTP/1.1\r\n" + _H + b"Connection: upgrade\r\nUpgrade: x\r\nContent-Length: 1\r\n\r\nx",
    ),
    KnownDifference(
        "a request line or header block over layerlb's limits",
        "layerlb",
        lambda m, r: r.startswith(("414", "431")),
        "layerlb bounds heads (8 KiB request line, 64 KiB header block); h11 is given 1 MiB here",
        b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n" + _H + b"\r\n",
    ),
    KnownDifference(
        "empty lines before the request line",
        "h11",
        lambda m, r: re.match(rb"(?:\r\n)+[^\r\n]", m) is not None,
        "RFC 9112 2.2: a server should ignore at least one empty line (CRLF) before a request line; "
        "layerlb skips CRLFs there (and refuses bare ones), h11 refuses",
        b"\r\nGET / HTTP/1.1\r\n" + _H + b"\r\n",
    ),
)


def explain(refused_by: Literal["layerlb", "h11"], message: bytes, reason: str) -> KnownDifference | None:
    """The known difference that covers this refusal, or None."""
    for row in KNOWN_DIFFERENCES:
        if row.refused_by == refused_by and row.applies(message, reason):
            return row
    return None


def _expected_forwarded(message: Message) -> list[tuple[bytes, bytes]]:
    """The fields h11 read that layerlb must forward as received."""
    listed = {
        token.strip(b" \t").lower()
        for name, value in message.headers
        if name == b"connection"
        for token in value.split(b",")
    }
    dropped = _NOT_FORWARDED | listed
    expects = [value.lower() for name, value in message.headers if name == b"expect"]
    if message.version == b"1.0" and expects and expects[-1] == b"100-continue":
        dropped = dropped | {b"expect"}  # RFC 9110 10.1.1: ignored in HTTP/1.0, so not forwarded
    if not message.target.startswith(b"/") and message.target != b"*":
        dropped = dropped | {b"host"}  # absolute-form: the authority replaces Host
    return [(name, value) for name, value in message.headers if name not in dropped]


def _agree(ours: Message, theirs: Message) -> None:
    if ours.framing() != theirs.framing():
        raise Finding(f"framing differs: layerlb {ours!r}, h11 {theirs!r}")
    if theirs.target.startswith(b"/") and ours.target != theirs.target:
        raise Finding(f"targets differ: layerlb {ours.target!r}, h11 {theirs.target!r}")
    if ours.headers != _expected_forwarded(theirs):
        raise Finding(f"forwarded fields differ: layerlb {ours.headers!r}, h11 {theirs.headers!r}")
    upgrade = ours.upgrade or theirs.upgrade  # h11 stops at any Upgrade header, before deciding keep-alive
    if ours.version == theirs.version == b"1.1" and ours.keep_alive != theirs.keep_alive and not upgrade:
        raise Finding(f"keep-alive differs: layerlb {ours!r}, h11 {theirs!r}")


def differential(data: bytes) -> None:
    """layerlb and h11 agree on every message both frame; every accept/refuse split is a known one."""
    ours, theirs = layerlb_reading(data), h11_reading(data)
    for index in range(max(len(ours.messages), len(theirs.messages))):
        mine = ours.messages[index] if index < len(ours.messages) else None
        other = theirs.messages[index] if index < len(theirs.messages) else None
        if mine is not None and other is not None:
            if mine.end < 0 or other.end < 0:  # one still reads its body: the head must agree
                _agree(
                    Message(**{**mine.__dict__, "end": -1, "body": b""}),
                    Message(**{**other.__dict__, "end": -1, "body": b""}),
                )
                if mine.end >= 0 or other.end >= 0:
                    # Same head, so the same body framing: only a chunked syntax one reader is lenient
                    # about can leave the other waiting (for bytes that can never make it valid).
                    waiting: Literal["layerlb", "h11"] = "layerlb" if mine.end < 0 else "h11"
                    reading = ours if waiting == "layerlb" else theirs
                    reason = reading.reason if reading.stop == "refused" else "waits for more of the body"
                    start = ours.messages[index - 1].end if index else 0
                    if explain(waiting, data[start:], reason) is None:
                        raise Finding(f"one reader ended a body the other still reads: {mine!r} / {other!r}")
                return
            _agree(mine, other)
            if mine.upgrade or other.upgrade or not mine.keep_alive or not other.keep_alive:
                return
            continue
        # One reader framed message `index`, the other stopped before it.
        stopped, side = (ours, "layerlb") if mine is None else (theirs, "h11")
        framed = other if mine is None else mine
        assert framed is not None
        if stopped.stop == "refused":
            start = ours.messages[index - 1].end if index else 0
            if explain(side, data[start:], stopped.reason) is None:  # type: ignore[arg-type]
                raise Finding(
                    f"{side} refused ({stopped.reason}) a message the other framed as {framed!r}, "
                    "and no row of KNOWN_DIFFERENCES covers it"
                )
        elif stopped.stop == "incomplete" and framed.end >= 0:
            raise Finding(f"{side} still waits where the other framed a whole message: {framed!r}")
        return
