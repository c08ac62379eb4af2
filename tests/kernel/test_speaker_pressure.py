"""A speaker starved of CPU keeps its VIPs; a dead one still loses them (real speakers, network namespaces).

The starvation is real: the holder's speaker process is stopped (SIGSTOP) and continued, as a node whose
CPU is taken by others stops it. Each pause is a round that starts late; the speaker tells its peers
(`membership.Pressure`), and they wait `deadAfter` plus twice that lateness for its next heartbeat. The
pauses grow, each shorter than what the peers allow by then, the last one longer than `deadAfter` itself:
with a fixed `deadAfter` that pause is a false takeover (the peers declare the holder dead and the client
is told another MAC), here it is nothing. Then the holder is killed, and its VIP moves.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import re
import signal
import time
from pathlib import Path

from layerlb_speaker import announcement

from tests.kernel.speaker_lan import NODES, Lan, lan, wait_until

VIP = "10.0.50.201"
DEAD_AFTER = 0.8
TIMING = ["--dead-after", str(DEAD_AFTER), "--max-dead-after", "3"]


def _pause(network: Lan, node: str, seconds: float) -> float:
    """Stops node's speaker for `seconds` (the stimulus itself, not a wait); returns the pause measured."""
    pid = network.speakers[node].pid
    started = time.monotonic()
    os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(seconds)
    finally:
        os.kill(pid, signal.SIGCONT)
    return time.monotonic() - started


def _allowed(network: Lan, peer: str, holder: str) -> float:
    """How long `peer` now lets `holder` stay silent, from its last log line saying so (0 if none)."""
    found = re.findall(
        rf"peer {holder}: its rounds run up to [\d.]+ s late; allowing it ([\d.]+) s",
        network.speakers[peer].stderr(),
    )
    return float(found[-1]) if found else 0.0


def _allows(network: Lan, peer: str, holder: str, least: float) -> bool:
    return _allowed(network, peer, holder) >= least


def test_a_starved_speaker_keeps_its_vip_and_a_killed_one_loses_it(tmp_path: Path) -> None:
    nodes = list(NODES)
    with lan(tmp_path, [VIP]) as network:
        network.configure([{"address": VIP, "nodes": nodes}])
        network.start_all(*TIMING)
        holder = announcement.rank(ipaddress.ip_address(VIP), nodes)[0]
        peers = [node for node in nodes if node != holder]
        wait_until(
            f"{holder} answers {VIP}",
            lambda: network.ping(VIP) and network.neighbour(VIP) == network.macs[holder],
        )

        for pause, then_allowed in ((0.3, 1.0), (0.6, 1.6)):
            measured = _pause(network, holder, pause)
            assert measured < DEAD_AFTER, (
                f"a priming pause of {measured:.2f}s is already too long to prove anything"
            )
            for peer in peers:
                wait_until(
                    f"{peer} allows {holder} at least {then_allowed}s after a {measured:.2f}s stall",
                    functools.partial(_allows, network, peer, holder, then_allowed),
                )
        long_pause = _pause(network, holder, 1.2)
        assert long_pause > DEAD_AFTER
        assert network.ping(VIP), "the VIP still answers after the long stall"
        for peer in peers:
            assert f"peer {holder} dead" not in network.speakers[peer].stderr(), (
                f"{peer} took {holder} for dead during a {long_pause:.2f}s stall it had been told to expect"
            )
        assert network.neighbour(VIP) == network.macs[holder]
        assert network.arping(VIP) == {network.macs[holder]}

        network.kill(holder)
        successor = announcement.rank(ipaddress.ip_address(VIP), peers)[0]
        wait_until(
            f"{VIP} moves to {successor} once {holder} is dead",
            lambda: network.neighbour(VIP) == network.macs[successor] and network.ping(VIP),
            timeout=15,
        )
