"""The HTTP/1 strictness decisions, one per row of the table in docs/security.md, each proved three ways:
layerlb's answer through the real proxy (a raw client socket, a real upstream socket that records what it
received), HAProxy's and nginx's answers from the real ones installed here, and the table in the docs
being exactly these rows.

The rule behind every row: where HAProxy and nginx both accept safely, layerlb accepts and normalises so
the upstream sees one unambiguous framing; where either refuses, or acceptance could let two readers
disagree on where a message ends, layerlb refuses with the status the RFC names. Methods are the one
exception, decided by RFC 9110 9.1 (issue #18): any token is a method, forwarded as sent.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.dataplane import reference_proxies
from tests.dataplane.conftest import Backend, ProxyUnderTest, lb_document

FORWARDS = "forwards"
HTTP09 = "HTTP/0.9 reply"  # an answer with no status line (nginx serves HTTP/0.9)
SECTION = "## HTTP/1 strictness decisions"
DOC = Path(__file__).resolve().parents[2] / "docs" / "security.md"


@dataclass(frozen=True)
class Decision:
    """One row: the input, what layerlb, HAProxy 2.6 and nginx 1.22 do, the RFC clause and the reason.

    `upstream` is what layerlb's upstream must receive when it forwards: the request line, then the
    framing header lines (in full, the only ones of their name), then the body.
    """

    case: str
    request: bytes
    layerlb: str
    haproxy: str
    nginx: str
    rfc: str
    why: str
    upstream: tuple[str, tuple[str, ...], bytes] | None = None


H = b"Host: h\r\n"
POST = b"POST / HTTP/1.1\r\n" + H

DECISIONS = [
    Decision(
        "extension method",
        b"FOOBAR / HTTP/1.1\r\n" + H + b"\r\n",
        FORWARDS,
        FORWARDS,
        FORWARDS,
        "RFC 9110 9.1",
        "methods are extensible; llhttp checks the rest of the head behind a stand-in request line",
        ("FOOBAR / HTTP/1.1", (), b""),
    ),
    Decision(
        "extension method with a body",
        b"FOOBAR / HTTP/1.1\r\n" + H + b"Content-Length: 5\r\n\r\nhello",
        FORWARDS,
        FORWARDS,
        FORWARDS,
        "RFC 9110 9.1, RFC 9112 6.3",
        "an unknown method is framed by Content-Length and Transfer-Encoding only, as every request",
        ("FOOBAR / HTTP/1.1", ("Content-Length: 5",), b"hello"),
    ),
    Decision(
        "lower-case method",
        b"get / HTTP/1.1\r\n" + H + b"\r\n",
        FORWARDS,
        FORWARDS,
        "400",
        "RFC 9110 9.1",
        "methods are case-sensitive: `get` is another method than GET, forwarded unchanged, never "
        "normalised; nginx's refusal is its method syntax, not framing, so no desync follows",
        ("get / HTTP/1.1", (), b""),
    ),
    Decision(
        "HTTP/1.2",
        b"GET / HTTP/1.2\r\n" + H + b"\r\n",
        FORWARDS,
        FORWARDS,
        FORWARDS,
        "RFC 9112 2.3",
        "a higher minor version is processed as the highest the recipient conforms to: forwarded as HTTP/1.1",
        ("GET / HTTP/1.1", (), b""),
    ),
    Decision(
        "HTTP/1.9 with a body",
        b"POST / HTTP/1.9\r\n" + H + b"Content-Length: 5\r\n\r\nhello",
        FORWARDS,
        FORWARDS,
        FORWARDS,
        "RFC 9112 2.3",
        "as HTTP/1.2: served and forwarded as HTTP/1.1, framed by its Content-Length",
        ("POST / HTTP/1.1", ("Content-Length: 5",), b"hello"),
    ),
    Decision(
        "HTTP/2.0 request line",
        b"GET / HTTP/2.0\r\n" + H + b"\r\n",
        "505",
        FORWARDS,
        "505",
        "RFC 9112 2.3, RFC 9110 15.6.6",
        "another major version is not HTTP/1 syntax; nginx refuses, so layerlb does",
    ),
    Decision(
        "HTTP/3.0 request line",
        b"GET / HTTP/3.0\r\n" + H + b"\r\n",
        "505",
        FORWARDS,
        "505",
        "RFC 9112 2.3, RFC 9110 15.6.6",
        "as HTTP/2.0",
    ),
    Decision(
        "HTTP/0.9 request line",
        b"GET /\r\n\r\n",
        "400",
        "400",
        HTTP09,
        "RFC 9112 3, Appendix C.1",
        "no version is no HTTP/1 request line (refused as soon as the line ends, not at the header timeout)",
    ),
    Decision(
        "Content-Length: 5, 5",
        POST + b"Content-Length: 5, 5\r\n\r\nhello",
        "400",
        FORWARDS,
        "400",
        "RFC 9110 8.6",
        "a recipient MAY take an agreeing list as one value or refuse it; nginx refuses",
    ),
    Decision(
        "two Content-Length: 5 lines",
        POST + b"Content-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
        "400",
        FORWARDS,
        "400",
        "RFC 9110 8.6",
        "as the list: nginx refuses",
    ),
    Decision(
        "Content-Length: 5, 6",
        POST + b"Content-Length: 5, 6\r\n\r\nhello",
        "400",
        "400",
        "400",
        "RFC 9112 6.3 (5)",
        "differing lengths: the message length is unknowable",
    ),
    Decision(
        "Content-Length: 5 and 6 lines",
        POST + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
        "400",
        "400",
        "400",
        "RFC 9112 6.3 (5)",
        "as the list",
    ),
    Decision(
        "Transfer-Encoding: chunked",
        POST + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        FORWARDS,
        FORWARDS,
        FORWARDS,
        "RFC 9112 7.1",
        "the control row: forwarded chunked",
        ("POST / HTTP/1.1", ("Transfer-Encoding: chunked",), b"hello"),
    ),
    Decision(
        "Transfer-Encoding: gzip, chunked",
        POST + b"Transfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        "501",
        "422",
        "501",
        "RFC 9112 6.1",
        "a transfer coding the server does not implement: 501; both refuse",
    ),
    Decision(
        "Transfer-Encoding: chunked, gzip",
        POST + b"Transfer-Encoding: chunked, gzip\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        "400",
        "400",
        "501",
        "RFC 9112 6.3 (4)",
        "chunked not last in a request: the length cannot be determined, MUST 400",
    ),
    Decision(
        "Transfer-Encoding: identity",
        POST + b"Transfer-Encoding: identity\r\n\r\n",
        "400",
        "400",
        "501",
        "RFC 9112 6.3 (4)",
        "as chunked not last (identity is no longer a transfer coding)",
    ),
    Decision(
        "two Transfer-Encoding: chunked lines",
        POST + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        "400",
        "400",
        "400",
        "RFC 9112 7",
        "chunked applied twice: a reader decoding once would see another body",
    ),
    Decision(
        "two identical Host lines",
        b"GET / HTTP/1.1\r\nHost: h\r\nHost: h\r\n\r\n",
        "400",
        FORWARDS,
        "400",
        "RFC 9112 3.2",
        "a server MUST answer 400 to more than one Host line; nginx does",
    ),
    Decision(
        "two differing Host lines",
        b"GET / HTTP/1.1\r\nHost: h\r\nHost: other\r\n\r\n",
        "400",
        "400",
        "400",
        "RFC 9112 3.2",
        "which host routes the request would depend on the reader",
    ),
    Decision(
        "Transfer-Encoding in HTTP/1.0",
        b"POST / HTTP/1.0\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        "400",
        FORWARDS,
        "400",
        "RFC 9112 6.1",
        "the framing MUST be treated as faulty; HTTP/1.0 readers do not know chunked; nginx refuses",
    ),
    Decision(
        "Content-Length with Transfer-Encoding",
        POST + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        "400",
        FORWARDS,
        "400",
        "RFC 9112 6.1, 6.3 (3)",
        "the classic smuggling pair: a server MAY reject, and nginx does; two readers could disagree",
    ),
]

IDS = [decision.case for decision in DECISIONS]


def markdown_rows() -> list[str]:
    """The table in docs/security.md, as these decisions render it (the docs must hold exactly these)."""
    rows = [
        "| Input | layerlb | HAProxy 2.6 | nginx 1.22 | RFC | Why |",
        "|---|---|---|---|---|---|",
    ]
    for decision in DECISIONS:
        shown = decision.request.decode("latin-1").replace("\r\n", "␍␊").replace("|", "\\|")
        rows.append(
            f"| {decision.case}: `{shown}` | {decision.layerlb} | {decision.haproxy} | {decision.nginx} | "
            f"{decision.rfc} | {decision.why} |"
        )
    return rows


# --- layerlb, through the real proxy ------------------------------------------------------------------------


@pytest.mark.parametrize("decision", DECISIONS, ids=IDS)
def test_layerlb_answers_each_row_as_the_table_says(
    decision: Decision,
    backends: Callable[..., Backend],
    proxies: Callable[[dict[str, Any]], ProxyUnderTest],
) -> None:
    backend = backends()
    proxy = proxies(lb_document({"app": [("127.0.0.1", backend.port)]}))
    client = proxy.client()
    client.send(decision.request)
    response = client.response()
    if decision.layerlb != FORWARDS:
        assert response.status == int(decision.layerlb), response.body
        assert backend.requests == []
        return
    assert response.status == 200, response.body
    assert decision.upstream is not None
    line, framing, body = decision.upstream
    [seen] = backend.requests
    assert f"{seen.method} {seen.target} {seen.version}" == line
    for expected in framing:
        name, _, value = expected.partition(": ")
        assert seen.all(name) == [value], seen.raw_head
    if not framing:
        assert seen.header("content-length") is None and seen.header("transfer-encoding") is None
    assert seen.body == body


# --- HAProxy and nginx, the real ones -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[str, reference_proxies.ReferenceProxy]]:
    if not reference_proxies.available():
        pytest.skip("HAProxy and nginx are not both installed (bench/packages.sh installs them)")
    directory = tmp_path_factory.mktemp("reference")
    started: dict[str, reference_proxies.ReferenceProxy] = {}
    try:
        for kind in ("haproxy", "nginx"):
            started[kind] = reference_proxies.ReferenceProxy(kind, directory / kind)
        yield started
    finally:
        for proxy in started.values():
            proxy.close()


def _observed(answer: reference_proxies.Answer) -> str:
    if answer.status == 0:
        return HTTP09
    if answer.status == 200 and answer.forwarded is not None:
        return FORWARDS
    return str(answer.status)


@pytest.mark.parametrize("decision", DECISIONS, ids=IDS)
def test_haproxy_and_nginx_answer_each_row_as_the_table_records(
    decision: Decision, reference: dict[str, reference_proxies.ReferenceProxy]
) -> None:
    observed = {kind: _observed(proxy.ask(decision.request)) for kind, proxy in reference.items()}
    assert observed == {"haproxy": decision.haproxy, "nginx": decision.nginx}


def test_the_rule_holds_on_every_row() -> None:
    """Accept only where both accept; refuse where either refuses (methods: RFC 9110 9.1, issue #18)."""
    for decision in DECISIONS:
        both_forward = decision.haproxy == FORWARDS and decision.nginx == FORWARDS
        if decision.case.endswith("method"):
            continue
        assert (decision.layerlb == FORWARDS) == both_forward, decision.case


# --- the docs -----------------------------------------------------------------------------------------------


def test_the_docs_table_is_exactly_these_rows() -> None:
    text = DOC.read_text()
    assert SECTION in text
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    table = [line for line in section.splitlines() if line.startswith("|")]
    assert table == markdown_rows()
