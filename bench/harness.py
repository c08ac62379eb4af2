"""The whole bench in one run, so layerlb is always measured beside HAProxy and a direct connection on
the same machine, the same moment and the same CPUs: backends, rows, the kernel path, reload under
load, memory, then one table and one JSON file.

A row or scenario whose subject cannot start is recorded as `unavailable` with the reason, and the run
goes on; nothing here lets one failure end the run.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import kernel, memory, processes, reload, report, resources, subjects, wrk
from bench.processes import Pinning, Process, Unavailable
from bench.report import OK, UNAVAILABLE, Row, Scenario

# Addresses of their own, so a stray listener elsewhere on 127.0.0.1 never shares the load.
VIP_L7, VIP_L4, VIP_RELOAD, VIP_MEMORY = "127.0.0.120", "127.0.0.121", "127.0.0.122", "127.0.0.123"
PORT = 28080  # uncommon, so tests of others on this machine (8080, 80) never share the address
BACKENDS = 4  # nginx processes: two serve the rows, all four rotate through the reload scenario
ROW_BACKENDS = 2
SECTIONS = ("rows", "kernel", "reload", "memory")
RESULTS = processes.REPO / "bench" / "results"


@dataclass
class Settings:
    """How long and how hard to drive each subject."""

    seconds: float = 10.0
    c1_seconds: float = 10.0
    warmup_seconds: float = 1.0
    reload_seconds: float = 30.0
    changes: int = 30
    clients: int = 5000
    rounds: int = 1
    quiet_wait: float = 10.0  # seconds a row may wait for other work on the machine to stop
    sections: tuple[str, ...] = SECTIONS
    rows: tuple[str, ...] | None = None  # None: every row


@dataclass
class Context:
    """What every row shares: the run's folder, pinning, wrk's script and the nginx backends."""

    folder: Path
    logs: Path
    pinning: Pinning
    settings: Settings
    script: Path
    backend_ports: list[int] = field(default_factory=list)
    backends: list[Process] = field(default_factory=list)
    backends_error: str | None = None
    ws_port: int | None = None
    ws_error: str | None = None

    def need_backends(self) -> list[int]:
        if self.backends_error is not None:
            raise Unavailable(self.backends_error)
        return self.backend_ports


def log(message: str) -> None:
    """Progress on stderr, so stdout holds only the table."""
    with contextlib.suppress(OSError):  # a closed stderr (`| head`) must not end the run
        print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def guarded(item: Row | Scenario, body: Callable[[], None]) -> None:
    """Run `body`; an Unavailable or any other error marks `item` unavailable instead of ending the run."""
    try:
        body()
    except Unavailable as error:
        _unavailable(item, str(error))
    except Exception as error:  # a harness bug must cost one row, not the whole run
        if os.environ.get("BENCH_DEBUG"):
            traceback.print_exc()
        _unavailable(item, f"harness error: {type(error).__name__}: {error}")
    except KeyboardInterrupt:
        _unavailable(item, "interrupted")
        raise
    log(f"{item.label}: {item.status}")


# --- rows --------------------------------------------------------------------------------------------


def measure(
    ctx: Context, row: Row, host: str, port: int, subject: int | None, prefix: list[str] | None = None
) -> None:
    """Warm up, then wrk at 50 connections and at one; fill the row.

    `subject` is the pid whose CPU time (with its children's) during the `-c50` run is recorded: a
    subject well below 100 % of its CPU was not the bottleneck (wrk, the backends or other work were).
    """
    settings, cpus, url = ctx.settings, ctx.pinning.load, f"http://{host}:{port}/"
    row.background_busy = background(settings.quiet_wait)
    if settings.warmup_seconds > 0:
        warm = wrk.run(url, 50, settings.warmup_seconds, ctx.script, cpus, prefix)
        if warm.requests == 0:
            raise Unavailable(f"no request succeeded during the warm-up ({warm.failed} failed)")
    before, spent, started = (
        processes.cpu_ticks(),
        processes.cpu_seconds(subject) if subject else 0.0,
        time.monotonic(),
    )
    row.c50 = wrk.run(url, 50, settings.seconds, ctx.script, cpus, prefix)
    row.cpu_busy = processes.cpu_busy(before, processes.cpu_ticks())
    if subject:
        used = processes.cpu_seconds(subject) - spent
        row.subject_cpu_seconds = round(used, 3)
        row.subject_cpu = round(100 * used / (time.monotonic() - started), 1)
    if row.c50.requests == 0:
        raise Unavailable("no request succeeded")
    if settings.c1_seconds > 0:
        row.c1 = wrk.run(url, 1, settings.c1_seconds, ctx.script, cpus, prefix)
    row.status = OK


def background(budget: float, window: float = 0.3) -> dict[str, float]:
    """CPU use by others with the subject started but idle, waiting up to `budget` seconds for the
    machine to quieten (other sessions' tests come and go); the last reading goes into the row."""
    deadline = time.monotonic() + budget
    while True:
        before = processes.cpu_ticks()
        time.sleep(window)  # a measurement window, not a wait for readiness
        busy = processes.cpu_busy(before, processes.cpu_ticks())
        if max(busy.values(), default=0.0) <= report.BUSY_WARNING or time.monotonic() >= deadline:
            return busy


def row_direct(ctx: Context, row: Row) -> None:
    """wrk straight to one nginx, which is moved to the subject CPU for the row (it is the subject)."""
    ports = ctx.need_backends()
    nginx = ctx.backends[0]
    processes.pin_tree(nginx.pid, ctx.pinning.subject)
    try:
        subjects.smoke("127.0.0.1", ports[0], "nginx")
        measure(ctx, row, "127.0.0.1", ports[0], nginx.pid)
    finally:
        processes.pin_tree(nginx.pid, ctx.pinning.load)


def row_haproxy(
    ctx: Context, row: Row, name: str, resource: resources.Resource, vip: str, access_log: bool = True
) -> None:
    """HAProxy on `layerlb render --format haproxy` of the resource (plus `nbthread 1`)."""
    processes.ensure_free(vip, PORT)
    path = subjects.write_resource(ctx.folder, name, resource)
    config = subjects.haproxy_config(
        path, ctx.folder / f"{name}-{'log' if access_log else 'nolog'}.cfg", access_log
    )
    started = time.monotonic()
    with processes.running(
        subjects.start_haproxy(config, ctx.logs, ctx.pinning.subject, name=f"haproxy-{name}")
    ) as proxy:
        processes.wait_until(lambda: processes.accepts(vip, PORT), 10, "HAProxy", proxy)
        row.startup_seconds = round(time.monotonic() - started, 3)
        subjects.smoke(vip, PORT, "HAProxy")
        measure(ctx, row, vip, PORT, proxy.pid)
        if not proxy.alive():
            raise Unavailable(proxy.exited_reason())


def row_layerlb(ctx: Context, row: Row, name: str, resource: resources.Resource, vip: str) -> None:
    """`layerlb serve` of the same resource, one worker, ready by `/readyz`."""
    processes.ensure_free(vip, PORT)
    path = subjects.write_resource(ctx.folder, name, resource)
    admin = processes.free_port()
    with processes.running(
        subjects.start_layerlb(path, ctx.logs, ctx.pinning.subject, admin, name=f"layerlb-{name}")
    ) as proxy:
        row.startup_seconds = round(subjects.wait_layerlb(proxy, admin, vip, PORT), 3)
        processes.pin_tree(proxy.pid, ctx.pinning.subject)  # workers forked late, threads
        subjects.smoke(vip, PORT, "layerlb serve")
        measure(ctx, row, vip, PORT, proxy.pid)
        if not proxy.alive():
            raise Unavailable(proxy.exited_reason())


def loopback_rows(ctx: Context) -> list[tuple[Row, Callable[[Row], None]]]:
    """The five loopback rows, in the order the table shows them."""

    def ports() -> list[int]:
        return ctx.need_backends()[:ROW_BACKENDS]

    return [
        (Row("direct", "direct to nginx"), lambda row: row_direct(ctx, row)),
        (
            Row("haproxy_http", "HAProxy 2.6 http mode"),
            lambda row: row_haproxy(ctx, row, "l7", resources.l7_proxy(VIP_L7, PORT, ports()), VIP_L7),
        ),
        (
            Row("layerlb_l7", "layerlb L7 proxy"),
            lambda row: row_layerlb(ctx, row, "l7", resources.l7_proxy(VIP_L7, PORT, ports()), VIP_L7),
        ),
        (
            Row("haproxy_http_nolog", "HAProxy 2.6 http mode, access log off (reference)"),
            lambda row: row_haproxy(ctx, row, "l7", resources.l7_proxy(VIP_L7, PORT, ports()), VIP_L7, False),
        ),
        (
            Row("haproxy_tcp", "HAProxy 2.6 tcp mode"),
            lambda row: row_haproxy(ctx, row, "l4", resources.l4_proxy(VIP_L4, PORT, ports()), VIP_L4),
        ),
        (
            Row("layerlb_l4", "layerlb L4 proxy (TCP relay)"),
            lambda row: row_layerlb(ctx, row, "l4", resources.l4_proxy(VIP_L4, PORT, ports()), VIP_L4),
        ),
    ]


def kernel_rows(ctx: Context, rows: list[Row]) -> None:
    """The netns direct row and the nftables DNAT row, on one topology, alternating each round."""
    direct, dnat = rows
    try:
        processes.require("nginx", "nginx-light")
        with kernel.topology(ctx.folder, ctx.logs, ctx.pinning) as topo:
            prefix = topo.exec_prefix(topo.client)

            def run_direct(attempt: Row) -> None:
                measure(ctx, attempt, kernel.BACKEND, kernel.PORT, None, prefix)

            def run_dnat(attempt: Row) -> None:
                how, undo = kernel.program(topo, ctx.folder, ctx.logs, ctx.pinning)
                attempt.notes.append(f"programmed by {how}")
                try:
                    measure(ctx, attempt, kernel.VIP, kernel.PORT, None, prefix)
                finally:
                    undo()

            rounds(ctx, [(direct, run_direct), (dnat, run_dnat)])
    except Unavailable as error:
        for row in rows:
            row.rounds.clear()
            row.reason = str(error)
            log(f"{row.label}: unavailable: {error}")
    for row in rows:
        row.combine()


def rounds(ctx: Context, specs: Sequence[tuple[Row, Callable[[Row], None]]]) -> None:
    """Measure every row once per round, in order, so slow drifts of the machine hit all rows alike."""
    total = ctx.settings.rounds
    for number in range(total):
        for row, body in specs:
            attempt = Row(row.key, row.label)
            log(f"{row.label}: measuring" + (f" (round {number + 1} of {total})" if total > 1 else ""))
            guarded(attempt, functools.partial(body, attempt))
            row.rounds.append(attempt)


def _unavailable(item: Row | Scenario, why: str) -> None:
    item.status, item.reason = UNAVAILABLE, why
    log(f"{item.label}: unavailable: {why}")


# --- scenarios ---------------------------------------------------------------------------------------


def reload_scenarios(ctx: Context) -> list[Scenario]:
    """Reload under load, layerlb then HAProxy, on the same resource generations."""
    kinds: list[tuple[str, str, type[reload.LayerlbReload] | type[reload.HAProxyReload]]] = [
        ("reload_layerlb", "reload under load, layerlb (SIGHUP)", reload.LayerlbReload),
        ("reload_haproxy", "reload under load, HAProxy (-sf)", reload.HAProxyReload),
    ]
    results = []
    for key, label, kind in kinds:
        scenario = Scenario(key, label)
        results.append(scenario)
        log(f"{label}: {ctx.settings.reload_seconds:g} s, {ctx.settings.changes} changes")
        guarded(scenario, functools.partial(_reload, ctx, scenario, kind))
    return results


def _reload(
    ctx: Context, scenario: Scenario, kind: type[reload.LayerlbReload] | type[reload.HAProxyReload]
) -> None:
    web = ctx.need_backends()
    if ctx.ws_port is None:
        raise Unavailable(ctx.ws_error or "no WebSocket backend")
    settings = ctx.settings
    subject = kind(ctx.folder, ctx.logs, ctx.pinning, VIP_RELOAD, PORT, web, ctx.ws_port, settings.changes)
    scenario.figures = reload.run(
        subject, VIP_RELOAD, PORT, ctx.script, ctx.pinning, settings.reload_seconds, settings.changes
    )
    scenario.status = OK


def memory_scenario(ctx: Context) -> Scenario:
    """RSS of one layerlb worker, idle and with `clients` idle keep-alive clients."""
    scenario = Scenario("memory", f"memory, layerlb worker idle and with {ctx.settings.clients} idle clients")

    def body() -> None:
        path = subjects.write_resource(
            ctx.folder, "memory", resources.l7_proxy(VIP_MEMORY, PORT, ctx.need_backends()[:ROW_BACKENDS])
        )
        scenario.figures = memory.measure(path, ctx.logs, ctx.pinning, VIP_MEMORY, PORT, ctx.settings.clients)
        scenario.status = OK

    log(scenario.label)
    guarded(scenario, body)
    return scenario


# --- the run -----------------------------------------------------------------------------------------


@contextlib.contextmanager
def backends(ctx: Context) -> Iterator[None]:
    """nginx backends and the WebSocket echo server on the load CPU, for the whole run."""
    try:
        for index in range(BACKENDS):
            port = processes.free_port()
            ctx.backends.append(
                subjects.start_nginx(ctx.folder, index, "127.0.0.1", port, ctx.pinning.load, ctx.logs)
            )
            ctx.backend_ports.append(port)
    except Unavailable as error:
        ctx.backends_error = str(error)
    try:
        port = processes.free_port()
        echo = processes.start(
            "websocket-echo",
            [sys.executable, "-m", "bench.websocket", "127.0.0.1", str(port)],
            ctx.logs,
            ctx.pinning.load,
        )
        ctx.backends.append(echo)
        processes.wait_until(
            lambda: processes.accepts("127.0.0.1", port), 10, "the WebSocket echo server", echo
        )
        ctx.ws_port = port
    except Unavailable as error:
        ctx.ws_error = str(error)
    try:
        yield
    finally:
        for process in ctx.backends:
            process.stop()


def machine() -> dict[str, Any]:
    """What the figures were measured on, for comparing runs."""

    def version(argv: list[str]) -> str:
        if processes.tool(argv[0]) is None:
            return ""
        result = processes.run_quiet([processes.tool(argv[0]) or argv[0], *argv[1:]])
        return (
            (result.stdout + result.stderr).strip().splitlines()[0]
            if (result.stdout + result.stderr).strip()
            else ""
        )

    return {
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "haproxy": subjects.haproxy_version(),
        "nginx": version(["nginx", "-v"]),
        "wrk": version(["wrk", "-v"]),
    }


def run(settings: Settings, pin: bool, output_dir: Path, keep: bool) -> tuple[str, Path, dict[str, Any]]:
    """Run the selected sections; returns (the table, the JSON path, the JSON document)."""
    started = datetime.datetime.now(datetime.UTC)
    pinning = Pinning.choose(pin)
    if pinning.load is not None:
        os.sched_setaffinity(0, pinning.load)  # the harness (WebSocket clients, polling) is load too
    limit = processes.raise_fd_limit()
    folder = Path(tempfile.mkdtemp(prefix="layerlb-bench-"))
    logs = folder / "logs"
    logs.mkdir()
    ctx = Context(folder, logs, pinning, settings, wrk.write_script(folder))
    rows: list[Row] = []
    scenarios: list[Scenario] = []
    log(f"folder {folder}; pinning {pinning.describe()}; open files {limit}")
    try:
        with backends(ctx):
            if "rows" in settings.sections:
                specs = [
                    (row, body)
                    for row, body in loopback_rows(ctx)
                    if settings.rows is None or row.key in settings.rows
                ]
                rows += [row for row, _ in specs]
                rounds(ctx, specs)
                for row, _ in specs:
                    row.combine()
            if "kernel" in settings.sections:
                pair = [
                    Row("netns_direct", "direct over netns (routed via LB ns)"),
                    Row("kernel_nft", "kernel nftables DNAT (netns)"),
                ]
                rows += pair
                log("kernel path: measuring")
                kernel_rows(ctx, pair)
            if "reload" in settings.sections:
                scenarios += reload_scenarios(ctx)
            if "memory" in settings.sections:
                scenarios.append(memory_scenario(ctx))
    finally:
        wrk.stop_all()
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)
    judged = report.targets({row.key: row for row in rows}, {s.key: s for s in scenarios})
    text = report.table(rows, scenarios, judged)
    document = {
        "started": started.isoformat(timespec="seconds"),
        "seconds": round((datetime.datetime.now(datetime.UTC) - started).total_seconds(), 1),
        "machine": machine(),
        "pinning": pinning.describe(),
        "settings": {
            "wrk": "wrk -t1 -c50 (and -c1) --latency, keep-alive, 21-byte nginx responses",
            "seconds": settings.seconds,
            "c1_seconds": settings.c1_seconds,
            "warmup_seconds": settings.warmup_seconds,
            "reload_seconds": settings.reload_seconds,
            "changes": settings.changes,
            "clients": settings.clients,
            "rounds": settings.rounds,
            "quiet_wait": settings.quiet_wait,
            "sections": list(settings.sections),
        },
        "rows": [row.to_json() for row in rows],
        "targets": [target.to_json() for target in judged],
        "cpu_per_request_ratios": report.cpu_ratios(rows),
        "scenarios": [scenario.to_json() for scenario in scenarios],
        "table": text,
    }
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    path = report.write_json(output_dir / f"{stamp}.json", document)
    return text, path, document


def parser() -> argparse.ArgumentParser:
    """The command line of bench/run.py."""
    top = argparse.ArgumentParser(
        prog="bench/run.py",
        description="layerlb against HAProxy, nginx direct and the kernel path, in one run: a table and a JSON file.",
    )
    top.add_argument(
        "--smoke", action="store_true", help="1-second runs of two rows (direct, HAProxy http), for the test"
    )
    top.add_argument("--only", action="append", choices=SECTIONS, help="run only this section (repeatable)")
    top.add_argument("--reload", action="store_true", help="run only the reload-under-load scenario")
    top.add_argument("--rows", help="comma-separated row keys to run, e.g. direct,haproxy_http,layerlb_l7")
    top.add_argument("--seconds", type=float, default=10.0, help="wrk -d for the -c50 runs (default 10)")
    top.add_argument(
        "--c1-seconds", type=float, default=10.0, help="wrk -d for the -c1 runs (default 10; 0 skips)"
    )
    top.add_argument(
        "--reload-seconds", type=float, default=30.0, help="load duration of the reload scenario"
    )
    top.add_argument("--changes", type=int, default=30, help="Plan changes during the reload scenario")
    top.add_argument(
        "--clients", type=int, default=5000, help="idle keep-alive clients for the memory figure"
    )
    top.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="measure every row N times, interleaved, and merge (noisy machines)",
    )
    top.add_argument(
        "--quiet-wait",
        type=float,
        default=10.0,
        help="seconds each row may wait for other CPU use to drop below 15 %% (default 10; 0 never waits)",
    )
    top.add_argument("--no-pin", action="store_true", help="do not pin wrk and the subject to separate CPUs")
    top.add_argument("--output-dir", type=Path, default=RESULTS, help="where <timestamp>.json goes")
    top.add_argument("--keep", action="store_true", help="keep the temp folder (configs, logs)")
    return top


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line, run, print the table and where the JSON went."""
    args = parser().parse_args(argv)
    # A SIGTERM (a CI timeout, `kill`) unwinds like Ctrl-C, so every subject and namespace is removed.
    signal.signal(signal.SIGTERM, _interrupt)
    settings = Settings(
        seconds=args.seconds,
        c1_seconds=args.c1_seconds,
        reload_seconds=args.reload_seconds,
        changes=args.changes,
        clients=args.clients,
        rounds=max(1, args.rounds),
        quiet_wait=max(0.0, args.quiet_wait),
    )
    if args.only:
        settings.sections = tuple(args.only)
    if args.reload:
        settings.sections = ("reload",)
    if args.rows:
        settings.rows = tuple(key.strip() for key in args.rows.split(",") if key.strip())
    if args.smoke:
        settings.seconds = settings.c1_seconds = 1.0
        settings.warmup_seconds = 0.0
        settings.quiet_wait = 0.0
        settings.sections = ("rows",)
        settings.rows = settings.rows or ("direct", "haproxy_http")
    try:
        text, path, _ = run(settings, not args.no_pin, args.output_dir, args.keep)
    except KeyboardInterrupt:
        log("interrupted: every subject was stopped, no JSON written")
        return 130
    print(text)
    print(f"\nJSON: {path}")
    return 0
