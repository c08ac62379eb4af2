"""Several worker processes serving the same listeners through SO_REUSEPORT, under one supervising parent.

Why a parent: something must restart a crashed worker, keep one view of the configuration, and answer the
admin endpoints for the whole pod. The parent owns the `PlanSource` (it polls the files and takes SIGHUP),
validates and probes new Plans once, and pushes them to every worker; each worker is a `runtime.Dataplane`
that binds its own SO_REUSEPORT sockets, so the kernel spreads connections (and UDP flows, by 4-tuple)
across workers.

Workers are started as `python -m layerlb_dataplane.workers` (fork and exec) rather than bare `fork()`:
forking inside a running event loop leaves the child with the parent's loop state (Python 3.11 does not
reset it), and a fresh interpreter costs a fraction of a second once per worker start.

The control channel is a socketpair carrying JSON lines:
- parent → worker: `{"op": "plans", "seq": N, "plans": [...]}`, `{"op": "report", "id": N}`;
- worker → parent: `{"op": "applied", "seq": N, "problems": [...], "warnings": [...]}` after every apply, and
  `{"op": "report", "id": N, "dumps": [[key, dump], ...]}` answering a report request.
Health checks run once, in the parent, not once per worker (that would multiply the probes every
backend receives by the number of workers, and workers could disagree): the parent follows every pushed
Plan with its own `Registry` and a probing `probes.HealthChecker`, and whenever a verdict changes it
sends every worker `{"op": "health", "verdicts": {key: [[backend, address, port, up], ...]}}` (also right
after the Plans to a worker that starts), which workers apply with `Dataplane.set_verdicts`.
Metrics are pulled on scrape: `/metrics` asks every worker for its counters and merges the answers (a
worker that does not answer within a second contributes its previous answer), so the numbers are fresh
and nothing is sent while nobody scrapes. EOF on the channel (the parent died) stops the worker gracefully.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from layerlb import plan
from layerlb_dataplane.control import admin, config, probes, runtime
from layerlb_dataplane.core.metrics import Dump, merge, render
from layerlb_dataplane.core.state import Registry
from layerlb_dataplane.kernel import driver

log = logging.getLogger("layerlb")

REPORT_SECONDS = 1.0
PULSE_SECONDS = 1.0  # how often the parent asks every worker for its metrics: proof that its loop runs
UNRESPONSIVE_SECONDS = 10.0  # a worker silent this long is not ready (its listeners' share of the kernel's
# connections would wait unanswered), long enough that a busy node's scheduling hiccups do not count
START_SECONDS = 60.0
RESTART_DELAYS = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
STEADY_SECONDS = 10.0  # a worker that lived this long restarts without backoff


class Worker:
    """The parent's handle on one worker process and its control channel."""

    def __init__(self, index: int, drain_timeout: float) -> None:
        self.index = index
        self.drain_timeout = drain_timeout
        self.process: asyncio.subprocess.Process | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.applied_seq = 0
        self.problems: list[str] = []
        self.warnings: list[str] = []  # what its node lacks though it serves (strict ARP)
        self.applied = asyncio.Event()
        self.dumps: list[tuple[str, Dump]] = []
        self.waiting: dict[int, asyncio.Future[list[tuple[str, Dump]]]] = {}
        self.ids = itertools.count(1)
        self.reader_task: asyncio.Task[None] | None = None
        self.on_applied: Callable[[], None] = lambda: None
        self.answered_at = time.monotonic()  # its last answer on the control channel (or its start)

    async def start(self) -> None:
        """Start the process with the child end of a fresh control channel."""
        parent, child = socket.socketpair()
        try:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "layerlb_dataplane.control.workers",
                "--control-fd",
                str(child.fileno()),
                "--index",
                str(self.index),
                "--drain-timeout",
                str(self.drain_timeout),
                pass_fds=(child.fileno(),),
            )
        finally:
            child.close()
        reader, self.writer = await asyncio.open_unix_connection(sock=parent)
        self.reader_task = asyncio.create_task(self._read(reader))

    def send(self, message: dict[str, Any]) -> None:
        """Queue one control message (dropped when the worker is gone: its restart gets the current Plans)."""
        if self.writer is not None and not self.writer.is_closing():
            self.writer.write(json.dumps(message).encode() + b"\n")

    async def report(self) -> list[tuple[str, Dump]]:
        """This worker's metrics now, or its last ones when it does not answer in time."""
        ident = next(self.ids)
        future: asyncio.Future[list[tuple[str, Dump]]] = asyncio.get_running_loop().create_future()
        self.waiting[ident] = future
        self.send({"op": "report", "id": ident})
        try:
            self.dumps = await asyncio.wait_for(future, REPORT_SECONDS)
        except TimeoutError:
            pass
        finally:
            self.waiting.pop(ident, None)
        return self.dumps

    async def _read(self, reader: asyncio.StreamReader) -> None:
        while line := await reader.readline():
            message = json.loads(line)
            self.answered_at = time.monotonic()
            if message["op"] == "applied":
                self.applied_seq, self.problems = message["seq"], message["problems"]
                self.warnings = list(message.get("warnings") or [])
                self.applied.set()
                self.on_applied()
            elif message["op"] == "report":
                future = self.waiting.get(message["id"])
                if future is not None and not future.done():
                    future.set_result([(key, dump) for key, dump in message["dumps"]])

    def close(self) -> None:
        """Forget the channel of an exited worker."""
        if self.writer is not None:
            self.writer.close()
        if self.reader_task is not None:
            self.reader_task.cancel()


class Supervisor:
    """The parent of `count` workers: configuration, admin server, restarts, signals."""

    def __init__(
        self,
        source: config.PlanSource,
        count: int,
        *,
        admin_address: tuple[str, int] | None = None,
        drain_timeout: float = runtime.DRAIN_SECONDS,
    ) -> None:
        self.source = source
        self.count = count
        self.admin_address = admin_address
        self.drain_timeout = drain_timeout
        self.current: list[plan.Plan] = []
        self.seq = 0
        self.workers: dict[int, Worker] = {}
        self.restarts = 0
        self.stopping = asyncio.Event()
        self.reloading = asyncio.Event()
        self.watchers: set[asyncio.Task[None]] = set()
        # The one prober: per LoadBalancer key, targets kept across Plans and their probes.
        self.health: dict[str, tuple[Registry, probes.HealthChecker]] = {}
        self.verdicts: dict[str, list[probes.Verdict]] = {}  # as last sent to the workers

    # --- the admin view ----------------------------------------------------------------------------------

    def ready(self) -> tuple[bool, list[str]]:
        """Ready when every worker runs and has applied the latest push without problems."""
        problems = []
        for index in range(self.count):
            worker = self.workers.get(index)
            if worker is None or worker.process is None or worker.process.returncode is not None:
                problems.append(f"worker {index} is not running")
            elif worker.applied_seq != self.seq:
                problems.append(f"worker {index} has not applied the current Plans yet")
            elif (silent := time.monotonic() - worker.answered_at) > UNRESPONSIVE_SECONDS:
                problems.append(
                    f"worker {index} has not answered for {silent:.0f} s: its event loop is stuck or starved"
                )
            else:
                problems += [f"worker {index}: {problem}" for problem in worker.problems]
        return (not problems and not self.stopping.is_set(), problems)

    async def metrics_text(self) -> str:
        """Every live worker's counters, merged per LoadBalancer, plus the workers' own gauges."""
        live = [
            worker for worker in self.workers.values() if worker.process and worker.process.returncode is None
        ]
        by_key: dict[str, list[Dump]] = {}
        for dumps in await asyncio.gather(*(worker.report() for worker in live)):
            for key, dump in dumps:
                by_key.setdefault(key, []).append(dump)
        extra = [
            "# HELP layerlb_workers Worker processes running.",
            "# TYPE layerlb_workers gauge",
            f"layerlb_workers {len(live)}",
            "# HELP layerlb_worker_restarts_total Workers restarted after they exited unexpectedly.",
            "# TYPE layerlb_worker_restarts_total counter",
            f"layerlb_worker_restarts_total {self.restarts}",
        ]
        return render([(key, merge(dumps)) for key, dumps in sorted(by_key.items())], extra)

    def plans(self) -> list[plan.Plan]:
        return list(self.current)

    # --- running -------------------------------------------------------------------------------------------

    def _load(self) -> list[plan.Plan]:
        """The source's Plans, checked, with new addresses probed; raises InvalidConfig or BindError."""
        plans = self.source.load()
        runtime.check(plans)
        held = {
            runtime.listener_key(p, listener)
            for p in self.current
            if not _kernel(p)
            for listener in p.listeners
        }
        for p in plans:
            if not _kernel(p):
                runtime.probe(p, [lst for lst in p.listeners if runtime.listener_key(p, lst) not in held])
        return plans

    def _push(self, plans: list[plan.Plan]) -> None:
        self.current = plans
        self.seq += 1
        for worker in self.workers.values():
            self._send_plans(worker)
        self._follow(plans)

    def _send_plans(self, worker: Worker) -> None:
        worker.send(
            {"op": "plans", "seq": self.seq, "plans": [p.model_dump(mode="json") for p in self.current]}
        )

    def _follow(self, plans: list[plan.Plan]) -> None:
        """Probe the targets of `plans` here, for every worker (probes of targets that stayed go on)."""
        keys = {p.key for p in plans}
        for key in [key for key in self.health if key not in keys]:
            self.health.pop(key)[1].close()
        for p in plans:
            entry = self.health.get(p.key)
            if entry is None:
                checker = probes.HealthChecker(on_change=lambda _target: self._share_verdicts())
                entry = self.health[p.key] = (Registry(), checker)
            registry, checker = entry
            checker.follow(registry.snapshot(p))
        self._share_verdicts()

    def _share_verdicts(self) -> None:
        """Send every worker the verdicts when they changed (a probe result, or a new Plan's targets)."""
        verdicts = {key: checker.verdicts() for key, (_, checker) in self.health.items()}
        if verdicts != self.verdicts:
            self.verdicts = verdicts
            for worker in self.workers.values():
                self._send_verdicts(worker)

    def _send_verdicts(self, worker: Worker) -> None:
        worker.send({"op": "health", "verdicts": self.verdicts})

    async def run(self) -> int:
        """Serve until SIGTERM/SIGINT; exit codes as `runtime.Dataplane.run`."""
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stopping.set)
        loop.add_signal_handler(signal.SIGHUP, self.reloading.set)
        if not await runtime.started(self.source, self.stopping):
            return 0
        try:
            self._push(self._load())
        except config.InvalidConfig as error:
            for line in error.lines:  # exactly what `layerlb validate` prints
                print(line, file=sys.stderr)
            return 2
        except runtime.BindError as error:
            log.error("%s", error)
            return 1
        server = None
        if self.admin_address is not None:
            try:
                server = await admin.start(self, self.admin_address)
            except OSError as error:
                log.error(
                    "cannot listen for the admin server on %s:%d: %s", *self.admin_address, error.strerror
                )
                return 1
        try:
            code = await self._serve()
        finally:
            if server is not None:
                server.close()
            await self._stop()
        return code

    async def _serve(self) -> int:
        for index in range(self.count):
            await self._start(index)
        if not await self._started():
            log.error("a worker could not start (see its lines above)")
            return 1
        for worker in self.workers.values():
            self.watchers.add(asyncio.create_task(self._watch(worker)))
        self.watchers.add(asyncio.create_task(self._pulse()))
        while not self.stopping.is_set():
            waits = [
                asyncio.ensure_future(self.stopping.wait()),
                asyncio.ensure_future(self.reloading.wait()),
                asyncio.ensure_future(self.source.changed()),
            ]
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            for wait in waits:
                wait.cancel()
            self.reloading.clear()
            if not self.stopping.is_set():
                self._reload()
        return 0

    async def _started(self) -> bool:
        """Wait until every worker applied its first Plans; False when one exits first or it takes too long."""
        started = {asyncio.ensure_future(worker.applied.wait()) for worker in self.workers.values()}
        exited = {asyncio.ensure_future(w.process.wait()) for w in self.workers.values() if w.process}
        stopping = asyncio.ensure_future(self.stopping.wait())
        deadline = asyncio.get_running_loop().time() + START_SECONDS
        try:
            while started:
                remaining = deadline - asyncio.get_running_loop().time()
                done, _ = await asyncio.wait(
                    started | exited | {stopping},
                    timeout=max(remaining, 0),
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if not done or done & exited:
                    return False
                if stopping in done:
                    return True
                started -= done
            return True
        finally:
            for future in started | exited | {stopping}:
                future.cancel()

    def _applied(self) -> None:
        """A worker applied Plans: once all run the current ones without problems, the source hears it."""
        workers = [self.workers.get(index) for index in range(self.count)]
        if all(w is not None and w.applied_seq == self.seq and not w.problems for w in workers):
            warnings = [w for worker in workers if worker is not None for w in worker.warnings]
            self.source.applied({p.key: p.generation for p in self.current}, list(dict.fromkeys(warnings)))

    def _reload(self) -> None:
        try:
            plans = self._load()
        except (config.InvalidConfig, runtime.BindError) as error:
            log.error("reload rejected, the current Plans keep serving:")
            for line in error.lines if isinstance(error, config.InvalidConfig) else [str(error)]:
                log.error("  %s", line)
            return
        if plans != self.current:
            self._push(plans)

    async def _start(self, index: int) -> Worker:
        worker = Worker(index, self.drain_timeout)
        self.workers[index] = worker
        worker.on_applied = self._applied
        await worker.start()
        self._send_plans(worker)
        self._send_verdicts(worker)
        return worker

    async def _pulse(self) -> None:
        """Ask every running worker for its metrics each `PULSE_SECONDS`: an answer is what keeps it ready.

        A worker whose loop is stuck (a bug, a hung call) or starved still holds its SO_REUSEPORT sockets,
        and the kernel keeps handing it its share of the new connections; `/readyz` must then say so, so
        that the pod leaves the VIP's eligible nodes instead of leaving those connections unanswered.
        """
        while not self.stopping.is_set():
            live = [
                w for w in self.workers.values() if w.process is not None and w.process.returncode is None
            ]
            await asyncio.gather(*(worker.report() for worker in live))
            await asyncio.sleep(PULSE_SECONDS)

    async def _watch(self, worker: Worker) -> None:
        """Restart a worker that exits while we are not stopping, backing off when it keeps crashing."""
        loop = asyncio.get_running_loop()
        quick = 0
        while True:
            started = loop.time()
            assert worker.process is not None
            code = await worker.process.wait()
            worker.close()
            if self.stopping.is_set():
                return
            quick = quick + 1 if loop.time() - started < STEADY_SECONDS else 0
            delay = RESTART_DELAYS[min(quick, len(RESTART_DELAYS) - 1)]
            log.error("worker %d exited with code %s; restarting it in %.1f s", worker.index, code, delay)
            await asyncio.sleep(delay)
            if self.stopping.is_set():
                return
            self.restarts += 1
            worker = await self._start(worker.index)

    async def _stop(self) -> None:
        """Forward SIGTERM to every worker and wait for their graceful stops (drain included)."""
        self.stopping.set()
        await asyncio.gather(*(checker.aclose() for _, checker in self.health.values()))
        for task in self.watchers:
            task.cancel()
        processes = [w.process for w in self.workers.values() if w.process and w.process.returncode is None]
        for process in processes:
            process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.gather(*(p.wait() for p in processes)), self.drain_timeout + 10)
        except TimeoutError:
            for process in processes:
                if process.returncode is None:
                    process.kill()
            await asyncio.gather(*(p.wait() for p in processes))
        for worker in self.workers.values():
            worker.close()


def _kernel(p: plan.Plan) -> bool:
    from layerlb import api

    return p.architecture in api.KERNEL_ARCHITECTURES


# --- the worker process --------------------------------------------------------------------------------------


class PushedSource(config.StaticSource):
    """The Plans the parent pushed; `loaded_seq` says which push `load()` last returned."""

    def __init__(self, plans: Sequence[plan.Plan], seq: int) -> None:
        super().__init__(plans)
        self.seq = seq
        self.loaded_seq = 0
        self.description = "the parent process"

    def push(self, plans: Sequence[plan.Plan], seq: int) -> None:
        self.seq = seq
        self.set(plans)

    def load(self) -> list[plan.Plan]:
        self.loaded_seq = self.seq
        return super().load()


def _plans(message: dict[str, Any]) -> list[plan.Plan]:
    return [plan.Plan.model_validate(data) for data in message["plans"]]


async def _worker(control_fd: int, drain_timeout: float, index: int) -> int:
    reader, writer = await asyncio.open_unix_connection(sock=socket.socket(fileno=control_fd))
    first = await reader.readline()
    if not first:
        return 0
    message = json.loads(first)
    source = PushedSource(_plans(message), message["seq"])

    def send(message: dict[str, Any]) -> None:
        if not writer.is_closing():
            writer.write(json.dumps(message).encode() + b"\n")

    def applied(problems: list[str]) -> None:
        send(
            {
                "op": "applied",
                "seq": source.loaded_seq,
                "problems": problems,
                "warnings": dataplane.warnings(),
            }
        )

    # The kernel is programmed once per node: by worker 0 only (the others serve the proxy architectures).
    engines = driver.default_engines() if index == 0 else None
    dataplane = runtime.Dataplane(
        source,
        engines=engines,
        probe=False,
        probe_health=False,  # the parent probes for every worker
        drain_timeout=drain_timeout,
        on_applied=applied,
        signals=(signal.SIGTERM,),
    )

    async def control() -> None:
        while line := await reader.readline():
            message = json.loads(line)
            if message["op"] == "plans":
                source.push(_plans(message), message["seq"])
            elif message["op"] == "report":
                send({"op": "report", "id": message["id"], "dumps": dataplane.dumps()})
            elif message["op"] == "health":
                dataplane.set_verdicts(
                    {
                        key: [(backend, address, port, up) for backend, address, port, up in verdicts]
                        for key, verdicts in message["verdicts"].items()
                    }
                )
        dataplane.request_stop()  # the parent is gone

    task = asyncio.create_task(control())
    try:
        return await dataplane.run()
    finally:
        task.cancel()
        writer.close()


def main(argv: Sequence[str] | None = None) -> int:
    """The worker process's entry point (started by `Supervisor`, never by hand)."""
    import uvloop

    parser = argparse.ArgumentParser(prog="layerlb-worker")
    parser.add_argument("--control-fd", type=int, required=True)
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--drain-timeout", type=float, default=runtime.DRAIN_SECONDS)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format=f"layerlb[worker {args.index}]: %(message)s", stream=sys.stderr
    )
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides; a terminal's ^C reaches it too
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(_worker(args.control_fd, args.drain_timeout, args.index))


if __name__ == "__main__":
    sys.exit(main())
