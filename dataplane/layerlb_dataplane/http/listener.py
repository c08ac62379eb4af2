"""What an L7 client connection and its listener know of each other: `Settings` and two interfaces.

`proxy.HttpListener` is a `Listener` and `connection.ClientConnection` a `Connection`. Both sides import
this module rather than each other, so the L7 modules import in one direction: `h1` → `upstream` →
`listener` → `exchange` → `connection` → `proxy`.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from layerlb import plan
from layerlb.api import AffinityType, Architecture, HashSource
from layerlb_dataplane.core import affinity
from layerlb_dataplane.core.metrics import Metrics, RequestSeries
from layerlb_dataplane.core.state import Snapshot
from layerlb_dataplane.http import upstream


class Settings:
    """Derived once per Snapshot, so that each request reads plain attributes instead of walking the Plan."""

    __slots__ = (
        "affinity",
        "cookie_age",
        "cookie_name",
        "default",
        "default_pool",
        "direct",
        "isolated",
        "limits",
        "plain",
        "plan_key",
        "pools",
        "snapshot",
        "timeouts",
        "transparent",
    )

    def __init__(self, snapshot: Snapshot) -> None:
        current = snapshot.plan
        self.snapshot = snapshot
        self.timeouts = current.timeouts
        self.limits = current.limits
        self.direct = not current.routes  # every request goes to the default backend
        self.default = current.default_backend
        self.pools = pools = snapshot.pools
        self.default_pool = pools.get(self.default) if self.default is not None else None
        self.transparent = current.architecture == Architecture.transparent
        # Pools whose upstream connections carry one client (PROXY header, or its address): never shared.
        self.isolated = frozenset(
            pool for pool in pools.values() if self.transparent or pool.backend.proxy_protocol is not None
        )
        self.affinity = current.session_affinity.type
        # Pools whose targets the balancer picks alone (no session affinity, no header or cookie key).
        self.plain = frozenset(
            pool
            for pool in pools.values()
            if self.affinity == AffinityType.None_ and pool.backend.hash_on.type == HashSource.SourceIP
        )
        self.cookie_name = current.session_affinity.cookie_name.encode()
        self.cookie_age = current.session_affinity.timeout_seconds
        self.plan_key = current.key


class Connection(Protocol):
    """What a listener drives of one of its client connections: admission, drain and abort."""

    transport: asyncio.Transport
    admitted: bool
    state: int
    client_ip: str  # the peer's address (a PROXY header may replace it later)

    @property
    def behind_proxy(self) -> bool:
        """The peer is a trusted PROXY-protocol sender whose header is still to come: its clients are many."""

    def admit(self) -> None:
        """A slot under the connection cap freed: start reading requests."""

    def shutdown(self) -> None:
        """The listener drains: close when idle, else after the response in flight."""


class Listener(Protocol):
    """What a client connection reads and calls of the listener that accepted it."""

    name: str
    listener: plan.Listener
    loop: asyncio.AbstractEventLoop | None
    metrics: Metrics
    proto: bytes
    affinity: affinity.Affinity
    pool: upstream.UpstreamPool
    closing: bool
    request_series: dict[str, RequestSeries]
    sweeper: asyncio.TimerHandle | None

    def current(self) -> Snapshot:
        """The Snapshot new requests are served from (it changes on reload); passive health goes to it."""

    def settings(self) -> Settings:
        """The settings of the current Snapshot."""

    def opened(self, connection: Connection) -> bool:
        """Count a new connection: True when it may start."""

    def closed(self, connection: Connection) -> None:
        """A connection ended: free its slot."""

    def release(self, connection: upstream.UpstreamConnection) -> None:
        """Return an upstream connection to the pool."""

    def series(self, backend: str) -> RequestSeries:
        """The request counters of this listener for `backend`."""

    def watch_affinity(self) -> None:
        """ClientIP affinity entries exist: expire them in time."""

    def schedule_sweep(self) -> None:
        """Close idle pooled connections and expire affinity entries soon."""
