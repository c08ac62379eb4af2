"""The four request-target forms (RFC 9112 3.2) as routing reads them: origin, absolute, authority and
asterisk; only the absolute form names a host, and no form's query or fragment reaches a path match."""

from __future__ import annotations

import pytest
from layerlb_dataplane.core import routing

from layerlb import plan


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("/v1/x?q=1", ("/v1/x", None)),
        ("/v1/x", ("/v1/x", None)),
        ("*", ("*", None)),  # OPTIONS * (asterisk form): no scheme, no host
        ("example.com:443", ("example.com:443", None)),  # CONNECT (authority form)
        ("example.com:443?x", ("example.com:443", None)),
        ("http://api.example.com/v1?q=1#f", ("/v1", "api.example.com")),
        ("http://api.example.com?q=1", ("/", "api.example.com")),
        ("http://api.example.com#frag", ("/", "api.example.com")),
        ("https://user:pw@api.example.com:8443/a/b", ("/a/b", "api.example.com:8443")),
        ("http://api.example.com", ("/", "api.example.com")),
    ],
)
def test_split_target(target: str, expected: tuple[str, str | None]) -> None:
    assert routing.split_target(target) == expected


def test_a_query_never_takes_part_in_an_exact_path_match() -> None:
    router = routing.Router([plan.Route(backend="exact", path="/login"), plan.Route(backend="all")], None)
    assert router.match("GET", "h", "/login?next=/", lambda name: None) == "exact"
    assert router.match("GET", "h", "/login", lambda name: None) == "exact"
    assert router.match("GET", "h", "/login/x", lambda name: None) == "all"


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("", ("", None)),  # no Host at all (HTTP/1.0)
        ("   ", ("", None)),
        ("Example.COM.", ("example.com", None)),
        ("example.com:8080", ("example.com", 8080)),
        ("[2001:db8::1]:443", ("[2001:db8::1]", 443)),
        ("2001:db8::1", ("2001:db8::1", None)),  # a bare IPv6 literal: its last group is no port
        ("fe80::1", ("fe80::1", None)),
    ],
)
def test_split_host(host: str, expected: tuple[str, int | None]) -> None:
    assert routing.split_host(host) == expected


def test_the_host_cache_keeps_each_host_until_it_is_full() -> None:
    """Each Host value's candidate routes are worked out once: the cache must keep them, not only stay small."""
    router = routing.Router([plan.Route(backend="api", hosts=("api.example.com",))], "main")
    hosts = [f"h{n}.example.com" for n in range(50)]
    for host in hosts:
        router.match("GET", host, "/", lambda name: None)
    assert len(router._by_host) == len(hosts)
    for n in range(routing.HOST_CACHE_SIZE - len(hosts) + 1):  # one more than it holds
        router.match("GET", f"x{n}.example.com", "/", lambda name: None)
    assert 0 < len(router._by_host) <= routing.HOST_CACHE_SIZE
