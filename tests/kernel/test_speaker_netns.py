"""The speaker on a real LAN: three nodes and a client on one bridge, real ARP/NDP, real kernels.

Each node runs the real `layerlb speaker` from a static configuration (tests/kernel/speaker_lan.py draws
the topology). What is asserted comes from outside the speaker: `arping`/`ndisc6` in the client (who
answers), the client kernel's neighbour cache (`ip neigh`, filled by a ping or moved by a gratuitous ARP),
and an ARP watcher in the client with its own parser. Takeover times are printed (p50/p95, run with -s to
see them); the only bound asserted is a generous one that says "it happened", as performance is the
benchmark's job (bench/announce.py).
"""

from __future__ import annotations

import functools
import ipaddress
import json
import re
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from layerlb_speaker import announcement

from tests.kernel.speaker_lan import NODES, Lan, lan, wait_until, watch_arp
from tests.netns import Spawned

VIP4, VIP6 = "10.0.50.200", "fd00:50::200"
ONLY_1_2 = "10.0.50.201"  # eligible on node1 and node2 only
NOWHERE = "10.0.50.202"  # eligible on a node that runs no speaker
TRIALS = 6
# Heartbeats (UDP 7947) dropped both ways on one node; ARP is untouched, so it still reaches the LAN.
PARTITION = """table inet partition {
	chain in { type filter hook input priority 0; udp dport 7947 drop; }
	chain out { type filter hook output priority 0; udp dport 7947 drop; }
}
"""
ALL = list(NODES)


def ranked(vip: str, nodes: list[str] = ALL) -> list[str]:
    return announcement.rank(ipaddress.ip_address(vip), nodes)


def base_vips() -> list[dict[str, Any]]:
    return [
        {"address": VIP4, "nodes": ALL, "owner": "LoadBalancer shop/web"},
        {"address": VIP6, "nodes": ALL},
        {"address": ONLY_1_2, "nodes": ["node1", "node2"]},
        {"address": NOWHERE, "nodes": ["node9"]},
    ]


@pytest.fixture
def speakers(tmp_path: Path) -> Iterator[Lan]:
    with lan(tmp_path, [VIP4, VIP6, ONLY_1_2, NOWHERE]) as network:
        network.configure(base_vips())
        network.start_all()
        yield network


def answered_by(network: Lan, vip: str, node: str, count: int = 2) -> bool:
    """Whether `node`, and only `node`, answered the client's ARP requests for `vip`."""
    return network.arping(vip, count) == {network.macs[node]}


def cached_as(network: Lan, vip: str, node: str) -> bool:
    """Whether the client kernel's neighbour cache points `vip` at `node`."""
    return network.neighbour(vip) == network.macs[node]


def percentiles(samples: list[float]) -> str:
    ordered = sorted(samples)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return f"p50 {statistics.median(ordered) * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms over {len(ordered)}"


def test_exactly_one_eligible_node_answers_arp_and_ndp_for_each_vip(speakers: Lan) -> None:
    first = ranked(VIP4)[0]
    wait_until(f"{first} answers ARP for {VIP4}", lambda: answered_by(speakers, VIP4, first))
    assert speakers.arping(VIP4, count=3) == {speakers.macs[first]}  # every reply from one MAC
    assert speakers.ping(VIP4)
    assert speakers.neighbour(VIP4) == speakers.macs[first]  # the client kernel's own ARP
    first6 = ranked(VIP6)[0]
    assert wait_until("an NA for the IPv6 VIP", lambda: speakers.ndisc(VIP6)) == {speakers.macs[first6]}
    only = ranked(ONLY_1_2, ["node1", "node2"])[0]
    assert wait_until("ARP for the VIP of two nodes", lambda: speakers.arping(ONLY_1_2)) == {
        speakers.macs[only]
    }
    assert speakers.arping(NOWHERE) == set()  # no live speaker may serve it: nobody answers


def _takeover(network: Lan, vip: str, cut: bool) -> tuple[float, str, str]:
    """Kills (or cuts the link of) the holder of `vip`; returns the time until the client's cache moved."""
    holder = network.node_of(network.neighbour(vip))
    assert holder is not None
    alive = [node for node in ALL if node != holder]
    successor = ranked(vip, alive)[0]
    if cut:
        moment = time.monotonic()
        network.bridge.ip("link", "set", network.bridge_port(holder), "down")
    else:
        moment = network.kill(holder)
    wait_until(
        f"client's cache for {vip} moves from {holder} to {successor}",
        lambda: network.neighbour(vip) == network.macs[successor],
        timeout=10,
        every=0.01,
    )
    return time.monotonic() - moment, holder, successor


def _populate(network: Lan, vip: str, node: str) -> None:
    wait_until(
        f"{node} answers {vip}", lambda: network.ping(vip) and network.neighbour(vip) == network.macs[node]
    )


def holding_nothing_among_all(spawned: Spawned, since: int = 0) -> bool:
    """Whether a (re)started speaker has, after character `since` of its log, joined all its peers and
    computed that it holds no VIP."""
    everyone = ", ".join(repr(node) for node in ALL)
    pattern = rf"holding 0 of \d+ VIPs; live speakers \[{everyone}\]"
    return re.search(pattern, spawned.stderr()[since:]) is not None


def test_a_killed_speakers_vip_moves_to_the_next_node_and_stays_there_when_it_returns(speakers: Lan) -> None:
    times = []
    holder = ranked(VIP4)[0]
    for _ in range(TRIALS):
        _populate(speakers, VIP4, holder)
        elapsed, killed, successor = _takeover(speakers, VIP4, cut=False)
        times.append(elapsed)
        assert elapsed < 5, f"takeover took {elapsed:.2f}s"
        assert speakers.ping(VIP4), "traffic flows to the new holder"
        assert speakers.arping(VIP4) == {speakers.macs[successor]}
        restarted = speakers.start(killed)
        restarted.wait_for_line("joined", timeout=30)
        # The restarted speaker may rank first again, but the VIP stays with its holder: a move would cut
        # the connections that reached the holder's node.
        wait_until(
            f"{killed} rejoined holding nothing", functools.partial(holding_nothing_among_all, restarted)
        )
        assert speakers.arping(VIP4, count=3) == {speakers.macs[successor]}
        holder = successor
    print(f"\nspeaker SIGKILL → client's neighbour cache moved: {percentiles(times)}")


def test_an_ipv6_vip_moves_with_an_unsolicited_neighbor_advertisement(speakers: Lan) -> None:
    first, second = ranked(VIP6)[:2]
    speakers.client.run(["ping", "-6", "-c1", "-W1", VIP6], check=False)
    wait_until("client resolved the IPv6 VIP", lambda: speakers.neighbour(VIP6) == speakers.macs[first])
    moment = speakers.kill(first)
    wait_until(
        "client's IPv6 cache moved", lambda: speakers.neighbour(VIP6) == speakers.macs[second], every=0.01
    )
    print(f"\nIPv6 takeover: {(time.monotonic() - moment) * 1000:.0f} ms")
    assert speakers.ndisc(VIP6) == {speakers.macs[second]}


def test_a_cut_link_moves_the_vip_and_it_stays_with_its_new_holder_when_the_link_returns(
    speakers: Lan,
) -> None:
    times = []
    holder = ranked(VIP4)[0]
    for _ in range(TRIALS // 2):
        _populate(speakers, VIP4, holder)
        elapsed, cut, successor = _takeover(speakers, VIP4, cut=True)
        times.append(elapsed)
        assert elapsed < 5
        assert speakers.ping(VIP4)
        since = len(speakers.speakers[cut].stderr())
        speakers.bridge.ip("link", "set", speakers.bridge_port(cut), "up")
        # Its link back, the node rejoins (it announces nothing while it listens) and hears that the VIP is
        # held: it does not take it back.
        wait_until(
            f"{cut} rejoined holding nothing",
            functools.partial(holding_nothing_among_all, speakers.speakers[cut], since),
        )
        assert speakers.arping(VIP4, count=3) == {speakers.macs[successor]}
        holder = successor
    print(f"\nlink cut → client's neighbour cache moved: {percentiles(times)}")


def _arp_seen(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_restarting_a_speaker_moves_only_its_own_vips_and_none_back(tmp_path: Path) -> None:
    vips = [f"10.0.50.{100 + n}" for n in range(10, 40)]
    with lan(tmp_path, vips) as network:
        network.configure([{"address": vip, "nodes": ALL} for vip in vips])
        network.start_all()
        holders = {vip: ranked(vip)[0] for vip in vips}
        restarted = "node2"
        for vip in vips:
            wait_until(
                f"{vip} answered",
                functools.partial(answered_by, network, vip, holders[vip], 1),
            )
        log = tmp_path / "arp.jsonl"
        network.client.spawn(watch_arp, str(log), "eth0").wait_for_line("watching")
        own = {vip for vip, node in holders.items() if node == restarted}
        speaker = network.speakers.pop(restarted)
        speaker.stop()  # SIGTERM: a goodbye heartbeat, the peers take over at once
        successors = {vip: ranked(vip, [n for n in ALL if n != restarted])[0] for vip in own}
        wait_until(
            "node2's VIPs announced by their successors",
            lambda: (
                {(f["ip"], f["mac"]) for f in _arp_seen(log) if f["ip"] == f["target"]}
                >= {(vip, network.macs[node]) for vip, node in successors.items()}
            ),
        )
        moved = {frame["ip"] for frame in _arp_seen(log) if frame["ip"] == frame["target"]}
        assert own and moved == own, "gratuitous ARP only for the stopped node's VIPs"
        back = network.start(restarted)
        back.wait_for_line("joined", timeout=30)
        wait_until("node2 rejoined holding nothing", functools.partial(holding_nothing_among_all, back))
        for vip in vips:
            assert network.arping(vip, count=1) == {network.macs[successors.get(vip, holders[vip])]}, vip
        assert not [
            f for f in _arp_seen(log) if f["mac"] == network.macs[restarted] and f["ip"] == f["target"]
        ], "the restarted node announced a VIP: it took one back"


def test_a_speaker_cut_off_from_the_api_hands_its_vips_to_fresh_peers(speakers: Lan) -> None:
    first, second = ranked(VIP4)[:2]
    wait_until("first holder answers", lambda: answered_by(speakers, VIP4, first))
    (speakers.folder / f"{first}.yaml").unlink()  # its source of truth is gone: its view turns stale
    wait_until("a fresh peer answers instead", lambda: answered_by(speakers, VIP4, second))
    assert speakers.speakers[first].process.poll() is None, "the stale speaker keeps running"
    speakers.configure(base_vips(), node=first)
    # Fresh again, it ranks first but leaves the VIP with its holder (a move would cut its connections).
    wait_until(
        "fresh again, it leaves the VIP with its holder",
        lambda: f"{VIP4} stays on {second}, its holder" in speakers.speakers[first].stderr(),
    )
    assert speakers.arping(VIP4, count=3) == {speakers.macs[second]}


def test_when_every_view_is_stale_the_last_known_state_stays_and_failover_still_works(speakers: Lan) -> None:
    first, second = ranked(VIP4)[:2]
    wait_until("first holder answers", lambda: answered_by(speakers, VIP4, first))
    for node in ALL:
        (speakers.folder / f"{node}.yaml").unlink()
    time.sleep(0)  # the files are polled every 0.5 s; the next assertion waits for its own evidence
    wait_until(
        "every speaker says its view is stale",
        lambda: all("stale" in speakers.speakers[n].stderr() for n in ALL),
    )
    assert speakers.arping(VIP4, count=3) == {speakers.macs[first]}
    speakers.kill(first)
    wait_until("a stale peer still takes over a dead node's VIP", lambda: answered_by(speakers, VIP4, second))


def test_a_speaker_that_hears_no_peers_announces_what_it_computes_alone(speakers: Lan) -> None:
    """The documented partition trade-off: cut off from the other speakers but not from the LAN, a node
    announces every VIP it is eligible for, so two nodes answer until the partition heals."""
    first = ranked(VIP4)[0]
    lonely = next(node for node in ALL if node != first)
    wait_until("first holder answers", lambda: answered_by(speakers, VIP4, first))
    speakers.nodes[lonely].run(["nft", "-f", "-"], input=PARTITION)
    both = {speakers.macs[first], speakers.macs[lonely]}
    wait_until("both sides answer", lambda: speakers.arping(VIP4, count=3) == both)
    speakers.nodes[lonely].run(["nft", "delete", "table", "inet", "partition"])
    wait_until("one answer again once it hears its peers", lambda: answered_by(speakers, VIP4, first))


def test_a_vip_on_a_missing_interface_is_reported_and_the_others_keep_answering(tmp_path: Path) -> None:
    with lan(tmp_path, [VIP4, ONLY_1_2]) as network:
        network.configure(
            [
                {"address": VIP4, "nodes": ALL},
                {"address": ONLY_1_2, "nodes": ALL, "interfaces": ["eth9"]},
                {"address": "10.0.50.300", "nodes": ALL},
            ]
        )
        network.start_all()
        first = ranked(VIP4)[0]
        wait_until("the good VIP answered", lambda: answered_by(network, VIP4, first))
        holder = ranked(ONLY_1_2)[0]
        wait_until(
            "the missing interface reported",
            lambda: "interface eth9 not found" in network.speakers[holder].stderr(),
        )
        assert "vips[2].address: '10.0.50.300' is not an IP address" in network.speakers[holder].stderr()
        assert network.arping(ONLY_1_2) == set()
        assert all(each.process.poll() is None for each in network.speakers.values())


def _first_ranked_by(node: str, start: int) -> str:
    """An address of the LAN that `node` ranks first for among all three (so only a pool can move it)."""
    return next(vip for n in range(start, start + 40) if ranked(vip := f"10.0.50.{n}")[0] == node)


def test_a_pools_node_selector_keeps_its_vip_on_the_matching_node_only(tmp_path: Path) -> None:
    selected = _first_ranked_by("node1", 210)  # node1 would hold it without the selector
    nowhere = _first_ranked_by("node1", 160)
    with lan(tmp_path, [selected, nowhere]) as network:
        document = {
            "peers": NODES,
            "labels": {"node1": {"zone": "a"}, "node2": {"zone": "b"}, "node3": {"zone": "a"}},
            "pools": [
                {
                    "name": "zone-b",
                    "addresses": [f"{selected}/32"],
                    "announce": {"nodeSelector": {"matchLabels": {"zone": "b"}}},
                },
                {
                    "name": "zone-c",
                    "addresses": [f"{nowhere}/32"],
                    "announce": {
                        "nodeSelector": {
                            "matchExpressions": [{"key": "zone", "operator": "In", "values": ["c"]}]
                        }
                    },
                },
            ],
            "vips": [
                {"address": selected, "nodes": ALL, "owner": "LoadBalancer shop/web"},
                {"address": nowhere, "nodes": ALL, "owner": "LoadBalancer shop/lost"},
            ],
        }
        _write_all(network, document)
        network.start_all()
        wait_until(f"node2 answers {selected}", lambda: answered_by(network, selected, "node2"))
        assert network.arping(selected, count=3) == {network.macs["node2"]}
        assert network.arping(nowhere) == set()
        reporter = ranked(nowhere)[0]
        wait_until(
            "NoEligibleNode reported by one speaker",
            lambda: "NoEligibleNode" in network.speakers[reporter].stderr(),
        )
        assert "spec.announce.nodeSelector" in network.speakers[reporter].stderr()
        assert all("NoEligibleNode" not in network.speakers[n].stderr() for n in ALL if n != reporter)
        network.kill("node2")  # the only matching node: the VIP goes nowhere else
        time.sleep(1.5)
        assert network.arping(selected) == set()


def test_a_node_lacking_the_pools_interface_yields_its_vip_and_reports_the_interface(tmp_path: Path) -> None:
    vip = _first_ranked_by("node1", 210)  # node1 would hold it if it had the interface
    with lan(tmp_path, [vip, VIP4]) as network:
        node1 = network.nodes["node1"]  # node1's LAN link is called lan0: it has no eth0
        node1.ip("link", "set", "eth0", "down")
        node1.ip("link", "set", "eth0", "name", "lan0")
        node1.ip("link", "set", "lan0", "up")
        document = {
            "peers": NODES,
            "pools": [{"name": "on-eth0", "addresses": [f"{vip}/32"], "announce": {"interfaces": ["eth0"]}}],
            "vips": [
                {"address": vip, "nodes": ALL, "owner": "LoadBalancer shop/web"},
                {"address": VIP4, "nodes": ALL},
            ],
        }
        _write_all(network, document)
        network.start_all()
        successor = ranked(vip, ["node2", "node3"])[0]
        wait_until(f"{successor} answers {vip}", lambda: answered_by(network, vip, successor))
        assert network.arping(vip, count=3) == {network.macs[successor]}
        stderr = network.speakers["node1"].stderr
        wait_until("node1 reports the missing interface", lambda: "InterfaceNotFound" in stderr())
        assert "VIPPool on-eth0: spec.announce.interfaces: interface eth0 not found on node node1" in stderr()
        first = ranked(VIP4)[0]  # the VIP outside the pool: node1 still answers on its own link
        wait_until(f"{first} answers {VIP4}", lambda: answered_by(network, VIP4, first))
        assert all(each.process.poll() is None for each in network.speakers.values())


def _write_all(network: Lan, document: dict[str, Any]) -> None:
    """Every node's static configuration: `Lan.configure` writes peers and vips only; pools need more."""
    for name in network.nodes:
        (network.folder / f"{name}.yaml").write_text(yaml.safe_dump(document), encoding="utf-8")
