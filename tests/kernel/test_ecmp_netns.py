"""Flows survive ECMP changes on the nftables engine: a router spreads the VIP over nodes by a multipath
route, 100 long-lived TCP connections run, a 4th node joins and then one leaves; a `dsr` flow the router
moves to another node reaches the same backend there (every node hashes the flow with the same seed over
the same map), so no connection breaks. `nat` cannot: a moved flow reaches a node without its conntrack
entry, which translates it afresh (another source address for the backend): the backend resets it.

The lab is `ecmp_lab` (namespaces on this machine; the IPVS counterpart runs in the QEMU guest). A node
whose seed differs from the others' is the negative control: with it, moved dsr flows break.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest
from layerlb_dataplane.kernel import nftables

from layerlb import api, plan
from layerlb.render import nftables_ruleset
from tests.kernel import ecmp_lab as lab
from tests.kernel import guest_scenarios as scenarios
from tests.netns import Namespace, Topology

COUNT, INTERVAL = 100, 0.1
SETTLE = lab.ANSWER_TIMEOUT + 1.5  # seconds per phase: a stalled connection is seen as broken in its phase


def ecmp_plan(architecture: api.Architecture) -> plan.Plan:
    """The LoadBalancer every node serves: the VIP on port 80, round-robin over the three backends."""
    port = lab.PORT if architecture is api.Architecture.nat else None  # dsr cannot change the port
    endpoints = [(address, port, 1) for address in lab.BACKENDS.values()]
    return scenarios.make_plan(
        "flows", lab.VIP, architecture, endpoints, engine=api.Engine.nftables, namespace="ecmp",
        listeners=(("tcp", lab.PORT, "TCP"),),
    )  # fmt: skip


def sync_node(plan_json: str, seed: str | None = None) -> int:
    """Runs in a node: one nftables engine sync of the Plan (nat masquerades: the nodes share the backends'
    segment, so replies must come back to the node that translated). `seed` replaces the Plan's hash seed
    on this node only: the negative control."""
    if seed is not None:
        nftables_ruleset.nft_seed = lambda p: seed
    p = plan.Plan.model_validate_json(plan_json)
    engine = nftables.NftablesEngine(masquerade=p.architecture is api.Architecture.nat)
    return engine.sync(p, {}).changes


def build(topo: Topology) -> dict[str, Namespace]:
    """The lab's namespaces, addressed and linked; backends answering on port 80."""
    switch = topo.namespace("sw")
    nodes = {name: topo.namespace(name) for name in ("client", "router", *lab.NODES, *lab.BACKENDS)}
    topo.link(nodes["client"], "eth0", nodes["router"], "eth0")
    nodes["client"].addr("eth0", f"{lab.CLIENT}/24")
    nodes["client"].route(f"default via {lab.ROUTER_FRONT}")
    nodes["router"].addr("eth0", f"{lab.ROUTER_FRONT}/24")
    topo.link(nodes["router"], "lan", switch, "p-router")
    nodes["router"].addr("lan", f"{lab.ROUTER_LAN}/24")
    for key, value in lab.ROUTER_SYSCTLS.items():
        nodes["router"].sysctl(key, value)
    ports = ["p-router"]
    for name, address in {**lab.NODES, **lab.BACKENDS}.items():
        topo.link(nodes[name], "eth0", switch, f"p-{name}")
        nodes[name].addr("eth0", f"{address}/24")
        nodes[name].route(f"default via {lab.ROUTER_LAN}")
        ports.append(f"p-{name}")
    topo.bridge(switch, "br0", ports)
    for name in lab.BACKENDS:
        for key, value in lab.BACKEND_SYSCTLS.items():
            nodes[name].sysctl(key, value)
        nodes[name].addr("lo", f"{lab.VIP}/32")
        nodes[name].spawn(lab.name_server, name, lab.PORT).wait_for_line("ready", timeout=30)
    return nodes


@pytest.fixture(scope="module")
def ecmp() -> Iterator[dict[str, Namespace]]:
    with Topology("ecmp", timeout=60) as topo:
        yield build(topo)


def run(nodes: dict[str, Namespace], p: plan.Plan, seeds: dict[str, str] | None = None) -> dict[str, Any]:
    """Every node synced with `p`, then the three phases of `ecmp_lab.PHASES` under 100 long-lived flows;
    the run's `ecmp_lab.summary`."""
    for name in lab.NODES:
        nodes[name].run(["nft", "flush", "ruleset"])
        assert nodes[name].call(sync_node, p.model_dump_json(), (seeds or {}).get(name)) >= 1
    router = nodes["router"]
    router.run(["ip", "-batch", "-"], input="\n".join(lab.route_lines(lab.VIP, lab.PHASES[0])) + "\n")
    client = nodes["client"].spawn(lab.long_lived_clients, lab.VIP, lab.PORT, COUNT, INTERVAL)
    ports = json.loads(client.wait_for_line("ready ", timeout=60).removeprefix("ready "))
    queries = "\n".join(lab.nexthop_queries(lab.VIP, lab.CLIENT, ports)) + "\n"
    paths = [lab.nexthops_of(router.run(["ip", "-batch", "-"], input=queries).stdout)]
    time.sleep(1.0)
    for nodes_in_route in lab.PHASES[1:]:
        os.kill(client.pid, signal.SIGUSR1)
        router.run(["ip", "-batch", "-"], input="\n".join(lab.route_lines(lab.VIP, nodes_in_route)) + "\n")
        paths.append(lab.nexthops_of(router.run(["ip", "-batch", "-"], input=queries).stdout))
        time.sleep(SETTLE)
    os.kill(client.pid, signal.SIGTERM)
    flows = json.loads(client.wait_for_line("result ", timeout=30).removeprefix("result "))
    return lab.summary(flows, paths)


def show(capsys: pytest.CaptureFixture[str], name: str, found: dict[str, Any]) -> None:
    with capsys.disabled():
        print(f"\n{lab.table({name: found})}  (answers: {found['answers']}, errors: {found['errors']})")


def test_dsr_flows_moved_by_ecmp_keep_their_backend(
    ecmp: dict[str, Namespace], capsys: pytest.CaptureFixture[str]
) -> None:
    """≤ 1 % of 100 connections reset or answered by another backend when a node joins and when one
    leaves, while the router really moved flows each time."""
    found = run(ecmp, ecmp_plan(api.Architecture.dsr))
    show(capsys, "nftables dsr", found)
    assert found["broken_before"] == 0
    for phase, figures in found["phases"].items():
        assert figures["moved_by_router"] >= 10, (phase, figures)
        assert figures["disturbed_percent"] <= 1.0, (phase, figures)


def test_a_node_hashing_with_another_seed_breaks_the_flows_moved_to_it(
    ecmp: dict[str, Namespace], capsys: pytest.CaptureFixture[str]
) -> None:
    """The negative control: the joining node n4 hashes with its own seed, so flows moved to it reach
    other backends, which reset them — the lab sees a broken consistency."""
    found = run(ecmp, ecmp_plan(api.Architecture.dsr), seeds={"n4": "0x00c0ffee"})
    show(capsys, "dsr, n4 other seed", found)
    assert found["phases"]["node added"]["disturbed_percent"] >= 5.0


def test_nat_flows_moved_by_ecmp_break(
    ecmp: dict[str, Namespace], capsys: pytest.CaptureFixture[str]
) -> None:
    """nat keeps the flow's state (conntrack, the masquerade's source address) on the node that
    translated it: every flow the router moves breaks, and no other."""
    found = run(ecmp, ecmp_plan(api.Architecture.nat))
    show(capsys, "nftables nat", found)
    assert found["broken_before"] == 0
    added = found["phases"]["node added"]
    assert added["broken"] == added["moved_by_router"] > 0
    assert all(figures["broken_unmoved"] == 0 for figures in found["phases"].values())
