"""Active health probes: the asyncio layer that finds dead endpoints before clients do, feeding `HealthState`.

`HealthChecker.follow(snapshot)` runs one task per target of every backend with a health check. Each
task probes every `interval_seconds` (fixed rate, the first after a random delay within a quarter
interval so a large Plan does not probe everything at once), each probe bounded by `timeout_seconds`:

- TCP: the connect succeeds;
- HTTP: `GET path HTTP/1.1` with `Host` and `Connection: close`; a 2xx or 3xx status line passes (1xx
  interim responses are skipped), anything else, a timeout or a reset fails. Only the status line is read.

The probe port is the check's `port`, else the target's, else the Plan's first listener's (a target
without port serves on the port the client used). On a transition the current Snapshot's pool is told
(`pool.health_changed()`, so hash tables rebuild) and so is `on_change` (kernel engines set weight 0).
A new Snapshot keeps the tasks of targets whose check and port stayed; only the others restart.

With several worker processes one prober serves them all (N probers would send N times the probes to
every backend, and could disagree): the supervising parent probes (`probing=True`), and each time a
verdict changes it pushes `verdicts()` (every probed target's active verdict) to the workers, whose
checkers do not probe (`probing=False`) and take the pushed verdicts with `apply`. Passive ejection stays
per process: each worker ejects on what its own requests see.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable

from layerlb import plan
from layerlb.api import HealthProtocol
from layerlb_dataplane.core import state, targets

log = logging.getLogger(__name__)

MAX_STATUS_LINE = 8192
MAX_INTERIM_RESPONSES = 8
CLOSE_SECONDS = 1.0  # how long a probe waits for its socket to close after the verdict


def probe_port(check: plan.HealthCheck, target: targets.Target, p: plan.Plan) -> int | None:
    """The port to probe: the check's, else the target's, else the first listener's (None: no listener)."""
    if check.port is not None:
        return check.port
    if target.port is not None:
        return target.port
    return p.listeners[0].port if p.listeners else None


async def probe(check: plan.HealthCheck, address: str, port: int, timeout: float | None = None) -> bool:
    """One probe of `address:port` by `check`; True when it passes. Never raises for network trouble."""
    limit = check.timeout_seconds if timeout is None else timeout
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(limit):
            reader, writer = await asyncio.open_connection(address, port, limit=MAX_STATUS_LINE)
            if check.protocol is HealthProtocol.TCP:
                return True
            writer.write(_request(check.path, address, port))
            await writer.drain()
            return await _status_passes(reader)
    except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
        return False
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), CLOSE_SECONDS)


def _request(path: str, address: str, port: int) -> bytes:
    host = f"[{address}]" if ":" in address else address
    if port != 80:
        host = f"{host}:{port}"
    return (
        f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n"
        "User-Agent: layerlb-health-check\r\nAccept: */*\r\n\r\n"
    ).encode("ascii")


async def _status_passes(reader: asyncio.StreamReader) -> bool:
    """Read the final status line; 2xx and 3xx pass."""
    for _ in range(MAX_INTERIM_RESPONSES):
        status = _status(await reader.readuntil(b"\n"))
        if status is None:
            return False
        if status >= 200:
            return status < 400
        while (await reader.readuntil(b"\n")).strip():  # the interim response's header lines
            pass
    return False


def _status(line: bytes) -> int | None:
    parts = line.split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or len(parts[1]) != 3 or not parts[1].isdigit():
        return None
    return int(parts[1])


# A target's active verdict as pushed between processes: backend, address, port, up.
Verdict = tuple[str, str, int | None, bool]


class HealthChecker:
    """Runs the active probes of a Snapshot and follows new Snapshots without restarting what stayed;
    with `probing` False it runs none and takes the verdicts of a prober elsewhere (`apply`)."""

    def __init__(
        self, on_change: Callable[[targets.Target], None] | None = None, *, probing: bool = True
    ) -> None:
        self.on_change = on_change
        self.probing = probing
        self.tasks: dict[targets.Target, asyncio.Task[None]] = {}
        self._setup: dict[targets.Target, tuple[plan.HealthCheck, int]] = {}
        self._pools: dict[targets.Target, state.BackendPool] = {}

    def follow(self, snapshot: state.Snapshot) -> None:
        """Probe the targets of `snapshot`: start new ones, restart changed ones, stop those that left."""
        wanted: dict[targets.Target, tuple[plan.HealthCheck, int]] = {}
        pools: dict[targets.Target, state.BackendPool] = {}
        for pool in snapshot.pools.values():
            check = pool.backend.health_check
            if check is None:
                continue
            for target in pool.targets:
                port = probe_port(check, target, snapshot.plan)
                if port is not None:
                    wanted[target] = (check, port)
                    pools[target] = pool
        self._pools = pools
        if not self.probing:
            self._setup = wanted
            return
        for target in list(self.tasks):
            if self._setup.get(target) != wanted.get(target):
                self.tasks.pop(target).cancel()
                del self._setup[target]
        for target, setup in wanted.items():
            if target not in self.tasks:
                self._setup[target] = setup
                self.tasks[target] = asyncio.create_task(
                    self._run(target, *setup), name=f"health {target.address}:{setup[1]}"
                )

    def verdicts(self) -> list[Verdict]:
        """The active verdict of every target with a check, in a stable order (what a prober pushes)."""
        return sorted(
            ((target.backend, target.address, target.port, target.health.up) for target in self._setup),
            key=lambda verdict: (verdict[0], verdict[1], -1 if verdict[2] is None else verdict[2]),
        )

    def apply(self, verdicts: list[Verdict]) -> int:
        """Take a prober's verdicts for the targets followed here; returns how many changed.

        A target the prober does not list (not probed there yet, or gone) keeps its verdict.
        """
        wanted = {(backend, address, port): up for backend, address, port, up in verdicts}
        changed = 0
        for target in self._setup:
            up = wanted.get(target.key)
            if up is not None and up != target.health.up:
                target.health.healthy = up  # the active verdict; passive ejection is untouched
                changed += 1
                self._changed(target)
        return changed

    def close(self) -> None:
        """Stop every probe."""
        for task in self.tasks.values():
            task.cancel()
        self.tasks.clear()
        self._setup.clear()
        self._pools.clear()

    async def aclose(self) -> None:
        """Stop every probe and wait until they have ended."""
        tasks = list(self.tasks.values())
        self.close()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _run(self, target: targets.Target, check: plan.HealthCheck, port: int) -> None:
        loop = asyncio.get_running_loop()
        interval = float(check.interval_seconds)
        await asyncio.sleep(random.uniform(0, interval / 4))
        due = loop.time()
        while True:
            passed = await probe(check, target.address, port)
            if target.health.record(passed):
                self._changed(target)
            due += interval
            now = loop.time()
            if due < now:  # a slow probe: start the next now, do not catch up with a burst
                due = now
            await asyncio.sleep(due - now)

    def _changed(self, target: targets.Target) -> None:
        if self.probing:  # the prober says it once; the processes that take its verdicts stay quiet
            log.info("health: %r is now %s", target, target.health.state)
        pool = self._pools.get(target)
        if pool is not None:
            pool.health_changed()
        if self.on_change is not None:
            try:
                self.on_change(target)
            except Exception:
                log.exception("health: on_change failed for %r", target)
