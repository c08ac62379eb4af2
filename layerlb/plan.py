"""The Plan: the fully resolved, versioned intermediate representation between control and data plane.

A Plan holds no Kubernetes references: addresses, ports, weights and certificates by content. The data
plane reads nothing else, and every renderer (IPVS, nftables, HAProxy, the data plane JSON) starts here.
Bump `PLAN_VERSION` on any change a running data plane could misread.
"""

from __future__ import annotations

from typing import Final, Literal

from pydantic import BaseModel, ConfigDict, Field

from layerlb.api import (
    AffinityType,
    Algorithm,
    Architecture,
    Engine,
    HashSource,
    HealthProtocol,
    HTTPMethod,
    Mode,
    Protocol,
    ProxyProtocolVersion,
)

PLAN_VERSION: Final = 1


class Frozen(BaseModel):
    """Base of Plan parts: immutable, unknown fields refused (a newer Plan is not half-read)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Certificate(Frozen):
    """A certificate chain and its key, PEM; `names` are the DNS names it serves (for SNI)."""

    source: str = Field(description="Where it came from, e.g. the Secret's name; for messages only.")
    cert_pem: str
    key_pem: str
    names: tuple[str, ...] = ()


class AcceptProxyProtocol(Frozen):
    """Clients in `trusted_cidrs` must start with a PROXY header; others must not."""

    trusted_cidrs: tuple[str, ...]


class Listener(Frozen):
    """A port on the VIP."""

    name: str
    port: int
    protocol: Protocol
    transport: Literal["TCP", "UDP"]
    certificates: tuple[Certificate, ...] = Field(
        default=(), description="HTTPS: the first is the default; SNI picks among the rest by name."
    )
    max_connections: int | None = None
    max_connections_per_client: int | None = None
    accept_proxy_protocol: AcceptProxyProtocol | None = None


class Endpoint(Frozen):
    """One backend address; `port` None means the port the client connected to (dsr and tunnel always)."""

    address: str
    port: int | None
    weight: int


class HealthCheck(Frozen):
    """Active probing; thresholds count consecutive results."""

    protocol: HealthProtocol
    path: str
    port: int | None
    interval_seconds: int
    timeout_seconds: int
    healthy_threshold: int
    unhealthy_threshold: int


class HashOn(Frozen):
    """The key of a hashing algorithm."""

    type: HashSource = HashSource.SourceIP
    name: str | None = None


class Backend(Frozen):
    """A set of endpoints that share load."""

    name: str
    algorithm: Algorithm
    hash_on: HashOn = HashOn()
    endpoints: tuple[Endpoint, ...]
    health_check: HealthCheck | None = None
    proxy_protocol: ProxyProtocolVersion | None = None


class Route(Frozen):
    """An L7 rule; header names are lower case, hosts lower case."""

    hosts: tuple[str, ...] = ()
    path_prefix: str | None = None
    path: str | None = None
    headers: tuple[tuple[str, str], ...] = ()
    methods: tuple[HTTPMethod, ...] = ()
    backend: str


class SessionAffinity(Frozen):
    """Keeps a client on one endpoint."""

    type: AffinityType = AffinityType.None_
    timeout_seconds: int = 10800
    cookie_name: str = "layerlb"


class Timeouts(Frozen):
    """Time limits of the proxy architectures, seconds."""

    connect: float = 5
    header: float = 10
    request: float = 60
    idle: float = 60


class Limits(Frozen):
    """Size limits of the HTTP request parser, bytes."""

    max_request_line: int = 8192
    max_header: int = 65536


class Plan(Frozen):
    """Everything one VIP's forwarding needs. Routes are in priority order: the first that matches wins."""

    version: Literal[1] = PLAN_VERSION
    name: str
    namespace: str
    generation: int
    mode: Mode
    architecture: Architecture
    engine: Engine | None = Field(description="Set for the kernel architectures only.")
    vip: str
    listeners: tuple[Listener, ...]
    backends: tuple[Backend, ...]
    routes: tuple[Route, ...] = ()
    default_backend: str | None
    session_affinity: SessionAffinity = SessionAffinity()
    timeouts: Timeouts = Timeouts()
    limits: Limits = Limits()

    def backend(self, name: str) -> Backend:
        """The backend called `name`; resolution guarantees every reference exists."""
        return next(backend for backend in self.backends if backend.name == name)

    @property
    def key(self) -> str:
        """`namespace/name`: how logs, metrics and kernel rule comments name this VIP's owner."""
        return f"{self.namespace}/{self.name}"
