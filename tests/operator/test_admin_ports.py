"""Host-network forwarding pods get an admin port each, so kernel-architecture LoadBalancers share nodes."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from typing import Any

import pytest
from layerlb_operator import admin_ports, cluster_view, objects, reconciler, sync_result
from layerlb_operator.metrics import Metrics

from tests.operator.test_reconciler import FakeClient


def _kernel_lb(name: str, architecture: str = "nat") -> dict[str, Any]:
    """An L4 LoadBalancer; nat, dsr and tunnel run on the node's network (IPVS, the default engine)."""
    return {
        "apiVersion": "layerlb.dev/v1alpha1",
        "kind": "LoadBalancer",
        "metadata": {"name": name, "namespace": "shop", "generation": 1, "uid": f"uid-{name}"},
        "spec": {
            "mode": "L4",
            "architecture": architecture,
            "listeners": [{"name": "tcp", "port": 80, "protocol": "TCP"}],
            "backends": [{"name": "app", "endpoints": [{"address": "10.1.0.1"}]}],
        },
    }


def _worker(
    *documents: dict[str, Any],
    ports: range = admin_ports.DEFAULT,
    deployed: dict[Any, list[int]] | None = None,
) -> tuple[reconciler.Reconciler, FakeClient, dict[str, list[dict[str, Any]]]]:
    store = {f"shop/{d['metadata']['name']}": [d] for d in documents}
    client = FakeClient(store)
    settings = objects.Settings(host_admin_ports=ports)
    worker = reconciler.Reconciler(
        client, settings, Metrics(), debounce=0.01, now=lambda: "2026-01-01T00:00:00Z"
    )
    pool = {
        "apiVersion": "layerlb.dev/v1alpha1",
        "kind": "VIPPool",
        "metadata": {"name": "p", "resourceVersion": "1"},
        "spec": {"addresses": ["192.0.2.0/28"]},
    }
    sources = cluster_view.Sources(
        loadbalancers=store, references={}, services={}, slices={}, secrets={}, pools={"p": [pool]},
        deployments={}, pods={}, serving={}, admin_ports=deployed or {},
    )  # fmt: skip
    worker.bind(sources)
    return worker, client, store


def _admin_port_of(client: FakeClient, name: str) -> int | None:
    deployments = [
        o for o in client.applied if o["kind"] == "Deployment" and o["metadata"]["name"].startswith(name)
    ]
    port = admin_ports.port_of(deployments[-1])
    if port is not None:
        command = deployments[-1]["spec"]["template"]["spec"]["containers"][0]["command"]
        assert f"0.0.0.0:{port}" in command  # the data plane binds what the probes ask
    return port


def test_host_network_load_balancers_get_distinct_ports_and_keep_them() -> None:
    worker, client, store = _worker(_kernel_lb("a"), _kernel_lb("b", "dsr"), _kernel_lb("c", "tunnel"))

    async def all_three() -> list[sync_result.Result]:
        return list(await asyncio.gather(*(worker.sync(store[f"shop/{n}"][0]) for n in "abc")))

    assert {r.verdict for r in asyncio.run(all_three())} == {"accepted"}
    ports = {name: _admin_port_of(client, name) for name in "abc"}
    assert sorted(p for p in ports.values() if p is not None) == [9090, 9091, 9092]
    asyncio.run(worker.sync(store["shop/b"][0]))
    assert _admin_port_of(client, "b") == ports["b"]  # a reconcile never moves a port


def test_the_port_a_deployment_already_has_is_kept_and_a_duplicate_moves() -> None:
    # An upgrade from the fixed port: two Deployments on 9090 (one per node); a restarted operator.
    deployed: dict[Any, list[int]] = {("shop", "a"): [9090], ("shop", "b"): [9090], ("shop", "c"): [9093]}
    worker, client, store = _worker(_kernel_lb("a"), _kernel_lb("b"), _kernel_lb("c"), deployed=deployed)
    for name in "cba":
        asyncio.run(worker.sync(store[f"shop/{name}"][0]))
    assert (_admin_port_of(client, "a"), _admin_port_of(client, "b"), _admin_port_of(client, "c")) == (
        9090,
        9091,
        9093,
    )


def test_pod_network_load_balancers_keep_the_fixed_port() -> None:
    lb = _kernel_lb("p", "proxy")
    worker, client, store = _worker(lb)
    asyncio.run(worker.sync(store["shop/p"][0]))
    deployment = next(o for o in client.applied if o["kind"] == "Deployment")
    spec = deployment["spec"]["template"]["spec"]
    assert "hostNetwork" not in spec
    assert spec["containers"][0]["ports"][0] == {"name": "admin", "containerPort": 9090, "protocol": "TCP"}


def test_exhaustion_is_reported_and_a_deleted_load_balancer_frees_its_port() -> None:
    worker, client, store = _worker(_kernel_lb("a"), _kernel_lb("b"), ports=range(9500, 9501))

    async def scenario() -> tuple[sync_result.Result, sync_result.Result]:
        await worker.sync(store["shop/a"][0])
        waiting = await worker.sync(store["shop/b"][0])
        await worker.forget(store.pop("shop/a")[0])
        assert "shop/b" in worker.queue  # woken: the port it waits for is free
        return waiting, await worker.sync(store["shop/b"][0])

    waiting, after = asyncio.run(scenario())
    assert waiting.verdict == "unresolvable"
    assert waiting.message == (
        "spec.architecture: every host admin port (9500-9500) is held by another host-network LoadBalancer "
        "(architectures nat, dsr, tunnel); widen LAYERLB_HOST_ADMIN_PORTS or delete one"
    )
    conditions = {c["type"]: c for c in client.patched[1][1]["conditions"]}
    assert (conditions["Accepted"]["status"], conditions["Accepted"]["reason"]) == (
        "False",
        "NoAdminPortAvailable",
    )
    assert after.verdict == "accepted"
    assert _admin_port_of(client, "b") == 9500


def test_the_range_setting() -> None:
    assert objects.Settings.from_environment(
        {"LAYERLB_HOST_ADMIN_PORTS": "10000-10009"}
    ).host_admin_ports == range(10000, 10010)
    assert objects.Settings.from_environment({}).host_admin_ports == range(9090, 9290)
    for bad in ("9090", "90-100", "9100-9090", "a-b", "9090-70000"):
        if bad == "9090":
            assert admin_ports.parse_range(bad) == range(9090, 9091)  # one port is a range too
            continue
        with pytest.raises(ValueError, match=r"LAYERLB_HOST_ADMIN_PORTS=.*want FIRST-LAST"):
            admin_ports.parse_range(bad)


def test_the_operator_refuses_a_bad_range_before_it_connects() -> None:
    env = {**os.environ, "LAYERLB_HOST_ADMIN_PORTS": "lots", "KUBECONFIG": "/nonexistent"}
    done = subprocess.run(
        [sys.executable, "-m", "layerlb.cli", "operator", "--metrics", "127.0.0.1:0"],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().endswith(
        "LAYERLB_HOST_ADMIN_PORTS='lots': want FIRST-LAST, two ports from 1024 to 65535, FIRST <= LAST"
    )
    assert "Traceback" not in done.stderr
