"""The bench's results as a table and as JSON, and the issues' targets judged from them, so one run
answers "did layerlb meet its targets on this machine" and leaves a file to compare runs by.

Every row and scenario is either measured or `unavailable` with its reason; a target whose inputs are
unavailable is itself `unavailable`, never counted as met or missed.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import wrk
from bench.wrk import Measurement

OK, UNAVAILABLE = "ok", "unavailable"
BUSY_WARNING = 15.0  # percent of a CPU used by others before a row, above which the run is flagged


@dataclass
class Row:
    """One subject driven by wrk: at 50 connections (throughput) and at one (added latency)."""

    key: str
    label: str
    status: str = UNAVAILABLE
    reason: str | None = None
    c50: Measurement | None = None
    c1: Measurement | None = None
    startup_seconds: float | None = None
    cpu_busy: dict[str, float] = field(default_factory=dict)  # percent per CPU during the -c50 run
    background_busy: dict[str, float] = field(default_factory=dict)  # percent per CPU just before, idle
    subject_cpu: float | None = None  # percent of one CPU the subject (and its children) used at -c50
    # CPU seconds the subject used during the -c50 run: per request, the figure that busy machines disturb
    # least (throughput depends on who else runs; the work one request costs hardly does).
    subject_cpu_seconds: float | None = None
    notes: list[str] = field(default_factory=list)
    rounds: list[Row] = field(default_factory=list)  # with --rounds N: each round's own Row

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "label": self.label,
            "status": self.status,
            "reason": self.reason,
            "startup_seconds": self.startup_seconds,
            "cpu_busy_percent": self.cpu_busy,
            "background_busy_percent": self.background_busy,
            "subject_cpu_percent": self.subject_cpu,
            "subject_cpu_us_per_request": self.cpu_us_per_request,
            "c50": self.c50.to_json() if self.c50 else None,
            "c1": self.c1.to_json() if self.c1 else None,
            "notes": self.notes,
            "rounds": [attempt.to_json() for attempt in self.rounds] if len(self.rounds) > 1 else [],
        }

    @property
    def cpu_us_per_request(self) -> float | None:
        """Subject CPU time per request at -c50, microseconds (None when not measured)."""
        if self.subject_cpu_seconds is None or self.c50 is None or not self.c50.requests:
            return None
        return round(1e6 * self.subject_cpu_seconds / self.c50.requests, 1)

    def combine(self) -> None:
        """Fold the rounds into this row: unavailable if any round was, else the merged figures."""
        if not self.rounds:
            self.status, self.reason = UNAVAILABLE, self.reason or "not run"
            return
        failed = next((attempt for attempt in self.rounds if attempt.status != OK), None)
        first = self.rounds[0]
        self.startup_seconds = first.startup_seconds
        self.notes = first.notes
        if failed is not None:
            self.status, self.reason = UNAVAILABLE, failed.reason
            return
        self.c50 = wrk.merge([attempt.c50 for attempt in self.rounds if attempt.c50 is not None])
        ones = [attempt.c1 for attempt in self.rounds if attempt.c1 is not None]
        self.c1 = wrk.merge(ones) if ones else None
        self.cpu_busy = _mean([attempt.cpu_busy for attempt in self.rounds])
        self.background_busy = _mean([attempt.background_busy for attempt in self.rounds])
        used = [attempt.subject_cpu for attempt in self.rounds if attempt.subject_cpu is not None]
        self.subject_cpu = round(sum(used) / len(used), 1) if used else None
        spent = [a.subject_cpu_seconds for a in self.rounds if a.subject_cpu_seconds is not None]
        self.subject_cpu_seconds = sum(spent) if len(spent) == len(self.rounds) else None
        self.status, self.reason = OK, None


def _mean(readings: list[dict[str, float]]) -> dict[str, float]:
    keys = {key for reading in readings for key in reading}
    return {key: round(sum(r.get(key, 0.0) for r in readings) / len(readings), 1) for key in sorted(keys)}


@dataclass
class Scenario:
    """A measurement that is not a wrk row (reload under load, memory): free-form figures."""

    key: str
    label: str
    status: str = UNAVAILABLE
    reason: str | None = None
    figures: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "label": self.label,
            "status": self.status,
            "reason": self.reason,
            **self.figures,
        }


@dataclass(frozen=True)
class Target:
    """One target of issue 3 or 4: the measured value against its goal, and whether it was met."""

    issue: int
    name: str
    value: float | None
    goal: str
    unit: str
    met: bool | None  # None: not measured (an input was unavailable)
    why: str | None = None

    @property
    def verdict(self) -> str:
        return "unavailable" if self.met is None else "met" if self.met else "MISSED"

    def to_json(self) -> dict[str, Any]:
        return {
            "issue": self.issue,
            "name": self.name,
            "value": self.value,
            "goal": self.goal,
            "unit": self.unit,
            "verdict": self.verdict,
            "why": self.why,
        }


def _target(
    issue: int,
    name: str,
    goal: str,
    unit: str,
    compute: Callable[[], float],
    test: Callable[[float], bool],
    inputs: list[Row | Scenario | None],
) -> Target:
    missing = [item for item in inputs if item is None or item.status != OK]
    if missing:
        why = "; ".join(
            f"{item.label}: {item.reason or 'not measured'}" if item is not None else "not run"
            for item in missing
        )
        return Target(issue, name, None, goal, unit, None, why)
    try:
        value = compute()
    except (ZeroDivisionError, KeyError, TypeError) as error:
        return Target(issue, name, None, goal, unit, None, f"cannot compute: {error}")
    return Target(issue, name, round(value, 3), goal, unit, test(value))


def targets(rows: dict[str, Row], scenarios: dict[str, Scenario]) -> list[Target]:
    """Judge every target of issues 3 and 4 from the rows and scenarios of this run."""

    def c50(key: str) -> Measurement:
        measured = rows[key].c50
        assert measured is not None
        return measured

    def c1(key: str) -> Measurement:
        measured = rows[key].c1
        assert measured is not None
        return measured

    def row(key: str) -> Row | None:
        return rows.get(key)

    def figure(key: str, name: str) -> float:
        value: float = scenarios[key].figures[name]
        return value

    reload, memory = scenarios.get("reload_layerlb"), scenarios.get("memory")
    return [
        _target(3, "L7 throughput, layerlb / HAProxy http", ">= 0.9", "x",
                lambda: c50("layerlb_l7").rps / c50("haproxy_http").rps, lambda v: v >= 0.9,
                [row("layerlb_l7"), row("haproxy_http")]),
        _target(3, "L7 p99, layerlb / HAProxy http", "<= 1.2", "x",
                lambda: c50("layerlb_l7").p99_ms / c50("haproxy_http").p99_ms, lambda v: v <= 1.2,
                [row("layerlb_l7"), row("haproxy_http")]),
        _target(3, "L7 added p50 at -c1, layerlb - direct", "<= 0.3", "ms",
                lambda: c1("layerlb_l7").p50_ms - c1("direct").p50_ms, lambda v: v <= 0.3,
                [row("layerlb_l7"), row("direct")]),
        _target(4, "L4 throughput, layerlb / HAProxy tcp", ">= 0.9", "x",
                lambda: c50("layerlb_l4").rps / c50("haproxy_tcp").rps, lambda v: v >= 0.9,
                [row("layerlb_l4"), row("haproxy_tcp")]),
        _target(4, "L4 p99, layerlb / HAProxy tcp", "<= 1.2", "x",
                lambda: c50("layerlb_l4").p99_ms / c50("haproxy_tcp").p99_ms, lambda v: v <= 1.2,
                [row("layerlb_l4"), row("haproxy_tcp")]),
        _target(4, "kernel throughput, nftables DNAT / direct (netns)", ">= 0.9", "x",
                lambda: c50("kernel_nft").rps / c50("netns_direct").rps, lambda v: v >= 0.9,
                [row("kernel_nft"), row("netns_direct")]),
        _target(3, "reload: failed requests (layerlb)", "== 0", "req",
                lambda: figure("reload_layerlb", "failed_requests"), lambda v: v == 0, [reload]),
        _target(3, "reload: dropped WebSockets (layerlb)", "== 0", "conn",
                lambda: figure("reload_layerlb", "dropped_websockets"), lambda v: v == 0, [reload]),
        _target(3, "memory: idle worker RSS", "<= 50", "MB",
                lambda: figure("memory", "idle_worker_mb"), lambda v: v <= 50, [memory]),
        _target(3, "memory: worker RSS, 5,000 idle keep-alive clients", "<= 150", "MB",
                lambda: figure("memory", "clients_worker_mb"), lambda v: v <= 150, [memory]),
    ]  # fmt: skip


# Pairs of rows whose CPU per request is compared (layerlb's against HAProxy's in the same mode).
CPU_PAIRS = (("layerlb_l7", "haproxy_http"), ("layerlb_l4", "haproxy_tcp"))


def cpu_ratios(rows: list[Row]) -> dict[str, float]:
    """CPU per request of layerlb over HAProxy's, per mode measured: with the subject the bottleneck,
    roughly the inverse of the throughput ratio a quiet machine would show."""
    by_key = {row.key: row for row in rows}
    ratios = {}
    for ours, theirs in CPU_PAIRS:
        mine, reference = by_key.get(ours), by_key.get(theirs)
        if mine is None or reference is None:
            continue
        a, b = mine.cpu_us_per_request, reference.cpu_us_per_request
        if a is not None and b:
            ratios[f"{ours} / {theirs}"] = round(a / b, 3)
    return ratios


def _ms(value: float) -> str:
    return f"{value:.2f}"


def _rps(value: float) -> str:
    return f"{value / 1000:.1f} k"


def table(rows: list[Row], scenarios: list[Scenario], judged: list[Target]) -> str:
    """The results as Markdown tables: rows, then targets, then the scenarios' figures."""
    lines = [
        "| row | req/s (-c50) | p50 ms | p99 ms | -c1 req/s | -c1 p50 ms | -c1 p99 ms | errors | subject CPU | CPU µs/req | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if row.status != OK or row.c50 is None:
            lines.append(f"| {row.label} | - | - | - | - | - | - | - | - | - | unavailable: {row.reason} |")
            continue
        one = row.c1
        errors = row.c50.failed + (one.failed if one else 0)
        cpu = "-" if row.subject_cpu is None else f"{row.subject_cpu:.0f} %"
        per = "-" if row.cpu_us_per_request is None else f"{row.cpu_us_per_request:.1f}"
        lines.append(
            f"| {row.label} | {_rps(row.c50.rps)} | {_ms(row.c50.p50_ms)} | {_ms(row.c50.p99_ms)} | "
            f"{_rps(one.rps) if one else '-'} | {_ms(one.p50_ms) if one else '-'} | "
            f"{_ms(one.p99_ms) if one else '-'} | {errors} | {cpu} | {per} | ok |"
        )
    for row in rows:
        lines += [f"\nNote, {row.label}: {note}" for note in row.notes]
    busy = max((max(row.background_busy.values(), default=0.0) for row in rows), default=0.0)
    if busy > BUSY_WARNING:
        lines += [
            "",
            f"WARNING: other work used up to {busy:.0f} % of a CPU just before a row (see background_busy_percent "
            "in the JSON): figures and ratios of this run are unreliable; run again on a quiet machine.",
        ]
    for pair, ratio in cpu_ratios(rows).items():
        lines.append(
            f"\nCPU per request, {pair}: {ratio:g} (not a target; steadier than throughput on a busy machine)"
        )
    lines += ["", "| issue | target | value | goal | verdict |", "|---|---|---|---|---|"]
    for target in judged:
        value = "-" if target.value is None else f"{target.value:g} {target.unit}".strip()
        verdict = target.verdict if target.why is None else f"{target.verdict} ({target.why})"
        lines.append(
            f"| #{target.issue} | {target.name} | {value} | {target.goal} {target.unit} | {verdict} |"
        )
    for scenario in scenarios:
        lines.append("")
        if scenario.status != OK:
            lines.append(f"{scenario.label}: unavailable: {scenario.reason}")
            continue
        shown = ", ".join(
            f"{name}={value}"
            for name, value in scenario.figures.items()
            if not isinstance(value, (list, dict))
        )
        lines.append(f"{scenario.label}: {shown}")
    return "\n".join(lines)


def write_json(path: Path, document: dict[str, Any]) -> Path:
    """Write the run's JSON (creating the folder), pretty-printed so diffs between runs read well."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2, sort_keys=False) + "\n")
    return path
