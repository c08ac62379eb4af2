"""Flows survive ECMP changes learned over BGP: the router is FRR's bgpd (`maximum-paths 8`), and its
multipath route to the VIP is the one it learns from the nodes' speakers — no hand-made route.

The lab is `ecmp_lab`'s (`test_ecmp_netns.build`: client, router, four nodes, three backends owning the VIP
on lo and answering the client directly) with FRR started in the router namespace (`bgp_lab.start_frr`,
BFD 300 ms x 3) and the router hashing the 5-tuple (`bgp_lab.ROUTER_SYSCTLS`). Each node runs the real
nftables engine for the VIP and the real `layerlb speaker` advertising it (static config, BIRD 2 under
it). 100 long-lived connections run while node n4's speaker starts (the router adds its next hop) and then
node n2's speaker stops with SIGTERM (its graceful withdrawal: the router drops that next hop). Counted: the
connections reset or answered by another backend, per phase, and how many flows the router really moved.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from layerlb import api
from tests.kernel import ecmp_lab as lab
from tests.kernel import test_ecmp_netns as host
from tests.kernel.bgp_lab import ROUTER_SYSCTLS, TIMING, start_frr, wait_until
from tests.netns import Namespace, Spawned, Topology

ROUTER_ASN, NODE_ASN = 64512, 64513
COUNT, INTERVAL = 100, 0.1


def router_config(folder: Path) -> str:
    """bgpd on the router: every node an eBGP neighbour with BFD, multipath over up to 8 of them."""
    neighbours = "".join(
        f" neighbor {address} peer-group NODES\n neighbor {address} update-source lan\n"
        for address in lab.NODES.values()
    )
    return f"""hostname router
log file {folder}/bgpd.log
log timestamp precision 3
!
router bgp {ROUTER_ASN}
 bgp router-id {lab.ROUTER_LAN}
 bgp log-neighbor-changes
 no bgp ebgp-requires-policy
 no bgp default ipv4-unicast
 neighbor NODES peer-group
 neighbor NODES remote-as {NODE_ASN}
 neighbor NODES bfd profile lab
{neighbours} !
 address-family ipv4 unicast
  neighbor NODES activate
  maximum-paths 8
 exit-address-family
!
"""


def speaker_config() -> dict[str, Any]:
    """Every node's static config: the VIP eligible everywhere, advertised to the router (BFD, hold 3 s);
    its pool leaves it to BGP alone (no ARP answers on the segment the backends share)."""
    peer = {"name": "tor", "peerAddress": lab.ROUTER_LAN, "peerASN": ROUTER_ASN, "localASN": NODE_ASN}
    return {
        "peers": lab.NODES,
        "pools": [{"name": "ecmp", "addresses": [f"{lab.VIP}/32"], "announce": {"l2": False}}],
        "vips": [{"address": lab.VIP, "nodes": list(lab.NODES), "pool": "ecmp"}],
        "bgp": {"peers": [peer | {"holdTime": 3, "bfd": {}}], "advertisements": [{"name": "all"}]},
    }


@dataclass
class BgpEcmp:
    """The ECMP lab's namespaces with FRR as the router, and the speakers running now."""

    folder: Path
    nodes: dict[str, Namespace]
    speakers: dict[str, Spawned] = field(default_factory=dict)

    def start(self, node: str) -> None:
        config = self.folder / f"{node}.yaml"
        config.write_text(yaml.safe_dump(speaker_config()), encoding="utf-8")
        argv = [sys.executable, "-m", "layerlb.cli", "speaker", "--node", node, "--config", str(config)]
        argv += ["--bgp-dir", str(self.folder / f"bgp-{node}"), *TIMING]
        self.speakers[node] = self.nodes[node].popen(argv, what=f"speaker {node}")

    def stop(self, node: str) -> None:
        """SIGTERM: the speaker withdraws the VIP, then ends its session and BIRD."""
        speaker = self.speakers.pop(node)
        speaker.process.send_signal(signal.SIGTERM)
        speaker.process.wait(15)
        speaker.stop()

    def kernel_next_hops(self) -> set[str]:
        """The VIP's next hops in the router's kernel FIB (what zebra installed from bgpd)."""
        routes = json.loads(self.nodes["router"].ip("-4", "-j", "route", "show", lab.VIP) or "[]")
        hops = {route["gateway"] for route in routes if route.get("gateway")}
        return hops | {
            hop["gateway"] for route in routes for hop in route.get("nexthops", []) if "gateway" in hop
        }

    def wait_for_route(self, nodes: Sequence[str], timeout: float = 30.0) -> float:
        """Waits until the router forwards the VIP over exactly `nodes`, and every running speaker reports its
        session Established with BFD Up (FRR 8.4 may re-create its first BFD session once, which BIRD answers
        by reconnecting: see bgp_lab; a flap after the phase began would move flows uncounted); returns how
        long the route took."""
        expected = {lab.NODES[name] for name in nodes}
        began = time.monotonic()
        wait_until(
            f"the router's route to {lab.VIP} via {sorted(nodes)}",
            lambda: self.kernel_next_hops() == expected,
            timeout,
        )
        took = time.monotonic() - began
        wait_until("the speakers' sessions settled", lambda: all(map(self.settled, self.speakers)), timeout)
        wait_until(f"the route still via {sorted(nodes)}", lambda: self.kernel_next_hops() == expected, 5)
        return took

    def settled(self, node: str) -> bool:
        """node's speaker reports its session Established and BFD Up (its status.json)."""
        try:
            peers = json.loads((self.folder / f"bgp-{node}" / "status.json").read_text())["peers"]
        except (OSError, ValueError, KeyError):
            return False
        entry = peers.get("tor", {})
        return bool(entry.get("state") == "Established" and entry.get("bfd") == "Up")


@pytest.fixture(scope="module")
def ecmp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BgpEcmp]:
    folder = tmp_path_factory.mktemp("ecmp-bgp")
    with Topology("ecmpbgp", timeout=60) as topo:
        yield lab_with_frr(topo, folder)


def lab_with_frr(topo: Topology, folder: Path) -> BgpEcmp:
    """`test_ecmp_netns.build`'s lab, its router running FRR with `ROUTER_SYSCTLS` (the 5-tuple hash)."""
    nodes = host.build(topo)
    for key, value in ROUTER_SYSCTLS.items():
        if key.startswith("net.ipv4"):
            nodes["router"].sysctl(key, value)
    start_frr(nodes["router"], folder, router_config(folder))
    return BgpEcmp(folder, nodes)


def run(ecmp: BgpEcmp, architecture: api.Architecture, seeds: dict[str, str] | None = None) -> dict[str, Any]:
    """Every node synced with the Plan; n1-n3's speakers advertise the VIP; 100 long-lived flows; n4's
    speaker starts, then n2's stops; the run's `ecmp_lab.summary` and the router's reaction times."""
    p = host.ecmp_plan(architecture)
    for name in lab.NODES:
        ecmp.nodes[name].run(["nft", "flush", "ruleset"])
        assert ecmp.nodes[name].call(host.sync_node, p.model_dump_json(), (seeds or {}).get(name)) >= 1
    router, client_ns = ecmp.nodes["router"], ecmp.nodes["client"]
    try:
        for name in lab.PHASES[0]:
            ecmp.start(name)
        ecmp.wait_for_route(lab.PHASES[0], timeout=60)
        client = client_ns.spawn(lab.long_lived_clients, lab.VIP, lab.PORT, COUNT, INTERVAL)
        ports = json.loads(client.wait_for_line("ready ", timeout=60).removeprefix("ready "))
        queries = "\n".join(lab.nexthop_queries(lab.VIP, lab.CLIENT, ports)) + "\n"
        paths = [lab.nexthops_of(router.run(["ip", "-batch", "-"], input=queries).stdout)]
        time.sleep(1.0)
        reaction: dict[str, float] = {}
        for phase, nodes_in_route in zip(lab.PHASE_NAMES[1:], lab.PHASES[1:], strict=True):
            os.kill(client.pid, signal.SIGUSR1)
            began = time.monotonic()
            joining = set(nodes_in_route) - set(ecmp.speakers)
            for name in joining:
                ecmp.start(name)
            for name in set(ecmp.speakers) - set(nodes_in_route):
                ecmp.stop(name)
            signalled = time.monotonic() - began
            reaction[phase] = round(signalled + ecmp.wait_for_route(nodes_in_route, timeout=60), 2)
            paths.append(lab.nexthops_of(router.run(["ip", "-batch", "-"], input=queries).stdout))
            time.sleep(host.SETTLE)
        os.kill(client.pid, signal.SIGTERM)
        flows = json.loads(client.wait_for_line("result ", timeout=30).removeprefix("result "))
    finally:
        for name in list(ecmp.speakers):
            ecmp.stop(name)
    found = lab.summary(flows, paths)
    found["router_seconds"] = reaction
    return found


def show(capsys: pytest.CaptureFixture[str], name: str, found: dict[str, Any]) -> None:
    with capsys.disabled():
        print(f"\n{lab.table({name: found})}  (answers: {found['answers']}, errors: {found['errors']})")
        print(f"router's route changed after (s): {found['router_seconds']}")


def test_dsr_flows_moved_by_a_route_learned_over_bgp_keep_their_backend(
    ecmp: BgpEcmp, capsys: pytest.CaptureFixture[str]
) -> None:
    """≤ 1 % of 100 connections reset or answered by another backend when n4's speaker joins the route
    and when n2's speaker leaves it, while the router (bgpd, zebra) really moved flows each time."""
    found = run(ecmp, api.Architecture.dsr)
    show(capsys, "nftables dsr over BGP", found)
    assert found["broken_before"] == 0
    for phase, figures in found["phases"].items():
        assert figures["moved_by_router"] >= 10, (phase, figures)
        assert figures["disturbed_percent"] <= 1.0, (phase, figures)


def test_a_node_hashing_with_another_seed_breaks_the_flows_bgp_moves_to_it(
    ecmp: BgpEcmp, capsys: pytest.CaptureFixture[str]
) -> None:
    """The negative control: n4 hashes with its own seed, so the flows the router moves to it once its
    speaker advertises the VIP reach other backends, which reset them."""
    found = run(ecmp, api.Architecture.dsr, seeds={"n4": "0x00c0ffee"})
    show(capsys, "dsr over BGP, n4 other seed", found)
    assert found["phases"]["node added"]["disturbed_percent"] >= 5.0


def test_nat_flows_moved_by_a_route_learned_over_bgp_break_and_no_other(
    ecmp: BgpEcmp, capsys: pytest.CaptureFixture[str]
) -> None:
    """nat keeps a flow's state on the node that translated it: the flows the router moves break."""
    found = run(ecmp, api.Architecture.nat)
    show(capsys, "nftables nat over BGP", found)
    assert found["broken_before"] == 0
    added = found["phases"]["node added"]
    assert added["broken"] == added["moved_by_router"] > 0
    assert all(figures["broken_unmoved"] == 0 for figures in found["phases"].values())
