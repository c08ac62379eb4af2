"""Routing: which backend a request reaches, by host, path, headers and method, in the Plan's order."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import pytest
from layerlb_dataplane.core import routing

from layerlb import plan
from layerlb.api import HTTPMethod


def headers(values: Mapping[str, str] | None = None) -> Callable[[str], str | None]:
    """A `header(name)` over request headers whose names arrive in any case."""
    lowered = {name.lower(): value for name, value in (values or {}).items()}
    return lowered.get


def route(backend: str, **match: object) -> plan.Route:
    return plan.Route.model_validate({"backend": backend, **match})


def backend_for(
    router: routing.Router,
    path: str = "/",
    host: str = "",
    method: str = "GET",
    request_headers: Mapping[str, str] | None = None,
    default_port: int | None = None,
) -> str | None:
    return router.match(method, host, path, headers(request_headers), default_port=default_port)


# --- hosts -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("api.example.com", "api"),
        ("API.Example.COM", "api"),
        ("api.example.com.", "api"),
        ("api.example.com:8443", "api"),
        ("www.example.com", None),
        ("", None),
    ],
)
def test_a_host_without_port_matches_any_port_in_any_case(host: str, expected: str | None) -> None:
    router = routing.Router([route("api", hosts=("api.example.com",))], None)
    assert backend_for(router, host=host) == expected


def test_a_host_with_port_matches_only_that_port() -> None:
    router = routing.Router([route("alt", hosts=("api.example.com:8080",))], "main")
    assert backend_for(router, host="api.example.com:8080") == "alt"
    assert backend_for(router, host="api.example.com:80") == "main"
    assert backend_for(router, host="api.example.com") == "main"


def test_a_host_without_port_stands_for_the_default_port_when_given() -> None:
    router = routing.Router([route("tls", hosts=("api.example.com:443",))], "main")
    assert backend_for(router, host="api.example.com", default_port=443) == "tls"
    assert backend_for(router, host="api.example.com", default_port=80) == "main"


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("a.example.com", "wild"),
        ("a.b.example.com", "wild"),
        ("A.Example.com:81", "wild"),
        ("example.com", None),
        ("aexample.com", None),
        ("a.example.org", None),
    ],
)
def test_a_wildcard_host_matches_one_or_more_labels_but_not_the_bare_domain(
    host: str, expected: str | None
) -> None:
    router = routing.Router([route("wild", hosts=("*.example.com",))], None)
    assert backend_for(router, host=host) == expected


def test_a_wildcard_host_with_port_matches_only_that_port() -> None:
    router = routing.Router([route("wild", hosts=("*.example.com:8080",))], None)
    assert backend_for(router, host="a.example.com:8080") == "wild"
    assert backend_for(router, host="a.example.com:8081") is None


def test_any_of_several_hosts_matches() -> None:
    router = routing.Router([route("app", hosts=("a.example.com", "*.example.net"))], None)
    assert backend_for(router, host="a.example.com") == "app"
    assert backend_for(router, host="x.example.net") == "app"
    assert backend_for(router, host="b.example.com") is None


def test_ipv6_literal_hosts_keep_their_port_apart() -> None:
    assert routing.split_host("[2001:db8::1]:8080") == ("[2001:db8::1]", 8080)
    assert routing.split_host("[2001:db8::1]") == ("[2001:db8::1]", None)
    assert routing.split_host("example.com:http") == ("example.com:http", None)


def test_an_absolute_form_target_names_the_host_and_path() -> None:
    router = routing.Router([route("api", hosts=("api.example.com",), path_prefix="/v1")], "main")
    assert backend_for(router, path="http://api.example.com/v1/x?q=1", host="other.example.com") == "api"
    assert backend_for(router, path="http://user@api.example.com:80/v1", host="") == "api"
    assert backend_for(router, path="http://api.example.com", host="") == "main"


def test_the_host_cache_stays_bounded() -> None:
    router = routing.Router([route("api", hosts=("api.example.com",))], "main")
    for index in range(routing.HOST_CACHE_SIZE * 2):
        assert backend_for(router, host=f"h{index}.example.com") == "main"
    assert len(router._by_host) <= routing.HOST_CACHE_SIZE
    assert backend_for(router, host="api.example.com") == "api"


# --- paths -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/v1", "v1"),
        ("/v1/", "v1"),
        ("/v1/users", "v1"),
        ("/v1?x=1", "v1"),
        ("/v10", "main"),
        ("/v", "main"),
        ("/", "main"),
    ],
)
def test_a_path_prefix_matches_on_segment_boundaries(path: str, expected: str) -> None:
    router = routing.Router([route("v1", path_prefix="/v1")], "main")
    assert backend_for(router, path=path) == expected


def test_a_trailing_slash_in_the_prefix_is_ignored() -> None:
    router = routing.Router([route("v1", path_prefix="/v1/")], "main")
    assert backend_for(router, path="/v1") == "v1"
    assert backend_for(router, path="/v1/x") == "v1"
    assert backend_for(router, path="/v10") == "main"


def test_the_root_prefix_matches_every_path() -> None:
    router = routing.Router([route("all", path_prefix="/")], None)
    for path in ("/", "/x", "/v1/y?z", "*"):
        assert backend_for(router, path=path) == "all"


def test_an_exact_path_ignores_the_query_but_nothing_else() -> None:
    router = routing.Router([route("login", path="/login")], "main")
    assert backend_for(router, path="/login") == "login"
    assert backend_for(router, path="/login?next=/") == "login"
    assert backend_for(router, path="/login/") == "main"
    assert backend_for(router, path="/login/x") == "main"


def test_paths_are_compared_as_sent() -> None:
    router = routing.Router([route("admin", path_prefix="/admin")], "main")
    assert backend_for(router, path="/%61dmin") == "main"
    assert backend_for(router, path="/Admin") == "main"


# --- headers and methods -----------------------------------------------------------------------------


def test_headers_match_exact_values_with_names_in_any_case() -> None:
    router = routing.Router([route("canary", headers=(("x-canary", "true"),))], "main")
    assert backend_for(router, request_headers={"X-Canary": "true"}) == "canary"
    assert backend_for(router, request_headers={"x-canary": "True"}) == "main"
    assert backend_for(router, request_headers={"x-canary": "true1"}) == "main"
    assert backend_for(router) == "main"


def test_every_header_of_a_route_must_match() -> None:
    router = routing.Router([route("both", headers=(("x-a", "1"), ("X-B", "2")))], "main")
    assert backend_for(router, request_headers={"x-a": "1", "x-b": "2"}) == "both"
    assert backend_for(router, request_headers={"x-a": "1"}) == "main"


def test_methods_match_exactly() -> None:
    router = routing.Router([route("write", methods=(HTTPMethod.POST, HTTPMethod.PUT))], "read")
    assert backend_for(router, method="POST") == "write"
    assert backend_for(router, method="PUT") == "write"
    assert backend_for(router, method="GET") == "read"
    assert backend_for(router, method="post") == "read"


# --- order and fallbacks -----------------------------------------------------------------------------


def test_the_first_matching_route_wins_and_every_condition_must_hold() -> None:
    routes = [
        route(
            "canary",
            hosts=("api.example.com",),
            path_prefix="/v1",
            headers=(("x-canary", "true"),),
            methods=(HTTPMethod.GET,),
        ),
        route("v1", hosts=("api.example.com",), path_prefix="/v1"),
        route("wild", hosts=("*.example.com",)),
        route("rest", path_prefix="/"),
    ]
    router = routing.Router(routes, "default")
    canary = {"x-canary": "true"}
    assert backend_for(router, "/v1/x", "api.example.com", "GET", canary) == "canary"
    assert backend_for(router, "/v1/x", "api.example.com", "POST", canary) == "v1"
    assert backend_for(router, "/v2", "api.example.com") == "wild"
    assert backend_for(router, "/v1", "other.org") == "rest"


def test_no_match_falls_back_to_the_default_backend_or_none() -> None:
    routes = [route("api", hosts=("api.example.com",))]
    assert backend_for(routing.Router(routes, "main"), host="x.org") == "main"
    assert backend_for(routing.Router(routes, None), host="x.org") is None
    assert backend_for(routing.Router([], "main")) == "main"
    assert backend_for(routing.Router([], None)) is None
