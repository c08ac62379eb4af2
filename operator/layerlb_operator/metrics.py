"""The operator's own `/metrics` (Prometheus text) and `/healthz`, so it can be scraped and probed like any pod.

The registry is plain counters and gauges rendered on demand; the server is a few lines of asyncio that
answer one GET per connection (no web framework for two fixed pages).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

RESULTS = ("accepted", "invalid", "unresolvable", "failed")


def _labels(**labels: str) -> str:
    inner = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
    return "{" + inner + "}" if inner else ""


@dataclass
class Metrics:
    """What the operator counts; `vips` and `services*` are asked for at scrape time, the rest is recorded
    as it happens."""

    reconciles: Counter[str] = field(default_factory=Counter)
    writes: Counter[str] = field(default_factory=Counter)
    conditions: dict[str, tuple[str, str]] = field(default_factory=dict)  # LB key -> (Accepted, Ready)
    leader: bool = False
    vips: Callable[[], int] = lambda: 0
    services: Callable[[], int] = lambda: 0
    service_addresses: Callable[[], int] = lambda: 0

    def reconciled(self, key: str, result: str, accepted: str, ready: str) -> None:
        """Count one reconcile of LoadBalancer `key` and remember its Accepted and Ready statuses."""
        self.reconciles[result] += 1
        self.conditions[key] = (accepted, ready)

    def forget(self, key: str) -> None:
        """LoadBalancer `key` is gone."""
        self.conditions.pop(key, None)

    def render(self) -> str:
        """The Prometheus text exposition (version 0.0.4)."""
        lines = [
            "# HELP layerlb_operator_reconciles_total LoadBalancer reconciles by result.",
            "# TYPE layerlb_operator_reconciles_total counter",
        ]
        lines += [
            f"layerlb_operator_reconciles_total{_labels(result=r)} {self.reconciles[r]}" for r in RESULTS
        ]
        lines += [
            "# HELP layerlb_operator_writes_total Requests that write to the API server, by kind.",
            "# TYPE layerlb_operator_writes_total counter",
        ]
        lines += [
            f"layerlb_operator_writes_total{_labels(kind=k)} {n}" for k, n in sorted(self.writes.items())
        ]
        lines += [
            "# HELP layerlb_operator_loadbalancers LoadBalancers by their Accepted and Ready condition status.",
            "# TYPE layerlb_operator_loadbalancers gauge",
        ]
        by_status = Counter(self.conditions.values())
        lines += [
            f"layerlb_operator_loadbalancers{_labels(accepted=a, ready=r)} {n}"
            for (a, r), n in sorted(by_status.items())
        ]
        lines += [
            "# HELP layerlb_operator_vips_allocated Addresses held by LoadBalancers and Services.",
            "# TYPE layerlb_operator_vips_allocated gauge",
            f"layerlb_operator_vips_allocated {self.vips()}",
            "# HELP layerlb_operator_services Services of type LoadBalancer that layerlb serves.",
            "# TYPE layerlb_operator_services gauge",
            f"layerlb_operator_services {self.services()}",
            "# HELP layerlb_operator_service_addresses_allocated Addresses held by Services of type LoadBalancer.",
            "# TYPE layerlb_operator_service_addresses_allocated gauge",
            f"layerlb_operator_service_addresses_allocated {self.service_addresses()}",
            "# HELP layerlb_operator_leader 1 while this replica holds the leader Lease and acts.",
            "# TYPE layerlb_operator_leader gauge",
            f"layerlb_operator_leader {int(self.leader)}",
        ]
        return "\n".join(lines) + "\n"


def parse_address(text: str) -> tuple[str, int]:
    """`HOST:PORT` (IPv6 in brackets) into its parts; ValueError says what is expected."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{text!r} is not HOST:PORT, e.g. 0.0.0.0:8080")
    return host.strip("[]") or "0.0.0.0", int(port)


async def serve(metrics: Metrics, host: str, port: int, healthy: Callable[[], bool]) -> asyncio.Server:
    """Start answering `GET /metrics` and `GET /healthz` on host:port."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            path = request.split(b" ", 2)[1].split(b"?")[0] if request.count(b" ") >= 2 else b""
            if path == b"/metrics":
                code, body, kind = "200 OK", metrics.render(), "text/plain; version=0.0.4"
            elif path == b"/healthz":
                code, body = ("200 OK", "ok\n") if healthy() else ("503 Service Unavailable", "unhealthy\n")
                kind = "text/plain"
            else:
                code, body, kind = "404 Not Found", "not found\n", "text/plain"
            data = body.encode()
            head = f"HTTP/1.1 {code}\r\nContent-Type: {kind}\r\nContent-Length: {len(data)}\r\nConnection: close\r\n\r\n"
            writer.write(head.encode() + data)
            await writer.drain()
        writer.close()

    return await asyncio.start_server(answer, host, port)
