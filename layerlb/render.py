"""Renderers: a Plan in, a text configuration out, through the jinja2 templates in `templates/`.

Formats: `dataplane` (the Plan as JSON, what the forwarding pod loads), `ipvs` (ipvsadm-restore rules),
`nftables` (an `nft -f` ruleset) and `haproxy` (haproxy.cfg). A format that cannot express a Plan says
why through `unsupported`, rather than rendering something that would forward differently.

The decisions (weight ranges, schedulers, ACLs, names) are small typed functions here, so that they can
be tested on their own; the templates only lay out what these functions computed. Every output is
deterministic: the same Plan and keywords give the same bytes.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache, lru_cache

import jinja2

from layerlb import api, plan

FORMATS = ("dataplane", "ipvs", "nftables", "haproxy")

DEFAULT_CERT_DIR = "/etc/layerlb/certs"
DEFAULT_DEVICE = "eth0"
PLACEHOLDER_MAC = "00:00:00:00:00:00"

IPVS_ARCHITECTURES = api.ENGINE_ARCHITECTURES[api.Engine.ipvs]
NFTABLES_ARCHITECTURES = api.ENGINE_ARCHITECTURES[api.Engine.nftables]
NFTABLES_ALGORITHMS = (api.Algorithm.round_robin, api.Algorithm.source_hash)
HAPROXY_ARCHITECTURES = (api.Architecture.proxy, api.Architecture.transparent)

# nft refuses longer names (NFT_NAME_MAXLEN is 256 with the terminating NUL).
NFT_NAME_MAX = 255
INTERFACE_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,15}$")
MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
# A table comment nft stores as is (the kernel keeps up to 256 bytes of user data).
NFT_COMMENT = re.compile(r"^[ -!#-~]{1,128}$")
# Characters HAProxy reads as part of a word without quoting.
HAPROXY_BARE = re.compile(r"^[A-Za-z0-9!%&*+,./:;<=>?@^_|~()-]+$")


# --- the entry points ------------------------------------------------------------------------------


def unsupported(p: plan.Plan, fmt: str) -> str | None:
    """Why `fmt` cannot render `p` (a message naming the field), or None when it can."""
    if fmt == "dataplane":
        return None
    if fmt == "ipvs":
        return _kernel_unsupported(p, fmt, api.Engine.ipvs, IPVS_ARCHITECTURES)
    if fmt == "nftables":
        kernel = _kernel_unsupported(p, fmt, api.Engine.nftables, NFTABLES_ARCHITECTURES)
        return kernel or _nftables_unsupported(p)
    if fmt == "haproxy":
        return _haproxy_unsupported(p)
    raise ValueError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")


def render(
    p: plan.Plan,
    fmt: str,
    *,
    cert_dir: str = DEFAULT_CERT_DIR,
    device: str = DEFAULT_DEVICE,
    device_mac: str | None = None,
    neighbours: Mapping[str, str] | None = None,
    masquerade: bool = False,
    comment: str | None = None,
) -> str:
    """The configuration of `p` in `fmt`; call `unsupported` first.

    Keywords a format does not use are ignored. haproxy: `cert_dir` holds one folder per HTTPS listener
    (see `haproxy_certificates`). nftables dsr: `device` is the interface that receives VIP traffic and
    forwards it, `device_mac` its MAC address, `neighbours` the backends' MACs by IP address (the data
    plane knows them at sync time; without them the render holds placeholders). nftables nat:
    `masquerade` rewrites the source of balanced connections to this node's address, for backends that
    do not route replies back through it (the client address is then lost). nftables: `comment` is
    stored in the kernel as the table's comment (the nftables engine keeps a hash of the ruleset there,
    so a restarted data plane can tell that the kernel already holds what it would load).
    """
    reason = unsupported(p, fmt)
    if reason is not None:
        raise ValueError(reason)
    if fmt == "dataplane":
        return dataplane(p)
    if fmt == "ipvs":
        return _template("ipvs.j2").render(header=_header(p), services=ipvs_services(p))
    if fmt == "nftables":
        return nftables(
            p,
            device=device,
            device_mac=device_mac,
            neighbours=neighbours,
            masquerade=masquerade,
            comment=comment,
        )
    return haproxy(p, cert_dir=cert_dir)


def dataplane(p: plan.Plan) -> str:
    """The Plan as JSON with sorted keys: stable, so an unchanged Plan gives an unchanged ConfigMap."""
    return json.dumps(p.model_dump(mode="json"), indent=2, sort_keys=True) + "\n"


@cache
def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader("layerlb", "templates"),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,  # plain-text configurations, not HTML
    )


def _template(name: str) -> jinja2.Template:
    return _environment().get_template(name)


def _header(p: plan.Plan) -> str:
    """The first comment line of every text render: whose configuration this is, and of which generation."""
    return f"layerlb {p.key} generation {p.generation}: {p.mode} {p.architecture}"


# --- shared helpers --------------------------------------------------------------------------------


def serving_backend(p: plan.Plan) -> plan.Backend:
    """The backend of an L4 Plan: L4 has no routes, so everything goes to the default backend."""
    return p.backend(p.default_backend or p.backends[0].name)


@lru_cache(maxsize=65536)
def is_ipv6(address: str) -> bool:
    """Whether an address is IPv6: the family decides brackets, nftables families and match keywords.
    Cached: a Plan of 1,000 listeners x 10 endpoints asks 11,000 times, and parsing is most of the cost."""
    return ipaddress.ip_address(address).version == 6


def host_port(address: str, port: int) -> str:
    """`address:port`, with IPv6 addresses in brackets, as ipvsadm and HAProxy read them."""
    return f"[{address}]:{port}" if is_ipv6(address) else f"{address}:{port}"


def weight_ranges(weights: Sequence[int]) -> list[tuple[int, int] | None]:
    """Consecutive ranges of `0..sum(weights)-1`, one per weight, so that a uniform number picks by weight.

    A weight of 0 gets None (no range: the endpoint takes no new traffic). nftables maps a random, counted
    or hashed number modulo the sum through these ranges to an endpoint.
    """
    ranges: list[tuple[int, int] | None] = []
    start = 0
    for weight in weights:
        if weight <= 0:
            ranges.append(None)
            continue
        ranges.append((start, start + weight - 1))
        start += weight
    return ranges


def nft_range(first: int, last: int) -> str:
    """An nftables map key: `3`, or the interval `0-2`."""
    return str(first) if first == last else f"{first}-{last}"


def _family_problem(p: plan.Plan, backends: Sequence[plan.Backend], fmt: str) -> str | None:
    vip_v6 = is_ipv6(p.vip)
    for backend in backends:
        for endpoint in backend.endpoints:
            if is_ipv6(endpoint.address) != vip_v6:
                index = p.backends.index(backend)
                family, vip_family = ("IPv6", "IPv4") if not vip_v6 else ("IPv4", "IPv6")
                return (
                    f"spec.backends[{index}].endpoints: format {fmt} cannot forward the {vip_family} VIP "
                    f"{p.vip} to the {family} endpoint {endpoint.address}; the kernel does not translate "
                    "between address families"
                )
    return None


def _duplicate_problem(p: plan.Plan, backends: Sequence[plan.Backend], fmt: str) -> str | None:
    """An endpoint listed twice, which `fmt` cannot hold: IPVS refuses a second identical real server,
    HAProxy a second server of the same name. In IPVS a missing port is the listener's, so compare per port.
    """
    ports: list[int | None] = [None] if fmt == "haproxy" else [listener.port for listener in p.listeners]
    for backend in backends:
        for port in ports:
            targets = [(e.address, e.port or port) for e in backend.endpoints]
            repeated = next((target for target in targets if targets.count(target) > 1), None)
            if repeated is not None:
                address, target_port = repeated
                where = address if target_port is None else host_port(address, target_port)
                return (
                    f"spec.backends[{p.backends.index(backend)}].endpoints: format {fmt} cannot list the "
                    f"endpoint {where} twice; merge them into one whose weight is the sum"
                )
    return None


def _kernel_unsupported(
    p: plan.Plan, fmt: str, engine: api.Engine, architectures: Sequence[api.Architecture]
) -> str | None:
    if p.architecture not in architectures:
        names = [str(a) for a in architectures]
        listed = ", ".join(names[:-1]) + f" and {names[-1]}"
        return f"spec.architecture: format {fmt} renders architectures {listed}, not {p.architecture}"
    if p.engine is not engine:
        return f"spec.engine: format {fmt} renders engine {engine}; this LoadBalancer uses {p.engine}"
    backends = [serving_backend(p)]
    duplicates = _duplicate_problem(p, backends, fmt) if engine is api.Engine.ipvs else None
    return _family_problem(p, backends, fmt) or duplicates


# --- ipvs --------------------------------------------------------------------------------------------

IPVS_FORWARDING = {
    api.Architecture.nat: "-m",
    api.Architecture.dsr: "-g",
    api.Architecture.tunnel: "-i",
}


# Scheduler flags so that a weight-0 server's hashed clients move to another server instead of failing.
IPVS_SCHEDULER_FLAGS: dict[str, str] = {"sh": "sh-fallback", "mh": "mh-fallback"}


def ipvs_scheduler(backend: plan.Backend) -> str:
    """The IPVS scheduler that balances a backend the way its algorithm promises, as near as IPVS can.

    | algorithm          | scheduler | why                                                               |
    |--------------------|-----------|-------------------------------------------------------------------|
    | round-robin        | rr / wrr  | rr when every weight above 0 is equal, else weighted round-robin  |
    | least-connections  | wlc       | weighted least-connections                                        |
    | random-two-choices | wlc       | power of two choices approximates least-connections               |
    | source-hash        | sh        | hash of the source address over the weighted servers              |
    | maglev             | mh        | IPVS' Maglev hashing                                              |
    | ring-hash          | mh        | IPVS has no ring; Maglev is its consistent hash (few remaps too)  |

    IPVS skips servers of weight 0 in every scheduler, so they drain; the hashing schedulers need the
    `-b sh-fallback` / `-b mh-fallback` flag for that (`IPVS_SCHEDULER_FLAGS`), or they keep hashing
    clients to the weight-0 server and refuse them (seen in the QEMU guest).
    """
    algorithm = backend.algorithm
    if algorithm is api.Algorithm.round_robin:
        weights = {endpoint.weight for endpoint in backend.endpoints if endpoint.weight > 0}
        return "rr" if len(weights) <= 1 else "wrr"
    if algorithm in (api.Algorithm.least_connections, api.Algorithm.random_two_choices):
        return "wlc"
    if algorithm is api.Algorithm.source_hash:
        return "sh"
    return "mh"


@dataclass(frozen=True)
class IPVSService:
    """What the template needs to write one virtual service and its real servers as ipvsadm-restore lines."""

    comment: str
    service: str
    scheduler: str
    persistence: int | None
    servers: tuple[str, ...]
    flags: str | None = None


def ipvs_services(p: plan.Plan) -> list[IPVSService]:
    """One IPVS virtual service per listener, all forwarding to the serving backend."""
    backend = serving_backend(p)
    method = IPVS_FORWARDING[p.architecture]
    affinity = p.session_affinity
    persistence = affinity.timeout_seconds if affinity.type is api.AffinityType.ClientIP else None
    services = []
    for listener in p.listeners:
        protocol = "-u" if listener.transport == "UDP" else "-t"
        service = f"{protocol} {host_port(p.vip, listener.port)}"
        servers = tuple(
            f"-r {host_port(e.address, e.port or listener.port)} {method} -w {e.weight}"
            for e in backend.endpoints
        )
        comment = (
            f"{p.key} listener {listener.name} ({listener.transport} {listener.port}) "
            f"-> backend {backend.name} ({backend.algorithm})"
        )
        scheduler = ipvs_scheduler(backend)
        services.append(
            IPVSService(
                comment, service, scheduler, persistence, servers, IPVS_SCHEDULER_FLAGS.get(scheduler)
            )
        )
    return services


# --- nftables ----------------------------------------------------------------------------------------


def nft_table_name(p: plan.Plan) -> str:
    """`layerlb_<namespace>_<name>`: one table per LoadBalancer, so re-applying one never touches another.

    Kubernetes names hold no `_`, so the name is unique; dots and dashes are valid in nft names. A name
    beyond nft's limit keeps its start and gains a hash of the whole.
    """
    name = f"layerlb_{p.namespace}_{p.name}"
    if len(name) <= NFT_NAME_MAX:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:12]
    return f"{name[: NFT_NAME_MAX - 13]}_{digest}"


def nft_seed(p: plan.Plan) -> str:
    """A fixed jhash seed: every replica and every re-apply hash a client to the same endpoint."""
    return f"0x{zlib.crc32(p.key.encode()):08x}"


def _nftables_unsupported(p: plan.Plan) -> str | None:
    backend = serving_backend(p)
    if backend.algorithm not in NFTABLES_ALGORITHMS:
        index = p.backends.index(backend)
        return (
            f"spec.backends[{index}].algorithm: format nftables renders round-robin and source-hash, "
            f"not {backend.algorithm}; use engine ipvs"
        )
    if p.session_affinity.type is not api.AffinityType.None_:
        return (
            f"spec.sessionAffinity.type: format nftables cannot keep {p.session_affinity.type} affinity; "
            "use algorithm source-hash or engine ipvs"
        )
    return None


@dataclass(frozen=True)
class NftRule:
    """What the template needs to write one rule under a comment saying which listener it serves."""

    comment: str
    rule: str


def nft_nat_rules(p: plan.Plan) -> list[NftRule]:
    """One DNAT rule per listener, spreading new connections over the endpoints by weight.

    round-robin counts (`numgen inc`), source-hash hashes the client address (`jhash`); conntrack
    carries the rest of each connection, so the map is consulted once per connection. A listener with no
    endpoint of weight above 0 gets no rule: its connections reach this node, where nothing listens.
    """
    backend = serving_backend(p)
    ip = "ip6" if is_ipv6(p.vip) else "ip"
    weights = [endpoint.weight for endpoint in backend.endpoints]
    total = sum(weight for weight in weights if weight > 0)
    if backend.algorithm is api.Algorithm.source_hash:
        selector = f"jhash {ip} saddr mod {total} seed {nft_seed(p)}"
    else:
        selector = f"numgen inc mod {total}"
    rules = []
    for listener in p.listeners:
        comment = (
            f"listener {listener.name} ({listener.transport} {listener.port}) -> backend {backend.name} "
            f"({backend.algorithm})"
        )
        match = f"{ip} daddr {p.vip} {listener.transport.lower()} dport {listener.port}"
        entries = [
            f"{nft_range(*span)} : {e.address} . {e.port or listener.port}"
            for e, span in zip(backend.endpoints, weight_ranges(weights), strict=True)
            if span is not None
        ]
        if not entries:
            rules.append(NftRule(f"{comment}: no endpoint of weight above 0", ""))
            continue
        rules.append(NftRule(comment, f"{match} dnat to {selector} map {{ {', '.join(entries)} }}"))
    return rules


def nft_masquerade_rule(p: plan.Plan) -> str:
    """Masquerade connections this table balanced: backends then reply to this node, not the client."""
    ip = "ip6" if is_ipv6(p.vip) else "ip"
    return f"ct status dnat ct original {ip} daddr {p.vip} masquerade"


def nft_dsr_rules(
    p: plan.Plan, device: str, device_mac: str, neighbours: Mapping[str, str]
) -> tuple[list[NftRule], bool]:
    """One MAC-rewriting rule per listener, and whether a placeholder MAC stands in for unknown ones.

    The hash is per flow (source address and port; source-hash: the address alone), never per packet,
    or a TCP connection would be split across backends. The source MAC becomes this node's, or the
    bridge would learn the client's MAC on this port and the backends' replies would go astray.
    """
    backend = serving_backend(p)
    ip = "ip6" if is_ipv6(p.vip) else "ip"
    weights = [endpoint.weight for endpoint in backend.endpoints]
    total = sum(weight for weight in weights if weight > 0)
    placeholder = device_mac == PLACEHOLDER_MAC
    rules = []
    for listener in p.listeners:
        transport = listener.transport.lower()
        key = (
            f"{ip} saddr"
            if backend.algorithm is api.Algorithm.source_hash
            else f"{ip} saddr . {transport} sport"
        )
        comment = (
            f"listener {listener.name} ({listener.transport} {listener.port}) -> backend {backend.name} "
            f"({backend.algorithm})"
        )
        entries = []
        for endpoint, span in zip(backend.endpoints, weight_ranges(weights), strict=True):
            if span is None:
                continue
            mac = neighbours.get(endpoint.address, PLACEHOLDER_MAC)
            placeholder = placeholder or mac == PLACEHOLDER_MAC
            entries.append(f"{nft_range(*span)} : {mac}")
        if not entries:
            rules.append(NftRule(f"{comment}: no endpoint of weight above 0", ""))
            continue
        rule = (
            f"{ip} daddr {p.vip} {transport} dport {listener.port} ether saddr set {device_mac} "
            f"ether daddr set jhash {key} mod {total} seed {nft_seed(p)} map {{ {', '.join(entries)} }} "
            f'fwd to "{device}"'
        )
        rules.append(NftRule(comment, rule))
    return rules, placeholder


def _mac(value: str, what: str) -> str:
    mac = value.strip().lower()
    if not MAC.match(mac):
        raise ValueError(f"{what} {value!r} is not a MAC address such as 02:00:00:00:00:01")
    return mac


def _neighbours(neighbours: Mapping[str, str] | None) -> dict[str, str]:
    return {
        str(ipaddress.ip_address(address)): _mac(mac, f"the MAC of {address}")
        for address, mac in (neighbours or {}).items()
    }


def nftables(
    p: plan.Plan,
    *,
    device: str = DEFAULT_DEVICE,
    device_mac: str | None = None,
    neighbours: Mapping[str, str] | None = None,
    masquerade: bool = False,
    comment: str | None = None,
) -> str:
    """The `nft -f` ruleset of a nat or dsr Plan: one table, replaced in one transaction."""
    table = nft_table_name(p)
    if comment is not None and not NFT_COMMENT.match(comment):
        raise ValueError(f"table comment {comment!r} must be 1-128 printable characters without quotes")
    if p.architecture is api.Architecture.nat:
        return _template("nftables.j2").render(
            header=_header(p),
            family="ip6" if is_ipv6(p.vip) else "ip",
            table=table,
            nat=True,
            rules=nft_nat_rules(p),
            masquerade=masquerade,
            masquerade_rule=nft_masquerade_rule(p),
            comment=comment,
        )
    if not INTERFACE_NAME.match(device):
        raise ValueError(f"device {device!r} is not an interface name")
    rules, placeholder = nft_dsr_rules(
        p, device, _mac(device_mac, "device_mac") if device_mac else PLACEHOLDER_MAC, _neighbours(neighbours)
    )
    return _template("nftables.j2").render(
        header=_header(p),
        family="netdev",
        table=table,
        nat=False,
        device=device,
        rules=rules,
        placeholder=placeholder,
        comment=comment,
    )


# --- haproxy -----------------------------------------------------------------------------------------


def _haproxy_unsupported(p: plan.Plan) -> str | None:
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
    return _duplicate_problem(p, p.backends, "haproxy")


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
        bind = host_port(p.vip, listener.port)
        if https:
            bind += f" ssl crt {cert_dir.rstrip('/')}/{listener.name}/"
        lines: list[str] = []
        if listener.max_connections is not None:
            lines.append(f"maxconn {listener.max_connections}")
        if listener.accept_proxy_protocol is not None:
            networks = " ".join(listener.accept_proxy_protocol.trusted_cidrs)
            lines.append(f"tcp-request connection expect-proxy layer4 if {{ src {networks} }}")
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
        address = endpoint.address if endpoint.port is None else host_port(endpoint.address, endpoint.port)
        if endpoint.port is None and is_ipv6(endpoint.address):
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
            words.append(f"source {'[::]' if is_ipv6(endpoint.address) else '0.0.0.0'} usesrc clientip")
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
            table = "ipv6" if is_ipv6(p.vip) else "ip"
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
    return _template("haproxy.j2").render(
        header=_header(p),
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
