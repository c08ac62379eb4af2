"""Load-balancing algorithms: pick a target for a new request or connection. Sans-IO.

STUB to be completed (issue 3 item 4): smooth weighted round-robin, least-connections, random-two-choices,
source-hash, ring-hash, Maglev. The interface below is the contract `state.BackendPool` relies on.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING, Protocol

from layerlb.api import Algorithm

if TYPE_CHECKING:
    from layerlb_dataplane.state import Target


class Balancer(Protocol):
    """Chooses among a backend's targets; skips targets that are not `usable` or are in `exclude`."""

    def pick(self, key: bytes, exclude: Collection[Target] = ()) -> Target | None:
        """A usable target; `key` is the hash key (client address or header/cookie value)."""
        ...

    def update(self, targets: Sequence[Target]) -> None:
        """Membership, weight or usability changed: rebuild whatever tables depend on it."""
        ...


class RoundRobin:
    """Placeholder: plain round-robin over usable targets."""

    def __init__(self, targets: Sequence[Target]) -> None:
        self.targets = list(targets)
        self.next = 0

    def pick(self, key: bytes, exclude: Collection[Target] = ()) -> Target | None:
        for _ in range(len(self.targets)):
            target = self.targets[self.next % len(self.targets)]
            self.next += 1
            if target.usable and target not in exclude:
                return target
        return None

    def update(self, targets: Sequence[Target]) -> None:
        self.targets = list(targets)


def create(algorithm: Algorithm, targets: Sequence[Target]) -> Balancer:
    """The balancer of `algorithm` over `targets`."""
    return RoundRobin(targets)
