"""The sans-IO HTTP/1.1 framing: requests one at a time, strict bodies, responses framed per RFC 9112 6.3.

The real-socket behaviour (status codes on the wire, what backends see) is in test_proxy_http.py.
"""

from __future__ import annotations

import httptools
import pytest
from layerlb_dataplane.http.h1 import framing
from layerlb_dataplane.http.h1.framing import ChunkedDecoder, ParseError, check_head
from layerlb_dataplane.http.h1.request import Request, RequestParser
from layerlb_dataplane.http.h1.response import Response, ResponseParser

from tests.dataplane.lenient_llhttp import lenient_llhttp


class Recorder:
    """Collects what a parser reports; `auto_resume` resumes the request parser after each request."""

    def __init__(self) -> None:
        self.events: list[tuple[str, object]] = []
        self.requests: list[Request] = []
        self.responses: list[Response] = []
        self.parser: RequestParser | None = None
        self.auto_resume = False

    def on_request(self, request: Request) -> None:
        self.requests.append(request)
        self.events.append(("request", request.target))

    def on_body(self, data: bytes | bytearray) -> None:
        self.events.append(("body", bytes(data)))

    def on_request_end(self) -> None:
        self.events.append(("end", None))
        if self.auto_resume and self.parser is not None:
            self.parser.resume()

    def on_response(self, response: Response) -> None:
        self.responses.append(response)
        self.events.append(("response", response.status))

    def on_response_body(self, data: bytes | bytearray) -> None:
        self.events.append(("body", bytes(data)))

    def on_response_end(self) -> None:
        self.events.append(("end", None))

    def body(self) -> bytes:
        return b"".join(data for kind, data in self.events if kind == "body" and isinstance(data, bytes))


def request_parser(**limits: int) -> tuple[RequestParser, Recorder]:
    recorder = Recorder()
    parser = RequestParser(recorder, **limits)
    recorder.parser = parser
    return parser, recorder


# --- requests ---------------------------------------------------------------------------------------------


def test_pipelined_requests_wait_until_resumed() -> None:
    parser, seen = request_parser()
    parser.feed(
        b"GET /a HTTP/1.1\r\nHost: h\r\n\r\nGET /b HTTP/1.1\r\nHost: h\r\n\r\nGET /c HTTP/1.1\r\nHost: h\r\n\r\n"
    )
    assert seen.events == [("request", b"/a"), ("end", None)]
    assert parser.buffered > 0
    parser.resume()
    assert seen.events[-2:] == [("request", b"/b"), ("end", None)]
    parser.resume()
    assert seen.events[-2:] == [("request", b"/c"), ("end", None)]
    assert parser.buffered == 0


def test_a_head_split_across_reads_and_a_body_counted_by_length() -> None:
    parser, seen = request_parser()
    message = b"POST /up HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\n0123456789"
    for index in range(len(message)):  # one byte at a time
        parser.feed(message[index : index + 1])
    assert seen.events[0] == ("request", b"/up")
    assert seen.body() == b"0123456789"
    assert seen.events[-1] == ("end", None)
    assert seen.requests[0].content_length == 10


def test_chunked_body_is_decoded_extensions_and_trailers_dropped() -> None:
    parser, seen = request_parser()
    parser.feed(
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
        b'5;name=value\r\nhello\r\n6 ; q="x y"\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n'
        b"GET /next HTTP/1.1\r\nHost: h\r\n\r\n"
    )
    assert seen.body() == b"hello world"
    assert seen.requests[0].chunked
    assert seen.events[-1] == ("end", None)
    parser.resume()
    assert seen.requests[-1].target == b"/next"


@pytest.mark.parametrize(
    "chunks",
    [
        b"+5\r\nhello\r\n0\r\n\r\n",  # sign
        b"0x5\r\nhello\r\n0\r\n\r\n",  # prefix
        b" 5\r\nhello\r\n0\r\n\r\n",  # leading space
        b"5 x\r\nhello\r\n0\r\n\r\n",  # junk after the size
        b"g\r\nhello\r\n0\r\n\r\n",  # not hex
        b"\r\nhello\r\n0\r\n\r\n",  # empty size
        b"10000000000000000\r\n",  # 17 hex digits: beyond any body
        b"5\nhello\r\n0\r\n\r\n",  # bare LF after the size
        b"5;\r\nhello\r\n0\r\n\r\n",  # empty extension
        b"5;a b\r\nhello\r\n0\r\n\r\n",  # space inside an extension
        b'5;a="x\r\nhello\r\n0\r\n\r\n',  # unterminated quoted extension
        b"5\r\nhelloXX0\r\n\r\n",  # data not followed by CRLF
        b"5\r\nhello\r\n0\r\nbad trailer\r\n\r\n",  # trailer without a colon
    ],
)
def test_malformed_chunked_bodies_are_refused(chunks: bytes) -> None:
    parser, _ = request_parser()
    with pytest.raises(ParseError) as raised:
        parser.feed(b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks)
    assert raised.value.status == 400


def test_the_forwarded_block_drops_hop_by_hop_and_listed_headers_and_keeps_the_rest_in_order() -> None:
    parser, seen = request_parser()
    parser.feed(
        b"GET / HTTP/1.1\r\nHost: Example.COM\r\nA: 1\r\nConnection: keep-alive, X-Private\r\nKeep-Alive: 5\r\n"
        b"X-Private: secret\r\nTE: trailers\r\nB: 2\r\nProxy-Connection: x\r\nProxy-Authorization: x\r\n"
        b"Trailer: x\r\nX-Forwarded-For: 192.0.2.1\r\nx-forwarded-for: 192.0.2.2\r\nX-Forwarded-Proto: https\r\n"
        b"X-Forwarded-Host: spoof\r\nForwarded: for=192.0.2.1\r\nCookie: a=1\r\nCookie: b=2\r\nC: 3\r\n\r\n"
    )
    request = seen.requests[0]
    assert request.block == b"\r\nHost: Example.COM\r\nA: 1\r\nB: 2\r\nCookie: a=1\r\nCookie: b=2\r\nC: 3"
    assert request.host == b"Example.COM"
    assert request.forwarded_for == b"192.0.2.1, 192.0.2.2"
    assert request.forwarded == b"for=192.0.2.1"
    assert request.cookie_value(b"b") == b"2"
    assert request.header("a") == "1"
    # A header the client lists in Connection is hop-by-hop: cut from the block, so routes and hashing do
    # not see it either (what they match on is what the backend receives).
    assert request.header("x-private") is None
    assert request.header("connection") == "keep-alive, X-Private"
    assert request.keep_alive


def test_keep_alive_expect_and_upgrade_rules() -> None:
    parser, seen = request_parser()
    seen.auto_resume = True
    parser.feed(
        b"GET / HTTP/1.0\r\n\r\n"
        b"GET / HTTP/1.0\r\nConnection: keep-alive\r\nExpect: 100-continue\r\n\r\n"
        b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
        b"GET /ws HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
        b"GET / HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\n\r\n"
        b"POST / HTTP/1.1\r\nHost: h\r\nExpect: 100-Continue\r\nContent-Length: 1\r\n\r\nx"
    )
    http10, http10_kept, closing, websocket, no_upgrade, expecting = seen.requests
    assert not http10.keep_alive and http10.version == b"1.0" and not http10.has_host
    assert http10_kept.keep_alive and not http10_kept.expect_continue and b"Expect" not in http10_kept.block
    assert not closing.keep_alive
    assert websocket.upgrade == b"websocket"
    assert no_upgrade.upgrade is None  # Upgrade without Connection: upgrade is not an upgrade
    assert expecting.expect_continue and b"Expect: 100-Continue" in expecting.block


def test_absolute_form_targets_take_their_host_from_the_authority() -> None:
    parser, seen = request_parser()
    parser.feed(b"GET http://Other.example:8080/p?q=1 HTTP/1.1\r\nHost: ignored.example\r\nA: b\r\n\r\n")
    request = seen.requests[0]
    assert (request.target, request.host, request.host_in_block) == (b"/p?q=1", b"Other.example:8080", False)
    assert request.block == b"\r\nA: b"


def test_leading_empty_lines_are_ignored() -> None:
    parser, seen = request_parser()
    parser.feed(b"\r\n\r\nGET / HTTP/1.1\r\nHost: h\r\n\r\n")
    assert seen.events == [("request", b"/"), ("end", None)]


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"GET /" + b"a" * 300, 414),  # no line end yet, already over the limit
        (b"GET /" + b"a" * 300 + b" HTTP/1.1\r\nHost: h\r\n\r\n", 414),
        (b"GET / HTTP/1.1\r\nHost: h\r\nX: " + b"a" * 2000, 431),  # still coming, already too large
        (b"GET / HTTP/1.1\r\nHost: h\r\nX: " + b"a" * 2000 + b"\r\n\r\n", 431),
        (b"GET / HTTP/1.1\nHost: h\n", 400),  # bare LF seen before the head is complete
    ],
)
def test_size_limits_and_bare_lf_are_enforced_before_the_head_is_complete(data: bytes, status: int) -> None:
    parser, seen = request_parser(max_request_line=256, max_header=1024)
    with pytest.raises(ParseError) as raised:
        parser.feed(data)
    assert raised.value.status == status
    assert seen.requests == []


@pytest.mark.parametrize(
    "head",
    [
        b"GET / HTTP/1.1\nHost: a\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\rX: b\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nX: b\r\n c\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nX: b\x01c\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nX: b\x7fc\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nX : b\r\n\r\n",
    ],
)
def test_raw_head_checks_refuse_what_a_lenient_llhttp_might_pass(head: bytes) -> None:
    with pytest.raises(ParseError):
        check_head(head)


def test_raw_head_checks_accept_a_correct_head_with_a_colon_in_a_value() -> None:
    check_head(b"GET / HTTP/1.1\r\nHost: a\r\nX: b :c\r\nY:\tz\r\n\r\n")


def _refuses(head: bytes) -> bool:
    try:
        httptools.HttpRequestParser(framing.VALIDATOR).feed_data(head)
    except httptools.HttpParserError:
        return True
    return False


def test_llhttp_probe_matches_llhttp() -> None:
    """The import-time probe decides whether raw checks run; it must agree with this llhttp build: strict
    exactly when llhttp refuses every pattern the raw checks refuse (obs-fold, bare LF/CR, CTLs, ...)."""
    patterns = [
        b"GET / HTTP/1.1\r\nHost: a\r\nX: b\r\n c\r\n\r\n",
        b"GET / HTTP/1.1\nHost: a\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\rX: b\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nX: b\x01c\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nX : b\r\n\r\n",
    ]
    assert all(_refuses(head) for head in patterns) == framing.LLHTTP_STRICT


def test_llhttp_probe_finds_a_lenient_llhttp(monkeypatch: pytest.MonkeyPatch) -> None:
    """The probe run against real llhttp with its leniencies on (as a distribution's build may have):
    it must say "not strict", so the raw-head checks run."""
    monkeypatch.setattr(httptools, "HttpRequestParser", lenient_llhttp(httptools.HttpRequestParser))
    assert framing._llhttp_is_strict() is False


# --- responses --------------------------------------------------------------------------------------------


def response_parser() -> tuple[ResponseParser, Recorder]:
    recorder = Recorder()
    return ResponseParser(recorder), recorder


def test_response_framing_by_length_then_reusable() -> None:
    parser, seen = response_parser()
    parser.expect(head_request=False)
    parser.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: keep-alive\r\nX-A: b\r\n\r\nhel")
    assert not parser.reusable
    parser.feed(b"lo")
    assert seen.body() == b"hello" and seen.events[-1] == ("end", None) and parser.reusable
    response = seen.responses[0]
    assert response.block == b"\r\nContent-Length: 5\r\nX-A: b"  # the hop-by-hop line is gone
    assert response.length_in_block and response.keep_alive


def test_a_repeated_response_frames_as_the_first_whole_split_after_head_or_followed() -> None:
    """The last head again with its whole body in one read takes a shorter way: the same framing."""
    whole = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: keep-alive\r\n\r\nabc"
    parser, seen = response_parser()
    for _ in range(2):
        parser.expect(head_request=False)
        parser.feed(whole)
        assert seen.events[-3:] == [("response", 200), ("body", b"abc"), ("end", None)] and parser.reusable
    assert seen.responses[0] is seen.responses[1]
    parser.expect(head_request=False)  # split: the general way, the same result
    parser.feed(whole[:-2])
    parser.feed(whole[-2:])
    assert seen.events[-4:] == [("response", 200), ("body", b"a"), ("body", b"bc"), ("end", None)]
    parser.expect(head_request=True)  # after HEAD the same bytes are a head and 3 bytes too many
    parser.feed(whole)
    assert seen.events[-2:] == [("response", 200), ("end", None)] and not parser.reusable
    parser, seen = response_parser()
    parser.expect(head_request=False)
    parser.feed(whole)
    parser.expect(head_request=False)
    parser.feed(whole + b"X")  # one byte beyond the response: never taken as whole
    assert seen.events[-1] == ("end", None) and not parser.reusable


def test_no_body_after_head_requests_and_for_204_304_and_1xx() -> None:
    parser, seen = response_parser()
    parser.expect(head_request=True)
    parser.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
    assert seen.events == [("response", 200), ("end", None)] and parser.reusable
    for status in (204, 304):
        parser.expect(head_request=False)
        parser.feed(b"HTTP/1.1 %d X\r\nContent-Length: 0\r\n\r\n" % status)
        assert seen.events[-1] == ("end", None) and parser.reusable
    parser.expect(head_request=False)
    parser.feed(
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx"
    )
    assert [response.status for response in seen.responses[-3:]] == [100, 103, 200]
    assert seen.events[-1] == ("end", None) and parser.reusable


def test_chunked_and_close_delimited_responses() -> None:
    parser, seen = response_parser()
    parser.expect(head_request=False)
    parser.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
    assert seen.body() == b"abc" and seen.responses[0].chunked and parser.reusable
    assert b"Transfer-Encoding" not in seen.responses[0].block
    parser, seen = response_parser()
    parser.expect(head_request=False)
    parser.feed(b"HTTP/1.0 200 OK\r\n\r\nuntil")
    parser.feed(b" close")
    assert parser.until_close and not seen.responses[0].keep_alive
    assert parser.feed_eof() and seen.body() == b"until close"
    assert seen.responses[0].status_line == b"HTTP/1.1 200 OK"


def test_bytes_after_a_response_make_the_connection_unusable() -> None:
    parser, seen = response_parser()
    parser.expect(head_request=False)
    parser.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nxEXTRA")
    assert seen.events[-1] == ("end", None)
    assert not parser.reusable


def test_switching_protocols_hands_back_the_tunnel_bytes() -> None:
    parser, seen = response_parser()
    parser.expect(head_request=False)
    rest = parser.feed(
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\nframe"
    )
    assert rest == b"frame"
    assert seen.responses[0].status == 101 and seen.responses[0].upgrade == b"websocket"


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"HTTP/1.1 200 OK\nContent-Length: 1\r\n\r\n",
        b"HTTP/1.1 999 Nope\r\n\r\n",
        b"RTSP/1.0 200 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX: a\r\n b\r\n\r\n",
    ],
)
def test_malformed_responses_are_refused(head: bytes) -> None:
    parser, _ = response_parser()
    parser.expect(head_request=False)
    with pytest.raises(ParseError) as raised:
        parser.feed(head)
    assert raised.value.status == 502


def test_chunk_decoder_across_arbitrary_splits() -> None:
    body = b"4\r\nWiki\r\n5;x=1\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n0\r\n\r\nNEXT"
    for split in range(1, len(body)):
        decoder, out = ChunkedDecoder(), bytearray()
        rest = decoder.feed(body[:split], out.extend)
        rest = decoder.feed(body[split:], out.extend) if rest is None else rest + body[split:]
        assert bytes(out) == b"Wikipedia in\r\n\r\nchunks." and rest == b"NEXT", split


@pytest.mark.parametrize(
    "values", [[b"+5"], [b"0x5"], [b"5 5"], [b""], [b"-1"], [b"5", b"6"], [b"5, 6"], [b"1" * 19]]
)
def test_content_length_values_are_strict(values: list[bytes]) -> None:
    with pytest.raises(ParseError):
        framing.parse_length(values)


def test_content_length_lists_that_agree_are_one_length() -> None:
    assert framing.parse_length([b"5, 5", b" 5 "]) == 5


@pytest.mark.parametrize(
    "values",
    [[b"gzip"], [b"chunked, gzip"], [b"chunked", b"chunked"], [b"foo, chunked"], [b""], [b"chunked;q=1"]],
)
def test_transfer_codings_must_end_with_one_known_chunked(values: list[bytes]) -> None:
    with pytest.raises(ParseError):
        framing.parse_codings(values)


def test_known_codings_before_chunked_are_kept() -> None:
    assert framing.parse_codings([b"GZip", b"chunked"]) == b"gzip"
    assert framing.parse_codings([b"chunked"]) == b""
