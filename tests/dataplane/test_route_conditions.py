"""Route conditions at their edges, each one a mutant of `routing` that survived the older tests: a wildcard
with a port, an exact path that sorts before the request's, a prefix longer than 256 characters, and header
values compared by content, never by identity."""

from __future__ import annotations

from layerlb_dataplane.core import routing

from layerlb import plan


def no_headers(name: str) -> str | None:
    return None


def test_a_wildcard_host_with_a_port_matches_subdomains_on_that_port_only() -> None:
    router = routing.Router([plan.Route(backend="wild", hosts=("*.example.com:8080",))], "main")
    assert router.match("GET", "api.example.com:8080", "/", no_headers) == "wild"
    assert router.match("GET", "api.example.com:9090", "/", no_headers) == "main"
    assert router.match("GET", "api.example.com:80", "/", no_headers) == "main"
    assert router.match("GET", "badexample.com:8080", "/", no_headers) == "main"  # not a subdomain
    assert router.match("GET", "example.com:8080", "/", no_headers) == "main"


def test_an_exact_path_matches_that_path_and_no_other() -> None:
    router = routing.Router([plan.Route(backend="exact", path="/login")], "main")
    assert router.match("GET", "h", "/login", no_headers) == "exact"
    for other in ("/a", "/log", "/login/", "/logout", "/z"):
        assert router.match("GET", "h", other, no_headers) == "main", other


def test_a_long_prefix_matches_its_own_path() -> None:
    prefix = "/" + "a" * 300
    router = routing.Router([plan.Route(backend="long", path_prefix=prefix)], "main")
    assert router.match("GET", "h", prefix, no_headers) == "long"
    assert router.match("GET", "h", prefix + "/x", no_headers) == "long"
    assert router.match("GET", "h", prefix + "b", no_headers) == "main"


def test_header_values_are_compared_by_content() -> None:
    router = routing.Router([plan.Route(backend="canary", headers=(("x-canary", "true"),))], "main")
    built = "".join(["tr", "ue"])  # equal, but another object, as a parsed request's value is

    def header(name: str) -> str | None:
        return built if name == "x-canary" else None

    assert router.match("GET", "h", "/", header) == "canary"
