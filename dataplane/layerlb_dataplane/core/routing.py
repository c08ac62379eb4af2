"""L7 routing: which backend a request goes to, decided per request, so the work is done per Plan. Sans-IO.

Rules (the Plan's routes are already most specific first; the first that matches wins, else the default
backend, else None → 404). Every condition a route gives must hold:

- **hosts**, any of them; case-insensitive, a trailing dot ignored. `api.example.com` matches that name on
  any port, `api.example.com:8080` only with that port; a Host without port stands for the scheme's
  default port when the caller passes `default_port`. `*.example.com` matches one or more labels in front
  of `example.com`, never `example.com` itself. An absolute-form request target (`GET http://h/x`) names
  the host instead of the Host header, as RFC 9112 §3.2.2 requires.
- **path_prefix** on segment boundaries: `/v1` matches `/v1`, `/v1/` and `/v1/x`, not `/v10`; a trailing
  slash in the prefix is ignored and `/` matches every path. **path** matches exactly.
- The path is the request target without its query string, compared as sent: no percent-decoding and no
  dot-segment removal (Envoy's and HAProxy's default), so routing never rewrites what the backend sees.
- **headers**: exact, case-sensitive values; names are case-insensitive. **methods**: exact tokens.

Speed: each route is compiled once; the hosts' verdict is cached per Host value (bounded), so a request
costs a dict lookup plus the path, method and header checks of the routes its host allows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from layerlb import plan

HOST_CACHE_SIZE = 1024  # distinct Host values remembered; a flood of random hosts only clears it


@dataclass(frozen=True, slots=True)
class _Hosts:
    """A route's host condition, split by kind so a check is a set lookup or a few `endswith`."""

    names: frozenset[str]  # exact names, any port
    names_ports: frozenset[tuple[str, int]]  # exact names with a port
    suffixes: tuple[str, ...]  # ".example.com" of "*.example.com", any port
    suffixes_ports: tuple[tuple[str, int], ...]

    @classmethod
    def compile(cls, hosts: Sequence[str]) -> _Hosts:
        names: set[str] = set()
        names_ports: set[tuple[str, int]] = set()
        suffixes: list[str] = []
        suffixes_ports: list[tuple[str, int]] = []
        for host in hosts:
            name, port = split_host(host)
            if name.startswith("*."):
                if port is None:
                    suffixes.append(name[1:])
                else:
                    suffixes_ports.append((name[1:], port))
            elif port is None:
                names.add(name)
            else:
                names_ports.add((name, port))
        return cls(frozenset(names), frozenset(names_ports), tuple(suffixes), tuple(suffixes_ports))

    def match(self, name: str, port: int | None) -> bool:
        if name in self.names:
            return True
        if port is not None and (name, port) in self.names_ports:
            return True
        for suffix in self.suffixes:
            if name.endswith(suffix) and len(name) > len(suffix):
                return True
        for suffix, wanted in self.suffixes_ports:
            if port == wanted and name.endswith(suffix) and len(name) > len(suffix):
                return True
        return False


@dataclass(frozen=True, slots=True)
class _Route:
    """One Plan route, compiled: every condition in the form its check needs."""

    backend: str
    hosts: _Hosts | None  # None: any host
    path: str | None
    prefix: str | None  # without trailing slash; None: any path (also for prefix "/")
    methods: frozenset[str]
    headers: tuple[tuple[str, str], ...]

    @classmethod
    def compile(cls, route: plan.Route) -> _Route:
        prefix = route.path_prefix.rstrip("/") if route.path_prefix is not None else None
        return cls(
            backend=route.backend,
            hosts=_Hosts.compile(route.hosts) if route.hosts else None,
            path=route.path,
            prefix=prefix or None,
            methods=frozenset(str(method) for method in route.methods),
            headers=tuple((name.lower(), value) for name, value in route.headers),
        )

    def match_rest(self, method: str, path: str, header: Callable[[str], str | None]) -> bool:
        """Everything but the host, which the Router has already settled."""
        if self.path is not None and path != self.path:
            return False
        prefix = self.prefix
        if prefix is not None and not (
            path.startswith(prefix) and (len(path) == len(prefix) or path[len(prefix)] == "/")
        ):
            return False
        if self.methods and method not in self.methods:
            return False
        return all(header(name) == value for name, value in self.headers)


def split_host(host: str) -> tuple[str, int | None]:
    """`(name, port)` of a Host value or route host: lower case, trailing dot dropped, `[v6]` kept whole.

    A port that is not a number leaves the whole value as the name, so it matches no route host.
    """
    host = host.strip().lower()
    port: int | None = None
    colon = host.rfind(":")
    if colon != -1 and host.find("]", colon) == -1 and (host[0] == "[" or host.count(":") == 1):
        digits = host[colon + 1 :]
        if digits.isdigit() and digits.isascii():
            port = int(digits)
            host = host[:colon]
    return host.rstrip("."), port


def split_target(target: str) -> tuple[str, str | None]:
    """`(path, authority)` of a request target: the query dropped; authority only for the absolute form."""
    if target.startswith("/"):
        query = target.find("?")
        return (target if query == -1 else target[:query]), None
    scheme = target.find("://")
    if scheme == -1:
        return target.split("?", 1)[0], None  # "*" (OPTIONS) or authority form (CONNECT)
    rest = target[scheme + 3 :]
    end = len(rest)
    for stop in "/?#":
        index = rest.find(stop)
        if index != -1 and index < end:
            end = index
    authority = rest[:end].rpartition("@")[2]
    path = rest[end:].split("?", 1)[0].split("#", 1)[0]
    return (path if path.startswith("/") else "/" + path), authority


class Router:
    """First matching route wins (the Plan orders them most specific first); else the default backend."""

    def __init__(self, routes: Sequence[plan.Route], default_backend: str | None) -> None:
        self.routes = list(routes)
        self.default_backend = default_backend
        self._compiled = tuple(_Route.compile(route) for route in self.routes)
        self._any_host = all(route.hosts is None for route in self._compiled)
        self._by_host: dict[tuple[str, int | None], tuple[_Route, ...]] = {}

    def match(
        self,
        method: str,
        host: str,
        path: str,
        header: Callable[[str], str | None],
        *,
        default_port: int | None = None,
    ) -> str | None:
        """The backend name for a request, or None (→ 404). `header(name)` takes a lower-case name.

        `path` is the request target as received (query and absolute form allowed); `host` the Host
        header ("" when absent); `default_port` the port a Host without one stands for (80 or 443).
        """
        if path.startswith("/"):
            query = path.find("?")
            if query != -1:
                path = path[:query]
        else:
            path, authority = split_target(path)
            if authority is not None:
                host = authority
        if self._any_host:
            candidates = self._compiled
        else:
            cache_key = (host, default_port)
            cached = self._by_host.get(cache_key)
            if cached is None:
                cached = self._candidates(host, default_port)
                if len(self._by_host) >= HOST_CACHE_SIZE:
                    self._by_host.clear()
                self._by_host[cache_key] = cached
            candidates = cached
        for route in candidates:
            if route.match_rest(method, path, header):
                return route.backend
        return self.default_backend

    def _candidates(self, host: str, default_port: int | None) -> tuple[_Route, ...]:
        """The routes, in order, whose host condition a Host value satisfies."""
        name, port = split_host(host) if host else ("", None)
        if port is None:
            port = default_port
        return tuple(
            route for route in self._compiled if route.hosts is None or route.hosts.match(name, port)
        )
