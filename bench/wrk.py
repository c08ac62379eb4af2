"""Runs wrk and reads its figures, so every row is driven by the same load generator with the same flags.

wrk prints `--latency` percentiles for people; a `done` script (it costs nothing per request, only
`request`/`response` hooks would) also writes the same summary as one JSON line, which is what is parsed:
requests, duration, the error counters and the latency percentiles in microseconds.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench import processes
from bench.processes import Unavailable

MARK = "BENCH-JSON "
_started: list[subprocess.Popen[bytes]] = []  # for stop_all

DONE_SCRIPT = """-- layerlb bench: the summary as one JSON line (parsed by bench/wrk.py)
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '%s{"requests":%d,"duration_us":%d,"bytes":%d,"connect":%d,"read":%d,"write":%d,"status":%d,' ..
    '"timeout":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,"mean_us":%.1f}\\n',
    "MARK", summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status,
    e.timeout, latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
    latency.mean))
end
""".replace('"MARK"', json.dumps(MARK))


@dataclass(frozen=True)
class Measurement:
    """One wrk run: throughput, latency percentiles and every kind of failure wrk counts."""

    connections: int
    seconds: float
    requests: int
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    errors_connect: int
    errors_read: int
    errors_write: int
    errors_timeout: int
    non_2xx_3xx: int

    @property
    def failed(self) -> int:
        """Failed requests as the reload target counts them: bad statuses plus socket errors."""
        return (
            self.non_2xx_3xx
            + self.errors_connect
            + self.errors_read
            + self.errors_write
            + self.errors_timeout
        )

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "failed": self.failed}


def parse(output: str) -> Measurement:
    """The Measurement in wrk's output (the `done` script's JSON line); ValueError when it is missing."""
    for line in output.splitlines():
        if line.startswith(MARK):
            data = json.loads(line[len(MARK) :])
            break
    else:
        raise ValueError(f"wrk printed no summary: {output.strip()[-300:]!r}")
    seconds = data["duration_us"] / 1e6
    return Measurement(
        connections=0,
        seconds=round(seconds, 3),
        requests=data["requests"],
        rps=round(data["requests"] / seconds, 1) if seconds > 0 else 0.0,
        p50_ms=data["p50_us"] / 1000,
        p90_ms=data["p90_us"] / 1000,
        p99_ms=data["p99_us"] / 1000,
        max_ms=data["max_us"] / 1000,
        errors_connect=data["connect"],
        errors_read=data["read"],
        errors_write=data["write"],
        errors_timeout=data["timeout"],
        non_2xx_3xx=data["status"],
    )


def write_script(folder: Path) -> Path:
    """Write the `done` script once per run; wrk reads it with `-s`."""
    path = folder / "summary.lua"
    path.write_text(DONE_SCRIPT)
    return path


def command(
    url: str, connections: int, seconds: float, script: Path, prefix: list[str] | None = None
) -> list[str]:
    """The wrk command line: one thread, `connections` keep-alive connections, latency percentiles."""
    wrk = processes.require("wrk")
    duration = f"{max(1, round(seconds))}s"
    return [
        *(prefix or []),
        wrk,
        "-t1",
        f"-c{connections}",
        f"-d{duration}",
        "--latency",
        "--timeout",
        "5s",
        "-s",
        str(script),
        url,
    ]


def stop(popen: subprocess.Popen[bytes]) -> None:
    """Kill a wrk that must not finish (interrupted, timed out) and reap it."""
    if popen.poll() is None:
        popen.kill()
    popen.communicate()


def finish(popen: subprocess.Popen[bytes], connections: int, timeout: float) -> Measurement:
    """Wait for a started wrk and parse what it printed."""
    try:
        out, err = popen.communicate(timeout=timeout)
    except subprocess.TimeoutExpired as error:
        stop(popen)
        raise Unavailable(f"wrk did not finish within {timeout:g} s") from error
    except BaseException:  # interrupted: never leave a load generator running
        stop(popen)
        raise
    text = out.decode(errors="replace")
    try:
        measured = parse(text)
    except ValueError as error:
        raise Unavailable(f"{error}; stderr: {err.decode(errors='replace').strip()[-200:]}") from error
    return Measurement(**{**asdict(measured), "connections": connections})


def spawn(
    url: str,
    connections: int,
    seconds: float,
    script: Path,
    cpus: frozenset[int] | None,
    prefix: list[str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start wrk pinned to `cpus` (the load side) without waiting, for runs that overlap other work."""
    argv = command(url, connections, seconds, script, prefix)

    def pin() -> None:
        if cpus is not None:
            os.sched_setaffinity(0, cpus)

    popen = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=pin)
    _started.append(popen)
    return popen


def stop_all() -> None:
    """Kill every wrk this process started that still runs (the run was interrupted)."""
    while _started:
        popen = _started.pop()
        if popen.poll() is None:
            stop(popen)


def run(
    url: str,
    connections: int,
    seconds: float,
    script: Path,
    cpus: frozenset[int] | None,
    prefix: list[str] | None = None,
) -> Measurement:
    """Run wrk to completion against `url` and return its Measurement."""
    popen = spawn(url, connections, seconds, script, cpus, prefix)
    return finish(popen, connections, timeout=seconds + 30)


def merge(measurements: list[Measurement]) -> Measurement:
    """Several rounds of the same run as one: throughput over the summed time, percentiles averaged
    (an approximation; each round's own figures stay in the JSON), the worst maximum, errors summed."""
    if len(measurements) == 1:
        return measurements[0]
    count = len(measurements)
    seconds = sum(m.seconds for m in measurements)
    requests = sum(m.requests for m in measurements)
    return Measurement(
        connections=measurements[0].connections,
        seconds=round(seconds, 3),
        requests=requests,
        rps=round(requests / seconds, 1) if seconds > 0 else 0.0,
        p50_ms=round(sum(m.p50_ms for m in measurements) / count, 3),
        p90_ms=round(sum(m.p90_ms for m in measurements) / count, 3),
        p99_ms=round(sum(m.p99_ms for m in measurements) / count, 3),
        max_ms=max(m.max_ms for m in measurements),
        errors_connect=sum(m.errors_connect for m in measurements),
        errors_read=sum(m.errors_read for m in measurements),
        errors_write=sum(m.errors_write for m in measurements),
        errors_timeout=sum(m.errors_timeout for m in measurements),
        non_2xx_3xx=sum(m.non_2xx_3xx for m in measurements),
    )
