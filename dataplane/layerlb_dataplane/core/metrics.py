"""Prometheus metrics of the data plane: cheap counters on the hot path, text exposition at scrape time.

The proxies call `Metrics` once or twice per request or connection, so recording is a dictionary lookup
and an integer increment keyed by a tuple of the strings the caller already holds: no formatting, no
locks, no labels objects. A scrape turns the counters into a JSON-able `dump()` (which is also what a
worker process sends its parent), `merge` adds the dumps of several workers, and `render` writes the
Prometheus text format 0.0.4.

One `Metrics` counts one LoadBalancer in one worker; `render` adds the `loadbalancer` label, so listener
and backend names need only be unique within their LoadBalancer, as the API guarantees.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Mapping
from typing import Any, Final

# Upper bounds of the latency histogram, seconds: sub-millisecond proxying up to the default request timeout.
BUCKETS: Final = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
_LE: Final = (*(repr(bound) for bound in BUCKETS), "+Inf")
_ROW: Final = len(BUCKETS) + 2  # one count per bucket, the +Inf bucket, then the sum of observations

Dump = dict[str, Any]
# How many leading fields of a dumped row are its labels; the rest are values (durations: one list).
_KEY_WIDTH: Final = {
    "requests": 3,
    "durations": 2,
    "active": 1,
    "accepted": 1,
    "failures": 2,
    "relayed": 2,
    "accept_errors": 2,
    "refused": 2,
}


class RequestSeries:
    """The request counters of one listener and backend: by status class, and the latency histogram.

    The L7 proxy keeps it per backend, so counting a request costs no key tuple and no dictionary lookup.
    """

    __slots__ = ("classes", "row")

    def __init__(self) -> None:
        self.classes = [0] * 10  # requests by status // 100 (0-9; statuses are 100-599 and the proxy's own)
        self.row = [0.0] * _ROW

    def done(self, status: int, seconds: float) -> None:
        """A request finished with `status` after `seconds`."""
        self.classes[status // 100] += 1
        row = self.row
        row[bisect_left(BUCKETS, seconds)] += 1
        row[-1] += seconds


class Metrics:
    """Counters, gauges and histograms of one LoadBalancer in one worker."""

    def __init__(self) -> None:
        """Start every family empty; series appear on first use, as Prometheus clients expect."""
        self.requests: dict[tuple[str, str], RequestSeries] = {}
        self.active: dict[str, int] = {}
        self.accepted: dict[str, int] = {}
        self.failures: dict[tuple[str, str], int] = {}
        self.relayed: dict[tuple[str, str], list[int]] = {}  # L4: [connections, bytes from client, to client]
        self.accept_errors: dict[tuple[str, str], int] = {}
        self.refused: dict[tuple[str, str], int] = {}

    def connection_opened(self, listener: str) -> None:
        """A client connection (or, for UDP, a flow) was accepted on `listener`."""
        self.active[listener] = self.active.get(listener, 0) + 1
        self.accepted[listener] = self.accepted.get(listener, 0) + 1

    def connection_closed(self, listener: str) -> None:
        """A client connection (or UDP flow) on `listener` ended."""
        self.active[listener] = self.active.get(listener, 0) - 1

    def accept_error(self, listener: str, reason: str) -> None:
        """Accepting on `listener` failed: `reason` is EMFILE, ENFILE, ENOBUFS, ENOMEM or other."""
        key = (listener, reason)
        self.accept_errors[key] = self.accept_errors.get(key, 0) + 1

    def connection_refused(self, listener: str, reason: str) -> None:
        """A connection was closed by a limit (`reason`: max_connections or per_client) before being served."""
        key = (listener, reason)
        self.refused[key] = self.refused.get(key, 0) + 1

    def series(self, listener: str, backend: str) -> RequestSeries:
        """The request counters of `listener` and `backend` (created on first use)."""
        series = self.requests.get((listener, backend))
        if series is None:
            series = self.requests[(listener, backend)] = RequestSeries()
        return series

    def request_done(self, listener: str, backend: str, status: int, seconds: float) -> None:
        """A request finished with `status` (including layerlb's own 4xx/5xx) after `seconds`."""
        self.series(listener, backend).done(status, seconds)

    def upstream_failure(self, backend: str, kind: str) -> None:
        """A connect/timeout/reset to a backend: `kind` is connect, timeout or reset."""
        key = (backend, kind)
        self.failures[key] = self.failures.get(key, 0) + 1

    def relay_done(self, listener: str, backend: str, received: int, sent: int) -> None:
        """An L4 connection or UDP flow to `backend` ended after `received` bytes from the client and `sent` to it."""
        row = self.relayed.get((listener, backend))
        if row is None:
            row = self.relayed[(listener, backend)] = [0, 0, 0]
        row[0] += 1
        row[1] += received
        row[2] += sent

    def dump(self) -> Dump:
        """The counters as plain JSON-able data (what a worker sends its parent)."""
        return {
            "requests": [
                [*key, code, count]
                for key, series in self.requests.items()
                for code, count in enumerate(series.classes)
                if count
            ],
            "durations": [[*key, list(series.row)] for key, series in self.requests.items()],
            "active": [[key, count] for key, count in self.active.items()],
            "accepted": [[key, count] for key, count in self.accepted.items()],
            "failures": [[*key, count] for key, count in self.failures.items()],
            "relayed": [[*key, *row] for key, row in self.relayed.items()],
            "accept_errors": [[*key, count] for key, count in self.accept_errors.items()],
            "refused": [[*key, count] for key, count in self.refused.items()],
        }


def merge(dumps: Iterable[Dump]) -> Dump:
    """Add up the dumps of one LoadBalancer from several workers.

    Counters and active connections add up. Gauges every worker computes from its own Snapshot are not
    additive: `generation` is the oldest any worker serves, `endpoints` ready the fewest any worker sees
    (conservative while health checks converge) and total the most.
    """
    sums: dict[str, dict[tuple[Any, ...], list[float]]] = {family: {} for family in _KEY_WIDTH}
    endpoints: dict[str, list[int]] = {}
    generations: list[int] = []
    for dump in dumps:
        for family, width in _KEY_WIDTH.items():
            for row in dump.get(family, ()):
                values = row[width] if family == "durations" else row[width:]
                _add(sums[family], tuple(row[:width]), values)
        for backend, ready, total in dump.get("endpoints", ()):
            seen = endpoints.get(backend)
            endpoints[backend] = (
                [ready, total] if seen is None else [min(seen[0], ready), max(seen[1], total)]
            )
        if "generation" in dump:
            generations.append(dump["generation"])
    merged: Dump = {
        family: [[*key, row] if family == "durations" else [*key, *row] for key, row in table.items()]
        for family, table in sums.items()
    }
    merged["endpoints"] = [[backend, *counts] for backend, counts in endpoints.items()]
    if generations:
        merged["generation"] = min(generations)
    return merged


def _add(table: dict[tuple[Any, ...], list[float]], key: tuple[Any, ...], values: list[float]) -> None:
    row = table.get(key)
    if row is None:
        table[key] = list(values)
    else:
        for index, value in enumerate(values):
            row[index] += value


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(pairs: Mapping[str, object]) -> str:
    return "{" + ",".join(f'{name}="{_escape(str(value))}"' for name, value in pairs.items()) + "}"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _code_class(code: int) -> str:
    return f"{code}xx" if 1 <= code <= 5 else "other"


_FAMILIES: Final = (
    ("layerlb_requests_total", "counter", "HTTP requests answered, by listener, backend and status class."),
    (
        "layerlb_request_duration_seconds",
        "histogram",
        "Time from a request's first byte to its response's last.",
    ),
    ("layerlb_connections_active", "gauge", "Client connections (UDP: flows) open now."),
    ("layerlb_connections_total", "counter", "Client connections (UDP: flows) accepted."),
    ("layerlb_relayed_connections_total", "counter", "L4 connections (UDP: flows) relayed to a backend."),
    ("layerlb_relayed_bytes_total", "counter", "L4 bytes relayed; direction received is from clients."),
    ("layerlb_upstream_failures_total", "counter", "Failed attempts to reach a backend, by kind."),
    (
        "layerlb_accept_errors_total",
        "counter",
        "Failed accepts on a listener, by reason (EMFILE: out of file descriptors); accepting pauses.",
    ),
    (
        "layerlb_connections_refused_total",
        "counter",
        "Client connections closed unserved by a limit (max_connections, per_client).",
    ),
    (
        "layerlb_backend_endpoints",
        "gauge",
        "A backend's endpoints: total in the Plan, and ready to take traffic.",
    ),
    ("layerlb_plan_generation", "gauge", "The generation of the Plan being served."),
)


def render(dumps: Iterable[tuple[str, Dump]], extra: Iterable[str] = ()) -> str:
    """The Prometheus text exposition (format 0.0.4) of (LoadBalancer key, merged dump) pairs."""
    lines: dict[str, list[str]] = {name: [] for name, _, _ in _FAMILIES}
    for key, dump in dumps:
        lb = {"loadbalancer": key}
        for listener, backend, code, count in dump.get("requests", ()):
            labels = _labels(
                {**lb, "listener": listener, "backend": backend, "code_class": _code_class(code)}
            )
            lines["layerlb_requests_total"].append(f"layerlb_requests_total{labels} {_number(count)}")
        for listener, backend, row in dump.get("durations", ()):
            common = {**lb, "listener": listener, "backend": backend}
            family = lines["layerlb_request_duration_seconds"]
            cumulative = 0.0
            for le, count in zip(_LE, row[:-1], strict=True):
                cumulative += count
                labels = _labels({**common, "le": le})
                family.append(f"layerlb_request_duration_seconds_bucket{labels} {_number(cumulative)}")
            family.append(f"layerlb_request_duration_seconds_sum{_labels(common)} {_number(row[-1])}")
            family.append(f"layerlb_request_duration_seconds_count{_labels(common)} {_number(cumulative)}")
        for listener, count in dump.get("active", ()):
            lines["layerlb_connections_active"].append(
                f"layerlb_connections_active{_labels({**lb, 'listener': listener})} {_number(count)}"
            )
        for listener, count in dump.get("accepted", ()):
            lines["layerlb_connections_total"].append(
                f"layerlb_connections_total{_labels({**lb, 'listener': listener})} {_number(count)}"
            )
        for listener, backend, connections, received, sent in dump.get("relayed", ()):
            common = {**lb, "listener": listener, "backend": backend}
            lines["layerlb_relayed_connections_total"].append(
                f"layerlb_relayed_connections_total{_labels(common)} {_number(connections)}"
            )
            for direction, count in (("received", received), ("sent", sent)):
                labels = _labels({**common, "direction": direction})
                lines["layerlb_relayed_bytes_total"].append(
                    f"layerlb_relayed_bytes_total{labels} {_number(count)}"
                )
        for backend, kind, count in dump.get("failures", ()):
            labels = _labels({**lb, "backend": backend, "kind": kind})
            lines["layerlb_upstream_failures_total"].append(
                f"layerlb_upstream_failures_total{labels} {_number(count)}"
            )
        for kind, name in (
            ("accept_errors", "layerlb_accept_errors_total"),
            ("refused", "layerlb_connections_refused_total"),
        ):
            for listener, reason, count in dump.get(kind, ()):
                labels = _labels({**lb, "listener": listener, "reason": reason})
                lines[name].append(f"{name}{labels} {_number(count)}")
        for backend, ready, total in dump.get("endpoints", ()):
            for state, count in (("ready", ready), ("total", total)):
                labels = _labels({**lb, "backend": backend, "state": state})
                lines["layerlb_backend_endpoints"].append(
                    f"layerlb_backend_endpoints{labels} {_number(count)}"
                )
        if "generation" in dump:
            lines["layerlb_plan_generation"].append(
                f"layerlb_plan_generation{_labels(lb)} {_number(dump['generation'])}"
            )
    out: list[str] = []
    for name, kind, help_text in _FAMILIES:
        out.append(f"# HELP {name} {help_text}")
        out.append(f"# TYPE {name} {kind}")
        out.extend(lines[name])
    out.extend(extra)
    return "\n".join(out) + "\n"
