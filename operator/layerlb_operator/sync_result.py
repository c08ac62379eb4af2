"""How one sync of a watched object ended: its own module, so that the LoadBalancer reconciler and the
Service reconciler, which drives it, both name it without importing each other."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Result:
    """How one sync ended: the reconcile verdict, or `failed` (the API server refused), or `skipped`, or
    `refused` (a Service's request cannot be met; events, not a timer, bring it back)."""

    verdict: str
    message: str = ""

    @property
    def transient(self) -> bool:
        """Whether to retry with backoff."""
        return self.verdict in ("unresolvable", "failed")
