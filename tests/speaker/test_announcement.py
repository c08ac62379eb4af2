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


def holding(
    members: dict[str, Member], chosen: dict[ipaddress.IPv4Address | ipaddress.IPv6Address, str]
) -> None:
    """Each member told the VIPs it holds in `chosen` (what the speakers' `Holding` datagrams carry)."""
    for node, member in members.items():
        held = frozenset(address for address, holder_ in chosen.items() if holder_ == node)
        members[node] = Member(node, member.fresh, member.unavailable, held)


def test_a_vip_moves_only_when_its_holder_leaves_and_stays_where_it_went_when_the_holder_returns() -> None:
    vips = [vip(f"10.0.1.{n}") for n in range(200)]
    before = announcements(vips, live(*NODES))
    members = live(*NODES[1:])
    holding(members, {address: node for address, node in before.items() if node != "node-1"})
    after = announcements(vips, members)
    moved = {address for address in before if before[address] != after[address]}
    assert moved == {address for address, node in before.items() if node == "node-1"}
    assert all(after[address] == rank(address, NODES[1:])[0] for address in moved)
    # node-1 comes back: it ranks first for the moved VIPs, but their holders keep them (a move cuts
    # connections); it takes only a VIP nobody holds.
    back = live(*NODES)
    holding(back, after)
    assert announcements(vips, back) == after
    assert announcements(vips, live(*NODES)) == before  # nobody holding: placed by weight alone


def test_a_newly_eligible_node_ranking_first_does_not_take_a_held_vip() -> None:
    """A second forwarding pod turning Ready elsewhere must not move the VIP from the first one's node."""
    address = ipaddress.ip_address("10.0.4.1")
    first, second = rank(address, NODES)[:2]
    members = live(*NODES)
    alone = Vip(address, frozenset({second}))
    assert holder(alone, members) == second
    holding(members, {address: second})
    both = Vip(address, frozenset({first, second}))
    assert holder(both, members) == second
    assert holder(both, live(*NODES)) == first  # what placement by weight alone would do
    # The incumbent stops being eligible (its pod went): then, and only then, it moves.
    assert holder(Vip(address, frozenset({first})), members) == first


def test_two_holders_of_one_vip_settle_on_the_one_ranking_first_and_a_stale_or_ineligible_claim_counts_not() -> (
    None
):
    address = ipaddress.ip_address("10.0.4.2")
    first, second, third = rank(address, NODES)[:3]
    members = live(*NODES)
    holding(members, {address: second})
    members[third] = Member(third, True, frozenset(), frozenset({address}))  # both took it in a partition
    assert holder(vip(str(address)), members) == second
    # An incumbent that may not hold it (not eligible, its interfaces gone, its view stale while others'
    # is fresh) is no incumbent.
    assert holder(vip(str(address), [n for n in NODES if n != second]), members) == third
    members[third] = Member(third, False, frozenset(), frozenset({address}))
    assert holder(vip(str(address), [n for n in NODES if n != second]), members) == first


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


def test_a_vip_nobody_holds_waits_for_a_joining_speaker_that_ranks_first_for_it() -> None:
    """Speakers starting together spread the VIPs by weight: the first to join does not take them all."""
    vips = [vip(f"10.0.5.{n}") for n in range(60)]
    first_joined = NODES[0]
    alone = {first_joined: Member(first_joined)}
    early = announcements(vips, alone, joining=NODES[1:])
    assert set(early.values()) == {first_joined}
    assert set(early) == {v.address for v in vips if rank(v.address, NODES)[0] == first_joined}
    assert announcements(vips, live(*NODES)) == {v.address: rank(v.address, NODES)[0] for v in vips}
    # A joining speaker that is not eligible, or a VIP someone holds, waits for nobody.
    held = vips[0]
    members = live(first_joined)
    members[first_joined] = Member(first_joined, holds=frozenset({held.address}))
    assert holder(held, members, joining=NODES[1:]) == first_joined
    only_first = Vip(vips[1].address, frozenset({first_joined}))
    assert holder(only_first, alone, joining=NODES[1:]) == first_joined
