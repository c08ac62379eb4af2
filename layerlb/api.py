"""The user-facing API: pydantic models of layerlb's resources (`layerlb.dev/v1alpha1`).

The kinds: `LoadBalancer` (namespaced), `VIPPool`, and for BGP `BGPPeer` and `BGPAdvertisement`.

These models are the single source of the CRD schemas (see `layerlb.crd`) and of per-field validation.
Rules that relate several fields live in `layerlb.rules`, once in Python and once in CEL, so that the
CLI, the operator and the API server refuse a bad resource with the same message.
"""

from __future__ import annotations

import ipaddress
import re
from enum import StrEnum
from typing import Annotated, Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field

GROUP = "layerlb.dev"
VERSION = "v1alpha1"
API_VERSION: Final = "layerlb.dev/v1alpha1"

# A DNS-1123 label: what Kubernetes accepts as the name of a port, a Service, a listener.
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
# A DNS-1123 subdomain: the name of a Secret.
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
# A host name to route on, optionally a leading wildcard label and a port.
HOST = r"^(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*(:[0-9]{1,5})?$"
# An HTTP header field name (RFC 9110 token).
HEADER_NAME = r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$"
# An HTTP path: starts with a slash, no whitespace, no query or fragment.
HTTP_PATH = r"^/[^\s?#]*$"
# A Linux network interface name: at most 15 bytes (IFNAMSIZ), no '/', ':' or whitespace; ASCII here.
INTERFACE_NAME = r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,14}$"
# A Kubernetes label key: an optional DNS-subdomain prefix and '/', then a name of at most 63 characters.
LABEL_KEY = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
)
# A Kubernetes label value: empty, or at most 63 characters alphanumeric at both ends.
LABEL_VALUE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"

# Bounds shared with the CRD: CEL's cost estimator needs every list and string bounded.
MAX_LISTENERS = 64
MAX_BACKENDS = 64
MAX_ENDPOINTS = 1024
MAX_ROUTES = 256
MAX_NAME = 63
MAX_WEIGHT = 256  # HAProxy's bound, tighter than IPVS' 65535, so every render of a Plan is valid.
# A client address's concurrent connections when a proxy listener sets no maxConnectionsPerClient: far
# above what browsers (6 per origin) or a large NAT need, low enough that one address cannot hold every
# descriptor of a forwarding pod (docs/security.md, "Limits against resource abuse").
PER_CLIENT_CONNECTIONS = 1000


class Mode(StrEnum):
    """Which layer balances: L4 sees addresses and ports, L7 sees HTTP requests."""

    L4 = "L4"
    L7 = "L7"


class Architecture(StrEnum):
    """How packets reach backends; which ones a mode allows is in `ARCHITECTURES`."""

    nat = "nat"
    dsr = "dsr"
    tunnel = "tunnel"
    proxy = "proxy"
    transparent = "transparent"


ARCHITECTURES: dict[Mode, tuple[Architecture, ...]] = {
    Mode.L4: (Architecture.nat, Architecture.dsr, Architecture.tunnel, Architecture.proxy),
    Mode.L7: (Architecture.proxy, Architecture.transparent),
}
KERNEL_ARCHITECTURES = (Architecture.nat, Architecture.dsr, Architecture.tunnel)


class Engine(StrEnum):
    """The kernel facility that forwards packets for the kernel architectures."""

    ipvs = "ipvs"
    nftables = "nftables"


ENGINE_ARCHITECTURES: dict[Engine, tuple[Architecture, ...]] = {
    Engine.ipvs: (Architecture.nat, Architecture.dsr, Architecture.tunnel),
    Engine.nftables: (Architecture.nat, Architecture.dsr),
}


class Protocol(StrEnum):
    """What a listener accepts; which ones a mode allows is in `PROTOCOLS`."""

    TCP = "TCP"
    UDP = "UDP"
    HTTP = "HTTP"
    HTTPS = "HTTPS"


PROTOCOLS: dict[Mode, tuple[Protocol, ...]] = {
    Mode.L4: (Protocol.TCP, Protocol.UDP),
    Mode.L7: (Protocol.HTTP, Protocol.HTTPS),
}


def transport(protocol: Protocol) -> Literal["TCP", "UDP"]:
    """The transport a listener binds: HTTP and HTTPS both occupy a TCP port."""
    return "UDP" if protocol is Protocol.UDP else "TCP"


class Algorithm(StrEnum):
    """How a backend's endpoints share the load."""

    round_robin = "round-robin"
    least_connections = "least-connections"
    random_two_choices = "random-two-choices"
    source_hash = "source-hash"
    ring_hash = "ring-hash"
    maglev = "maglev"


HASHING_ALGORITHMS = (Algorithm.source_hash, Algorithm.ring_hash, Algorithm.maglev)


class HashSource(StrEnum):
    """What a hashing algorithm hashes: the client address, or (L7) a header or a cookie."""

    SourceIP = "SourceIP"
    Header = "Header"
    Cookie = "Cookie"


class AffinityType(StrEnum):
    """Whether a client sticks to one endpoint: by its address, or (L7) by a cookie."""

    None_ = "None"
    ClientIP = "ClientIP"
    Cookie = "Cookie"


class HealthProtocol(StrEnum):
    """How an endpoint is probed: a TCP connect, or an HTTP request expecting 2xx/3xx."""

    TCP = "TCP"
    HTTP = "HTTP"


class ProxyProtocolVersion(StrEnum):
    """The PROXY protocol header sent to a backend: v1 text or v2 binary."""

    v1 = "v1"
    v2 = "v2"


Name = Annotated[str, Field(min_length=1, max_length=MAX_NAME, pattern=DNS_LABEL)]
Port = Annotated[int, Field(strict=True, ge=1, le=65535)]


class Model(BaseModel):
    """Base of every API model: unknown fields are errors, and field names are the YAML names."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, use_enum_values=False)


class TLS(Model):
    """Where an HTTPS listener's certificate and key come from."""

    secretName: Annotated[str, Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN)] = Field(
        description="A Secret of type kubernetes.io/tls in the LoadBalancer's namespace (tls.crt, tls.key)."
    )
    extraSecretNames: (
        list[Annotated[str, Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN)]] | None
    ) = Field(
        default=None,
        max_length=16,
        description="More certificates; the client's SNI picks the one whose names match, else secretName's.",
    )


class AcceptProxyProtocol(Model):
    """Accept a PROXY protocol header (v1 or v2) from clients in these networks only."""

    trustedCIDRs: list[Annotated[str, Field(max_length=43)]] = Field(
        min_length=1,
        max_length=64,
        description="Networks whose connections may (and must) start with a PROXY protocol header.",
    )


class Listener(Model):
    """A port on the VIP that accepts traffic."""

    name: Name = Field(description="Unique among the listeners; a DNS label.")
    port: Port = Field(description="Port on the VIP, 1-65535; unique per transport (TCP or UDP).")
    protocol: Protocol = Field(description="L4: TCP or UDP. L7: HTTP or HTTPS (HTTPS needs tls).")
    tls: TLS | None = Field(default=None, description="Certificate for an HTTPS listener.")
    maxConnections: Annotated[int, Field(strict=True, ge=1, le=1_000_000)] | None = Field(
        default=None,
        description="Cap on concurrent client connections; beyond it new ones wait in the backlog.",
    )
    maxConnectionsPerClient: Annotated[int, Field(strict=True, ge=1, le=1_000_000)] | None = Field(
        default=None,
        description=(
            f"Cap on one client address's concurrent connections (proxy architectures; default "
            f"{PER_CLIENT_CONNECTIONS}); beyond it a new one gets 503 (L7) or is closed (L4). Connections "
            "from acceptProxyProtocol's trusted networks are not counted."
        ),
    )
    acceptProxyProtocol: AcceptProxyProtocol | None = Field(
        default=None, description="Read a PROXY protocol header from trusted clients (proxy architectures)."
    )


class ServiceRef(Model):
    """A Kubernetes Service in the LoadBalancer's namespace, resolved through its EndpointSlices."""

    name: Name = Field(description="Name of the Service.")
    port: Port = Field(description="The Service port (not the target port).")


class Endpoint(Model):
    """A static backend address."""

    address: Annotated[str, Field(min_length=2, max_length=45)] = Field(description="IPv4 or IPv6 address.")
    port: Port | None = Field(default=None, description="Defaults to the listener's port.")
    weight: Annotated[int, Field(strict=True, ge=0, le=MAX_WEIGHT)] = Field(
        default=1, description=f"Relative share of new connections, 0-{MAX_WEIGHT}; 0 drains the endpoint."
    )


class HealthCheck(Model):
    """Active probing of each endpoint; an endpoint is used only while it passes."""

    protocol: HealthProtocol = Field(default=HealthProtocol.TCP, description="TCP connect or HTTP request.")
    path: Annotated[str, Field(max_length=1024, pattern=HTTP_PATH)] = Field(
        default="/", description="HTTP only: the path requested; a 2xx or 3xx answer passes."
    )
    port: Port | None = Field(default=None, description="Probe this port instead of the endpoint's.")
    intervalSeconds: Annotated[int, Field(strict=True, ge=1, le=3600)] = Field(
        default=5, description="Time between probes."
    )
    timeoutSeconds: Annotated[int, Field(strict=True, ge=1, le=3600)] = Field(
        default=1, description="A probe slower than this fails; must be below intervalSeconds."
    )
    healthyThreshold: Annotated[int, Field(strict=True, ge=1, le=100)] = Field(
        default=2, description="Consecutive passes that bring an endpoint back."
    )
    unhealthyThreshold: Annotated[int, Field(strict=True, ge=1, le=100)] = Field(
        default=3, description="Consecutive failures that take an endpoint out."
    )


class HashOn(Model):
    """The key of a hashing algorithm."""

    type: HashSource = Field(default=HashSource.SourceIP, description="SourceIP, or (L7) Header or Cookie.")
    name: Annotated[str, Field(min_length=1, max_length=256, pattern=HEADER_NAME)] | None = Field(
        default=None, description="The header or cookie name; required for Header and Cookie."
    )


class Backend(Model):
    """A set of endpoints that share load: a Service's or a static list."""

    name: Name = Field(description="Unique among the backends; routes and defaultBackend name it.")
    service: ServiceRef | None = Field(
        default=None, description="Endpoints from this Service (not with endpoints)."
    )
    endpoints: list[Endpoint] | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_ENDPOINTS,
        description="Static endpoints (not with service).",
    )
    algorithm: Algorithm = Field(default=Algorithm.round_robin, description="How endpoints share the load.")
    hashOn: HashOn | None = Field(
        default=None, description="Key for source-hash, ring-hash and maglev; default the client address."
    )
    healthCheck: HealthCheck | None = Field(
        default=None, description="Active health checks of the endpoints."
    )
    proxyProtocol: ProxyProtocolVersion | None = Field(
        default=None,
        description="Send a PROXY protocol header (v1 or v2) to this backend (proxy architectures).",
    )


class HTTPMethod(StrEnum):
    """HTTP methods a route can match."""

    GET = "GET"
    HEAD = "HEAD"
    POST = "POST"
    PUT = "PUT"
    DELETE = "DELETE"
    PATCH = "PATCH"
    OPTIONS = "OPTIONS"
    CONNECT = "CONNECT"
    TRACE = "TRACE"


class RouteMatch(Model):
    """What a request must look like for a route to take it; every given part must match."""

    hosts: list[Annotated[str, Field(max_length=253, pattern=HOST)]] | None = Field(
        default=None, max_length=16, description="Host names, optionally *.domain and :port; any of them."
    )
    pathPrefix: Annotated[str, Field(max_length=1024, pattern=HTTP_PATH)] | None = Field(
        default=None, description="Path prefix on segment boundaries: /v1 matches /v1 and /v1/x, not /v10."
    )
    path: Annotated[str, Field(max_length=1024, pattern=HTTP_PATH)] | None = Field(
        default=None, description="Exact path (not with pathPrefix)."
    )
    headers: (
        dict[
            Annotated[str, Field(max_length=256, pattern=HEADER_NAME)], Annotated[str, Field(max_length=4096)]
        ]
        | None
    ) = Field(
        default=None,
        max_length=16,
        description="Header values that must match exactly; names are case-insensitive.",
    )
    methods: list[HTTPMethod] | None = Field(default=None, max_length=9, description="Any of these methods.")


class Route(Model):
    """An L7 rule: requests that match go to the named backend."""

    match: RouteMatch = Field(description="The request's host, path, headers and method to match.")
    backend: Name = Field(description="The name of a backend of this LoadBalancer.")


class SessionAffinity(Model):
    """Keeps a client on one endpoint."""

    type: AffinityType = Field(default=AffinityType.None_, description="None, ClientIP, or (L7) Cookie.")
    timeoutSeconds: Annotated[int, Field(strict=True, ge=1, le=86400)] = Field(
        default=10800, description="How long a client stays stuck after its last request."
    )
    cookieName: Annotated[str, Field(min_length=1, max_length=64, pattern=HEADER_NAME)] = Field(
        default="layerlb", description="Cookie only: the cookie's name."
    )


class Timeouts(Model):
    """Time limits of the proxy architectures."""

    connectSeconds: Annotated[float, Field(strict=True, allow_inf_nan=False, gt=0, le=300)] = Field(
        default=5, description="Connect to a backend."
    )
    headerSeconds: Annotated[float, Field(strict=True, allow_inf_nan=False, gt=0, le=300)] = Field(
        default=10, description="A client's whole request head; slower clients get 408."
    )
    requestSeconds: Annotated[float, Field(strict=True, allow_inf_nan=False, gt=0, le=86400)] = Field(
        default=60, description="A backend's response head; slower backends give 504."
    )
    idleSeconds: Annotated[float, Field(strict=True, allow_inf_nan=False, gt=0, le=86400)] = Field(
        default=60, description="An idle client or upstream connection is closed after this."
    )


class Limits(Model):
    """Size limits of the L7 request parser."""

    maxRequestLineBytes: Annotated[int, Field(strict=True, ge=256, le=1_048_576)] = Field(
        default=8192, description="A longer request line gets 414."
    )
    maxHeaderBytes: Annotated[int, Field(strict=True, ge=1024, le=1_048_576)] = Field(
        default=65536, description="A larger header block gets 431."
    )


class LoadBalancerSpec(Model):
    """What the user wants: one VIP, its listeners, its backends and how traffic reaches them."""

    mode: Mode = Field(description="L4 balances connections and datagrams; L7 balances HTTP requests.")
    architecture: Architecture = Field(
        description=(
            "How traffic reaches backends. L4 nat: the kernel (IPVS or nftables) rewrites the destination "
            "and replies return through the LB. L4 dsr: the kernel rewrites the MAC only, backends on the "
            "same L2 segment own the VIP and reply directly. L4 tunnel: the kernel wraps packets in IP-in-IP, "
            "backends decapsulate and reply directly. L4 proxy: layerlb's userspace TCP/UDP relay. L7 proxy: "
            "layerlb's HTTP proxy, two TCP connections. L7 transparent: the HTTP proxy connects to backends "
            "from the client's own address."
        )
    )
    engine: Engine | None = Field(
        default=None, description="L4 nat, dsr, tunnel only: ipvs (default) or nftables (nat and dsr)."
    )
    vip: Annotated[str, Field(min_length=2, max_length=45)] | None = Field(
        default=None, description="The virtual IP; allocated from a VIPPool when not given."
    )
    vipPool: Name | None = Field(default=None, description="Allocate the VIP from this VIPPool only.")
    replicas: Annotated[int, Field(strict=True, ge=1, le=100)] = Field(
        default=1, description="Forwarding pods for this VIP."
    )
    listeners: list[Listener] = Field(min_length=1, max_length=MAX_LISTENERS, description="Ports on the VIP.")
    backends: list[Backend] = Field(min_length=1, max_length=MAX_BACKENDS, description="Where traffic goes.")
    defaultBackend: Name | None = Field(
        default=None,
        description="The backend for traffic no route takes (L4: required with several backends).",
    )
    routes: list[Route] | None = Field(
        default=None, max_length=MAX_ROUTES, description="L7 only: the most specific matching route wins."
    )
    sessionAffinity: SessionAffinity | None = Field(
        default=None, description="Keeps a client on one endpoint."
    )
    timeouts: Timeouts | None = Field(default=None, description="Time limits of the proxy architectures.")
    limits: Limits | None = Field(default=None, description="Size limits of the L7 request parser.")


class Condition(Model):
    """A Kubernetes API convention condition."""

    type: str = Field(description="Accepted, Programmed or Ready.")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(description="A CamelCase word saying why.")
    message: str = Field(default="", description="Human-readable details.")
    observedGeneration: int | None = Field(
        default=None, description="The generation this condition describes."
    )
    lastTransitionTime: str | None = Field(default=None, description="When status last changed (RFC 3339).")


class BackendStatus(Model):
    """How many of a backend's endpoints are ready."""

    name: str = Field(description="The backend's name.")
    ready: int = Field(description="Endpoints passing health checks.")
    total: int = Field(description="All endpoints.")


class Announcement(Model):
    """Who announces the VIP on the network: for L2, written by the speaker of the node that holds it; for a
    VIP routed over BGP only (its pool's `spec.announce.l2: false`), by the first advertising node's speaker
    by name, naming every advertising node."""

    address: str = Field(description="The VIP announced (equal to status.vip while it is current).")
    node: str = Field(
        description=(
            "L2: the node whose speaker answers ARP/NDP for the VIP. BGP: the advertising nodes, joined by "
            "', ' (what the ANNOUNCED BY column shows)."
        )
    )
    nodes: list[str] | None = Field(
        default=None,
        description="BGP: every node advertising the VIP to its routers (they share it by ECMP); absent for L2.",
    )
    interfaces: list[str] = Field(
        default_factory=list, description="L2: the node's interfaces the VIP is answered on; empty for BGP."
    )
    protocol: Literal["L2", "BGP"] = Field(
        default="L2", description="How the VIP is announced: L2 (ARP/NDP) or BGP (routes to BGPPeers)."
    )
    since: str | None = Field(
        default=None,
        description="L2: when this node took the VIP over; BGP: since when this set of nodes advertises it (RFC 3339).",
    )


class LoadBalancerStatus(Model):
    """What the operator observed and did; `announcement` is the speaker's (the operator never writes it)."""

    vip: str | None = Field(default=None, description="The VIP in use.")
    observedGeneration: int | None = Field(default=None, description="The generation last reconciled.")
    conditions: list[Condition] = Field(default_factory=list, description="Accepted, Programmed, Ready.")
    backends: list[BackendStatus] = Field(
        default_factory=list, description="Ready and total endpoints per backend."
    )
    announcement: Announcement | None = Field(
        default=None,
        description=(
            "The node announcing the VIP, written by its layerlb speaker when it takes the VIP over; absent "
            "when no node announces it."
        ),
    )


class SelectorOperator(StrEnum):
    """How a label selector requirement compares a node's label with its values (metav1.LabelSelector)."""

    In = "In"
    NotIn = "NotIn"
    Exists = "Exists"
    DoesNotExist = "DoesNotExist"


LabelKey = Annotated[str, Field(min_length=1, max_length=317, pattern=LABEL_KEY)]
LabelValue = Annotated[str, Field(max_length=63, pattern=LABEL_VALUE)]
MAX_SELECTOR_TERMS = 32
MAX_SELECTOR_VALUES = 64
MAX_INTERFACES = 16


class LabelSelectorRequirement(Model):
    """One requirement on a label: In and NotIn compare with values, Exists and DoesNotExist take none."""

    key: LabelKey = Field(description="The label key, such as topology.kubernetes.io/zone.")
    operator: SelectorOperator = Field(description="In, NotIn, Exists or DoesNotExist.")
    values: list[LabelValue] | None = Field(
        default=None,
        max_length=MAX_SELECTOR_VALUES,
        description="In and NotIn: the values to compare with (at least one). Exists, DoesNotExist: none.",
    )


class LabelSelector(Model):
    """A Kubernetes label selector (metav1.LabelSelector): every part must match; empty matches all."""

    matchLabels: dict[LabelKey, LabelValue] | None = Field(
        default=None,
        max_length=MAX_SELECTOR_TERMS,
        description="Labels that must be present with these values.",
    )
    matchExpressions: list[LabelSelectorRequirement] | None = Field(
        default=None, max_length=MAX_SELECTOR_TERMS, description="Requirements that must all hold."
    )


class Announce(Model):
    """How a pool's addresses are announced on the nodes' LAN (L2: ARP/NDP, as MetalLB's L2Advertisement).

    BGP is configured apart, by BGPAdvertisements that select pools and nodes themselves; the two combine:
    a pool a BGPAdvertisement selects is still answered by ARP/NDP unless `l2` is false here.
    """

    l2: bool = Field(
        default=True,
        strict=True,
        description=(
            "Answer ARP/NDP for the pool's addresses on the nodes' LAN (one node per address), also when a "
            "BGPAdvertisement routes them. false: BGP only (a pool no BGPAdvertisement selects is then not "
            "announced at all); interfaces and nodeSelector, which are L2's, must be absent."
        ),
    )

    interfaces: list[Annotated[str, Field(min_length=1, max_length=15, pattern=INTERFACE_NAME)]] | None = (
        Field(
            default=None,
            max_length=MAX_INTERFACES,
            description=(
                "Answer ARP/NDP only on these interfaces of a node (a node with none of them does not announce); "
                "absent or empty: the interface holding the node's InternalIP."
            ),
        )
    )
    nodeSelector: LabelSelector | None = Field(
        default=None,
        description="Only nodes whose labels match may announce the pool's addresses; absent: every eligible node.",
    )


class VIPPoolSpec(Model):
    """Addresses the operator may hand out as VIPs, and where the speakers announce them."""

    addresses: list[Annotated[str, Field(min_length=3, max_length=91)]] = Field(
        min_length=1,
        max_length=64,
        description="CIDRs (192.0.2.0/28) or inclusive ranges (192.0.2.10-192.0.2.20) of one family.",
    )
    namespaces: list[Name] | None = Field(
        default=None, max_length=256, description="Namespaces that may draw from this pool; all when absent."
    )
    autoAssign: bool = Field(
        default=True,
        strict=True,
        description="Hand out addresses to LoadBalancers that name no pool; false: only by name.",
    )
    announce: Announce | None = Field(
        default=None,
        description=(
            "L2 announcement (ARP/NDP): on or off, which nodes (nodeSelector), which interfaces; absent: on, "
            "everywhere. BGP announcement is a BGPAdvertisement's."
        ),
    )


class PoolCondition(Condition):
    """A VIPPool's condition, written by the operator from what the speakers report."""

    type: str = Field(description="InterfacesFound.")


class PoolNodeStatus(Model):
    """What one node's speaker says about a pool: each node writes (and removes) its own entry only."""

    node: str = Field(description="The node whose speaker wrote this entry.")
    missingInterfaces: list[str] = Field(
        default_factory=list,
        description="Interfaces of spec.announce.interfaces this node lacks or has down.",
    )
    observedGeneration: int | None = Field(
        default=None, description="The pool's generation this entry describes."
    )


class VIPPoolStatus(Model):
    """What the speakers found on their nodes (`nodes`) and the operator's verdict on it (`conditions`)."""

    conditions: list[PoolCondition] = Field(
        default_factory=list, description="InterfacesFound: every selected node has the pool's interfaces."
    )
    nodes: list[PoolNodeStatus] = Field(
        default_factory=list,
        description="One entry per node whose speaker has something to report (a missing interface); absent: nothing.",
    )


# --- BGP: BGPPeer and BGPAdvertisement ----------------------------------------------------------------

MAX_ASN = 4_294_967_295  # 4-octet AS numbers (RFC 6793); 0 is reserved
# The key of a Secret's data: letters, digits, '-', '_' and '.'.
SECRET_KEY = r"^[-._a-zA-Z0-9]+$"
WELL_KNOWN_COMMUNITIES = ("no-export", "no-advertise", "local-as", "blackhole")
MAX_BGP_SELECTED = 64

ASN = Annotated[int, Field(strict=True, ge=1, le=MAX_ASN)]
ObjectName = Annotated[str, Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN)]
Address = Annotated[str, Field(min_length=2, max_length=45)]


class SecretKeyRef(Model):
    """One key of a Secret, named by namespace and name (the referring resource is cluster-scoped)."""

    name: ObjectName = Field(description="The Secret's name.")
    namespace: Annotated[str, Field(min_length=1, max_length=63, pattern=DNS_LABEL)] = Field(
        description="The Secret's namespace."
    )
    key: Annotated[str, Field(min_length=1, max_length=253, pattern=SECRET_KEY)] = Field(
        default="password", description="The key in the Secret's data that holds the value."
    )


class BFD(Model):
    """Bidirectional Forwarding Detection (RFC 5880) on a BGP session: a lost peer is noticed in under a second."""

    receiveInterval: Annotated[int, Field(strict=True, ge=10, le=60000)] = Field(
        default=300,
        description="Milliseconds, 10-60000: the shortest interval at which the node accepts BFD packets from the peer.",
    )
    transmitInterval: Annotated[int, Field(strict=True, ge=10, le=60000)] = Field(
        default=300,
        description=(
            "Milliseconds, 10-60000: the interval at which the node sends BFD packets (slower when the "
            "peer's receive interval is longer)."
        ),
    )
    detectMultiplier: Annotated[int, Field(strict=True, ge=2, le=255)] = Field(
        default=3,
        description=(
            "Packets missed in a row that declare the path down, 2-255: with 300 ms and 3, a dead peer or "
            "node is detected after 900 ms and the session torn down at once."
        ),
    )


class BGPPeerSpec(Model):
    """One BGP session per selected node to a router: where it is, who both ends are, its timers and options."""

    peerAddress: Address = Field(description="The router's IPv4 or IPv6 address.")
    peerPort: Port = Field(default=179, description="The router's TCP port, 1-65535.")
    peerASN: ASN = Field(
        description=f"The router's AS number, 1-{MAX_ASN}; equal to localASN: iBGP, else eBGP."
    )
    localASN: ASN = Field(description=f"The AS number the nodes speak for, 1-{MAX_ASN}.")
    holdTime: Annotated[int, Field(strict=True, ge=0, le=65535)] = Field(
        default=90,
        description=(
            "Seconds without a message from the router before the session is declared down: 0 (never; no "
            "keepalives) or 3-65535. The session uses the smaller of this and the router's offer."
        ),
    )
    keepaliveTime: Annotated[int, Field(strict=True, ge=0, le=65535)] | None = Field(
        default=None,
        description="Seconds between keepalives, below holdTime (0 only with holdTime 0); absent: holdTime / 3.",
    )
    passwordSecret: SecretKeyRef | None = Field(
        default=None,
        description=(
            "The TCP MD5 signature password (RFC 2385) the router expects, from a Secret (key default "
            "`password`); absent: no password. There is no plaintext password field."
        ),
    )
    sourceAddress: Address | None = Field(
        default=None,
        description=(
            "The node's own address the session starts from, of peerAddress's family; absent: the address "
            "of the interface the route to peerAddress leaves by."
        ),
    )
    ebgpMultiHop: bool = Field(
        default=False,
        strict=True,
        description=(
            "eBGP only: the router may be several hops away (the session's packets leave with a TTL above "
            "1); false: it must be on a directly connected network."
        ),
    )
    bfd: BFD | None = Field(
        default=None,
        description="Run BFD on the session with these intervals (`bfd: {}` for the defaults); absent: off.",
    )
    nodeSelector: LabelSelector | None = Field(
        default=None,
        description="The nodes that open a session to this router; absent: every node that runs a speaker.",
    )
    routerID: Address | None = Field(
        default=None,
        description=(
            "The BGP identifier the nodes present, a non-zero IPv4 address; absent: each node's own IPv4 "
            "address (give one on IPv6-only nodes). Peers that select the same node should agree."
        ),
    )

    @property
    def keepalive(self) -> int:
        """The keepalive interval in effect, in seconds: keepaliveTime, else holdTime / 3 rounded down."""
        return self.keepaliveTime if self.keepaliveTime is not None else self.holdTime // 3


class BGPSessionState(StrEnum):
    """The state of a BGP session's finite state machine (RFC 4271, 8.2.2)."""

    Idle = "Idle"
    Connect = "Connect"
    Active = "Active"
    OpenSent = "OpenSent"
    OpenConfirm = "OpenConfirm"
    Established = "Established"


class BFDState(StrEnum):
    """The state of a BFD session (RFC 5880, 4.1)."""

    AdminDown = "AdminDown"
    Down = "Down"
    Init = "Init"
    Up = "Up"


class BGPPeerCondition(Condition):
    """A BGPPeer's condition, written by the operator from what the speakers report in `status.nodes`."""

    type: str = Field(
        description=(
            "Established: True when every selected node has its session Established; the message counts "
            "them (2/3 nodes Established)."
        )
    )


class BGPPeerNodeStatus(Model):
    """One node's session with the router: each node's speaker writes (and removes) its own entry only."""

    node: str = Field(description="The node whose speaker wrote this entry.")
    state: BGPSessionState = Field(
        description="Idle, Connect, Active, OpenSent, OpenConfirm or Established (only the last carries routes)."
    )
    since: str | None = Field(default=None, description="When the session entered this state (RFC 3339).")
    lastError: str | None = Field(
        default=None,
        description="The last reason the session failed or closed, as the routing daemon or the router said it.",
    )
    prefixesAdvertised: int | None = Field(
        default=None, description="Prefixes this node advertises to the router now."
    )
    bfd: BFDState | None = Field(
        default=None, description="The BFD session's state (AdminDown, Down, Init, Up); absent: BFD is off."
    )
    observedGeneration: int | None = Field(
        default=None, description="The BGPPeer's generation this entry describes."
    )


class BGPPeerStatus(Model):
    """Each node's session (`nodes`, written by the speakers) and the operator's verdict on them (`conditions`)."""

    conditions: list[BGPPeerCondition] = Field(
        default_factory=list, description="Established: every selected node has its session up."
    )
    nodes: list[BGPPeerNodeStatus] = Field(
        default_factory=list, description="One entry per node that opens a session to this router."
    )


Community = Annotated[str, Field(min_length=1, max_length=32)]


class BGPAdvertisementSpec(Model):
    """Which VIPs go to which routers from which nodes, and with which BGP attributes.

    A node advertises a VIP to a router when the VIP's pool is selected (`vipPools`), the router is
    selected (`peers`) and the node has a session with it (the BGPPeer's nodeSelector), the node matches
    `nodeSelector`, and the node can serve the VIP (ready forwarding pods; for a Service, as for L2), so
    routers spread the VIP over those nodes by ECMP. L2 is not replaced: the pool's addresses are still
    answered by ARP/NDP on the LAN unless the VIPPool says `spec.announce.l2: false`. Several
    advertisements that give one router the same prefix merge: the union of their communities and large
    communities, the highest localPreference.
    """

    vipPools: list[ObjectName] | None = Field(
        default=None,
        max_length=MAX_BGP_SELECTED,
        description="The VIPPools whose addresses are advertised; absent or empty: every pool.",
    )
    peers: list[ObjectName] | None = Field(
        default=None,
        max_length=MAX_BGP_SELECTED,
        description="The BGPPeers (routers) they are advertised to; absent or empty: every peer.",
    )
    nodeSelector: LabelSelector | None = Field(
        default=None,
        description="Only nodes whose labels match advertise; absent: every node that can serve the VIP.",
    )
    communities: list[Community] | None = Field(
        default=None,
        max_length=64,
        description=(
            "BGP communities (RFC 1997) attached to the routes: ASN:VALUE with each part 0-65535, or "
            "no-export (65535:65281), no-advertise (65535:65282), local-as (65535:65283, NO_EXPORT_SUBCONFED) "
            "or blackhole (65535:666, RFC 7999)."
        ),
    )
    largeCommunities: list[Community] | None = Field(
        default=None,
        max_length=64,
        description="Large communities (RFC 8092) attached to the routes: ASN:VALUE:VALUE, each 0-4294967295.",
    )
    localPreference: Annotated[int, Field(strict=True, ge=0, le=MAX_ASN)] | None = Field(
        default=None,
        description=(
            "LOCAL_PREF, 0-4294967295: the higher, the more the router's AS prefers these routes. Sent to "
            "iBGP peers only (localASN equal to peerASN), as BGP defines; eBGP peers never see it."
        ),
    )
    aggregationLength: Annotated[int, Field(strict=True, ge=0, le=32)] = Field(
        default=32,
        description=(
            "The prefix length IPv4 VIPs are advertised with, 0-32: 32, each VIP alone; shorter, the "
            "covering prefix (24: one /24 for all the VIPs inside it, from every node serving one). Not "
            "shorter than the pools' CIDRs, or the router sends their neighbours' addresses to the nodes."
        ),
    )
    aggregationLengthV6: Annotated[int, Field(strict=True, ge=0, le=128)] = Field(
        default=128,
        description="The prefix length IPv6 VIPs are advertised with, 0-128: 128, each VIP alone; as aggregationLength.",
    )


def address_block(value: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    """Parse a CIDR or an inclusive range into its first address and size; ValueError says why."""
    if "-" in value:
        first_text, _, last_text = value.partition("-")
        try:
            first = ipaddress.ip_address(first_text)
            last = ipaddress.ip_address(last_text)
        except ValueError:
            raise ValueError(f"{value!r} is not a range such as 192.0.2.10-192.0.2.20") from None
        if first.version != last.version:
            raise ValueError(f"{value!r} mixes IPv4 and IPv6")
        if int(last) < int(first):
            raise ValueError(f"{value!r} ends before it starts")
        return first, int(last) - int(first) + 1
    try:
        if not re.fullmatch(r"[0-9A-Fa-f:.]+/[0-9]{1,3}", value):
            raise ValueError(value)
        network = ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ValueError(
            f"{value!r} is not a CIDR (192.0.2.0/28) or a range (192.0.2.10-192.0.2.20)"
        ) from None
    return network.network_address, network.num_addresses


class ObjectMeta(BaseModel):
    """The part of Kubernetes metadata layerlb reads; the rest is kept but not checked."""

    model_config = ConfigDict(extra="allow")

    name: Annotated[str, Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN)]
    namespace: Annotated[str, Field(min_length=1, max_length=63, pattern=DNS_LABEL)] | None = None
    generation: int | None = None
    labels: dict[str, str] | None = None
    annotations: dict[str, str] | None = None


class LoadBalancer(Model):
    """A `LoadBalancer` resource as stored by the API server."""

    apiVersion: Literal["layerlb.dev/v1alpha1"] = API_VERSION
    kind: Literal["LoadBalancer"] = "LoadBalancer"
    metadata: ObjectMeta
    spec: LoadBalancerSpec
    status: LoadBalancerStatus | None = None


class VIPPool(Model):
    """A cluster-scoped `VIPPool` resource."""

    apiVersion: Literal["layerlb.dev/v1alpha1"] = API_VERSION
    kind: Literal["VIPPool"] = "VIPPool"
    metadata: ObjectMeta
    spec: VIPPoolSpec
    status: VIPPoolStatus | None = None


class BGPPeer(Model):
    """A cluster-scoped `BGPPeer` resource: a router the speakers of the selected nodes peer with."""

    apiVersion: Literal["layerlb.dev/v1alpha1"] = API_VERSION
    kind: Literal["BGPPeer"] = "BGPPeer"
    metadata: ObjectMeta
    spec: BGPPeerSpec
    status: BGPPeerStatus | None = None


class BGPAdvertisement(Model):
    """A cluster-scoped `BGPAdvertisement` resource: which pools' VIPs are advertised to which BGPPeers."""

    apiVersion: Literal["layerlb.dev/v1alpha1"] = API_VERSION
    kind: Literal["BGPAdvertisement"] = "BGPAdvertisement"
    metadata: ObjectMeta
    spec: BGPAdvertisementSpec


KINDS: dict[str, type[Model]] = {
    "LoadBalancer": LoadBalancer,
    "VIPPool": VIPPool,
    "BGPPeer": BGPPeer,
    "BGPAdvertisement": BGPAdvertisement,
}


def describe(value: Any) -> str:
    """A value as it reads in an error message."""
    return repr(value) if isinstance(value, str) else str(value)
