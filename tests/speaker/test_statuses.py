"""Who announces, in status: what the holder writes on a takeover, who clears an unannounced VIP, and
that nothing is written while nothing changes (pure `statuses`, then through `runtime.Speaker`)."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Mapping
from typing import Any

from layerlb_speaker import announcement, statuses
from layerlb_speaker.announcement import Address, Member, Owner, Vip
from layerlb_speaker.membership import Heartbeat, Timing
from layerlb_speaker.runtime import Inventory, Settings, Speaker

V4 = ipaddress.IPv4Address("192.0.2.10")
V6 = ipaddress.IPv6Address("2001:db8::10")
LB = Owner("LoadBalancer", "shop", "web", "uid-lb", "layerlb.dev/v1alpha1")
SVC = Owner("Service", "shop", "web", "uid-svc", "v1")
NODES = ("n1", "n2", "n3")


def members(*nodes: str) -> dict[str, Member]:
    return {node: Member(node) for node in nodes}


def test_a_takeover_writes_the_announcement_and_the_families_condition_on_every_owner() -> None:
    publisher = statuses.Publisher("n2")
    vip = Vip(V4, frozenset(NODES), (LB, SVC))
    writes = publisher.update([vip], {V4: "n2"}, members(*NODES), {V4: ("eth0",)}, "2026-01-01T00:00:00Z")
    assert [w.owner for w in writes] == [LB, SVC]
    lb, svc = writes
    assert lb.loadbalancer_patch() == {
        "status": {
            "announcement": {
                "address": "192.0.2.10",
                "node": "n2",
                "interfaces": ["eth0"],
                "protocol": "L2",
                "since": "2026-01-01T00:00:00Z",
            }
        }
    }
    assert svc.service_apply() == {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "web", "namespace": "shop"},
        "status": {
            "conditions": [
                {
                    "type": "layerlb.dev/AnnouncedIPv4",
                    "status": "True",
                    "reason": "Announced",
                    "message": "192.0.2.10 from n2 on eth0",
                    "lastTransitionTime": "2026-01-01T00:00:00Z",
                }
            ]
        },
    }
    # Recomputed without a change (its own write came back through the watch): nothing more.
    assert publisher.update([vip], {V4: "n2"}, members(*NODES), {V4: ("eth0",)}, "2026-01-01T00:00:09Z") == []


def test_dual_stack_each_family_is_its_own_condition_under_a_manager_per_family_and_node() -> None:
    vips = [Vip(V4, frozenset(NODES), (SVC,)), Vip(V6, frozenset(NODES), (SVC,))]
    holders: dict[Address, str] = {V4: "n1", V6: "n3"}
    n1 = statuses.Publisher("n1").update(vips, holders, members(*NODES), {V4: ("eth0",)}, "t")
    n3 = statuses.Publisher("n3").update(vips, holders, members(*NODES), {V6: ("eth1",)}, "t")
    n2 = statuses.Publisher("n2").update(vips, holders, members(*NODES), {}, "t")
    assert n2 == []  # holds neither
    [(v4_condition,)] = [w.service_apply()["status"]["conditions"] for w in n1]
    [(v6_condition,)] = [w.service_apply()["status"]["conditions"] for w in n3]
    assert (v4_condition["type"], v4_condition["message"]) == (
        "layerlb.dev/AnnouncedIPv4",
        "192.0.2.10 from n1 on eth0",
    )
    assert (v6_condition["type"], v6_condition["message"]) == (
        "layerlb.dev/AnnouncedIPv6",
        "2001:db8::10 from n3 on eth1",
    )
    assert statuses.field_manager(V4, "n1") == "layerlb-speaker/IPv4/n1"
    assert statuses.field_manager(V6, "n3") == "layerlb-speaker/IPv6/n3"
    assert len(statuses.field_manager(V6, "n" * 300)) == 128  # the API server's limit


def test_the_loser_writes_nothing_and_the_new_holder_overwrites() -> None:
    vip = Vip(V4, frozenset(NODES), (LB,))
    n1, n2 = statuses.Publisher("n1"), statuses.Publisher("n2")
    assert len(n1.update([vip], {V4: "n1"}, members(*NODES), {V4: ("eth0",)}, "t1")) == 1
    # n1's peers see it die; n2 takes over. n1 (if it lives on, cut off) loses it: it writes nothing.
    assert n1.update([vip], {V4: "n2"}, members(*NODES), {}, "t2") == []
    [write] = n2.update([vip], {V4: "n2"}, members("n2", "n3"), {V4: ("eth0",)}, "t2")
    assert write.announcement() == {
        "address": "192.0.2.10",
        "node": "n2",
        "interfaces": ["eth0"],
        "protocol": "L2",
        "since": "t2",
    }
    # Coming back to n1 later is a new takeover: written again, with the new time.
    [again] = n1.update([vip], {V4: "n1"}, members(*NODES), {V4: ("eth0",)}, "t3")
    assert (again.node, again.since) == ("n1", "t3")


def test_an_owner_that_appears_later_is_written_once_and_new_interfaces_keep_since() -> None:
    publisher = statuses.Publisher("n1")
    alone = Vip(V4, frozenset(NODES), (SVC,))
    [first] = publisher.update([alone], {V4: "n1"}, members(*NODES), {V4: ("eth0",)}, "t1")
    assert first.owner == SVC
    both = Vip(V4, frozenset(NODES), (SVC, LB))  # the LoadBalancer's status now names its VIP
    [later] = publisher.update([both], {V4: "n1"}, members(*NODES), {V4: ("eth0",)}, "t2")
    assert (later.owner, later.since) == (LB, "t1")
    widened = publisher.update([both], {V4: "n1"}, members(*NODES), {V4: ("eth1", "eth0")}, "t3")
    assert [(w.owner, w.interfaces, w.since) for w in widened] == [
        (SVC, ("eth0", "eth1"), "t1"),
        (LB, ("eth0", "eth1"), "t1"),
    ]


def test_a_vip_nobody_announces_is_cleared_by_the_live_speaker_ranking_first_only() -> None:
    vip = Vip(V4, frozenset(), (LB, SVC))  # no eligible node
    first = announcement.rank(V4, NODES)[0]
    writes = {node: statuses.Publisher(node).update([vip], {}, members(*NODES), {}, "t") for node in NODES}
    assert [node for node, found in writes.items() if found] == [first]
    lb, svc = writes[first]
    assert lb.loadbalancer_patch() == {"status": {"announcement": None}}  # merge patch: removed
    condition = svc.condition()
    assert (condition["status"], condition["reason"], condition["message"]) == (
        "False",
        "NotAnnounced",
        "192.0.2.10 is not announced: no node is eligible to announce it",
    )
    # A speaker that has not joined (not a member yet) clears nothing.
    assert (
        statuses.Publisher(first).update([vip], {}, members(*(n for n in NODES if n != first)), {}, "t") == []
    )
    # Eligible nodes whose speakers are all dead: said so.
    dead = Vip(V4, frozenset({"n9"}), (SVC,))
    [said] = statuses.Publisher(first).update([dead], {}, members(*NODES), {}, "t")
    assert (
        said.message()
        == "192.0.2.10 is not announced: no live speaker on its eligible nodes (n9) can answer for it"
    )


def test_written_compares_the_stored_object_without_the_time() -> None:
    [lb, svc] = statuses.Publisher("n1").update(
        [Vip(V4, frozenset(NODES), (LB, SVC))], {V4: "n1"}, members(*NODES), {V4: ("eth0",)}, "t1"
    )
    stored_lb = {
        "status": {"vip": "192.0.2.10", "announcement": {**(lb.announcement() or {}), "since": "t0"}}
    }
    assert lb.written(stored_lb)
    assert not lb.written({"status": {"vip": "192.0.2.10"}})
    operator_condition = {
        "type": "layerlb.dev/AddressAssigned",
        "status": "True",
        "reason": "AddressAssigned",
    }
    stored_svc = {
        "status": {"conditions": [operator_condition, {**svc.condition(), "lastTransitionTime": "t0"}]}
    }
    assert svc.written(stored_svc)
    assert not svc.written({"status": {"conditions": [operator_condition]}})
    cleared = statuses.Write(LB, V4, None, why="x")
    assert cleared.written({"status": {"vip": "192.0.2.10"}}) and not cleared.written(stored_lb)


class Recorder:
    def announcing(self, vip: Vip, node: str, interface: str) -> None:
        pass

    def problem(self, vip: Vip, reason: str, message: str) -> None:
        pass

    def pool_problem(self, pool: Owner, reason: str, message: str) -> None:
        pass


class Published:
    def __init__(self, node: str) -> None:
        self.state = statuses.Publisher(node)
        self.writes: list[statuses.Write] = []

    def publish(
        self,
        vips: tuple[Vip, ...],
        holders: Mapping[Address, str],
        members: Mapping[str, Member],
        held_on: Mapping[Address, tuple[str, ...]],
        advertisers: Mapping[Address, tuple[str, ...]],
    ) -> None:
        self.writes += self.state.update(vips, holders, members, held_on, "now", advertisers)


class FakeResponder:
    def hold(self, vips: Any) -> None:
        pass

    def announce(self, address: Any) -> None:
        pass

    def close(self) -> None:
        pass


def test_the_speaker_publishes_its_takeovers_through_its_publisher() -> None:
    holder = announcement.rank(V4, ["n1", "n2"])[0]
    other = "n2" if holder == "n1" else "n1"
    found: dict[str, Published] = {}
    for node in (holder, other):
        each = Speaker(Settings(node=node, interfaces=("eth0",), timing=Timing(0.1, 0.5, 0.0)), Recorder())
        each.responders = {"eth0": FakeResponder()}  # type: ignore[dict-item]
        each.publisher = found.setdefault(node, Published(node))
        each.membership.heard(Heartbeat("n2" if node == "n1" else "n1", True, True), 0.0)

        async def go(speaker: Speaker = each) -> None:
            speaker.update(Inventory((Vip(V4, frozenset({"n1", "n2"}), (LB,)),), {}, True))
            speaker.reconcile()
            speaker.reconcile()  # again, unchanged
            await asyncio.sleep(0)

        asyncio.run(go())
    assert [(w.owner, w.node, w.interfaces) for w in found[holder].writes] == [(LB, holder, ("eth0",))]
    assert found[other].writes == []
