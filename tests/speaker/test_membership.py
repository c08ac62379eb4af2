"""Liveness from heartbeats on an injected clock: joining, dying, leaving, rejoining, freshness."""

from __future__ import annotations

import ipaddress

import pytest
from layerlb_speaker.announcement import Member
from layerlb_speaker.membership import (
    MAX_HOLDING,
    Heartbeat,
    Holding,
    Membership,
    Pressure,
    Timing,
    Unavailable,
)

TIMING = Timing(interval=0.1, dead_after=0.5, join=0.5)


def joined(now: float = 0.0, *peers: str) -> Membership:
    membership = Membership("node-1", TIMING, now)
    for peer in peers:
        membership.heard(Heartbeat(peer, True, True), now)
    membership.expire(now + TIMING.join)
    return membership


def test_heartbeats_round_trip_and_noise_is_ignored() -> None:
    beat = Heartbeat("node-2.example", ready=True, fresh=False)
    assert Heartbeat.decode(beat.encode()) == beat
    for noise in (
        b"",
        b"LLBS",
        b"XXXX\x01\x01\x01a",
        beat.encode()[:-1],
        beat.encode() + b"x",
        b"LLBS\x02\x01\x01a",
    ):
        assert Heartbeat.decode(noise) is None


def test_a_starting_speaker_announces_nothing_until_it_has_listened_for_the_join_period() -> None:
    membership = Membership("node-1", TIMING, 0.0)
    membership.heard(Heartbeat("node-2", True, True), 0.1)
    assert membership.members() == {"node-2": Member("node-2")}
    assert membership.heartbeat() == Heartbeat("node-1", ready=False, fresh=True)
    assert not membership.expire(0.4)
    membership.heard(Heartbeat("node-2", True, True), 0.45)
    assert membership.expire(0.5)  # joined: now a member itself
    assert set(membership.members()) == {"node-1", "node-2"}
    assert membership.heartbeat().ready


def test_a_peer_is_dead_after_dead_after_without_heartbeats_and_not_before() -> None:
    membership = joined(0.0, "node-2")
    membership.heard(Heartbeat("node-2", True, True), 1.0)
    assert not membership.expire(1.5)  # exactly dead_after: still alive
    assert membership.expire(1.51)
    assert set(membership.members()) == {"node-1"}
    assert not membership.expire(2.0)  # reported once


def test_a_joining_or_leaving_peer_is_not_a_member() -> None:
    membership = joined(0.0, "node-2")
    assert membership.heard(Heartbeat("node-2", False, True), 0.6)  # goodbye, or restarted and joining
    assert "node-2" not in membership.members()
    assert membership.heard(Heartbeat("node-2", True, True), 0.7)
    assert "node-2" in membership.members()
    assert not membership.heard(Heartbeat("node-2", True, True), 0.8)  # nothing changed


def test_freshness_travels_with_the_heartbeat() -> None:
    membership = joined(0.0, "node-2")
    assert membership.heard(Heartbeat("node-2", True, False), 0.6)
    assert membership.members()["node-2"] == Member("node-2", fresh=False)
    assert membership.set_fresh(False)
    assert membership.members()["node-1"] == Member("node-1", fresh=False)
    assert not membership.heartbeat().fresh


def test_alone_after_joining_it_is_the_only_member() -> None:
    assert set(joined(0.0).members()) == {"node-1"}


def test_rejoining_forgets_every_peer_and_waits_a_join_period_again() -> None:
    membership = joined(0.0, "node-2")
    assert membership.rejoin(5.0)
    assert membership.members() == {}
    assert not membership.heartbeat().ready
    membership.heard(Heartbeat("node-2", True, True), 5.2)
    assert membership.expire(5.5)
    assert set(membership.members()) == {"node-1", "node-2"}


def test_its_own_heartbeat_echoed_back_is_ignored() -> None:
    membership = joined(0.0)
    assert not membership.heard(Heartbeat("node-1", True, True), 0.6)


@pytest.mark.parametrize(("interval", "dead_after"), [(0.0, 0.5), (0.5, 0.5), (-1.0, 0.5)])
def test_timings_that_cannot_work_are_refused(interval: float, dead_after: float) -> None:
    with pytest.raises(ValueError, match="heartbeat interval"):
        Timing(interval, dead_after)


def test_unavailable_interfaces_round_trip_in_a_datagram_of_their_own() -> None:
    message = Unavailable("node-2.example", frozenset({"eth1", "bond0.100"}))
    data = message.encode()
    assert Unavailable.decode(data) == message
    assert Heartbeat.decode(data) is None  # a speaker of the previous version ignores it
    assert Unavailable.decode(Heartbeat("node-2", True, True).encode()) is None
    assert Unavailable.decode(Unavailable("node-2").encode()) == Unavailable("node-2", frozenset())
    for noise in (
        b"",
        b"LLBU",
        data[:-1],
        data + b"x",
        b"LLBU\x01\x01\x01a\x00",
        b"LLBU\x01\x01\x01a\x10" + b"x" * 16,
    ):
        assert Unavailable.decode(noise) is None


def test_at_most_64_interface_names_travel() -> None:
    message = Unavailable("n", frozenset(f"if{n}" for n in range(100)))
    decoded = Unavailable.decode(message.encode())
    assert decoded is not None and len(decoded.interfaces) == 64


def test_a_peers_unavailable_interfaces_reach_its_member_and_go_when_it_dies() -> None:
    membership = joined(0.0, "node-2")
    assert membership.heard_unavailable(Unavailable("node-2", frozenset({"eth1"})))
    assert membership.members()["node-2"] == Member("node-2", True, frozenset({"eth1"}))
    assert not membership.heard_unavailable(Unavailable("node-2", frozenset({"eth1"})))  # no change
    assert membership.heard_unavailable(Unavailable("node-2", frozenset()))
    assert membership.members()["node-2"].unavailable == frozenset()
    membership.heard_unavailable(Unavailable("node-2", frozenset({"eth1"})))
    membership.expire(TIMING.join + 10)
    membership.heard(Heartbeat("node-2", True, True), TIMING.join + 10)
    assert membership.members()["node-2"].unavailable == frozenset()


def test_its_own_unavailable_interfaces_are_in_its_member_and_its_message() -> None:
    membership = joined(0.0)
    assert membership.set_unavailable(frozenset({"eth9"}))
    assert not membership.set_unavailable(frozenset({"eth9"}))
    assert membership.members()["node-1"].unavailable == {"eth9"}
    assert membership.unavailable_message() == Unavailable("node-1", frozenset({"eth9"}))
    assert not membership.heard_unavailable(Unavailable("node-1", frozenset()))  # our own echo


def test_the_longest_heartbeat_gap_per_peer_and_who_expired_after_how_long_are_kept() -> None:
    membership = joined(0.0, "node-2", "node-3")
    for now in (0.6, 0.7, 1.05, 1.15):
        membership.heard(Heartbeat("node-2", True, True), now)
    assert membership.longest_gap["node-2"] == pytest.approx(0.6)  # 0.0 (joining) to 0.6
    assert "node-3" not in membership.longest_gap  # heard once: no gap yet
    assert membership.expire(0.8)  # node-3 silent since 0.0
    [(node, silence)] = membership.expired
    assert node == "node-3"
    assert silence == pytest.approx(0.8)
    assert not membership.expire(0.9)
    assert membership.expired == []


def test_pressure_messages_round_trip_and_noise_is_ignored() -> None:
    message = Pressure("node-2.example", 271)
    assert Pressure.decode(message.encode()) == message
    assert Pressure.decode(Pressure("n", 10**6).encode()) == Pressure("n", 65535)  # clamped, not wrapped
    for noise in (
        b"",
        b"LLBP",
        message.encode()[:-1],
        message.encode() + b"x",
        Heartbeat("n", True, True).encode(),
        Unavailable("n", frozenset({"eth1"})).encode(),
    ):
        assert Pressure.decode(noise) is None
    assert Heartbeat.decode(message.encode()) is None
    assert Unavailable.decode(message.encode()) is None


def test_a_peer_reporting_late_rounds_is_given_twice_its_lateness_more_before_it_is_dead() -> None:
    membership = joined(0.0, "node-2", "node-3")
    membership.heard_pressure(Pressure("node-2", 300))  # its loop ran up to 300 ms late lately
    membership.heard(Heartbeat("node-2", True, True), 1.0)
    membership.heard(Heartbeat("node-3", True, True), 1.0)
    assert membership.expire(1.51)  # node-3, which reported nothing, is dead after dead_after
    assert set(membership.members()) == {"node-1", "node-2"}
    assert not membership.expire(2.1)  # 0.5 s + 2 x 0.3 s
    assert membership.expire(2.11)
    assert set(membership.members()) == {"node-1"}


def test_the_extra_time_is_capped_and_forgotten_with_the_peer() -> None:
    membership = joined(0.0, "node-2")
    membership.heard_pressure(Pressure("node-2", 5000))
    assert membership.dead_after("node-2") == TIMING.max_dead_after == 2.0
    membership.heard(Heartbeat("node-2", True, True), 1.0)
    assert not membership.expire(3.0)
    assert membership.expire(3.01)
    assert membership.dead_after("node-2") == TIMING.dead_after  # a new life starts unsuspected
    membership.heard_pressure(Pressure("node-1", 5000))  # our own echo changes nothing
    assert membership.dead_after("node-1") == TIMING.dead_after


def test_timing_refuses_a_ceiling_below_dead_after() -> None:
    with pytest.raises(ValueError, match=r"max_dead_after 0\.4s must not be below dead_after 0\.5s"):
        Timing(interval=0.1, dead_after=0.5, join=0.5, max_dead_after=0.4)


def test_holdings_round_trip_in_datagrams_of_their_own_and_noise_is_ignored() -> None:
    addresses = (ipaddress.ip_address("192.0.2.7"), ipaddress.ip_address("2001:db8::7"))
    message = Holding("node-2", addresses)
    data = message.encode()
    assert Holding.decode(data) == message
    assert Holding.decode(Holding("node-2").encode()) == Holding("node-2")
    for noise in (
        b"",
        data[:-1],
        data + b"x",
        Heartbeat("node-2", True, True).encode(),
        b"LLBH\x01\x06\x01node-2\x05",
    ):
        assert Holding.decode(noise) is None
    assert (
        Heartbeat.decode(data) is None and Unavailable.decode(data) is None and Pressure.decode(data) is None
    )


def test_many_holdings_are_split_over_datagrams_that_each_fit_and_carry_them_all() -> None:
    addresses = [ipaddress.ip_address(f"2001:db8::{n:x}") for n in range(1, 1001)]
    messages = Holding.split("node-with-a-long-name-" + "x" * 200, addresses)
    assert len(messages) == -(-1000 // MAX_HOLDING)
    assert all(len(message.encode()) <= 2048 for message in messages)  # what the heartbeat socket reads
    assert {a for message in messages for a in message.addresses} == set(addresses)
    assert Holding.split("node-1", []) == []


def test_a_peers_holdings_reach_its_member_and_go_when_no_longer_told_or_when_it_dies() -> None:
    membership = joined(0.0, "node-2")
    now = TIMING.join
    vip_a, vip_b = ipaddress.ip_address("192.0.2.1"), ipaddress.ip_address("192.0.2.2")
    assert membership.heard_holding(Holding("node-2", (vip_a, vip_b)), now)
    assert not membership.heard_holding(Holding("node-2", (vip_a,)), now)  # nothing new
    assert membership.members()["node-2"].holds == {vip_a, vip_b}
    for step in range(1, 8):  # node-2 keeps telling vip_a only, and keeps beating
        at = now + step * TIMING.interval
        membership.heard(Heartbeat("node-2", True, True), at)
        membership.heard_holding(Holding("node-2", (vip_a,)), at)
        membership.expire(at)
    assert membership.members()["node-2"].holds == {vip_a}  # vip_b released: no longer told
    membership.expire(now + 10)
    assert "node-2" not in membership.members()
    membership.heard(Heartbeat("node-2", True, True), now + 10)
    assert membership.members()["node-2"].holds == frozenset()  # a dead peer's holdings are forgotten


def test_its_own_holdings_are_in_its_member_and_messages_and_a_joining_peers_count_not() -> None:
    membership = joined(0.0)
    address = ipaddress.ip_address("192.0.2.9")
    membership.set_holds([address])
    assert membership.members()["node-1"].holds == {address}
    assert membership.holding_messages() == [Holding("node-1", (address,))]
    assert not membership.heard_holding(Holding("node-1", ()), 1.0)  # our own echo
    membership.heard(Heartbeat("node-3", False, True), 1.0)  # still joining: not a member
    assert not membership.heard_holding(Holding("node-3", (address,)), 1.0)


def test_a_goodbye_says_leaving_so_a_stopping_speaker_is_not_taken_for_a_joining_one() -> None:
    goodbye = Heartbeat("node-2", ready=False, fresh=True, leaving=True)
    assert Heartbeat.decode(goodbye.encode()) == goodbye
    membership = joined(0.0, "node-2", "node-3")
    membership.heard(Heartbeat("node-3", False, True), 0.6)  # restarted: joining again
    membership.heard(goodbye, 0.6)
    assert membership.joining() == {"node-3"}
    assert set(membership.members()) == {"node-1"}
    assert membership.expire(5.0)  # the joining one died: VIPs that waited for it are placed again
    assert membership.joining() == frozenset()
