"""Only idempotent requests are sent twice: a POST on a pooled connection the backend had closed reaches the
backend at most once, even without a body.

A backend closes an idle keep-alive connection whenever it likes; a request that went out on it just then
sees the close before any response byte. Retrying it on a fresh connection is right for GET or PUT (RFC 9110
9.2.2) and wrong for POST or PATCH: the backend may have acted on it already (here it did: it read the
request before closing). The older test only sent a POST with a body, which the proxy never retries
for another reason, so making POST retryable went unseen (issue #18).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from tests.dataplane.conftest import Backend, ProxyUnderTest, Seen, get, lb_document, respond

Backends = Callable[..., Backend]
Proxies = Callable[[dict[str, Any]], ProxyUnderTest]


def hangs_up_on_every_second_request(backend_requests: dict[tuple[str, int], int]) -> Any:
    """A handler answering the first request of each connection and closing on the second, unanswered,
    after reading it whole: the race of an idle close, made certain."""

    async def handler(seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        backend_requests[seen.peer] = backend_requests.get(seen.peer, 0) + 1
        if backend_requests[seen.peer] == 2:
            writer.close()
            return
        writer.write(respond(body=b"done"))

    return handler


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"POST /orders HTTP/1.1\r\nHost: h\r\n\r\n",
        b"POST /orders HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n",
        b"POST /orders HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\n{}",
        b"PATCH /orders/1 HTTP/1.1\r\nHost: h\r\n\r\n",
    ],
    ids=["post-no-body", "post-empty-body", "post-body", "patch-no-body"],
)
def test_a_non_idempotent_request_on_a_stale_connection_reaches_the_backend_at_most_once(
    request_bytes: bytes, backends: Backends, proxies: Proxies
) -> None:
    per_connection: dict[tuple[str, int], int] = {}
    backend = backends(handler=hangs_up_on_every_second_request(per_connection))
    proxy = proxies(lb_document({"app": [("127.0.0.1", backend.port)]}))
    client = proxy.client()
    client.send(get())  # opens the upstream connection the next request reuses
    assert client.response().status == 200
    client.send(request_bytes)
    answer = client.response()
    method = request_bytes.split(b" ", 1)[0].decode()
    sent = [seen for seen in backend.requests if seen.method == method]
    assert len(sent) == 1, f"the backend saw {method} {len(sent)} times"
    assert answer.status == 502
    assert backend.accepted == 1  # no second connection was opened for it


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
def test_an_idempotent_request_on_a_stale_connection_is_retried_once_on_a_fresh_one(
    method: str, backends: Backends, proxies: Proxies
) -> None:
    """The other side of the rule, so the test above is known to reach the stale-connection path."""
    per_connection: dict[tuple[str, int], int] = {}
    backend = backends(handler=hangs_up_on_every_second_request(per_connection))
    proxy = proxies(lb_document({"app": [("127.0.0.1", backend.port)]}))
    client = proxy.client()
    client.send(get())
    assert client.response().status == 200
    client.send(f"{method} /orders/1 HTTP/1.1\r\nHost: h\r\n\r\n".encode())
    answer = client.response()
    assert (answer.status, answer.body) == (200, b"done")
    assert len([seen for seen in backend.requests if seen.target == "/orders/1"]) == 2  # sent twice
    assert backend.accepted == 2
