"""Endpoint health as one state machine, so proxies, probers and kernel engines share one verdict. Sans-IO.

Rules, in one place:

- **Active checks** count consecutive probe results. A target starts *healthy* (HAProxy's choice, not
  Envoy's wait-for-first-check): a fresh Plan serves at once, and a dead endpoint is found within
  `interval * unhealthy_threshold`. It goes down after `unhealthy_threshold` consecutive failures and
  comes back after `healthy_threshold` consecutive successes; a result of the other kind resets the run.
  Without a configured check, probe results are ignored and the active verdict stays healthy.
- **Passive ejection** counts consecutive failures the proxies observed: a refused or timed-out connect
  (L7 and L4 TCP), and for L7 also a reset, malformed or late response; a relay or answer is a success. After
  `passive_threshold` (5) of them the target is ejected for `ejection_seconds` (30 s), doubling on each
  repeated ejection up to `max_ejection_seconds` (5 min); the backoff level resets once the target has
  stayed in service for `max_ejection_seconds` after its last ejection. Ejection is independent of active
  checks: a target is healthy only when both say so.
- An ejection ends by the clock, not by an event: `ejected_until` tells a balancer when to look again.

The asyncio prober that feeds `record` lives in `control/probes.py`; the proxies feed `record_passive`
through `state.Snapshot.record_passive`, the one path for L7 and L4 alike.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from layerlb import plan

PASSIVE_THRESHOLD = 5
EJECTION_SECONDS = 30.0
MAX_EJECTION_SECONDS = 300.0


class HealthState:
    """Whether a target may take traffic, from active probes and passive observations."""

    def __init__(
        self,
        check: plan.HealthCheck | None = None,
        *,
        passive_threshold: int = PASSIVE_THRESHOLD,
        ejection_seconds: float = EJECTION_SECONDS,
        max_ejection_seconds: float = MAX_EJECTION_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.check = check
        self.passive_threshold = passive_threshold
        self.ejection_seconds = ejection_seconds
        self.max_ejection_seconds = max_ejection_seconds
        self.clock = clock
        self._up = True  # the active checks' verdict
        self._successes = 0
        self._failures = 0
        # Consecutive passive failures: the proxies read it to skip reporting a success that changes nothing.
        self.passive_failures = 0
        self._ejections = 0  # backoff level of passive ejection
        self._ejected_until = 0.0  # clock() time; 0.0 when not ejected
        self._last_ejection_end = 0.0

    # --- the verdict ---------------------------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        """Active checks say up and no passive ejection is in force."""
        if not self._up:
            return False
        return self._ejected_until == 0.0 or self._ejected_until <= self.clock()

    @healthy.setter
    def healthy(self, value: bool) -> None:
        """Force the active verdict (an operator override or a test); counters restart."""
        self._up = value
        self._successes = self._failures = 0

    @property
    def up(self) -> bool:
        """The active checks' verdict alone (what a single prober shares with the other processes)."""
        return self._up

    @property
    def ejected_until(self) -> float:
        """When the current passive ejection ends, on `clock`'s scale; 0.0 when none is in force."""
        if self._ejected_until != 0.0 and self._ejected_until <= self.clock():
            self._last_ejection_end = self._ejected_until
            self._ejected_until = 0.0
        return self._ejected_until

    @property
    def state(self) -> str:
        """`healthy`, `unhealthy` (active checks) or `ejected` (passive): for metrics and /config."""
        if not self._up:
            return "unhealthy"
        return "ejected" if self.ejected_until else "healthy"

    # --- active checks -------------------------------------------------------------------------------

    def configure(self, check: plan.HealthCheck | None) -> None:
        """Adopt the (possibly changed) health check of the target's backend; the same check changes nothing.

        A changed check keeps the verdict but restarts the counting runs; removing the check makes the
        active verdict healthy, since nothing would ever probe it back up.
        """
        if check == self.check:
            return
        self.check = check
        self._successes = self._failures = 0
        if check is None:
            self._up = True

    def record(self, success: bool) -> bool:
        """Record a probe result; True when `healthy` changed."""
        check = self.check
        if check is None:
            return False
        before = self.healthy
        if success:
            self._failures = 0
            self._successes += 1
            if not self._up and self._successes >= check.healthy_threshold:
                self._up = True
        else:
            self._successes = 0
            self._failures += 1
            if self._up and self._failures >= check.unhealthy_threshold:
                self._up = False
        return self.healthy != before

    # --- passive ejection ----------------------------------------------------------------------------

    def record_passive(self, ok: bool) -> bool:
        """Record what the proxy saw of a real request or connection; True when `healthy` changed.

        `ok` False is a connect error or timeout to the target; anything that reached the target is True.
        Failures while ejected (in-flight stragglers) do not extend the ejection.
        """
        if ok:
            self.passive_failures = 0
            return False
        now = self.clock()
        if self.ejected_until:
            return False
        self.passive_failures += 1
        if self.passive_failures < self.passive_threshold:
            return False
        before = self.healthy
        if self._ejections and now - self._last_ejection_end >= self.max_ejection_seconds:
            self._ejections = 0
        duration = min(self.ejection_seconds * 2**self._ejections, self.max_ejection_seconds)
        self._ejections += 1
        self.passive_failures = 0
        self._ejected_until = now + duration
        return self.healthy != before

    def __repr__(self) -> str:
        return f"HealthState({self.state}, check={'yes' if self.check else 'no'})"
