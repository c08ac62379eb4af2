"""The forwarding headers each request carries upstream: its own Host on a kept-alive connection, and an IPv6
client written as RFC 7239 wants it in `Forwarded`.

The proxy caches the forwarding lines of a connection (they repeat for every request of a client), so a
cache keyed too loosely would send the first request's Host with the next ones; and an IPv6 `for=` must be
a quoted, bracketed string (RFC 7239 6: `for="[2001:db8::1]"`), or a backend's parser reads `for=2001`
and a stray `:db8::1`. Neither was caught by the suite when planted (issue #18).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from typing import Any

from layerlb_dataplane.net import proxy_protocol

from layerlb.api import ProxyProtocolVersion
from tests.dataplane.conftest import Backend, LoopThread, ProxyUnderTest, RawClient, get, lb_document

Backends = Callable[..., Backend]
Proxies = Callable[[dict[str, Any]], ProxyUnderTest]


def one(backend: Backend, **spec: Any) -> dict[str, Any]:
    return lb_document({"app": [("127.0.0.1", backend.port)]}, **spec)


# --- Host on a kept-alive connection ------------------------------------------------------------------------


def test_each_request_on_a_kept_alive_connection_is_forwarded_with_its_own_host(
    backends: Backends, proxies: Proxies
) -> None:
    backend = backends()
    proxy = proxies(one(backend))
    client = proxy.client()
    hosts = ["shop.example", "api.example:8443", "shop.example", "Static.Example"]
    for host in hosts:
        client.send(get(host=host))
        assert client.response().status == 200
    assert [seen.header("host") for seen in backend.requests] == hosts
    assert [seen.all("x-forwarded-host") for seen in backend.requests] == [[host] for host in hosts]
    forwarded = [seen.all("forwarded") for seen in backend.requests]
    assert forwarded == [
        ["for=127.0.0.1;proto=http;host=shop.example"],
        ['for=127.0.0.1;proto=http;host="api.example:8443"'],
        ["for=127.0.0.1;proto=http;host=shop.example"],
        ["for=127.0.0.1;proto=http;host=Static.Example"],
    ]
    assert backend.accepted == 1  # one upstream connection: the lines differ per request, not per connection


def test_a_request_with_its_own_forwarding_headers_between_two_plain_ones_leaves_no_trace(
    backends: Backends, proxies: Proxies
) -> None:
    """A client's claimed X-Forwarded-For is appended to for that request only."""
    backend = backends()
    proxy = proxies(one(backend))
    client = proxy.client()
    for extra in ("", "X-Forwarded-For: 198.51.100.4\r\nForwarded: for=198.51.100.4\r\n", ""):
        client.send(get(host="a.example", extra=extra))
        assert client.response().status == 200
    first, claimed, third = backend.requests
    assert first.all("x-forwarded-for") == third.all("x-forwarded-for") == ["127.0.0.1"]
    assert claimed.all("x-forwarded-for") == ["198.51.100.4, 127.0.0.1"]
    assert claimed.all("forwarded") == ["for=198.51.100.4, for=127.0.0.1;proto=http;host=a.example"]
    assert third.all("forwarded") == ["for=127.0.0.1;proto=http;host=a.example"]


# --- IPv6 clients ---------------------------------------------------------------------------------------------

IPV6_FOR = re.compile(r'for="\[(?P<ip>[0-9a-fA-F:]+)\](:\d+)?"')  # RFC 7239 6: quoted, in brackets


def forwarded_for(value: str) -> str:
    """The address of the last `for=` element of a Forwarded value, which must be quoted and bracketed."""
    last = value.split(",")[-1].strip().split(";")[0]
    match = IPV6_FOR.fullmatch(last)
    assert match is not None, f"an IPv6 for= must be quoted and bracketed (RFC 7239 6), got {last!r}"
    return match["ip"]


def test_an_ipv6_client_is_quoted_and_bracketed_in_forwarded(
    backends: Backends, proxies: Proxies, loop_thread: LoopThread
) -> None:
    """A client connecting over ::1, through the same listener served on the IPv6 loopback too."""
    backend = backends()
    proxy = proxies(one(backend))

    async def serve_on_ipv6() -> asyncio.Server:
        loop = asyncio.get_running_loop()
        return await loop.create_server(proxy.listener.protocol_factory, "::1", 0)

    server = loop_thread.run(serve_on_ipv6())
    try:
        port = server.sockets[0].getsockname()[1]
        client = RawClient(port, host="::1")
        client.send(get(host="v6.example"))
        assert client.response().status == 200
        client.close()
    finally:
        loop_thread.call(server.close)
    (seen,) = backend.requests
    assert seen.all("x-forwarded-for") == ["::1"]  # X-Forwarded-For has no quoting: the bare address
    (forwarded,) = seen.all("forwarded")
    assert forwarded_for(forwarded) == "::1"
    assert forwarded.endswith(";proto=http;host=v6.example")


def test_an_ipv6_source_from_a_proxy_protocol_header_is_quoted_too(
    backends: Backends, proxies: Proxies
) -> None:
    """The documentation prefix 2001:db8::/32, as a trusted load balancer in front reports it."""
    backend = backends()
    proxy = proxies(one(backend, listener={"acceptProxyProtocol": {"trustedCIDRs": ["127.0.0.0/8"]}}))
    client = proxy.client()
    header = proxy_protocol.encode(ProxyProtocolVersion.v2, ("2001:db8::1", 40000), ("2001:db8::ff", 80))
    client.send(header + get())
    assert client.response().status == 200
    client.send(get(extra='Forwarded: for="[2001:db8::9]"\r\n'))  # a claimed element stays as it came
    assert client.response().status == 200
    first, second = backend.requests
    assert first.all("x-forwarded-for") == ["2001:db8::1"]
    assert forwarded_for(first.all("forwarded")[0]) == "2001:db8::1"
    assert second.all("forwarded") == ['for="[2001:db8::9]", for="[2001:db8::1]";proto=http;host=example.com']
