"""Kernel engines program a Plan into the kernel's forwarding (IPVS, nftables) as desired state.

Every engine has the same two operations, so `layerlb serve` drives any of them the same way: `sync`
makes the kernel forward the Plan with the targets' current health and drain (and changes nothing when
it already does), `remove` deletes what the engine programmed for the Plan.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from layerlb.plan import Plan
from layerlb_dataplane.state import Target


@dataclass
class SyncReport:
    """What one sync did: how many kernel changes it made (0: already in place) and how long it took."""

    changes: int
    seconds: float


class KernelEngine(Protocol):
    """An engine that programs Plans into the kernel."""

    def sync(self, plan: Plan, targets: Mapping[str, Sequence[Target]]) -> SyncReport:
        """Make the kernel forward `plan` to `targets` (by backend name, with usable/draining/active)."""
        ...

    def remove(self, plan: Plan) -> None:
        """Delete what this engine programmed for `plan`."""
        ...
