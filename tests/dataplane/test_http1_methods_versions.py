"""Extension and lower-case methods, and HTTP/1.x minor versions above 1.1 (RFC 9110 9.1, RFC 9112 2.3):
accepted, with llhttp still checking the rest of the head in C behind a stand-in request line."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from layerlb_dataplane.http.h1 import request as h1_request
from layerlb_dataplane.http.h1.framing import ParseError

from tests.dataplane.conftest import Backend, ProxyUnderTest, Seen, get, lb_document
from tests.dataplane.test_http1 import request_parser, response_parser


@pytest.mark.parametrize("method", [b"FOOBAR", b"get", b"Get", b"M-SEARCH2", b"X!#$%&'*+-.^_`|~9"])
def test_any_token_is_a_method_kept_as_sent_and_framed_by_content_length(method: bytes) -> None:
    parser, seen = request_parser()
    parser.feed(method + b" /x HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabc")
    request = seen.requests[0]
    assert (request.method, request.target, request.content_length) == (method, b"/x", 3)
    assert seen.events == [("request", b"/x"), ("body", b"abc"), ("end", None)]


@pytest.mark.parametrize("method", [b"F(O", b'F"O', b"FO\x01", b"F,O", b"F/O", b"F@O"])
def test_a_method_that_is_not_a_token_is_refused(method: bytes) -> None:
    parser, _ = request_parser()
    with pytest.raises(ParseError) as raised:
        parser.feed(method + b" / HTTP/1.1\r\nHost: h\r\n\r\n")
    assert raised.value.status == 400


@pytest.mark.parametrize(
    "head",
    [
        b"FOOBAR / HTTP/1.1\r\nHost: h\r\nX: a\r\n b\r\n\r\n",  # obs-fold
        b"FOOBAR / HTTP/1.1\r\nHost: h\r\nX : a\r\n\r\n",  # whitespace before the colon
        b"FOOBAR / HTTP/1.1\r\nHost: h\r\nX A: a\r\n\r\n",  # not a field name
        b"FOOBAR /a\x7fb HTTP/1.1\r\nHost: h\r\n\r\n",  # DEL in the target
    ],
)
def test_llhttp_still_checks_the_head_of_an_extension_method(
    monkeypatch: pytest.MonkeyPatch, head: bytes
) -> None:
    """With the raw-head checks off (a strict llhttp), only llhttp behind the stand-in can refuse these."""
    monkeypatch.setattr(h1_request, "LLHTTP_STRICT", True)
    monkeypatch.setattr(h1_request, "check_head", lambda *args: None)
    parser, seen = request_parser()
    with pytest.raises(ParseError) as raised:
        parser.feed(head)
    assert raised.value.status == 400
    assert seen.requests == []


def test_extension_methods_do_not_grow_the_memo_of_known_methods() -> None:
    """A client could send a million distinct methods: only llhttp's finite table is remembered."""
    parser, seen = request_parser()
    seen.auto_resume = True
    for number in range(50):
        parser.feed(b"EXT%d / HTTP/1.1\r\nHost: h\r\n\r\n" % number)
    assert len(seen.requests) == 50
    assert not any(method.startswith(b"EXT") for method in h1_request._METHODS)


@pytest.mark.parametrize("minor", b"23456789", ids=lambda minor: f"HTTP/1.{minor - 0x30}")
def test_http_1_2_to_1_9_requests_are_served_as_http_1_1(minor: int) -> None:
    parser, seen = request_parser()
    parser.feed(b"GET / HTTP/1.%c\r\nHost: h\r\n\r\n" % minor)
    request = seen.requests[0]
    assert request.version == b"1.1" and request.keep_alive


@pytest.mark.parametrize(
    ("line", "status"),
    [
        (b"GET / HTTP/2.0", 505),
        (b"GET / HTTP/3.0", 505),
        (b"GET / HTTP/0.9", 505),
        (b"GET / HTTP/1.a", 400),
        (b"GET / HTTP/1.10", 400),
        (b"GET /", 400),  # HTTP/0.9
        (b"GET / http/1.1", 400),
    ],
)
def test_other_versions_are_refused_as_soon_as_the_request_line_is_complete(line: bytes, status: int) -> None:
    """The request line alone is enough: an HTTP/0.9 client is answered now, not at the header timeout."""
    parser, seen = request_parser()
    with pytest.raises(ParseError) as raised:
        parser.feed(line + b"\r\n")
    assert raised.value.status == status
    assert seen.requests == []


@pytest.mark.parametrize("minor", b"23456789", ids=lambda minor: f"HTTP/1.{minor - 0x30}")
def test_an_http_1_x_response_is_framed_as_http_1_1_and_forwarded_as_such(minor: int) -> None:
    parser, seen = response_parser()
    parser.expect(head_request=False)
    parser.feed(b"HTTP/1.%c 200 OK\r\nContent-Length: 2\r\n\r\nok" % minor)
    response = seen.responses[0]
    assert response.status_line == b"HTTP/1.1 200 OK" and response.keep_alive
    assert seen.events == [("response", 200), ("body", b"ok"), ("end", None)]
    assert parser.reusable


@pytest.mark.parametrize("version", [b"HTTP/2.0", b"HTTP/1.a", b"HTTP/1.", b"HTTP/0.9"])
def test_other_response_versions_are_refused(version: bytes) -> None:
    parser, _ = response_parser()
    parser.expect(head_request=False)
    with pytest.raises(ParseError) as raised:
        parser.feed(version + b" 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert raised.value.status == 502


def test_a_backends_http_1_2_response_reaches_the_client_as_http_1_1_and_the_connection_is_reused(
    backends: Callable[..., Backend], proxies: Callable[[dict[str, Any]], ProxyUnderTest]
) -> None:
    async def http_1_2(seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.2 200 OK\r\nContent-Length: 5\r\n\r\nhello")

    backend = backends(handler=http_1_2)
    proxy = proxies(lb_document({"app": [("127.0.0.1", backend.port)]}))
    client = proxy.client()
    for _ in range(2):
        client.send(get())
        response = client.response()
        assert response.raw_head.startswith(b"HTTP/1.1 200 ") and response.body == b"hello"
    assert backend.accepted == 1  # framed as HTTP/1.1: kept alive and reused
