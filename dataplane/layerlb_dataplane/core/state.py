"""Live forwarding state built from a Plan: targets, backend pools and the snapshot requests are served from.

A `Registry` outlives Plans: applying a new Plan yields a new immutable-ish `Snapshot` but reuses the
`Target` objects of endpoints that stay, so their health, counters and pooled connections survive a
reload, while endpoints that left are marked `draining` (no new picks; open connections finish).
Sans-IO: nothing here touches sockets or the event loop.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass

from layerlb import plan
from layerlb_dataplane.core import balancing, routing
from layerlb_dataplane.core.targets import Target


class BackendPool:
    """A backend's targets and the balancer that picks among them."""

    def __init__(self, backend: plan.Backend, targets: list[Target]) -> None:
        self.backend = backend
        self.targets = targets
        self.balancer: balancing.Balancer = balancing.create(backend.algorithm, targets)

    @property
    def name(self) -> str:
        return self.backend.name

    def pick(
        self, client_ip: str, hash_key: bytes | None = None, exclude: Collection[Target] = ()
    ) -> Target | None:
        """A usable target for a new request/connection, or None when none is usable (→ 503).

        `hash_key` is what the backend's `hash_on` names (header or cookie value) for the hashing
        algorithms; None means hash the client address. `exclude` skips targets already tried (retries).
        """
        key = hash_key if hash_key is not None else client_ip.encode()
        return self.balancer.pick(key, exclude)

    def record_passive(self, target: Target, ok: bool) -> bool:
        """Record what real traffic saw of `target` (False: connect error or timeout); True when it changed.

        Passive failures eject a target (`health.HealthState.record_passive`); the balancer learns at once.
        """
        changed = target.health.record_passive(ok)
        if changed:
            self.health_changed()
        return changed

    def health_changed(self) -> None:
        """Tell the balancer that some target's usability changed (hash tables rebuild)."""
        self.balancer.update(self.targets)

    def ready_count(self) -> int:
        return sum(1 for target in self.targets if target.usable)


@dataclass
class Snapshot:
    """Everything a request needs, for one Plan generation."""

    plan: plan.Plan
    pools: dict[str, BackendPool]
    router: routing.Router

    @property
    def generation(self) -> int:
        return self.plan.generation

    def pool(self, name: str | None) -> BackendPool | None:
        return self.pools.get(name) if name is not None else None

    def record_passive(self, target: Target, ok: bool) -> bool:
        """Passive health, the one path both proxies feed: `target`'s result, told to its backend's pool here.

        The pool of the Snapshot serving new traffic, not the one the request or connection started from,
        so that the balancer that rebuilds is the one picking next. A target whose backend left the Plan
        takes no new traffic, so its results are dropped. True when the target's usability changed.
        """
        pool = self.pools.get(target.backend)
        return pool.record_passive(target, ok) if pool is not None else False


class Registry:
    """Targets by (backend, address, port), kept across Plans."""

    def __init__(self) -> None:
        self.targets: dict[tuple[str, str, int | None], Target] = {}

    def snapshot(self, new: plan.Plan) -> Snapshot:
        """Build the Snapshot of `new`, reusing surviving targets and marking departed ones draining."""
        seen: set[tuple[str, str, int | None]] = set()
        pools: dict[str, BackendPool] = {}
        for backend in new.backends:
            targets = []
            for endpoint in backend.endpoints:
                key = (backend.name, endpoint.address, endpoint.port)
                target = self.targets.get(key)
                if target is None:
                    target = Target(backend.name, endpoint.address, endpoint.port, endpoint.weight)
                    target.health.configure(backend.health_check)
                    self.targets[key] = target
                else:
                    target.weight = endpoint.weight
                    target.draining = False
                    target.health.configure(backend.health_check)
                seen.add(key)
                targets.append(target)
            pools[backend.name] = BackendPool(backend, targets)
        for key, target in list(self.targets.items()):
            if key not in seen:
                target.draining = True
                if target.active == 0:
                    del self.targets[key]
        return Snapshot(plan=new, pools=pools, router=routing.Router(new.routes, new.default_backend))

    def draining(self) -> Iterable[Target]:
        """Targets removed from the Plan that still carry connections."""
        return (target for target in self.targets.values() if target.draining)

    def forget_drained(self) -> None:
        """Drop draining targets whose last connection ended."""
        for key, target in list(self.targets.items()):
            if target.draining and target.active == 0:
                del self.targets[key]
