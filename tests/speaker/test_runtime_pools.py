"""The speaker's loop with pools: who reports a missing interface or a VIP no node may announce, and where.

Responders are stand-ins (no packet sockets); membership is fed by hand, as heartbeats would feed it.
"""

from __future__ import annotations

import asyncio
import ipaddress
from typing import Any

from layerlb_speaker import announcement, inventory
from layerlb_speaker.announcement import Owner, Vip
from layerlb_speaker.membership import Heartbeat, Timing, Unavailable
from layerlb_speaker.runtime import Inventory, Settings, Speaker

NODES = ["n1", "n2", "n3"]
POOL = inventory.pool_owner("edge")
WEB = Owner("LoadBalancer", "shop", "web")


class Recorder:
    def __init__(self) -> None:
        self.lines: list[tuple[str, ...]] = []

    def announcing(self, vip: Vip, node: str, interface: str) -> None:
        self.lines.append(("announcing", str(vip.address), node, interface))

    def problem(self, vip: Vip, reason: str, message: str) -> None:
        self.lines.append(("problem", str(vip.address), reason, message))

    def pool_problem(self, pool: Owner, reason: str, message: str) -> None:
        self.lines.append(("pool", pool.name, reason, message))


class FakeResponder:
    def __init__(self) -> None:
        self.held: list[Any] = []

    def hold(self, vips: Any) -> None:
        self.held = sorted(vips)

    def announce(self, address: Any) -> None:
        pass

    def close(self) -> None:
        pass


def speaker(
    node: str, interfaces: tuple[str, ...], peers: dict[str, frozenset[str]]
) -> tuple[Speaker, Recorder]:
    """A joined speaker on `node` with responders on `interfaces`, hearing `peers` (node → unavailable)."""
    recorder = Recorder()
    each = Speaker(
        Settings(node=node, interfaces=("eth0",), timing=Timing(0.1, 0.5, 0.0)), recorder, lambda: 0.0
    )
    each.responders = {name: FakeResponder() for name in interfaces}  # type: ignore[misc]
    for peer, unavailable in peers.items():
        each.membership.heard(Heartbeat(peer, True, True), 0.0)
        each.membership.heard_unavailable(Unavailable(peer, unavailable))
    return each, recorder


def address_ranked_first_by(node: str) -> ipaddress.IPv4Address:
    for n in range(1, 255):
        address = ipaddress.IPv4Address(f"192.0.2.{n}")
        if announcement.rank(address, NODES)[0] == node:
            return address
    raise AssertionError("no address")


def run(each: Speaker, vips: tuple[Vip, ...], notices: tuple[inventory.Notice, ...] = ()) -> None:
    async def go() -> None:
        each.update(Inventory(vips, {}, True, notices))
        asked = {name for vip in vips for name in vip.interfaces}
        each.membership.set_unavailable(frozenset(asked - set(each.responders)))
        each.reconcile()
        await asyncio.sleep(0)

    asyncio.run(go())


def test_a_node_lacking_the_pools_interface_reports_it_once_on_the_pool_and_the_next_node_answers() -> None:
    address = address_ranked_first_by("n1")
    vips = (
        Vip(address, frozenset(NODES), (WEB,), ("eth1",), POOL),
        Vip(address + 1, frozenset(NODES), (WEB,), ("eth1",), POOL),
        Vip(ipaddress.IPv4Address("198.51.100.1"), frozenset({"n1"}), (WEB,)),  # no pool: default interface
    )
    n1, recorded = speaker("n1", ("eth0",), {"n2": frozenset(), "n3": frozenset()})
    run(n1, vips)
    pool_lines = [line for line in recorded.lines if line[0] == "pool"]
    assert pool_lines == [
        (
            "pool",
            "edge",
            "InterfaceNotFound",
            "spec.announce.interfaces: interface eth1 not found on node n1; "
            "the pool's addresses are not announced on it there",
        )
    ]
    successor = announcement.rank(address, ["n2", "n3"])[0]
    assert n1.holders[address] == successor
    problems = [line for line in recorded.lines if line[0] == "problem"]
    assert (
        "problem",
        str(address),
        "InterfaceNotFound",
        f"interface eth1 not found on node n1 (VIPPool edge spec.announce.interfaces); {address} is not "
        f"announced there, {successor} announces it",
    ) in problems
    assert ("announcing", "198.51.100.1", "n1", "eth0") in recorded.lines  # other VIPs unaffected
    assert n1.responders["eth0"].held == [ipaddress.IPv4Address("198.51.100.1")]  # type: ignore[attr-defined]
    run(n1, vips)  # recomputed: nothing new to say
    assert len([line for line in recorded.lines if line[0] in ("pool", "problem")]) == len(pool_lines) + len(
        problems
    )

    # The peer computes the same: it holds the VIP on eth1.
    peer, _ = speaker(
        successor,
        ("eth0", "eth1"),
        {"n1": frozenset({"eth1"}), **{n: frozenset() for n in NODES if n not in ("n1", successor)}},
    )
    run(peer, vips)
    assert address in peer.responders["eth1"].held  # type: ignore[attr-defined]
    assert address not in peer.responders["eth0"].held  # type: ignore[attr-defined]


def test_a_node_with_one_of_the_pools_interfaces_answers_there_and_reports_the_other() -> None:
    address = address_ranked_first_by("n1")
    vips = (Vip(address, frozenset(NODES), (WEB,), ("eth1", "eth2"), POOL),)
    n1, recorded = speaker("n1", ("eth0", "eth2"), {"n2": frozenset(), "n3": frozenset()})
    run(n1, vips)
    assert n1.holders[address] == "n1"
    assert n1.responders["eth2"].held == [address]  # type: ignore[attr-defined]
    assert [line[3] for line in recorded.lines if line[0] == "pool"] == [
        "spec.announce.interfaces: interface eth1 not found on node n1; the pool's addresses are not announced on it there"
    ]


def test_a_notice_is_reported_by_exactly_one_speaker_on_the_owners_and_the_pool() -> None:
    address = address_ranked_first_by("n2")
    vip = Vip(address, frozenset(), (WEB,), (), POOL)
    notice = inventory.Notice("NoEligibleNode", f"{address} is not announced: ...", vip, POOL)
    reported = []
    for node in NODES:
        each, recorded = speaker(node, ("eth0",), {n: frozenset() for n in NODES if n != node})
        run(each, (vip,), (notice,))
        run(each, (vip,), (notice,))  # once, not at every recomputation
        reported.append((node, [line[:3] for line in recorded.lines]))
    assert reported == [
        ("n1", []),
        ("n2", [("problem", str(address), "NoEligibleNode"), ("pool", "edge", "NoEligibleNode")]),
        ("n3", []),
    ]


def test_a_vippools_events_go_to_the_default_namespace_naming_the_cluster_scoped_pool() -> None:
    from layerlb_speaker import kube

    created: list[tuple[str, Any]] = []

    class Core:
        def create_namespaced_event(self, namespace: str, body: Any) -> None:
            created.append((namespace, body))

    cluster = object.__new__(kube.Cluster)
    cluster.core = Core()  # type: ignore[assignment]
    cluster.node = "n1"
    cluster._pending = 1
    cluster._create_event(POOL, "Warning", "InterfaceNotFound", "spec.announce.interfaces: ...")
    [(namespace, body)] = created
    assert namespace == "default"
    assert body["involvedObject"] == {
        "kind": "VIPPool",
        "namespace": "",
        "name": "edge",
        "uid": "",
        "apiVersion": "layerlb.dev/v1alpha1",
    }
    assert (body["type"], body["reason"]) == ("Warning", "InterfaceNotFound")


def test_a_new_owner_of_an_address_this_node_keeps_is_told_who_announces() -> None:
    """A LoadBalancer deleted and another given the same address a moment later: the holder does not change,
    nothing is taken over, and still the new owner gets its `Announcing` (once), the old one nothing more."""
    address = address_ranked_first_by("n1")
    each, recorder = speaker("n1", ("eth0",), {"n2": frozenset(), "n3": frozenset()})
    first = Vip(address, frozenset(NODES), (WEB,))
    run(each, (first,))
    assert recorder.lines == [("announcing", str(address), "n1", "eth0")]
    shop = Owner("LoadBalancer", "shop", "shop")
    run(each, (Vip(address, frozenset(NODES), (shop,)),))
    run(each, (Vip(address, frozenset(NODES), (shop,)),))
    assert recorder.lines == [("announcing", str(address), "n1", "eth0")] * 2
    told = [line for line in recorder.lines if line[0] == "announcing"]
    assert len(told) == 2
