"""The `haproxy` format: a proxy or transparent Plan as a complete haproxy.cfg (frontends, routes as ACLs,
backends with checks and affinity), and the certificate files it expects."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass

from layerlb import api, plan
from layerlb.render import shared

DEFAULT_CERT_DIR = "/etc/layerlb/certs"
HAPROXY_ARCHITECTURES = (api.Architecture.proxy, api.Architecture.transparent)
# Characters HAProxy reads as part of a word without quoting.
HAPROXY_BARE = re.compile(r"^[A-Za-z0-9!%&*+,./:;<=>?@^_|~()-]+$")


def unsupported(p: plan.Plan) -> str | None:
    """Why the haproxy format cannot render `p` (a message naming the field), or None when it can."""
    if p.architecture not in HAPROXY_ARCHITECTURES:
        return (
            f"spec.architecture: format haproxy renders architectures proxy and transparent, "
            f"not {p.architecture}; use format ipvs or nftables"
        )
    for index, listener in enumerate(p.listeners):
        if listener.transport == "UDP":
            return (
                f"spec.listeners[{index}].protocol: format haproxy cannot proxy UDP (listener "
                f"{listener.name}); the layerlb data plane can"
            )
    return shared.duplicate_problem(p, p.backends, "haproxy")


def haproxy_word(value: str) -> str:
    """A value as one HAProxy configuration word: bare when safe, else quoted so nothing is expanded.

    Single quotes take everything literally; a value holding one goes in double quotes, where `\\`,
    `"` and `$` (environment variables) are escaped.
    """
    if value and HAPROXY_BARE.match(value):
        return value
    if "'" not in value:
        return f"'{value}'"
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$")
    return f'"{escaped}"'


def haproxy_duration(seconds: float) -> str:
    """A Plan time in HAProxy units: whole seconds as `5s`, anything finer in milliseconds."""
    milliseconds = round(seconds * 1000)
    return f"{milliseconds // 1000}s" if milliseconds % 1000 == 0 else f"{milliseconds}ms"


def haproxy_balance(p: plan.Plan, backend: plan.Backend) -> tuple[str, str | None]:
    """`balance` and `hash-type` of a backend, the nearest HAProxy has to its algorithm.

    | algorithm          | balance                           | hash-type  |
    |--------------------|-----------------------------------|------------|
    | round-robin        | roundrobin                        |            |
    | least-connections  | leastconn                         |            |
    | random-two-choices | random(2)                         |            |
    | source-hash        | source / hdr(NAME) / hash req.cook(NAME) | map-based (modulo, as the name says) |
    | ring-hash          | the same key                      | consistent |
    | maglev             | the same key                      | consistent: HAProxy's consistent hash is the nearest to Maglev (few remaps on change) |

    The key is the client address (`source`), or in L7 a header (`hdr(NAME)`) or a cookie
    (`hash req.cook(NAME)`, HAProxy 2.6+).
    """
    algorithm = backend.algorithm
    if algorithm is api.Algorithm.round_robin:
        return "roundrobin", None
    if algorithm is api.Algorithm.least_connections:
        return "leastconn", None
    if algorithm is api.Algorithm.random_two_choices:
        return "random(2)", None
    hash_on = backend.hash_on
    if hash_on.type is api.HashSource.Header and hash_on.name:
        balance = haproxy_word(f"hdr({hash_on.name})")
    elif hash_on.type is api.HashSource.Cookie and hash_on.name:
        balance = "hash " + haproxy_word(f"req.cook({hash_on.name})")
    else:
        balance = "source"
    return balance, "map-based" if algorithm is api.Algorithm.source_hash else "consistent"


def haproxy_server_name(endpoint: plan.Endpoint) -> str:
    """A server's name from its address (and port): stable while the endpoint lives, unlike an index."""
    return endpoint.address if endpoint.port is None else f"{endpoint.address}:{endpoint.port}"


def haproxy_cookie(endpoint: plan.Endpoint) -> str:
    """The affinity cookie's value for a server: stable, and opaque so addresses do not leak to clients."""
    return hashlib.sha256(haproxy_server_name(endpoint).encode()).hexdigest()[:12]


def haproxy_frontend_name(p: plan.Plan, listener: plan.Listener) -> str:
    """`fe_<namespace>_<name>_<listener>`: unique even when several LoadBalancers share one haproxy.cfg."""
    return f"fe_{p.namespace}_{p.name}_{listener.name}"


def haproxy_backend_name(p: plan.Plan, backend: str) -> str:
    """`be_<namespace>_<name>_<backend>`; Kubernetes names hold no `_`, so no two names meet."""
    return f"be_{p.namespace}_{p.name}_{backend}"


def haproxy_no_route_name(p: plan.Plan) -> str:
    """The backend answering 404 when no route matches and there is no default backend."""
    return haproxy_backend_name(p, "no_route")


def haproxy_host_acls(name: str, hosts: Sequence[str]) -> list[str]:
    """ACL lines matching any of `hosts`, with or without a port in the Host header unless one is given.

    `*.example.com` matches any name ending in `.example.com` (one label or more, as in the Gateway API).
    """
    lines = []
    for host in hosts:
        if host.startswith("*."):
            suffix = host[1:]
            fetch = "hdr(host)" if ":" in host else "hdr(host),field(1,:)"
            lines.append(f"acl {name} {fetch} -i -m end {suffix}")
        elif ":" in host:
            lines.append(f"acl {name} hdr(host) -i {host}")
        else:
            lines.append(f"acl {name} hdr(host),field(1,:) -i {host}")
    return lines


def haproxy_route(p: plan.Plan, index: int, route: plan.Route) -> tuple[list[str], str]:
    """The ACL lines of one route and its `use_backend` line; every part of the match must hold.

    A prefix matches on segment boundaries (`/v1` takes `/v1` and `/v1/x`, not `/v10`); header values
    match the whole field exactly (`req.fhdr`, which does not split at commas).
    """
    prefix = f"route{index}"
    acls: list[str] = []
    conditions: list[str] = []
    if route.hosts:
        acls += haproxy_host_acls(f"{prefix}_host", route.hosts)
        conditions.append(f"{prefix}_host")
    if route.path is not None:
        acls.append(f"acl {prefix}_path path -m str -- {haproxy_word(route.path)}")
        conditions.append(f"{prefix}_path")
    elif route.path_prefix is not None and route.path_prefix.rstrip("/"):
        stem = route.path_prefix.rstrip("/")
        acls.append(f"acl {prefix}_path path -m str -- {haproxy_word(stem)}")
        acls.append(f"acl {prefix}_path path -m beg -- {haproxy_word(stem + '/')}")
        conditions.append(f"{prefix}_path")
    for number, (header, value) in enumerate(route.headers):
        acl = f"{prefix}_header{number}"
        acls.append(f"acl {acl} {haproxy_word(f'req.fhdr({header})')} -m str -- {haproxy_word(value)}")
        conditions.append(acl)
    if route.methods:
        acls.append(f"acl {prefix}_method method {' '.join(str(method) for method in route.methods)}")
        conditions.append(f"{prefix}_method")
    use = f"use_backend {haproxy_backend_name(p, route.backend)}"
    return acls, f"{use} if {' '.join(conditions)}" if conditions else use


@dataclass(frozen=True)
class HAProxyFrontend:
    """What the template needs to lay out one listener's frontend: its bind, limits and routing lines."""

    name: str
    comment: str
    mode: str
    bind: str
    lines: tuple[str, ...]
    default_backend: str


@dataclass(frozen=True)
class HAProxyBackend:
    """What the template needs to lay out one backend: balancing, checks, affinity and server lines."""

    name: str
    comment: str
    mode: str
    lines: tuple[str, ...]
    servers: tuple[str, ...]


def haproxy_certificates(p: plan.Plan, cert_dir: str = DEFAULT_CERT_DIR) -> dict[str, str]:
    """The files the haproxy render expects: path -> PEM (chain, then key), one folder per HTTPS listener.

    HAProxy loads a folder's files in name order and serves the first as the default certificate, so
    the names keep the Plan's order; SNI picks among them by the names in each certificate.
    """
    files = {}
    for listener in p.listeners:
        for number, certificate in enumerate(listener.certificates):
            source = re.sub(r"[^A-Za-z0-9.-]+", "-", certificate.source.split("/")[-1])
            path = f"{cert_dir.rstrip('/')}/{listener.name}/{number:02d}-{source}.pem"
            files[path] = certificate.cert_pem.rstrip("\n") + "\n" + certificate.key_pem.rstrip("\n") + "\n"
    return files


def haproxy_frontends(p: plan.Plan, cert_dir: str) -> list[HAProxyFrontend]:
    """One frontend per listener; L7 frontends carry every route, first match wins."""
    l7 = p.mode is api.Mode.L7
    route_lines: list[str] = []
    use_lines: list[str] = []
    for index, route in enumerate(p.routes):
        acls, use = haproxy_route(p, index, route)
        route_lines += acls
        use_lines.append(use)
    if p.default_backend is not None:
        default = haproxy_backend_name(p, p.default_backend)
    else:
        default = haproxy_no_route_name(p)
    frontends = []
    for listener in p.listeners:
        https = listener.protocol is api.Protocol.HTTPS
        bind = shared.host_port(p.vip, listener.port)
        if https:
            bind += f" ssl crt {cert_dir.rstrip('/')}/{listener.name}/"
        lines: list[str] = []
        if listener.max_connections is not None:
            lines.append(f"maxconn {listener.max_connections}")
        networks = ""
        if listener.accept_proxy_protocol is not None:
            networks = " ".join(listener.accept_proxy_protocol.trusted_cidrs)
            lines.append(f"tcp-request connection expect-proxy layer4 if {{ src {networks} }}")
        if listener.max_connections_per_client is not None:
            # One client address's open connections (trusted PROXY senders not counted), as the data plane.
            unless = f" if !{{ src {networks} }}" if networks else ""
            lines += [
                "stick-table type ipv6 size 1m expire 60s store conn_cur",
                f"tcp-request connection track-sc0 src{unless}",
                f"tcp-request connection reject if {{ sc0_conn_cur gt {listener.max_connections_per_client} }}",
            ]
        if l7:
            lines.append("option forwardfor")
            proto = "https" if https else "http"
            lines.append(f"http-request set-header X-Forwarded-Proto {proto}")
            lines += route_lines + use_lines
        comment = f"{p.key} listener {listener.name} ({listener.protocol} {listener.port})"
        frontends.append(
            HAProxyFrontend(
                name=haproxy_frontend_name(p, listener),
                comment=comment,
                mode="http" if l7 else "tcp",
                bind=bind,
                lines=tuple(lines),
                default_backend=default,
            )
        )
    return frontends


def _haproxy_servers(p: plan.Plan, backend: plan.Backend) -> tuple[str, ...]:
    """The server lines of a backend, so each endpoint is reached, probed and kept as the Plan says.

    An endpoint without a port takes the port the client connected to (HAProxy's own rule for a server
    without one); its health check, which has no client, probes the check's port or else the first
    listener's. transparent: each connection leaves from the client's address (`usesrc clientip`).
    """
    check = backend.health_check
    transparent = p.architecture is api.Architecture.transparent
    cookie = p.session_affinity.type is api.AffinityType.Cookie
    servers = []
    for endpoint in backend.endpoints:
        address = (
            endpoint.address if endpoint.port is None else shared.host_port(endpoint.address, endpoint.port)
        )
        if endpoint.port is None and shared.is_ipv6(endpoint.address):
            address = f"[{endpoint.address}]"
        words = [f"server {haproxy_server_name(endpoint)} {address} weight {endpoint.weight}"]
        if check is not None:
            words.append("check")
            port = check.port or (None if endpoint.port is not None else p.listeners[0].port)
            if port is not None:
                words.append(f"port {port}")
        if backend.proxy_protocol is not None:
            words.append(
                "send-proxy-v2" if backend.proxy_protocol is api.ProxyProtocolVersion.v2 else "send-proxy"
            )
            if check is not None:
                words.append("check-send-proxy")
        if cookie:
            words.append(f"cookie {haproxy_cookie(endpoint)}")
        if transparent:
            words.append(
                f"source {'[::]' if shared.is_ipv6(endpoint.address) else '0.0.0.0'} usesrc clientip"
            )
        servers.append(" ".join(words))
    return tuple(servers)


def haproxy_backends(p: plan.Plan) -> list[HAProxyBackend]:
    """The backends traffic can reach (the default and every route's), in the Plan's order."""
    l7 = p.mode is api.Mode.L7
    used = {route.backend for route in p.routes}
    if p.default_backend is not None:
        used.add(p.default_backend)
    affinity = p.session_affinity
    backends = []
    for backend in p.backends:
        if backend.name not in used:
            continue
        balance, hash_type = haproxy_balance(p, backend)
        lines = [f"balance {balance}"]
        if hash_type is not None:
            lines.append(f"hash-type {hash_type}")
        check = backend.health_check
        if check is not None:
            if check.protocol is api.HealthProtocol.HTTP:
                lines.append(f"option httpchk GET {haproxy_word(check.path)}")
            lines.append(f"timeout check {check.timeout_seconds}s")
            lines.append(
                f"default-server inter {check.interval_seconds}s "
                f"fall {check.unhealthy_threshold} rise {check.healthy_threshold}"
            )
        if affinity.type is api.AffinityType.Cookie:
            lines.append(
                f"cookie {haproxy_word(affinity.cookie_name)} insert indirect nocache httponly "
                f"maxidle {affinity.timeout_seconds}s"
            )
        elif affinity.type is api.AffinityType.ClientIP:
            table = "ipv6" if shared.is_ipv6(p.vip) else "ip"
            lines.append(f"stick-table type {table} size 1m expire {affinity.timeout_seconds}s")
            lines.append("stick on src")
        count = len(backend.endpoints)
        comment = f"{p.key} backend {backend.name} ({backend.algorithm}, {count} endpoint{'' if count == 1 else 's'})"
        backends.append(
            HAProxyBackend(
                name=haproxy_backend_name(p, backend.name),
                comment=comment,
                mode="http" if l7 else "tcp",
                lines=tuple(lines),
                servers=_haproxy_servers(p, backend),
            )
        )
    return backends


def haproxy_timeouts(p: plan.Plan) -> dict[str, str]:
    """HAProxy's `timeout` settings for the Plan's limits, in the order they apply to a request.

    connect: reaching a backend. L7: `http-request` bounds the client's request head (408), `server`
    the backend's response head (504), `client`, `http-keep-alive` and `tunnel` (WebSocket) the idle
    time. L4: a connection idle on either side for the idle time is closed.
    """
    t = p.timeouts
    if p.mode is api.Mode.L4:
        idle = haproxy_duration(t.idle)
        return {"connect": haproxy_duration(t.connect), "client": idle, "server": idle}
    return {
        "connect": haproxy_duration(t.connect),
        "http-request": haproxy_duration(t.header),
        "server": haproxy_duration(t.request),
        "client": haproxy_duration(t.idle),
        "http-keep-alive": haproxy_duration(t.idle),
        "tunnel": haproxy_duration(t.idle),
    }


def haproxy(p: plan.Plan, *, cert_dir: str = DEFAULT_CERT_DIR) -> str:
    """A complete haproxy.cfg for a proxy or transparent Plan (TCP listeners only in L4)."""
    l7 = p.mode is api.Mode.L7
    return shared.template("haproxy.j2").render(
        header=shared.header(p),
        l7=l7,
        # The request line and header block must fit one buffer, less the rewrite reserve (1024).
        bufsize=p.limits.max_request_line + p.limits.max_header + 1024,
        limits=p.limits,
        timeouts=haproxy_timeouts(p),
        frontends=haproxy_frontends(p, cert_dir),
        backends=haproxy_backends(p),
        no_route=haproxy_no_route_name(p) if l7 and p.default_backend is None else None,
        cert_dir=cert_dir.rstrip("/"),
        https=any(listener.protocol is api.Protocol.HTTPS for listener in p.listeners),
    )
