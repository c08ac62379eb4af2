"""Endpoint health: the consecutive-result state machine (sans-IO) and the active probes that feed it.

STUB to be completed (issue 3 item 5): thresholds from the Plan's health check, passive ejection after
consecutive failures, asyncio TCP and HTTP probers. The interface below is what `state.Target` relies on.
"""

from __future__ import annotations

from dataclasses import dataclass

from layerlb import plan


@dataclass
class HealthState:
    """Whether a target may take traffic, from active probes and passive observations."""

    healthy: bool = True
    check: plan.HealthCheck | None = None

    def configure(self, check: plan.HealthCheck | None) -> None:
        """Adopt the (possibly changed) health check of the target's backend."""
        self.check = check

    def record(self, success: bool) -> bool:
        """Record a probe result; True when `healthy` changed."""
        return False
