"""1,000 Plan updates under load: not one request fails, and the data plane's memory stays flat (#18, point 2).

A `layerlb dataplane --plan FILE` process serves an L7 Plan with an HTTP and an HTTPS listener in front of
four real backends. Each update changes what a forwarding pod sees change in production, all at once: the
endpoints of both backends (a different pair serves `/` each time, the weights of `/api` move), the routes
(one host route replaced every time), and the HTTPS listener's certificate (three rotate). The update goes
the pod's way: the Plan file replaced by a rename, then SIGHUP (`config.PlanFile`, the path the ConfigMap
source takes too); the test waits until the admin server serves that generation before the next one.

Meanwhile wrk sends GETs on a new connection each over HTTP (the churn meets accepts) and on kept-alive
TLS connections over HTTPS (they outlive every certificate change), and counts every failure itself
(connect, read, write, timeout, non-2xx/3xx). Zero is the only pass.

Memory: the process's RSS after the first 100 updates (every code path warm) and after all of them; the
growth must stay under `RSS_GROWTH` (a leak of one Plan's TLS contexts, listeners or pools per update would
be 1,000 times that; measured: under 1 MiB). The TLS connections are kept alive on purpose: each new TLS
connection adds a session (about 4 KiB) to the listener's OpenSSL session cache, which keeps up to
OpenSSL's default 20,480 of them; that growth follows connections, not Plans, and is not what this
measures. The figures are printed (`-s`).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from layerlb import api, plan
from tests.chaos.dataplane_process import DataplaneProcess, Wrk
from tests.dataplane.conftest import Backend, LoopThread
from tests.dataplane.helpers_runtime import free_port, make_certificate

VIP = "127.0.0.61"
UPDATES = 1000
WARM = 100
RSS_GROWTH = 6 * 1024 * 1024  # bytes, from update WARM to update UPDATES
MIB = 1024 * 1024


@pytest.fixture
def loop_thread() -> Iterator[LoopThread]:
    thread = LoopThread()
    yield thread
    thread.stop()


def churned_plan(
    generation: int,
    http_port: int,
    https_port: int,
    backends: list[int],
    certificates: list[plan.Certificate],
) -> plan.Plan:
    """Update `generation` of the Plan: every part that churns moved on by one."""
    pair = [backends[generation % len(backends)], backends[(generation + 1) % len(backends)]]
    return plan.Plan(
        name="churn",
        namespace="chaos",
        generation=generation,
        mode=api.Mode.L7,
        architecture=api.Architecture.proxy,
        engine=None,
        vip=VIP,
        listeners=(
            plan.Listener(name="http", port=http_port, protocol=api.Protocol.HTTP, transport="TCP"),
            plan.Listener(
                name="https",
                port=https_port,
                protocol=api.Protocol.HTTPS,
                transport="TCP",
                certificates=(certificates[generation % len(certificates)],),
            ),
        ),
        backends=(
            plan.Backend(
                name="web",
                algorithm=api.Algorithm.round_robin,
                endpoints=tuple(plan.Endpoint(address="127.0.0.1", port=port, weight=1) for port in pair),
            ),
            plan.Backend(
                name="api",
                algorithm=api.Algorithm.least_connections,
                endpoints=tuple(
                    plan.Endpoint(address="127.0.0.1", port=port, weight=1 + (generation + index) % 3)
                    for index, port in enumerate(backends)
                ),
            ),
        ),
        routes=(
            plan.Route(path_prefix="/api", backend="api"),
            plan.Route(hosts=(f"h{generation % 50}.example.com",), path_prefix="/x", backend="api"),
        ),
        default_backend="web",
    )


def test_a_thousand_plan_updates_under_load_fail_no_request_and_keep_memory_flat(
    tmp_path: Path, loop_thread: LoopThread
) -> None:
    backends = [Backend(loop_thread, f"b{index}") for index in range(4)]
    ports = [backend.port for backend in backends]
    certificates = [make_certificate(tmp_path, f"cert{index}", []) for index in range(3)]
    http_port, https_port = free_port(VIP), free_port(VIP)

    def plans(generation: int) -> list[plan.Plan]:
        return [churned_plan(generation, http_port, https_port, ports, certificates)]

    dataplane = DataplaneProcess(tmp_path, plans(1))
    fresh = Wrk(tmp_path, f"http://{VIP}:{http_port}/", connections=2, delay_ms=20, close=True)
    kept_tls = Wrk(tmp_path, f"https://{VIP}:{https_port}/api/items", connections=4, delay_ms=20)
    began = time.monotonic()
    warm_rss = 0
    for generation in range(2, UPDATES + 2):
        dataplane.reload(plans(generation), generation)
        if generation == WARM + 1:
            warm_rss = dataplane.rss()
    took = time.monotonic() - began
    final_rss = dataplane.rss()
    served, encrypted = fresh.finish(), kept_tls.finish()
    assert dataplane.stop() == 0
    for backend in backends:
        backend.close()
    print(
        f"\n{UPDATES} Plan updates in {took:.1f} s ({UPDATES / took:.0f}/s) under load: HTTP new connections "
        f"{served.requests} requests, {served.failed} failed; HTTPS kept alive {encrypted.requests} "
        f"requests, {encrypted.failed} failed; RSS {warm_rss / MIB:.1f} MiB after {WARM} updates, "
        f"{final_rss / MIB:.1f} MiB after {UPDATES} (+{(final_rss - warm_rss) / MIB:.2f} MiB)"
    )
    assert served.failed == 0, served.output
    assert encrypted.failed == 0, encrypted.output
    # The load ran throughout: both clients sent requests across the churn, not only before it. At least one
    # request per ten updates each: on a quiet machine the churn is fastest (1,000 updates in 4 s) and the
    # clients send the fewest (measured 360 HTTP and 760 HTTPS); a bound tied to the update count alone
    # (one per two updates) failed there although nothing was wrong (found by a fresh-clone CI run).
    assert served.requests > UPDATES // 10 and encrypted.requests > UPDATES // 10, (
        served.output,
        encrypted.output,
    )
    assert final_rss - warm_rss < RSS_GROWTH, (warm_rss, final_rss)
