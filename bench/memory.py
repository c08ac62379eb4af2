"""Memory of a layerlb worker (a target in the bench report), so the per-worker cost is known idle and with 5,000
idle keep-alive clients: RSS of the worker process, read from /proc while the connections are open.

With `--workers 1` layerlb may serve in the process it starts or fork one worker; the figure is the
worker's RSS (the largest forked process, else the process itself), the supervisor's shown beside it.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench import processes, subjects
from bench.processes import Pinning, Unavailable

MB = 1024 * 1024


def _worker(pid: int) -> tuple[int, int]:
    """(worker pid, supervisor RSS or 0): the largest descendant when layerlb forked workers."""
    children = processes.descendants(pid)
    if not children:
        return pid, 0
    worker = max(children, key=processes.rss_bytes)
    return worker, processes.rss_bytes(pid)


def measure(
    yaml_path: Path, logs: Path, pinning: Pinning, vip: str, port: int, clients: int
) -> dict[str, Any]:
    """Start layerlb on the L7 resource, read its worker's RSS idle, then with `clients` connections."""
    processes.ensure_free(vip, port)
    admin = processes.free_port()
    server = subjects.start_layerlb(yaml_path, logs, pinning.subject, admin, name="layerlb-memory")
    with processes.running(server):
        subjects.wait_layerlb(server, admin, vip, port)
        subjects.smoke(vip, port, "layerlb serve")
        worker, supervisor = _worker(server.pid)
        idle = processes.rss_bytes(worker)
        helper = subprocess.Popen(
            [sys.executable, "-m", "bench.idle_clients", vip, str(port), str(clients)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            cwd=processes.REPO,
            env={"PYTHONPATH": str(processes.REPO), "PATH": "/usr/bin:/bin"},
        )
        try:
            started = time.monotonic()
            assert helper.stdout is not None
            line = helper.stdout.readline().decode().split()  # blocks until all are open (or failed)
            if len(line) != 3 or line[0] != "ready":
                raise Unavailable(f"the idle-clients helper failed: {line!r}")
            opened, failed = int(line[1]), int(line[2])
            loaded_worker, loaded_supervisor = _worker(server.pid)
            loaded = processes.rss_bytes(loaded_worker)
            if not server.alive():
                raise Unavailable(server.exited_reason())
            worker_command = processes.command_line(loaded_worker)
        finally:
            if helper.stdin is not None:
                helper.stdin.close()
            try:
                helper.wait(10)
            except subprocess.TimeoutExpired:
                helper.kill()
                helper.wait()
    return {
        "idle_worker_mb": round(idle / MB, 1),
        "idle_supervisor_mb": round(supervisor / MB, 1) if supervisor else None,
        "clients": clients,
        "clients_open": opened,
        "clients_failed": failed,
        "clients_open_seconds": round(time.monotonic() - started, 1),
        "clients_worker_mb": round(loaded / MB, 1),
        "clients_supervisor_mb": round(loaded_supervisor / MB, 1) if loaded_supervisor else None,
        "worker": worker_command[:120],
    }
