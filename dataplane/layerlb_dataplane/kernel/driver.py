"""Drives a kernel engine from the runtime: sync on every Plan and health change, and keep re-syncing.

The engines are synchronous (netlink, `nft` and `ip` calls); the driver runs them in a thread so the event
loop keeps serving, serialises syncs, and re-syncs periodically so that drained real servers are deleted
once idle and hand edits of layerlb's own rules are repaired.

Kernel state and process lifetime: when the process stops (SIGTERM, crash, upgrade) the rules stay in
the kernel, so forwarding continues and a restarted data plane adopts them without touching live
connections. They are removed only when the LoadBalancer itself goes: its Plan leaves the source.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from layerlb import api, plan
from layerlb_dataplane.core.state import Snapshot
from layerlb_dataplane.kernel import KernelEngine, strict_arp

log = logging.getLogger("layerlb.kernel")

RESYNC_SECONDS = 2.0


class Driver:
    """One Plan's kernel programming: the runtime's `KernelDriver`, over a `KernelEngine`."""

    def __init__(self, engine: KernelEngine, resync_seconds: float = RESYNC_SECONDS) -> None:
        self.engine = engine
        self.resync_seconds = resync_seconds
        self.snapshot: Snapshot | None = None
        self.lock = asyncio.Lock()
        self.ticker: asyncio.Task[None] | None = None
        self.warnings: tuple[str, ...] = ()  # the last sync's: what the node lacks (forwarding works)

    async def apply(self, snapshot: Snapshot) -> None:
        """Program `snapshot` now; keep it programmed in the background."""
        self.snapshot = snapshot
        await self._sync()
        if self.ticker is None:
            self.ticker = asyncio.get_running_loop().create_task(self._tick())

    async def _sync(self) -> None:
        snapshot = self.snapshot
        if snapshot is None:
            return
        targets = {name: list(pool.targets) for name, pool in snapshot.pools.items()}
        async with self.lock:
            report = await asyncio.to_thread(self.engine.sync, snapshot.plan, targets)
        self.warnings = report.warnings
        if report.changes:
            log.info(
                "%s: kernel sync made %d change(s) in %.3f s",
                snapshot.plan.key,
                report.changes,
                report.seconds,
            )

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self.resync_seconds)
            try:
                await self._sync()
            except Exception as error:  # keep serving: the next tick retries
                log.error("kernel re-sync failed: %s", error)

    async def close(self, remove: bool = False) -> None:
        """Stop re-syncing; `remove`: the LoadBalancer is gone, so delete its kernel state too."""
        if self.ticker is not None:
            self.ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.ticker
            self.ticker = None
        if remove and self.snapshot is not None:
            async with self.lock:
                await asyncio.to_thread(self.engine.remove, self.snapshot.plan)


def engine_for(p: plan.Plan) -> KernelEngine:
    """The engine the Plan names (ipvs or nftables), enforcing strict ARP where the operator asks
    (`strict_arp.ENV`: its forwarding pods' VIPs are announced by the speaker)."""
    strict = strict_arp.enabled()
    if p.engine is api.Engine.nftables:
        from layerlb_dataplane.kernel.nftables import NftablesEngine

        return NftablesEngine(strict_arp=strict)
    from layerlb_dataplane.kernel.ipvs.engine import IpvsEngine

    return IpvsEngine(strict_arp=strict)


def default_engines() -> dict[api.Architecture, Callable[[plan.Plan], Driver]]:
    """The runtime's engines for every kernel architecture."""

    def factory(p: plan.Plan) -> Driver:
        return Driver(engine_for(p))

    return {architecture: factory for architecture in api.KERNEL_ARCHITECTURES}
