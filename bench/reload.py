"""Reload under load (a target in the bench report), so "a new Plan drops nothing" is checked with real traffic:
while wrk runs for 30 s and 10 WebSocket connections stay open, the resource changes 30 times; failed
requests and dropped WebSockets are counted. layerlb reloads on SIGHUP after the file is rewritten;
HAProxy is reloaded its own way, a new process with `-sf <old pid>` on the re-rendered config.

Each change is confirmed before the next: layerlb when `/metrics` reports the new Plan generation,
HAProxy when the new process owns the listening socket and the old one no longer does.
"""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
import time
from pathlib import Path
from typing import Any, Protocol

from bench import processes, resources, subjects, websocket, wrk
from bench.processes import Pinning, Process, Unavailable

CONFIRM_SECONDS = 5.0


class Reloadable(Protocol):
    """A subject the scenario can change while it serves."""

    label: str

    def apply(self, generation: int) -> float | None:
        """Switch to `generation`; the seconds until it was confirmed, or None if it never was."""

    def close(self) -> None:
        """Stop every process of the subject."""


def owns(pid: int, inodes: set[str]) -> bool:
    """Whether process `pid` holds one of the socket `inodes` open."""
    wanted = {f"socket:[{inode}]" for inode in inodes}
    try:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                if os.readlink(fd) in wanted:
                    return True
            except OSError:
                continue
    except OSError:
        return False
    return False


class LayerlbReload:
    """`layerlb serve` of the scenario's file: each change rewrites the file and sends SIGHUP."""

    label = "layerlb serve (SIGHUP)"

    def __init__(
        self,
        folder: Path,
        logs: Path,
        pinning: Pinning,
        host: str,
        port: int,
        web: list[int],
        ws: int,
        changes: int,
    ) -> None:
        del changes  # layerlb reads each generation from the file when told
        processes.ensure_free(host, port)
        self.folder, self.host, self.port, self.web, self.ws = folder, host, port, web, ws
        self.path = folder / "reload.yaml"
        resources.write(self.path, resources.reload_generation(1, host, port, web, ws))
        self.admin = processes.free_port()
        self.process = subjects.start_layerlb(
            self.path, logs, pinning.subject, self.admin, name="layerlb-reload"
        )
        try:
            subjects.wait_layerlb(self.process, self.admin, host, port)
            subjects.smoke(host, port, "layerlb serve")
        except BaseException:
            self.process.stop()
            raise

    def apply(self, generation: int) -> float | None:
        started = time.monotonic()
        resources.write(
            self.path, resources.reload_generation(generation, self.host, self.port, self.web, self.ws)
        )
        os.kill(self.process.pid, signal.SIGHUP)
        deadline = started + CONFIRM_SECONDS
        while time.monotonic() < deadline and self.process.alive():
            try:
                served = subjects.served_generation(self.admin)
            except OSError:
                served = None
            if served is not None and served >= generation:
                return time.monotonic() - started
            time.sleep(processes.POLL_SECONDS)
        return None

    def close(self) -> None:
        self.process.stop()


class HAProxyReload:
    """HAProxy on the rendered config: each change renders again and starts `haproxy -sf <old pid>`."""

    label = "HAProxy (-sf)"

    def __init__(
        self,
        folder: Path,
        logs: Path,
        pinning: Pinning,
        host: str,
        port: int,
        web: list[int],
        ws: int,
        changes: int,
    ) -> None:
        processes.ensure_free(host, port)
        self.folder, self.logs, self.pinning = folder, logs, pinning
        self.host, self.port, self.web, self.ws = host, port, web, ws
        self.processes: list[Process] = []
        # Rendered (and checked by `haproxy -c`) before the load starts, so reloads only start processes.
        self.configs = {generation: self._config(generation) for generation in range(1, changes + 2)}
        self.current = subjects.start_haproxy(self.configs[1], logs, pinning.subject, name="haproxy-reload-1")
        self.processes.append(self.current)
        try:
            processes.wait_until(lambda: processes.accepts(host, port), 10, "HAProxy", self.current)
            subjects.smoke(host, port, "HAProxy")
        except BaseException:
            self.close()
            raise

    def _config(self, generation: int) -> Path:
        path = resources.write(
            self.folder / f"reload-haproxy-{generation}.yaml",
            resources.reload_generation(generation, self.host, self.port, self.web, self.ws),
        )
        return subjects.haproxy_config(path, self.folder / f"haproxy-reload-{generation}.cfg")

    def apply(self, generation: int) -> float | None:
        started = time.monotonic()
        old = self.current
        new = subjects.start_haproxy(
            self.configs[generation],
            self.logs,
            self.pinning.subject,
            name=f"haproxy-reload-{generation}",
            previous=old.pid,
        )
        self.processes.append(new)
        self.current = new
        deadline = started + CONFIRM_SECONDS
        while time.monotonic() < deadline and new.alive():
            inodes = processes.listening_inodes(self.host, self.port)
            if owns(new.pid, inodes) and not owns(old.pid, inodes):
                return time.monotonic() - started
            time.sleep(processes.POLL_SECONDS)
        return None

    def close(self) -> None:
        for process in self.processes:
            process.stop(timeout=2)


async def _run(
    subject: Reloadable,
    host: str,
    port: int,
    script: Path,
    pinning: Pinning,
    seconds: float,
    changes: int,
    count: int,
) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    states = [websocket.LongLived(number) for number in range(count)]
    tasks: list[asyncio.Task[None]] = []
    for state in states:
        try:
            reader, writer = await websocket.open_connection(host, port, "/ws")
        except (OSError, TimeoutError, ConnectionError, asyncio.IncompleteReadError) as error:
            stop.set()
            await asyncio.gather(*tasks)
            raise Unavailable(f"{subject.label} did not open WebSocket {state.number}: {error}") from error
        state.opened = True
        tasks.append(asyncio.create_task(websocket.hold(state, reader, writer, stop)))
    load = wrk.spawn(f"http://{host}:{port}/", 50, seconds, script, pinning.load)
    started = time.monotonic()
    confirmed: list[float | None] = []
    try:
        for number in range(changes):
            # Spread the changes evenly over the load: a schedule, not a wait for readiness.
            slot = started + (number + 1) * seconds / (changes + 1)
            await asyncio.sleep(max(0.0, slot - time.monotonic()))
            confirmed.append(await loop.run_in_executor(None, subject.apply, number + 2))
        measured = await loop.run_in_executor(None, wrk.finish, load, 50, seconds + 30)
    finally:
        if load.poll() is None:
            wrk.stop(load)
        stop.set()
        await asyncio.gather(*tasks)
    took = [value for value in confirmed if value is not None]
    dropped = [f"ws{state.number} {state.dropped}" for state in states if state.dropped]
    latencies = [value for state in states for value in state.latencies]
    return {
        "changes": changes,
        "changes_confirmed": len(took),
        "apply_p50_ms": round(statistics.median(took) * 1000, 1) if took else None,
        "apply_max_ms": round(max(took) * 1000, 1) if took else None,
        "requests": measured.requests,
        "rps": measured.rps,
        "failed_requests": measured.failed,
        "non_2xx_3xx": measured.non_2xx_3xx,
        "socket_errors": measured.failed - measured.non_2xx_3xx,
        "websockets": count,
        "dropped_websockets": len(dropped),
        "websocket_echoes": sum(state.echoed for state in states),
        "websocket_echo_max_ms": round(max(latencies) * 1000, 1) if latencies else None,
        "drops": dropped,
        "wrk": measured.to_json(),
    }


def run(
    subject: Reloadable,
    host: str,
    port: int,
    script: Path,
    pinning: Pinning,
    seconds: float,
    changes: int,
    count: int = 10,
) -> dict[str, Any]:
    """Run the scenario against a started subject and return its figures (the subject is closed)."""
    try:
        return asyncio.run(_run(subject, host, port, script, pinning, seconds, changes, count))
    finally:
        subject.close()
