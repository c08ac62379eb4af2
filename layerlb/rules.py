"""The validation rules that relate fields, each written once in CEL (for the API server) and once in Python.

Each `Rule` sits at a `scope` in the resource (a path; `[*]` means every item of a list), fails with the
same message in both languages, and reports at `scope + field`. The CRD generator copies the CEL into
`x-kubernetes-validations`; `layerlb.validation` runs the Python. A test applies every invalid example to
a real API server and compares its messages with ours, so the two halves cannot drift apart.

The API server cannot name a list index in a rule's field path, so rules that look across list items
sit on the list or on `spec` and name the offending item in their message.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from layerlb.api import (
    ARCHITECTURES,
    MAX_ASN,
    PROTOCOLS,
    WELL_KNOWN_COMMUNITIES,
    Announce,
    Architecture,
    Backend,
    BGPPeerSpec,
    Endpoint,
    HashOn,
    HealthCheck,
    LabelSelectorRequirement,
    Listener,
    LoadBalancerSpec,
    Mode,
    Protocol,
    RouteMatch,
    address_block,
)


@dataclass(frozen=True)
class Rule:
    """A cross-field rule: where it applies, its CEL, its CEL message, and the same check in Python."""

    kind: str
    scope: str
    field: str
    cel: str
    message: str  # a CEL messageExpression
    check: Callable[[Any], str | None]


def _join(values: Iterable[object]) -> str:
    return ", ".join(str(value) for value in values)


def _list(values: Iterable[object]) -> str:
    """A list as CEL's `'%s'.format([list])` prints it, so both halves give one message."""
    return "[" + ", ".join(f'"{value}"' for value in values) + "]"


def _first_repeated(values: list[Any]) -> Any | None:
    return next((value for value in values if values.count(value) > 1), None)


def _in_cel(values: Iterable[str]) -> str:
    return "[" + ", ".join(f"'{value}'" for value in values) + "]"


L4_ARCHS = _in_cel(ARCHITECTURES[Mode.L4])
L7_ARCHS = _in_cel(ARCHITECTURES[Mode.L7])
L4_PROTOCOLS = _in_cel(PROTOCOLS[Mode.L4])
L7_PROTOCOLS = _in_cel(PROTOCOLS[Mode.L7])
KERNEL = "['nat', 'dsr', 'tunnel']"
PROXIES = "['proxy', 'transparent']"
NFT_ALGORITHMS = ("round-robin", "source-hash")


def _is_kernel(spec: LoadBalancerSpec) -> bool:
    return spec.mode is Mode.L4 and spec.architecture in ("nat", "dsr", "tunnel")


def _is_proxy(spec: LoadBalancerSpec) -> bool:
    return spec.architecture in ("proxy", "transparent")


# --- spec -------------------------------------------------------------------------------------------


def _architecture(spec: LoadBalancerSpec) -> str | None:
    valid = ARCHITECTURES[spec.mode]
    if spec.architecture in valid:
        return None
    return f"architecture {spec.architecture} is not available in mode {spec.mode}; valid: {_join(valid)}"


def _engine_applies(spec: LoadBalancerSpec) -> str | None:
    if spec.engine is None or _is_kernel(spec):
        return None
    return f"engine applies only to L4 nat, dsr and tunnel, not to {spec.mode} {spec.architecture}; remove it"


def _engine_can(spec: LoadBalancerSpec) -> str | None:
    if spec.engine == "nftables" and spec.architecture is Architecture.tunnel:
        return "engine nftables cannot do architecture tunnel (IP-in-IP); use engine ipvs, or architecture nat or dsr"
    return None


def _listener_protocols(spec: LoadBalancerSpec) -> str | None:
    valid = PROTOCOLS[spec.mode]
    bad = [listener.name for listener in spec.listeners if listener.protocol not in valid]
    if not bad:
        return None
    return f"listener protocol not available in mode {spec.mode} (valid: {_join(valid)}): {_list(bad)}"


def _routes_l7(spec: LoadBalancerSpec) -> str | None:
    if spec.routes is None or spec.mode is Mode.L7:
        return None
    return "routes apply only to mode L7; an L4 LoadBalancer sends everything to its one backend or defaultBackend"


def _route_backends(spec: LoadBalancerSpec) -> str | None:
    names = [backend.name for backend in spec.backends]
    missing = [route.backend for route in spec.routes or [] if route.backend not in names]
    if not missing:
        return None
    return f"route backend {missing[0]} is not declared in backends; declared: {_list(names)}"


def _default_backend(spec: LoadBalancerSpec) -> str | None:
    names = [backend.name for backend in spec.backends]
    if spec.defaultBackend is None or spec.defaultBackend in names:
        return None
    return f"defaultBackend {spec.defaultBackend} is not declared in backends; declared: {_list(names)}"


def _l4_backend(spec: LoadBalancerSpec) -> str | None:
    if spec.mode is not Mode.L4 or len(spec.backends) == 1 or spec.defaultBackend is not None:
        return None
    names = [backend.name for backend in spec.backends]
    return f"mode L4 with several backends needs defaultBackend to name the one that serves; declared: {_list(names)}"


def _l7_target(spec: LoadBalancerSpec) -> str | None:
    if spec.mode is not Mode.L7 or spec.defaultBackend is not None or spec.routes:
        return None
    return "mode L7 needs routes or a defaultBackend; without either every request would get 404"


def _cookie_affinity(spec: LoadBalancerSpec) -> str | None:
    affinity = spec.sessionAffinity
    if affinity is None or affinity.type != "Cookie" or spec.mode is Mode.L7:
        return None
    return "sessionAffinity Cookie needs mode L7; use ClientIP in mode L4"


def _proxy_protocol_backends(spec: LoadBalancerSpec) -> str | None:
    bad = [backend.name for backend in spec.backends if backend.proxyProtocol is not None]
    if not bad or _is_proxy(spec):
        return None
    return f"proxyProtocol needs architecture proxy or transparent (the kernel cannot write the header): {_list(bad)}"


def _proxy_listeners(spec: LoadBalancerSpec) -> str | None:
    bad = [
        listener.name
        for listener in spec.listeners
        if listener.acceptProxyProtocol is not None
        or listener.maxConnections is not None
        or listener.maxConnectionsPerClient is not None
    ]
    if not bad or _is_proxy(spec):
        return None
    return (
        "acceptProxyProtocol, maxConnections and maxConnectionsPerClient need architecture proxy or "
        f"transparent: {_list(bad)}"
    )


def _proxy_settings(spec: LoadBalancerSpec) -> str | None:
    if spec.timeouts is None or _is_proxy(spec):
        return None
    return f"timeouts apply only to architectures proxy and transparent, not to {spec.architecture}"


def _limits_l7(spec: LoadBalancerSpec) -> str | None:
    if spec.limits is None or spec.mode is Mode.L7:
        return None
    return "limits apply only to mode L7 (they bound the HTTP request parser)"


def _fixed_ports(spec: LoadBalancerSpec) -> str | None:
    if spec.architecture not in ("dsr", "tunnel"):
        return None
    bad = [b.name for b in spec.backends if any(e.port is not None for e in b.endpoints or [])]
    if not bad:
        return None
    return (
        f"{spec.architecture} cannot change the destination port, endpoints take the listener port; "
        f"remove port from the endpoints of: {_list(bad)}"
    )


def _hash_keys(spec: LoadBalancerSpec) -> str | None:
    if spec.mode is Mode.L7:
        return None
    bad = [b.name for b in spec.backends if b.hashOn is not None and b.hashOn.type != "SourceIP"]
    if not bad:
        return None
    return f"hashOn Header and Cookie need mode L7; mode L4 hashes on SourceIP: {_list(bad)}"


def _nftables_algorithms(spec: LoadBalancerSpec) -> str | None:
    if spec.engine != "nftables":
        return None
    bad = [b.name for b in spec.backends if b.algorithm not in NFT_ALGORITHMS]
    if not bad:
        return None
    return (
        f"engine nftables can do algorithm round-robin or source-hash only; use engine ipvs for: {_list(bad)}"
    )


def _nftables_affinity(spec: LoadBalancerSpec) -> str | None:
    affinity = spec.sessionAffinity
    if spec.engine != "nftables" or affinity is None or affinity.type != "ClientIP":
        return None
    return "engine nftables cannot do sessionAffinity ClientIP; use algorithm source-hash or engine ipvs"


# --- lists and items ----------------------------------------------------------------------------------


def _listener_names(listeners: list[Listener]) -> str | None:
    repeated = _first_repeated([listener.name for listener in listeners])
    return None if repeated is None else f"listener names must be unique; repeated: {repeated}"


def _listener_ports(listeners: list[Listener]) -> str | None:
    keys = [(listener.port, listener.protocol == Protocol.UDP) for listener in listeners]
    repeated = _first_repeated(keys)
    if repeated is None:
        return None
    return f"listener ports must be unique per transport (TCP or UDP); repeated: {repeated[0]}"


def _listener_tls(listener: Listener) -> str | None:
    if listener.protocol is Protocol.HTTPS:
        return None if listener.tls is not None else "protocol HTTPS requires tls.secretName"
    return None if listener.tls is None else f"tls applies only to protocol HTTPS, not {listener.protocol}"


def _backend_names(backends: list[Backend]) -> str | None:
    repeated = _first_repeated([backend.name for backend in backends])
    return None if repeated is None else f"backend names must be unique; repeated: {repeated}"


def _backend_source(backend: Backend) -> str | None:
    if (backend.service is None) != (backend.endpoints is None):
        return None
    return "exactly one of service or endpoints is required"


def _hash_on_algorithm(backend: Backend) -> str | None:
    if backend.hashOn is None or backend.algorithm in ("source-hash", "ring-hash", "maglev"):
        return None
    return f"hashOn needs algorithm source-hash, ring-hash or maglev, not {backend.algorithm}"


def _hash_on_name(hash_on: HashOn) -> str | None:
    if hash_on.type == "SourceIP":
        return None if hash_on.name is None else "name applies only to types Header and Cookie"
    return None if hash_on.name is not None else f"type {hash_on.type} requires name"


def _health_timeout(check: HealthCheck) -> str | None:
    if check.timeoutSeconds < check.intervalSeconds:
        return None
    return f"timeoutSeconds ({check.timeoutSeconds}) must be below intervalSeconds ({check.intervalSeconds})"


def _health_path(check: HealthCheck) -> str | None:
    return None if check.protocol == "HTTP" or check.path == "/" else "path applies only to protocol HTTP"


def _match_path(match: RouteMatch) -> str | None:
    if match.path is not None and match.pathPrefix is not None:
        return "path and pathPrefix exclude each other; give one"
    return None


def is_ip(value: str) -> bool:
    """An IP address as CEL's `isIP` sees it: no zone, no IPv4-mapped IPv6 form."""
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        return False
    return not (isinstance(address, ipaddress.IPv6Address) and (address.ipv4_mapped or address.scope_id))


def _ip(value: str) -> str | None:
    return None if is_ip(value) else f"'{value}' is not an IPv4 or IPv6 address"


def _cidr(value: str) -> str | None:
    address, _, prefix = value.partition("/")
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        prefix = ""
    if is_ip(address) and prefix.isdigit():
        return None
    return f"'{value}' is not a CIDR such as 10.0.0.0/8"


def _pool_block(value: str) -> str | None:
    try:
        address_block(value)
    except ValueError as error:
        if "ends before it starts" in str(error):
            return None  # `_pool_order` says so; the API server cannot order addresses
        return f"'{value}' is not a CIDR (192.0.2.0/28) or a range (192.0.2.10-192.0.2.20)"
    return None


def _pool_order(value: str) -> str | None:
    try:
        address_block(value)
    except ValueError as error:
        return str(error) if "ends before it starts" in str(error) else None
    return None


def _selector_values(requirement: LabelSelectorRequirement) -> str | None:
    if requirement.operator in ("In", "NotIn"):
        if requirement.values:
            return None
        return f"operator {requirement.operator} needs at least one value"
    if not requirement.values:
        return None
    return f"operator {requirement.operator} takes no values; remove them"


def _interface_names(interfaces: list[str]) -> str | None:
    repeated = _first_repeated(interfaces)
    return None if repeated is None else f"interface names must be unique; repeated: {repeated}"


def _endpoint_ip(endpoint: Endpoint) -> str | None:
    return _ip(endpoint.address)


def _announce_l2(announce: Announce) -> str | None:
    if announce.l2 or (not announce.interfaces and announce.nodeSelector is None):
        return None
    return "interfaces and nodeSelector choose where ARP/NDP is answered; with l2 false remove them, or set l2 true"


# --- BGP -----------------------------------------------------------------------------------------------


def _hold_time(hold: int) -> str | None:
    if hold == 0 or hold >= 3:
        return None
    return f"holdTime must be 0 (no keepalives) or 3-65535 seconds, not {hold}"


def _keepalive(spec: BGPPeerSpec) -> str | None:
    keepalive = spec.keepaliveTime
    if keepalive is None:
        return None
    if spec.holdTime == 0 and keepalive != 0:
        return f"keepaliveTime must be 0 when holdTime is 0 (no keepalives), not {keepalive}"
    if spec.holdTime == 0:
        return None
    if keepalive == 0:
        return "keepaliveTime 0 (no keepalives) needs holdTime 0"
    if keepalive < spec.holdTime:
        return None
    return f"keepaliveTime ({keepalive}) must be below holdTime ({spec.holdTime})"


def _multihop(spec: BGPPeerSpec) -> str | None:
    if not spec.ebgpMultiHop or spec.localASN != spec.peerASN:
        return None
    return f"ebgpMultiHop applies only to eBGP (localASN other than peerASN); both are {spec.localASN}"


def _source_family(spec: BGPPeerSpec) -> str | None:
    source = spec.sourceAddress
    if source is None or not is_ip(source) or not is_ip(spec.peerAddress):
        return None
    if ipaddress.ip_address(source).version == ipaddress.ip_address(spec.peerAddress).version:
        return None
    return (
        f"sourceAddress {source} and peerAddress {spec.peerAddress} are of different families; "
        "a session runs over IPv4 or IPv6"
    )


def _router_id(value: str) -> str | None:
    if is_ip(value) and ipaddress.ip_address(value).version == 4 and value != "0.0.0.0":
        return None
    return f"'{value}' is not a router ID: a non-zero IPv4 address"


def _numbers(value: str, count: int, maximum: int) -> bool:
    """`value` is `count` decimal numbers joined by ':', each at most `maximum` (as the CEL half checks it)."""
    digits = len(str(maximum))
    pattern = ":".join([f"[0-9]{{1,{digits}}}"] * count)
    return re.fullmatch(pattern, value) is not None and all(int(part) <= maximum for part in value.split(":"))


def _community(value: str) -> str | None:
    if value in WELL_KNOWN_COMMUNITIES or _numbers(value, 2, 65535):
        return None
    well_known = _join(WELL_KNOWN_COMMUNITIES)
    return f"'{value}' is not a community: ASN:VALUE with each part 0-65535, or {well_known}"


def _large_community(value: str) -> str | None:
    if _numbers(value, 3, MAX_ASN):
        return None
    return f"'{value}' is not a large community: ASN:VALUE:VALUE with each part 0-{MAX_ASN}"


def _unique(what: str) -> Callable[[list[str]], str | None]:
    """The check that a list of strings has no repeats, saying `what` they are."""

    def unique(values: list[str]) -> str | None:
        repeated = _first_repeated(values)
        return None if repeated is None else f"{what} must be unique; repeated: {repeated}"

    unique.__name__ = f"_unique({what})"
    return unique


def _unique_cel(what: str) -> tuple[str, str]:
    """The CEL rule and message of `_unique(what)`."""
    return (
        "self.all(i, self.exists_one(j, j == i))",
        f"'{what} must be unique; repeated: %s'.format([self.filter(i, !self.exists_one(j, j == i))[0]])",
    )


LB = "LoadBalancer"
PEER = "BGPPeer"
ADVERTISEMENT = "BGPAdvertisement"
IS_IP = "'\\'%s\\' is not an IPv4 or IPv6 address'.format([self])"
SELECTOR_VALUES = (
    "self.operator in ['In', 'NotIn'] ? (has(self.values) && self.values.size() > 0) : "
    "(!has(self.values) || self.values.size() == 0)",
    "self.operator in ['In', 'NotIn'] ? 'operator %s needs at least one value'.format([self.operator]) : "
    "'operator %s takes no values; remove them'.format([self.operator])",
)
NAMES = "self.backends.map(b, b.name)"
PROTOCOL_OK = f"l.protocol in (self.mode == 'L4' ? {L4_PROTOCOLS} : {L7_PROTOCOLS})"
UNIQUE_NAME = "self.exists_one(m, m.name == l.name)"
UNIQUE_PORT = "self.exists_one(m, m.port == l.port && (m.protocol == 'UDP') == (l.protocol == 'UDP'))"

# Messages use `format`, never `+ string()` or `join()`: the API server's cost estimator refuses those
# (their results have no size bound), and `%s` of a list prints `[a, b]`, as `_list` does in Python.
# fmt: off
RULES: tuple[Rule, ...] = (
    Rule(LB, "spec", ".architecture",
         f"self.mode == 'L4' ? self.architecture in {L4_ARCHS} : self.architecture in {L7_ARCHS}",
         "'architecture %s is not available in mode %s; valid: %s'.format([self.architecture, self.mode, "
         "self.mode == 'L4' ? 'nat, dsr, tunnel, proxy' : 'proxy, transparent'])",
         _architecture),
    Rule(LB, "spec", ".engine",
         f"!has(self.engine) || (self.mode == 'L4' && self.architecture in {KERNEL})",
         "'engine applies only to L4 nat, dsr and tunnel, not to %s %s; remove it'.format([self.mode, self.architecture])",
         _engine_applies),
    Rule(LB, "spec", ".engine",
         "!has(self.engine) || self.engine != 'nftables' || self.architecture != 'tunnel'",
         "'engine nftables cannot do architecture tunnel (IP-in-IP); use engine ipvs, or architecture nat or dsr'",
         _engine_can),
    Rule(LB, "spec", ".listeners",
         f"self.listeners.all(l, {PROTOCOL_OK})",
         "'listener protocol not available in mode %s (valid: %s): %s'.format([self.mode, "
         "self.mode == 'L4' ? 'TCP, UDP' : 'HTTP, HTTPS', "
         f"self.listeners.filter(l, !({PROTOCOL_OK})).map(l, l.name)])",
         _listener_protocols),
    Rule(LB, "spec", ".routes",
         "!has(self.routes) || self.mode == 'L7'",
         "'routes apply only to mode L7; an L4 LoadBalancer sends everything to its one backend or defaultBackend'",
         _routes_l7),
    Rule(LB, "spec", ".routes",
         "!has(self.routes) || self.routes.all(r, self.backends.exists(b, b.name == r.backend))",
         "'route backend %s is not declared in backends; declared: %s'.format(["
         f"self.routes.filter(r, !self.backends.exists(b, b.name == r.backend))[0].backend, {NAMES}])",
         _route_backends),
    Rule(LB, "spec", ".defaultBackend",
         "!has(self.defaultBackend) || self.backends.exists(b, b.name == self.defaultBackend)",
         f"'defaultBackend %s is not declared in backends; declared: %s'.format([self.defaultBackend, {NAMES}])",
         _default_backend),
    Rule(LB, "spec", ".defaultBackend",
         "self.mode != 'L4' || self.backends.size() == 1 || has(self.defaultBackend)",
         f"'mode L4 with several backends needs defaultBackend to name the one that serves; declared: %s'.format([{NAMES}])",
         _l4_backend),
    Rule(LB, "spec", ".defaultBackend",
         "self.mode != 'L7' || has(self.defaultBackend) || (has(self.routes) && self.routes.size() > 0)",
         "'mode L7 needs routes or a defaultBackend; without either every request would get 404'",
         _l7_target),
    Rule(LB, "spec", ".sessionAffinity",
         "!has(self.sessionAffinity) || self.sessionAffinity.type != 'Cookie' || self.mode == 'L7'",
         "'sessionAffinity Cookie needs mode L7; use ClientIP in mode L4'",
         _cookie_affinity),
    Rule(LB, "spec", ".backends",
         f"self.architecture in {PROXIES} || self.backends.all(b, !has(b.proxyProtocol))",
         "'proxyProtocol needs architecture proxy or transparent (the kernel cannot write the header): %s'"
         ".format([self.backends.filter(b, has(b.proxyProtocol)).map(b, b.name)])",
         _proxy_protocol_backends),
    Rule(LB, "spec", ".listeners",
         f"self.architecture in {PROXIES} || self.listeners.all(l, !has(l.acceptProxyProtocol) && "
         "!has(l.maxConnections) && !has(l.maxConnectionsPerClient))",
         "'acceptProxyProtocol, maxConnections and maxConnectionsPerClient need architecture proxy or "
         "transparent: %s'.format([self.listeners.filter(l, has(l.acceptProxyProtocol) || "
         "has(l.maxConnections) || has(l.maxConnectionsPerClient)).map(l, l.name)])",
         _proxy_listeners),
    Rule(LB, "spec", ".timeouts",
         f"!has(self.timeouts) || self.architecture in {PROXIES}",
         "'timeouts apply only to architectures proxy and transparent, not to %s'.format([self.architecture])",
         _proxy_settings),
    Rule(LB, "spec", ".limits",
         "!has(self.limits) || self.mode == 'L7'",
         "'limits apply only to mode L7 (they bound the HTTP request parser)'",
         _limits_l7),
    Rule(LB, "spec", ".backends",
         "!(self.architecture in ['dsr', 'tunnel']) || "
         "self.backends.all(b, !has(b.endpoints) || b.endpoints.all(e, !has(e.port)))",
         "'%s cannot change the destination port, endpoints take the listener port; remove port from the endpoints "
         "of: %s'.format([self.architecture, self.backends.filter(b, has(b.endpoints) && "
         "b.endpoints.exists(e, has(e.port))).map(b, b.name)])",
         _fixed_ports),
    Rule(LB, "spec", ".backends",
         "self.mode == 'L7' || self.backends.all(b, !has(b.hashOn) || b.hashOn.type == 'SourceIP')",
         "'hashOn Header and Cookie need mode L7; mode L4 hashes on SourceIP: %s'.format(["
         "self.backends.filter(b, has(b.hashOn) && b.hashOn.type != 'SourceIP').map(b, b.name)])",
         _hash_keys),
    Rule(LB, "spec", ".backends",
         "!has(self.engine) || self.engine != 'nftables' || "
         f"self.backends.all(b, b.algorithm in {_in_cel(NFT_ALGORITHMS)})",
         "'engine nftables can do algorithm round-robin or source-hash only; use engine ipvs for: %s'.format(["
         f"self.backends.filter(b, !(b.algorithm in {_in_cel(NFT_ALGORITHMS)})).map(b, b.name)])",
         _nftables_algorithms),
    Rule(LB, "spec", ".sessionAffinity",
         "!has(self.engine) || self.engine != 'nftables' || !has(self.sessionAffinity) || "
         "self.sessionAffinity.type != 'ClientIP'",
         "'engine nftables cannot do sessionAffinity ClientIP; use algorithm source-hash or engine ipvs'",
         _nftables_affinity),
    Rule(LB, "spec.vip", "",
         "isIP(self)",
         "'\\'%s\\' is not an IPv4 or IPv6 address'.format([self])",
         _ip),
    Rule(LB, "spec.listeners", "",
         f"self.all(l, {UNIQUE_NAME})",
         f"'listener names must be unique; repeated: %s'.format([self.filter(l, !{UNIQUE_NAME})[0].name])",
         _listener_names),
    Rule(LB, "spec.listeners", "",
         f"self.all(l, {UNIQUE_PORT})",
         "'listener ports must be unique per transport (TCP or UDP); repeated: %d'.format(["
         f"self.filter(l, !{UNIQUE_PORT})[0].port])",
         _listener_ports),
    Rule(LB, "spec.listeners[*]", ".tls",
         "self.protocol == 'HTTPS' ? has(self.tls) : !has(self.tls)",
         "self.protocol == 'HTTPS' ? 'protocol HTTPS requires tls.secretName' : "
         "'tls applies only to protocol HTTPS, not %s'.format([self.protocol])",
         _listener_tls),
    Rule(LB, "spec.listeners[*].acceptProxyProtocol.trustedCIDRs[*]", "",
         "isCIDR(self)",
         "'\\'%s\\' is not a CIDR such as 10.0.0.0/8'.format([self])",
         _cidr),
    Rule(LB, "spec.backends", "",
         "self.all(b, self.exists_one(c, c.name == b.name))",
         "'backend names must be unique; repeated: %s'.format(["
         "self.filter(b, !self.exists_one(c, c.name == b.name))[0].name])",
         _backend_names),
    Rule(LB, "spec.backends[*]", "",
         "has(self.service) != has(self.endpoints)",
         "'exactly one of service or endpoints is required'",
         _backend_source),
    Rule(LB, "spec.backends[*]", ".hashOn",
         "!has(self.hashOn) || self.algorithm in ['source-hash', 'ring-hash', 'maglev']",
         "'hashOn needs algorithm source-hash, ring-hash or maglev, not %s'.format([self.algorithm])",
         _hash_on_algorithm),
    Rule(LB, "spec.backends[*].hashOn", ".name",
         "self.type == 'SourceIP' ? !has(self.name) : has(self.name)",
         "self.type == 'SourceIP' ? 'name applies only to types Header and Cookie' : "
         "'type %s requires name'.format([self.type])",
         _hash_on_name),
    Rule(LB, "spec.backends[*].endpoints[*]", ".address",
         "isIP(self.address)",
         "'\\'%s\\' is not an IPv4 or IPv6 address'.format([self.address])",
         _endpoint_ip),
    Rule(LB, "spec.backends[*].healthCheck", ".timeoutSeconds",
         "self.timeoutSeconds < self.intervalSeconds",
         "'timeoutSeconds (%d) must be below intervalSeconds (%d)'.format([self.timeoutSeconds, self.intervalSeconds])",
         _health_timeout),
    Rule(LB, "spec.backends[*].healthCheck", ".path",
         "self.protocol == 'HTTP' || self.path == '/'",
         "'path applies only to protocol HTTP'",
         _health_path),
    Rule(LB, "spec.routes[*].match", "",
         "!(has(self.path) && has(self.pathPrefix))",
         "'path and pathPrefix exclude each other; give one'",
         _match_path),
    Rule("VIPPool", "spec.addresses[*]", "",
         "isCIDR(self) || (self.split('-').size() == 2 && isIP(self.split('-')[0]) && isIP(self.split('-')[1]) "
         "&& ip(self.split('-')[0]).family() == ip(self.split('-')[1]).family())",
         "'\\'%s\\' is not a CIDR (192.0.2.0/28) or a range (192.0.2.10-192.0.2.20)'.format([self])",
         _pool_block),
    # Python only (empty CEL): CEL's IP library cannot compare addresses, so the operator reports it.
    Rule("VIPPool", "spec.addresses[*]", "", "", "", _pool_order),
    Rule("VIPPool", "spec.announce.interfaces", "",
         "self.all(i, self.exists_one(j, j == i))",
         "'interface names must be unique; repeated: %s'.format([self.filter(i, !self.exists_one(j, j == i))[0]])",
         _interface_names),
    Rule("VIPPool", "spec.announce.nodeSelector.matchExpressions[*]", ".values", *SELECTOR_VALUES, _selector_values),
    Rule("VIPPool", "spec.announce", "",
         "self.l2 || ((!has(self.interfaces) || self.interfaces.size() == 0) && !has(self.nodeSelector))",
         "'interfaces and nodeSelector choose where ARP/NDP is answered; with l2 false remove them, or set l2 true'",
         _announce_l2),
    Rule(PEER, "spec.peerAddress", "", "isIP(self)", IS_IP, _ip),
    Rule(PEER, "spec.sourceAddress", "", "isIP(self)", IS_IP, _ip),
    Rule(PEER, "spec", ".sourceAddress",
         "!has(self.sourceAddress) || !isIP(self.sourceAddress) || !isIP(self.peerAddress) || "
         "ip(self.sourceAddress).family() == ip(self.peerAddress).family()",
         "'sourceAddress %s and peerAddress %s are of different families; a session runs over IPv4 or IPv6'"
         ".format([self.sourceAddress, self.peerAddress])",
         _source_family),
    Rule(PEER, "spec.routerID", "",
         "isIP(self) && ip(self).family() == 4 && self != '0.0.0.0'",
         "'\\'%s\\' is not a router ID: a non-zero IPv4 address'.format([self])",
         _router_id),
    Rule(PEER, "spec.holdTime", "",
         "self == 0 || self >= 3",
         "'holdTime must be 0 (no keepalives) or 3-65535 seconds, not %d'.format([self])",
         _hold_time),
    Rule(PEER, "spec", ".keepaliveTime",
         "!has(self.keepaliveTime) || (self.holdTime == 0 ? self.keepaliveTime == 0 : "
         "(self.keepaliveTime > 0 && self.keepaliveTime < self.holdTime))",
         "self.holdTime == 0 ? "
         "'keepaliveTime must be 0 when holdTime is 0 (no keepalives), not %d'.format([self.keepaliveTime]) : "
         "(self.keepaliveTime == 0 ? 'keepaliveTime 0 (no keepalives) needs holdTime 0' : "
         "'keepaliveTime (%d) must be below holdTime (%d)'.format([self.keepaliveTime, self.holdTime]))",
         _keepalive),
    Rule(PEER, "spec", ".ebgpMultiHop",
         "!self.ebgpMultiHop || self.localASN != self.peerASN",
         "'ebgpMultiHop applies only to eBGP (localASN other than peerASN); both are %d'.format([self.localASN])",
         _multihop),
    Rule(PEER, "spec.nodeSelector.matchExpressions[*]", ".values", *SELECTOR_VALUES, _selector_values),
    Rule(ADVERTISEMENT, "spec.vipPools", "", *_unique_cel("VIPPool names"), _unique("VIPPool names")),
    Rule(ADVERTISEMENT, "spec.peers", "", *_unique_cel("BGPPeer names"), _unique("BGPPeer names")),
    Rule(ADVERTISEMENT, "spec.nodeSelector.matchExpressions[*]", ".values", *SELECTOR_VALUES, _selector_values),
    Rule(ADVERTISEMENT, "spec.communities[*]", "",
         f"self in {_in_cel(WELL_KNOWN_COMMUNITIES)} || "
         "(self.matches('^[0-9]{1,5}:[0-9]{1,5}$') && self.split(':').all(p, int(p) <= 65535))",
         "'\\'%s\\' is not a community: ASN:VALUE with each part 0-65535, or "
         f"{_join(WELL_KNOWN_COMMUNITIES)}'.format([self])",
         _community),
    Rule(ADVERTISEMENT, "spec.communities", "", *_unique_cel("communities"), _unique("communities")),
    Rule(ADVERTISEMENT, "spec.largeCommunities[*]", "",
         f"self.matches('^[0-9]{{1,10}}:[0-9]{{1,10}}:[0-9]{{1,10}}$') && self.split(':').all(p, int(p) <= {MAX_ASN})",
         f"'\\'%s\\' is not a large community: ASN:VALUE:VALUE with each part 0-{MAX_ASN}'.format([self])",
         _large_community),
    Rule(ADVERTISEMENT, "spec.largeCommunities", "", *_unique_cel("large communities"), _unique("large communities")),
)
# fmt: on


def rules_for(kind: str) -> list[Rule]:
    """The rules of one kind, in the order they are reported."""
    return [rule for rule in RULES if rule.kind == kind]
