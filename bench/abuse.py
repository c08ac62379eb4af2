"""The long run of the abuse tests (`make bench-abuse`): each abuse against `layerlb serve` for longer and
harder than `tests/chaos/test_abuse_*.py` can afford, with the legitimate client's latency quiet and
abused, and the serve process's resources while it lasts.

For each abuse: a fresh lab (`tests.chaos.abuse_lab.Lab`: a backend process, `layerlb serve` on a loopback
VIP, the legitimate client's own process from another address), the client alone for `--seconds`
(quiet), then again while the abuse runs (abused); meanwhile the serve process's RSS, descriptors and CPU
are sampled. A table goes to stdout, the figures as JSON to `--json` when given.

`python -m bench.abuse [--seconds S] [--only NAME,...] [--json PATH]`; names: idle, flood, slow-heads,
slow-bodies, huge-headers, huge-body, never-read, per-client, descriptors.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tests.chaos.abuse_lab import ABUSER_SOURCES, Lab, Latencies, sources

INTERVAL = 0.01  # the legitimate client's pace: a request every 10 ms
GET = b"GET / HTTP/1.1\r\nHost: abuse\r\n\r\n"


@dataclass
class Figures:
    """One abuse's row of the table."""

    name: str
    quiet_p50_ms: float
    quiet_p99_ms: float
    abused_p50_ms: float
    abused_p99_ms: float
    abused_failures: int
    abused_requests: int
    rss_before_mib: float
    rss_peak_mib: float
    fds_peak: int
    cpu_cores: float
    tcp_mem_peak_mib: float  # the host's TCP socket buffers (/proc/net/sockstat): what RSS does not show
    note: str = ""

    @property
    def ratio(self) -> float:
        return self.abused_p99_ms / self.quiet_p99_ms if self.quiet_p99_ms else 0.0


def tcp_memory() -> int:
    """Bytes in the host's TCP socket buffers (all sockets: the proxy's, the backend's, the clients')."""
    for line in Path("/proc/net/sockstat").read_text().splitlines():
        if line.startswith("TCP:"):
            return int(line.split()[-1]) * 4096
    return 0


class Sampler:
    """The serve process's peak RSS and descriptors, and its CPU, sampled while an abuse runs."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.rss_peak = lab.rss()
        self.fds_peak = lab.fds()
        self.tcp_mem_peak = tcp_memory()
        self.stop = threading.Event()
        self.cpu_start = lab.cpu_seconds()
        self.started = time.monotonic()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(0.25):
            with contextlib.suppress(OSError, ValueError):
                self.rss_peak = max(self.rss_peak, self.lab.rss())
                self.fds_peak = max(self.fds_peak, self.lab.fds())
                self.tcp_mem_peak = max(self.tcp_mem_peak, tcp_memory())

    def finish(self) -> float:
        """Stop; the CPU used meanwhile, in cores."""
        self.stop.set()
        self.thread.join(5)
        return (self.lab.cpu_seconds() - self.cpu_start) / (time.monotonic() - self.started)


Abuse = Callable[
    [Lab, threading.Event, threading.Event], str
]  # (lab, ready, stop): sets ready once in place, runs until stop; a note


def _threads(count: int, body: Callable[[int], None]) -> list[threading.Thread]:
    threads = [threading.Thread(target=body, args=(index,), daemon=True) for index in range(count)]
    for thread in threads:
        thread.start()
    return threads


def idle(lab: Lab, ready: threading.Event, stop: threading.Event) -> str:
    held = [lab.connect(source) for source in sources(10_000)]
    ready.set()
    stop.wait()
    for sock in held:
        sock.close()
    return "10,000 connections held, no byte sent"


def flood(lab: Lab, ready: threading.Event, stop: threading.Event) -> str:
    made = [0] * 4

    def run(index: int) -> None:
        for source in sources(10_000_000):
            if stop.is_set():
                return
            with contextlib.suppress(OSError):
                lab.connect(source).close()
                made[index] += 1

    started = time.monotonic()
    ready.set()
    for thread in _threads(4, run):
        thread.join()
    return f"{sum(made) / (time.monotonic() - started):.0f} connections/s opened and closed, 4 threads"


def slow_heads(lab: Lab, ready: threading.Event, stop: threading.Event) -> str:
    slow = [lab.connect(source) for source in sources(1000)]
    for sock in slow:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: slow\r\n")
    ready.set()
    while not stop.wait(1.0):
        for index, sock in enumerate(slow):
            try:
                sock.sendall(b"X-a: b\r\n")
            except OSError:  # answered 408 and closed: come back, as a patient attacker does
                sock.close()
                slow[index] = lab.connect(ABUSER_SOURCES[index % len(ABUSER_SOURCES)])
                slow[index].sendall(b"GET / HTTP/1.1\r\nHost: slow\r\n")
    for sock in slow:
        sock.close()
    return "1,000 heads, a header line per second each, reopened after their 408"


def slow_bodies(lab: Lab, ready: threading.Event, stop: threading.Event) -> str:
    head = b"POST /upload HTTP/1.1\r\nHost: slow\r\nContent-Length: 100000000\r\n\r\n"
    slow = [lab.connect(source) for source in sources(500)]
    for sock in slow:
        sock.sendall(head)
    ready.set()
    while not stop.wait(1.0):
        for sock in slow:
            with contextlib.suppress(OSError):
                sock.sendall(b"x")
    for sock in slow:
        sock.close()
    return "500 bodies, a byte per second each (an inactivity timeout: held while they trickle)"


def huge_headers(lab: Lab, ready: threading.Event, stop: threading.Event) -> str:
    block = b"".join(b"X-Filler-%d: %s\r\n" % (n, b"a" * 1000) for n in range(1000))
    count = [0] * 4

    def run(index: int) -> None:
        for source in sources(10_000_000):
            if stop.is_set():
                return
            with contextlib.suppress(OSError), lab.connect(source) as sock:
                sock.sendall(b"GET / HTTP/1.1\r\nHost: huge\r\n" + block)
                sock.recv(64)
                count[index] += 1

    started = time.monotonic()
    ready.set()
    for thread in _threads(4, run):
        thread.join()
    return f"{sum(count) / (time.monotonic() - started):.0f} x 1 MB header blocks/s (431)"


def huge_body(lab: Lab, ready: threading.Event, stop: threading.Event) -> str:
    sent = [0] * 2
    chunk = b"u" * (1 << 20)

    def run(index: int) -> None:
        size = 1 << 30
        with contextlib.suppress(OSError):
            while not stop.is_set():
                with lab.connect() as sock:
                    sock.sendall(b"POST /upload HTTP/1.1\r\nHost: big\r\nContent-Length: %d\r\n\r\n" % size)
                    for _ in range(size >> 20):
                        if stop.is_set():
                            return
                        sock.sendall(chunk)
                        sent[index] += len(chunk)
                    sock.recv(4096)

    started = time.monotonic()
    ready.set()
    for thread in _threads(2, run):
        thread.join()
    return (
        f"2 uploads of 1 GiB bodies in a loop, {sum(sent) / (time.monotonic() - started) / 2**20:.0f} MiB/s"
    )


def never_read(lab: Lab, ready: threading.Event, stop: threading.Event) -> str:
    stuck = []
    for source in sources(200):
        sock = lab.connect(source)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(b"GET /big HTTP/1.1\r\nHost: big\r\n\r\n")
        stuck.append(sock)
    ready.set()
    stop.wait()
    for sock in stuck:
        sock.close()
    return "200 clients asking 256 MiB each and reading nothing"


def per_client(lab: Lab, ready: threading.Event, stop: threading.Event) -> str:
    held = [lab.connect() for _ in range(1000)]  # the default cap of one address
    refused = [0] * 2
    ready.set()

    def run(index: int) -> None:
        while not stop.is_set():
            with contextlib.suppress(OSError), lab.connect() as sock:
                sock.sendall(GET)
                if sock.recv(64).startswith(b"HTTP/1.1 503"):
                    refused[index] += 1

    for thread in _threads(2, run):
        thread.join()
    for sock in held:
        sock.close()
    return f"one address: 1,000 held (its cap) and {sum(refused)} more refused with 503"


def descriptors(lab: Lab, ready: threading.Event, stop: threading.Event) -> str:
    held = []
    for source in sources(1500):  # over RLIMIT_NOFILE 1024
        with contextlib.suppress(OSError):
            held.append(lab.connect(source))
    ready.set()
    stop.wait()
    for sock in held:
        sock.close()
    return "RLIMIT_NOFILE 1024, 1,500 connections held (the legitimate client waits in the backlog)"


ABUSES: dict[str, tuple[Abuse, dict[str, Any]]] = {
    "idle": (idle, {}),
    "flood": (flood, {}),
    "slow-heads": (slow_heads, {}),
    "slow-bodies": (slow_bodies, {}),
    "huge-headers": (huge_headers, {}),
    "huge-body": (huge_body, {}),
    "never-read": (never_read, {}),
    "per-client": (per_client, {}),
    "descriptors": (descriptors, {"fd_limit": 1024}),
}


@contextlib.contextmanager
def _running(lab: Lab, abuse: Abuse) -> Iterator[dict[str, str]]:
    stop, ready = threading.Event(), threading.Event()
    result: dict[str, str] = {}

    def run() -> None:
        try:
            result["note"] = abuse(lab, ready, stop)
        finally:
            ready.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        ready.wait(300)
        time.sleep(1.0)  # let the abuse settle in before the client measures
        yield result
    finally:
        stop.set()
        thread.join(120)


def measure(name: str, seconds: float, folder: Path) -> Figures:
    """One abuse: the quiet client, then the client while the abuse runs, and the resources meanwhile."""
    abuse, options = ABUSES[name]
    with Lab(folder, "127.0.0.90", **options) as lab:
        quiet = lab.probe(seconds, INTERVAL)
        rss_before = lab.rss()
        with _running(lab, abuse) as result:
            sampler = Sampler(lab)
            abused: Latencies = lab.probe(seconds, INTERVAL)
            cpu = sampler.finish()
    return Figures(
        name=name,
        quiet_p50_ms=quiet.p50 * 1000,
        quiet_p99_ms=quiet.p99 * 1000,
        abused_p50_ms=abused.p50 * 1000 if abused.samples else float("nan"),
        abused_p99_ms=abused.p99 * 1000 if abused.samples else float("nan"),
        abused_failures=abused.failures,
        abused_requests=len(abused.samples) + abused.failures,
        rss_before_mib=rss_before / 2**20,
        rss_peak_mib=sampler.rss_peak / 2**20,
        fds_peak=sampler.fds_peak,
        cpu_cores=cpu,
        tcp_mem_peak_mib=sampler.tcp_mem_peak / 2**20,
        note=result.get("note", ""),
    )


def table(rows: list[Figures]) -> str:
    lines = [
        "abuse         quiet p50/p99 ms   abused p50/p99 ms   p99 x   failed/requests   RSS MiB before/peak   fds peak   CPU cores   TCP buffers MiB",
    ]
    for row in rows:
        lines.append(
            f"{row.name:<13} {row.quiet_p50_ms:6.1f} / {row.quiet_p99_ms:6.1f}    "
            f"{row.abused_p50_ms:7.1f} / {row.abused_p99_ms:7.1f}   {row.ratio:5.1f}   "
            f"{row.abused_failures:5d} / {row.abused_requests:<6d}    {row.rss_before_mib:6.1f} / {row.rss_peak_mib:6.1f}"
            f"       {row.fds_peak:6d}     {row.cpu_cores:4.2f}        {row.tcp_mem_peak_mib:7.0f}"
        )
    lines += [f"  {row.name}: {row.note}" for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--seconds", type=float, default=20.0, help="quiet and abused windows, each (default 20)"
    )
    parser.add_argument("--only", default="", help="comma-separated abuse names (default: all)")
    parser.add_argument("--json", type=Path, help="write the figures here as JSON")
    args = parser.parse_args(argv)
    names = [name for name in args.only.split(",") if name] or list(ABUSES)
    rows = []
    for name in names:
        print(f"abuse: {name} ...", flush=True)
        with tempfile.TemporaryDirectory(prefix=f"abuse-{name}-") as folder:
            rows.append(measure(name, args.seconds, Path(folder)))
        print(table(rows[-1:]).splitlines()[1], flush=True)
    print(table(rows))
    if args.json is not None:
        args.json.write_text(json.dumps([asdict(row) for row in rows], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
