"""One endpoint of one backend as the data plane tracks it across Plans: its weight, health and load.

Sans-IO. Balancers, pools, affinity, the proxies and the kernel engines all hold `Target` objects; the
`state.Registry` keeps one per endpoint across reloads.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from layerlb_dataplane.core import health


@dataclass(eq=False)
class Target:
    """One endpoint of one backend, as the data plane tracks it across Plans."""

    backend: str
    address: str
    port: int | None  # None: the port the client connected to (listener port)
    weight: int
    health: health.HealthState = field(default_factory=health.HealthState)
    active: int = 0  # requests/connections in flight, for least-connections and drain
    draining: bool = False  # gone from the Plan: no new picks, existing connections finish

    @property
    def key(self) -> tuple[str, str, int | None]:
        return (self.backend, self.address, self.port)

    @property
    def usable(self) -> bool:
        """May take new traffic: in the Plan, weight above zero, healthy."""
        return not self.draining and self.weight > 0 and self.health.healthy

    def port_for(self, listener_port: int) -> int:
        return self.port if self.port is not None else listener_port

    def __repr__(self) -> str:
        return f"Target({self.backend} {self.address}:{self.port})"
