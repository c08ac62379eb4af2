"""Who announces which VIP: one holder per VIP among eligible live speakers, stable as nodes come and go."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from layerlb_speaker.announcement import Member, Vip, announcements, holder, mine, rank, weight

GOLDEN = Path(__file__).resolve().parents[2] / "testdata" / "speaker" / "rendezvous.txt"
NODES = [f"node-{n}" for n in range(1, 6)]


def vip(address: str, nodes: list[str] = NODES) -> Vip:
    return Vip(ipaddress.ip_address(address), frozenset(nodes))


def live(*nodes: str, stale: tuple[str, ...] = ()) -> dict[str, Member]:
    return {node: Member(node, node not in stale) for node in nodes}


def test_the_rendezvous_weights_are_pinned_by_a_golden_file(request: pytest.FixtureRequest) -> None:
    """Speakers of two versions must agree during a rolling upgrade: the hash never changes silently."""
    lines = []
    for n in range(20):
        address = ipaddress.ip_address(f"192.0.2.{n}") if n % 2 else ipaddress.ip_address(f"2001:db8::{n:x}")
        lines.append(f"{address} {' '.join(rank(address, NODES))} {weight(address, NODES[0]):016x}")
    actual = "\n".join(lines) + "\n"
    if request.config.getoption("--update-goldens"):
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(actual)
    assert actual == GOLDEN.read_text(), "the rendezvous hash changed: mixed versions would both answer"


def test_every_speaker_computes_the_same_single_holder() -> None:
    vips = [vip(f"10.0.0.{n}") for n in range(200)]
    members = live(*NODES)
    chosen = announcements(vips, members)
    assert set(chosen) == {v.address for v in vips}
    shares = [mine(vips, members, node) for node in NODES]
    assert sum(len(share) for share in shares) == len(vips)  # exactly one holder each
    assert all(20 <= len(share) <= 60 for share in shares), [len(s) for s in shares]  # roughly even


def test_a_vip_moves_only_when_its_holder_leaves_and_comes_back_when_it_returns() -> None:
    vips = [vip(f"10.0.1.{n}") for n in range(200)]
    before = announcements(vips, live(*NODES))
    after = announcements(vips, live(*NODES[1:]))
    moved = {address for address in before if before[address] != after[address]}
    assert moved == {address for address, node in before.items() if node == "node-1"}
    assert all(after[address] == rank(address, NODES[1:])[0] for address in moved)
    assert announcements(vips, live(*NODES)) == before


def test_only_eligible_live_nodes_hold() -> None:
    only = vip("10.0.2.1", ["node-2", "node-9"])
    assert holder(only, live(*NODES)) == "node-2"
    assert holder(only, live("node-1", "node-3")) is None
    assert holder(vip("10.0.2.2", []), live(*NODES)) is None


def test_fresh_speakers_are_preferred_and_stale_ones_hold_only_when_no_fresh_one_can() -> None:
    address = "10.0.3.1"
    first, second = rank(ipaddress.ip_address(address), NODES)[:2]
    assert holder(vip(address), live(*NODES, stale=(first,))) == second
    assert holder(vip(address), live(*NODES, stale=tuple(NODES))) == first  # all stale: last known state
    assert holder(vip(address, [first]), live(*NODES, stale=(first,))) == first  # no fresh one can


def test_a_node_lacking_every_interface_of_a_vip_is_passed_over_without_moving_other_vips() -> None:
    restricted = Vip(ipaddress.ip_address("10.0.3.1"), frozenset(NODES), interfaces=("eth1", "eth2"))
    first, second = rank(restricted.address, NODES)[:2]
    members = live(*NODES)
    assert holder(restricted, members) == first
    members[first] = Member(first, True, frozenset({"eth1"}))  # still has eth2: still the holder
    assert holder(restricted, members) == first
    members[first] = Member(first, True, frozenset({"eth1", "eth2"}))
    assert holder(restricted, members) == second
    plain = vip("10.0.3.1")  # the same address without interfaces: its default interface serves
    assert holder(plain, members) == first
    members = {node: Member(node, True, frozenset({"eth1", "eth2"})) for node in NODES}
    assert holder(restricted, members) is None
