"""The proxy's own HTTP/1 checks, with llhttp out of the way: each case here is one a lenient llhttp passes,
so the refusal must come from the proxy's code (the checks llhttp would otherwise hide from every test).

The same cases through real sockets are in test_proxy_http.py (`strict_proxy`'s "lenient-llhttp" run).
"""

from __future__ import annotations

import pytest
from layerlb_dataplane.http.h1 import framing
from layerlb_dataplane.http.h1.framing import ParseError

from tests.dataplane import lenient_llhttp
from tests.dataplane.test_http1 import request_parser, response_parser

H = b"Host: h\r\n"

REQUESTS = [
    (
        "CL and TE",
        b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
        400,
    ),
    (
        "TE and CL",
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
        400,
    ),
    ("TE in HTTP/1.0", b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
    ("TE chunked not last", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked, gzip\r\n\r\n", 400),
    ("TE chunked twice", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked, chunked\r\n\r\n", 400),
    ("TE gzip then chunked", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip, chunked\r\n\r\n", 501),
    ("obs-fold", b"GET / HTTP/1.1\r\n" + H + b"X-A: a\r\n b\r\n\r\n", 400),
    ("bare LF", b"GET / HTTP/1.1\n" + H + b"\r\n", 400),
    ("bare LF in a header", b"GET / HTTP/1.1\r\nHost: h\nX-A: a\r\n\r\n", 400),
    ("NUL in a value", b"GET / HTTP/1.1\r\n" + H + b"X-A: a\x00b\r\n\r\n", 400),
    ("DEL in a value", b"GET / HTTP/1.1\r\n" + H + b"X-A: a\x7fb\r\n\r\n", 400),
    ("two Hosts", b"GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n", 400),
    ("no Host", b"GET / HTTP/1.1\r\n\r\n", 400),
    ("bad Host", b"GET / HTTP/1.1\r\nHost: a b@c\r\n\r\n", 400),
    ("HTTP/2.0", b"GET / HTTP/2.0\r\n" + H + b"\r\n", 505),
    ("RTSP", b"GET / RTSP/1.0\r\n" + H + b"\r\n", 400),
    ("CONNECT", b"CONNECT h:443 HTTP/1.1\r\nHost: h:443\r\n\r\n", 405),
    (
        "upgrade with a body",
        b"POST / HTTP/1.1\r\n" + H + b"Connection: upgrade\r\nUpgrade: ws\r\nContent-Length: 1\r\n\r\n",
        400,
    ),
]


@pytest.mark.parametrize(("name", "head", "status"), REQUESTS, ids=[case[0] for case in REQUESTS])
def test_the_request_parser_refuses_what_a_lenient_llhttp_passes(
    monkeypatch: pytest.MonkeyPatch, name: str, head: bytes, status: int
) -> None:
    lenient_llhttp.install(monkeypatch)
    assert lenient_llhttp.lenient_accepts(head), "lenient llhttp refuses it: not a test of the proxy's check"
    parser, seen = request_parser()
    with pytest.raises(ParseError) as raised:
        parser.feed(head)
    assert raised.value.status == status, raised.value.reason
    assert seen.requests == []


RESPONSES = [
    ("CL and TE", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"),
    ("TE not chunked last", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n"),
    ("obs-fold", b"HTTP/1.1 200 OK\r\nX-A: a\r\n b\r\nContent-Length: 0\r\n\r\n"),
    ("NUL in a value", b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\nContent-Length: 0\r\n\r\n"),
]


@pytest.mark.parametrize(("name", "head"), RESPONSES, ids=[case[0] for case in RESPONSES])
def test_the_response_parser_refuses_what_a_lenient_llhttp_passes(
    monkeypatch: pytest.MonkeyPatch, name: str, head: bytes
) -> None:
    lenient_llhttp.install(monkeypatch)
    import httptools

    assert lenient_llhttp.lenient_accepts(head, httptools.HttpResponseParser)
    parser, seen = response_parser()
    parser.expect(head_request=False)
    with pytest.raises(ParseError) as raised:
        parser.feed(head)
    assert raised.value.status == 502
    assert seen.responses == []


@pytest.mark.parametrize(
    ("values", "status"),
    [([b"5, 5"], 400), ([b"5", b"5"], 400), ([b"5", b"6"], 400), ([b"5,6"], 400), ([b"+5"], 400)],
)
def test_request_content_length_is_one_plain_number(values: list[bytes], status: int) -> None:
    """What llhttp refuses even when lenient (so no parser test can reach it): called directly."""
    with pytest.raises(ParseError) as raised:
        framing.parse_length(values, only_one=True)
    assert raised.value.status == status
    assert framing.parse_length([b"5"], only_one=True) == 5
