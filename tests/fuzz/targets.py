"""The fuzz targets: one function per parser, bytes in, `Finding` raised when a property breaks.

Each target holds its parser to the properties that matter for a front door: it raises only its own
refusal (`ParseError`, `ProxyProtocolError`, `InvalidConfig`), never a stray `IndexError` or
`RecursionError`; the bytes arriving in any number of reads frame exactly as they do in one read (a
connection's reads are cut wherever the network cuts them); and what it accepts survives a round trip
(encode what was parsed, parse it again, get the same thing). The first byte of an input chooses where
the reads are cut, so the fuzzer explores the cuts too. The targets are plain functions so the short CI
run, the long benchmark run and the regression tests all call the same code (`tests/fuzz/main.py` runs
them under atheris).
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Callable
from typing import Final

from layerlb_dataplane.control import config
from layerlb_dataplane.http.h1 import framing, request, response
from layerlb_dataplane.net import proxy_protocol

from layerlb import api


class Finding(AssertionError):
    """A property of a parser broke on this input (a crash is any other exception)."""


def cuts(data: bytes) -> tuple[bytes, list[bytes]]:
    """The input without its first byte, and that input cut into reads at the sizes the first byte picks."""
    if not data:
        return b"", []
    step, rest = data[0], data[1:]
    sizes = (1 + (step & 0x0F), 1 + (step >> 4) * 7)  # alternating read sizes, 1..16 and 1..106
    reads, pos, turn = [], 0, 0
    while pos < len(rest):
        size = sizes[turn % 2]
        reads.append(rest[pos : pos + size])
        pos += size
        turn += 1
    return rest, reads


# --- HTTP/1 requests --------------------------------------------------------------------------------


class _RequestLog:
    """A request handler that writes down what the parser framed, as comparable tuples."""

    def __init__(self) -> None:
        self.events: list[tuple[object, ...]] = []
        self.body = bytearray()

    def on_request(self, req: request.Request) -> None:
        self.events.append(
            (
                "request",
                req.method,
                req.target,
                req.version,
                req.host,
                req.content_length,
                req.chunked,
                req.codings,
                req.keep_alive,
                req.upgrade,
                req.block,
            )
        )

    def on_body(self, data: bytes | bytearray) -> None:
        self.body += data

    def on_request_end(self) -> None:
        self.events.append(("end", bytes(self.body)))
        self.body = bytearray()


def frame_requests(reads: list[bytes]) -> tuple[list[tuple[object, ...]], str | None, int]:
    """Feed `reads` to one `RequestParser`, answering each request at once (`resume`): the events, the
    refusal (status and reason) or None, and the bytes left buffered."""
    log = _RequestLog()
    parser = request.RequestParser(log)
    refusal = None
    try:
        for data in reads:
            parser.feed(data)
            while parser.paused:
                if log.events and log.events[-1][0] == "request" and log.events[-1][9] is not None:
                    return log.events, None, parser.buffered  # an upgrade: the rest is a tunnel
                parser.resume()
    except framing.ParseError as error:
        refusal = f"{error.status} {error.reason}"
    return log.events, refusal, parser.buffered


def http_request(data: bytes) -> None:
    """Request framing is the same in one read and in many, and refusals are `ParseError` only."""
    rest, reads = cuts(data)
    whole = frame_requests([rest])
    split = frame_requests(reads)
    if whole[:2] != split[:2]:
        # A refusal may come at another point in pieces (a partial head is checked as it grows, a head is
        # checked whole once complete): what was framed before it must agree, and the reading that did
        # not refuse must not have framed more than the one that did.
        short = min(len(whole[0]), len(split[0]))
        if whole[0][:short] != split[0][:short]:
            raise Finding(f"one read framed {whole[0]!r}, several reads framed {split[0]!r}")
        for accepted, refused in ((whole, split), (split, whole)):
            if accepted[1] is None and refused[1] is not None and len(accepted[0]) > len(refused[0]):
                raise Finding(f"refused {refused[:2]!r} in one reading, framed {accepted[0]!r} in the other")
        if whole[1] is None and split[1] is None:
            raise Finding(f"one read framed {whole[:2]!r}, several reads framed {split[:2]!r}")
    # Twice the same bytes on one connection: the second time takes the parser's memo of the first.
    if whole[1] is None and whole[2] == 0 and whole[0] and whole[0][-1][0] == "end":
        again = frame_requests([rest, rest])
        if again[1] is None and again[0][: len(whole[0])] != whole[0]:
            raise Finding(f"the same bytes framed differently the second time: {again[0]!r}")
        if again[1] is None and again[0][len(whole[0]) :][: len(whole[0])] != whole[0]:
            raise Finding(f"a repeated head framed differently from memory: {again[0]!r} vs {whole[0]!r}")


# --- HTTP/1 responses -------------------------------------------------------------------------------


class _ResponseLog:
    def __init__(self) -> None:
        self.events: list[tuple[object, ...]] = []
        self.body = bytearray()

    def on_response(self, resp: response.Response) -> None:
        self.events.append(
            (
                "response",
                resp.status,
                resp.status_line,
                resp.content_length,
                resp.chunked,
                resp.keep_alive,
                resp.upgrade,
                resp.block,
            )
        )

    def on_response_body(self, data: bytes | bytearray) -> None:
        self.body += data

    def on_response_end(self) -> None:
        self.events.append(("end", bytes(self.body)))
        self.body = bytearray()


def frame_responses(reads: list[bytes], head_request: bool) -> tuple[list[tuple[object, ...]], str | None]:
    """Feed `reads` to one `ResponseParser` that awaits a response (to a HEAD request or not), then the
    end of the connection; a new response is awaited after each one ends, as a kept-alive proxy would."""
    log = _ResponseLog()
    parser = response.ResponseParser(log)
    parser.expect(head_request)
    try:
        for data in reads:
            ended = sum(1 for event in log.events if event[0] == "end")
            if parser.feed(data):
                return log.events, "tunnel"
            if sum(1 for event in log.events if event[0] == "end") > ended:
                if not parser.reusable:  # bytes after a response in the same read: never reused
                    return log.events, "out of step"
                parser.expect(head_request)
        if parser.feed_eof():
            log.events.append(("eof",))
    except framing.ParseError as error:
        return log.events, f"{error.status} {error.reason}"
    return log.events, None


def http_response(data: bytes) -> None:
    """Response framing is the same in one read and in many; refusals are 502 `ParseError`s only."""
    rest, reads = cuts(data)
    head_request = bool(data[:1]) and data[0] & 1 == 1
    whole = frame_responses([rest], head_request)
    split = frame_responses(reads, head_request)
    if whole != split:
        # Bytes after a finished response in the same read mark the backend out of step; in a later read
        # (as if the proxy had sent the next request in between) they are the next response. Otherwise
        # a refusal may only come at another point: what was framed before it must agree.
        short = min(len(whole[0]), len(split[0]))
        if whole[0][:short] != split[0][:short]:
            raise Finding(f"one read framed {whole!r}, several reads framed {split!r}")
        if "out of step" not in (whole[1], split[1]):
            for accepted, refused in ((whole, split), (split, whole)):
                if accepted[1] in (None, "tunnel") and len(accepted[0]) > len(refused[0]):
                    raise Finding(f"refused {refused!r} in one reading, framed {accepted!r} in the other")
    for outcome in (whole, split):
        if outcome[1] not in (None, "tunnel", "out of step") and not str(outcome[1]).startswith("502 "):
            raise Finding(f"a malformed response must be a 502, got {outcome[1]!r}")


# --- chunked ----------------------------------------------------------------------------------------


def decode_chunked(reads: list[bytes]) -> tuple[bytes, bytes | None, str | None]:
    """The decoded body, the bytes after it (None: not ended), and the refusal, over `reads`."""
    decoder = framing.ChunkedDecoder(max_trailers=4096)
    body = bytearray()
    try:
        for index, data in enumerate(reads):
            after = decoder.feed(data, body.extend)
            if after is not None:
                return bytes(body), bytes(after) + b"".join(reads[index + 1 :]), None
    except framing.ParseError as error:
        return bytes(body), None, f"{error.status} {error.reason}"
    return bytes(body), None, None


def encode_chunked(body: bytes, sizes: int) -> bytes:
    """`body` re-chunked as the proxy sends it upstream: plain sizes, no extensions, no trailers."""
    step = 1 + sizes % 17
    chunks = [body[i : i + step] for i in range(0, len(body), step)]
    return b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for chunk in chunks) + b"0\r\n\r\n"


def chunked(data: bytes) -> None:
    """Chunked decoding: the same in one read and in many, and the body survives re-chunking."""
    rest, reads = cuts(data)
    whole = decode_chunked([rest])
    split = decode_chunked(reads)
    if whole[1:] != split[1:] or (whole[2] is None and whole[0] != split[0]):
        raise Finding(f"one read decoded {whole!r}, several reads decoded {split!r}")
    if whole[1] is not None:
        if len(whole[0]) + len(whole[1]) > len(rest):
            raise Finding("decoding produced more bytes than it was given")
        again = decode_chunked([encode_chunked(whole[0], data[0])])
        if again != (whole[0], b"", None):
            raise Finding(f"{whole[0]!r} re-chunked decodes to {again!r}")


# --- PROXY protocol ---------------------------------------------------------------------------------


def read_proxy_header(reads: list[bytes]) -> tuple[object, ...]:
    parser = proxy_protocol.HeaderParser()
    try:
        for index, data in enumerate(reads):
            result = parser.feed(data)
            if result is not None:
                header, after = result
                return ("header", header, after + b"".join(reads[index + 1 :]))
    except proxy_protocol.ProxyProtocolError as error:
        return ("refused", str(error)[:0])  # the message may differ: where the bytes were cut shows in it
    return ("incomplete",)


def proxy_header(data: bytes) -> None:
    """PROXY v1/v2: the same in one read and in many; what is read encodes and parses back the same."""
    rest, reads = cuts(data)
    whole = read_proxy_header([rest])
    split = read_proxy_header(reads)
    if whole != split:
        raise Finding(f"one read gave {whole!r}, several reads gave {split!r}")
    if whole[0] != "header":
        return
    header = whole[1]
    assert isinstance(header, proxy_protocol.ProxyHeader)
    if header.source is None or header.destination is None:
        return
    for version in (api.ProxyProtocolVersion.v1, api.ProxyProtocolVersion.v2):
        if version == api.ProxyProtocolVersion.v1 and header.transport != "TCP":
            continue
        encoded = proxy_protocol.encode(version, header.source, header.destination, header.transport)
        back = read_proxy_header([encoded])
        if back[0] != "header" or back[2] != b"" or _same_client(back[1]) != _same_client(header):
            raise Finding(f"{header!r} encoded as {version.value} reads back as {back!r}")


def _same_client(header: object) -> tuple[object, ...]:
    """A header's endpoints with IPv4-mapped IPv6 read as IPv4: `encode` carries them so, by design."""
    assert isinstance(header, proxy_protocol.ProxyHeader)

    def plain(endpoint: tuple[str, int] | None) -> tuple[str, int] | None:
        if endpoint is None:
            return None
        address = ipaddress.ip_address(endpoint[0])
        mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
        return (str(mapped or address), endpoint[1])

    return plain(header.source), plain(header.destination), header.transport


# --- Plan JSON --------------------------------------------------------------------------------------


def plan_json(data: bytes) -> None:
    """The Plan loader refuses bad input with `InvalidConfig` only; a Plan it accepts reloads the same."""
    try:
        plans = config.parse_plans("fuzz.json", data, allow_empty=bool(data[:1]) and data[0] & 1 == 1)
    except config.InvalidConfig as error:
        if not error.lines or not all(line.startswith("fuzz.json") for line in error.lines):
            raise Finding(f"an InvalidConfig that does not say where: {error.lines!r}") from None
        return
    text = json.dumps([json.loads(p.model_dump_json()) for p in plans])
    again = config.parse_plans("again.json", text, allow_empty=True)
    if again != plans:
        raise Finding(f"accepted Plans do not survive dumping and loading: {plans!r} vs {again!r}")


TARGETS: Final[dict[str, Callable[[bytes], None]]] = {
    "http_request": http_request,
    "http_response": http_response,
    "chunked": chunked,
    "proxy_protocol": proxy_header,
    "plan_json": plan_json,
}
