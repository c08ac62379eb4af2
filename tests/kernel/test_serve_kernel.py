"""`layerlb serve` programs the kernel architectures in the namespace it runs in, and keeps them healthy.

The whole path, as a user runs it: a LoadBalancer YAML (L4 nat on nftables, static endpoints, a TCP
health check) served by the real `layerlb serve` process inside the LB namespace; traffic from a client
namespace; a backend going down; the process stopping (rules stay for the next one to adopt) and the
LoadBalancer leaving the file (rules go).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.kernel.test_nftables_netns import (
    BACKEND_PORT,
    backends_of,
    fetch_many,
    routed_topology,
    start_backends,
)
from tests.netns import Namespace, Spawned, Topology

VIP = "10.0.110.1"
CLIENT = "10.0.11.2"
LB_FRONT, LB_BACK = "10.0.11.1", "10.0.12.1"
BACKENDS = {"be1": "10.0.12.11", "be2": "10.0.12.12"}
TABLE = "layerlb_shop_edge"

LOAD_BALANCER = f"""apiVersion: layerlb.dev/v1alpha1
kind: LoadBalancer
metadata: {{name: edge, namespace: shop}}
spec:
  mode: L4
  architecture: nat
  engine: nftables
  vip: {VIP}
  listeners: [{{name: web, port: 80, protocol: TCP}}]
  backends:
    - name: app
      endpoints:
        - {{address: {BACKENDS["be1"]}, port: {BACKEND_PORT}}}
        - {{address: {BACKENDS["be2"]}, port: {BACKEND_PORT}}}
      healthCheck: {{protocol: TCP, intervalSeconds: 2, timeoutSeconds: 1, unhealthyThreshold: 2}}
"""
# The LoadBalancer above gone, another (userspace) one in its place: the kernel rules must leave.
REPLACEMENT = f"""apiVersion: layerlb.dev/v1alpha1
kind: LoadBalancer
metadata: {{name: other, namespace: shop}}
spec:
  mode: L4
  architecture: proxy
  vip: {LB_FRONT}
  listeners: [{{name: t, port: 9000, protocol: TCP}}]
  backends: [{{name: app, endpoints: [{{address: {BACKENDS["be1"]}, port: {BACKEND_PORT}}}]}}]
"""


def _wait(condition: Callable[[], bool], what: str, serve: Spawned, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; layerlb serve said:\n{serve.stderr()}")
        time.sleep(0.2)


def _table_exists(lb: Namespace) -> bool:
    return lb.run(["nft", "list", "table", "ip", TABLE], check=False).returncode == 0


def _backends_reached(client: Namespace, connections: int) -> set[str]:
    """The backends `connections` new connections reach; empty when any of them fails."""
    try:
        return set(backends_of(client.call(fetch_many, VIP, 80, connections)))
    except Exception:
        return set()


def _serves(client: Namespace) -> bool:
    return bool(_backends_reached(client, 1))


@pytest.fixture(scope="module")
def topology() -> Iterator[tuple[dict[str, Namespace], dict[str, Spawned]]]:
    with Topology("servekernel", timeout=90) as topo:
        nodes = routed_topology(topo, CLIENT, LB_FRONT, BACKENDS, LB_BACK)
        yield nodes, start_backends(nodes, BACKENDS)


def _serve(lb: Namespace, config: Path) -> Spawned:
    return lb.popen([sys.executable, "-m", "layerlb.cli", "serve", str(config)], what="layerlb serve")


def test_serve_programs_nat_keeps_it_healthy_leaves_it_on_exit_and_removes_it_with_the_load_balancer(
    topology: tuple[dict[str, Namespace], dict[str, Spawned]], tmp_path: Path
) -> None:
    nodes, servers = topology
    client, lb = nodes["client"], nodes["lb"]
    config = tmp_path / "edge.yaml"
    config.write_text(LOAD_BALANCER)

    serve = _serve(lb, config)
    try:
        _wait(lambda: _serves(client), "the VIP to serve through the kernel", serve)
        spread = backends_of(client.call(fetch_many, VIP, 80, 60))
        assert set(spread) == {"be1", "be2"}, spread
        peers = {a["peer"] for c in client.call(fetch_many, VIP, 80, 4) for a in c}
        assert peers == {CLIENT}  # nat: the backend sees the client's own address

        servers.pop("be2").stop()  # a backend dies: the health check takes it out of the rules
        _wait(
            lambda: _backends_reached(client, 20) == {"be1"},
            "new connections to avoid the dead backend",
            serve,
        )
    finally:
        assert serve.stop(timeout=30) == 0, serve.stderr()
    assert _table_exists(lb), "the rules must outlive the process (a restart adopts them)"
    assert set(backends_of(client.call(fetch_many, VIP, 80, 5))) == {"be1"}  # still forwarding

    serve = _serve(lb, config)
    try:
        _wait(lambda: "shop/edge: generation" in serve.stderr(), "the restarted process to adopt edge", serve)
        config.write_text(REPLACEMENT)  # the LoadBalancer is gone from the source
        _wait(lambda: not _table_exists(lb), "the LoadBalancer's kernel rules to be removed", serve)
    finally:
        assert serve.stop(timeout=30) == 0, serve.stderr()
