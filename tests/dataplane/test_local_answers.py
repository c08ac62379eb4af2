"""The proxy's own answers carry the RFC 9110 reason phrase of their status: a client or a log reading the
status line sees `405 Method Not Allowed`, not another status's words."""

from __future__ import annotations

import pytest
from layerlb_dataplane.http.h1 import framing

REASONS = {
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",  # CONNECT
    408: "Request Timeout",
    414: "URI Too Long",
    431: "Request Header Fields Too Large",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
    505: "HTTP Version Not Supported",
}


@pytest.mark.parametrize(("status", "reason"), REASONS.items())
def test_a_local_answer_has_its_statuss_reason_phrase(status: int, reason: str) -> None:
    answer = framing.error_response(status, "why", close=False)
    assert answer.split(b"\r\n", 1)[0] == f"HTTP/1.1 {status} {reason}".encode()
    assert answer.endswith(b"\r\n\r\nwhy\n") and b"Content-Length: 4\r\n" in answer


def test_an_unlisted_status_says_error_and_a_closing_head_says_so() -> None:
    answer = framing.error_response(418, "teapot", close=True, head_only=True)
    assert answer.startswith(b"HTTP/1.1 418 Error\r\n") and answer.endswith(b"Connection: close\r\n\r\n")
