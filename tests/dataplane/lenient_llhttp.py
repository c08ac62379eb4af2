"""Real llhttp with every leniency on: what a lax llhttp build would accept, to put llhttp out of the way.

The proxy's own checks (Content-Length with Transfer-Encoding, raw-head checks, codings, Host) sit behind
llhttp, which refuses most of the same inputs first; with this parser in its place, the proxy's own check
must be the one that refuses, so a test can fail when that check is removed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httptools
import pytest
from layerlb_dataplane.http.h1 import request as h1_request
from layerlb_dataplane.http.h1 import response as h1_response

LENIENCIES = (
    "lenient_headers",
    "lenient_chunked_length",
    "lenient_keep_alive",
    "lenient_transfer_encoding",
    "lenient_version",
    "lenient_data_after_close",
    "lenient_optional_lf_after_cr",
    "lenient_optional_cr_before_lf",
    "lenient_optional_crlf_after_chunk",
    "lenient_spaces_after_chunk_size",
)


def lenient_llhttp(parser_type: type[Any]) -> Callable[[object], Any]:
    """A factory of real llhttp parsers of `parser_type` with every leniency on."""

    def make(protocol: object) -> Any:
        parser = parser_type(protocol)
        parser.set_dangerous_leniencies(**dict.fromkeys(LENIENCIES, True))
        return parser

    return make


def lenient_accepts(head: bytes, parser_type: type[Any] = httptools.HttpRequestParser) -> bool:
    """Whether lenient llhttp passes `head` (then only the proxy's own checks can refuse it)."""
    try:
        lenient_llhttp(parser_type)(object()).feed_data(head)
    except httptools.HttpParserUpgrade:
        return True
    except httptools.HttpParserError:
        return False
    return True


def install(monkeypatch: pytest.MonkeyPatch) -> None:
    """Put lenient llhttp under the request and response parsers, with the raw-head checks on, as the
    import-time probe would turn them on for such a build."""
    monkeypatch.setattr(httptools, "HttpRequestParser", lenient_llhttp(httptools.HttpRequestParser))
    monkeypatch.setattr(httptools, "HttpResponseParser", lenient_llhttp(httptools.HttpResponseParser))
    monkeypatch.setattr(h1_request, "LLHTTP_STRICT", False)
    monkeypatch.setattr(h1_response, "LLHTTP_STRICT", False)
