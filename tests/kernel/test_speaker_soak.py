"""A short soak of the speakers on the network-namespace LAN: healthy speakers never move a VIP, even on a
busy machine.

The benchmark's soak (`make bench-announce-soak`, bench/announce_soak.py) for one minute, lighter: three
speakers sharing 30 VIPs, two spinning workers and 100 UDP requests a second to the VIPs. Nothing is done
to the speakers, so any change of the node behind a VIP is a false takeover, whichever way it is seen
(the node answering the client's requests, the client's neighbour cache, the ARP frames the client sees,
the speakers' own logs). The margin: the longest heartbeat gap logged over the 10-minute soak is
printed in speaker/README.md, against the 500 ms after which a peer is dead.
"""

from __future__ import annotations

from bench import announce_soak


def test_no_vip_moves_while_every_speaker_is_healthy_on_a_busy_machine() -> None:
    figures = announce_soak.soak(60, count=30, workers=2, rate=100)
    announce_soak.report(figures, 30, 2, 100)
    assert not any(figures.moves.values()), "\n".join(figures.details)
    assert figures.sent > 5000
    assert figures.lost == 0
    assert figures.wrong == []
