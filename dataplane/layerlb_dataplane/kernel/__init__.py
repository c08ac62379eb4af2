"""Kernel engines program a Plan into the kernel's forwarding (IPVS, nftables) as desired state.

Every engine has the same operations, so `layerlb serve` drives any of them the same way: `sync`
makes the kernel forward the Plan with the targets' current health and drain (and changes nothing when
it already does), `remove` deletes what the engine programmed for the Plan, and `next_resync` says when
a sync is due even though nothing changed (a drain that ends by time or by the kernel's own counters).

What every engine does with `targets` (by backend name, as `state.Registry` keeps them):

- an endpoint of the Plan whose target is not `usable` (health down, weight 0, draining) takes no new
  connections or flows; established ones stay where they are;
- an endpoint without a target counts as usable (a caller may pass no targets at all);
- an endpoint gone from the Plan, or whose target is `draining`, drains: no new connections, existing
  ones finish, and the engine forgets it after they end or after its drain timeout (each engine says how
  it can tell). Drains progress only when `sync` runs: call it again at `next_resync`.

Engines are not thread-safe: one engine per thread, used in the network namespace it programs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from layerlb.plan import Plan
from layerlb_dataplane.core.targets import Target


@dataclass
class SyncReport:
    """What one sync did: how many kernel changes it made (0: already in place), how long it took, and what
    the node still lacks that the user should hear of (`strict_arp`'s warning), though forwarding works."""

    changes: int
    seconds: float
    warnings: tuple[str, ...] = ()


class KernelEngine(Protocol):
    """An engine that programs Plans into the kernel."""

    def sync(self, plan: Plan, targets: Mapping[str, Sequence[Target]]) -> SyncReport:
        """Make the kernel forward `plan` to `targets` (by backend name, with usable/draining/active)."""
        ...

    def remove(self, plan: Plan) -> None:
        """Delete what this engine programmed for `plan`."""
        ...

    def next_resync(self, plan: Plan) -> float | None:
        """When (`time.monotonic()` scale) to sync `plan` again to finish a drain; None when none is pending."""
        ...
