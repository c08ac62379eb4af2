"""BGP's pure parts: which routes a node advertises to which peer (`bgp`), the bird.conf it becomes and what
BIRD's replies say (`bird`), and the static configuration's `bgp:` section, bad entries reported per field."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from layerlb_speaker import bgp, bird, config
from layerlb_speaker.announcement import Owner, Vip

from layerlb import api

GOLDEN = Path(__file__).resolve().parents[2] / "testdata" / "speaker" / "bird.conf"


def vip(address: str, *nodes: str, pool: str | None = None) -> Vip:
    return Vip(
        ipaddress.ip_address(address), frozenset(nodes), pool=Owner("VIPPool", "", pool) if pool else None
    )


def peer(name: str = "tor", address: str = "10.0.60.254", **changes: object) -> bgp.Peer:
    fields: dict[str, object] = {"peer_asn": 64512, "local_asn": 64513} | changes
    return bgp.Peer(name, ipaddress.ip_address(address), **fields)  # type: ignore[arg-type]


def routes(desired: bgp.Desired, name: str) -> dict[str, bgp.Attributes]:
    session = next(s for s in desired.sessions if s.peer.name == name)
    return {str(prefix): attributes for prefix, attributes in session.routes.items()}


RACK_A = api.LabelSelector(matchLabels={"rack": "a"})

VIPS = (
    vip("198.51.100.10", "node1", "node2", pool="edge"),
    vip("198.51.100.11", "node2", pool="edge"),
    vip("203.0.113.5", "node1", pool="other"),
    vip("2001:db8::10", "node1", pool="edge"),
)


def test_a_node_advertises_the_vips_it_is_eligible_for_in_each_peers_family() -> None:
    intent = bgp.Intent((peer(), peer("tor6", "fd00::1")), (bgp.Advertisement("all"),))
    desired = bgp.desired(intent, "node1", "10.0.60.1", VIPS)
    assert set(routes(desired, "tor")) == {"198.51.100.10/32", "203.0.113.5/32"}
    assert set(routes(desired, "tor6")) == {"2001:db8::10/128"}
    assert str(desired.router_id) == "10.0.60.1"
    assert desired.withdrawn().prefixes() == set()


def test_advertisements_select_pools_peers_and_nodes_and_merge_their_attributes() -> None:
    selector = RACK_A
    ads = (
        bgp.Advertisement("edge", pools=("edge",), communities=((65000, 1),), local_preference=100),
        bgp.Advertisement("more", pools=("edge",), communities=((65000, 2),), local_preference=300),
        bgp.Advertisement("elsewhere", peers=("other",), communities=((1, 1),)),
        bgp.Advertisement("rack-a", selector=selector, length=24),
    )
    ibgp = peer(local_asn=64512)
    intent = bgp.Intent((ibgp,), ads, {"node1": {"rack": "b"}})
    got = routes(bgp.desired(intent, "node1", "10.0.60.1", VIPS), "tor")
    assert got == {"198.51.100.10/32": bgp.Attributes(frozenset({(65000, 1), (65000, 2)}), frozenset(), 300)}
    intent = bgp.Intent((peer(),), ads, {"node1": {"rack": "a"}})
    got = routes(bgp.desired(intent, "node1", "10.0.60.1", VIPS), "tor")
    assert got["198.51.100.10/32"].local_preference is None  # eBGP: no LOCAL_PREF
    assert set(got) == {"198.51.100.10/32", "198.51.100.0/24", "203.0.113.0/24"}


def test_a_peers_node_selector_decides_which_nodes_open_a_session() -> None:
    selector = RACK_A
    intent = bgp.Intent((peer(selector=selector),), (bgp.Advertisement("all"),), {"node1": {"rack": "a"}})
    assert len(bgp.desired(intent, "node1", "10.0.60.1", VIPS).sessions) == 1
    assert bgp.desired(intent, "node2", "10.0.60.2", VIPS).sessions == ()


def test_bird_conf_matches_its_golden_file(request: pytest.FixtureRequest) -> None:
    ads = (
        bgp.Advertisement(
            "tagged", communities=((65000, 100), (65535, 65281)), large_communities=((64513, 1, 2),)
        ),
        bgp.Advertisement("preferred", peers=("ibgp",), local_preference=250),
    )
    peers = (
        peer(hold=9, password="s3cret", bfd=bgp.Bfd()),
        peer("ibgp", "10.0.60.253", local_asn=64512, source=ipaddress.ip_address("10.0.60.11")),
        peer("tor6", "fd00::1", multihop=True, port=1179),
    )
    text = bird.render(bgp.desired(bgp.Intent(peers, ads), "node1", "10.0.60.1", VIPS), "node1")
    if request.config.getoption("--update-goldens"):
        GOLDEN.write_text(text, encoding="utf-8")
    assert text == GOLDEN.read_text(encoding="utf-8")


PROTOCOLS = """BIRD 2.0.12 ready.
Name       Proto      Table      State  Since         Info
device1    Device     ---        up     2026-12-07 20:33:45

layerlb_vips4 Static     master4    up     2026-12-07 20:33:45
  Channel ipv4
    State:          UP
    Routes:         1 imported, 0 exported, 1 preferred

peer_tor_0cf8ae BGP        ---        up     2026-12-07 20:34:51  Established
  BGP state:          Established
    Neighbor address: 10.0.60.254
    Neighbor AS:      64512
  Channel ipv4
    State:          UP
    Routes:         0 imported, 2 exported, 0 preferred

peer_tor6_1a9a60 BGP        ---        start  2026-12-07 20:33:46  Idle          Received: Bad peer AS
  BGP state:          Idle
    Neighbor address: fd00:60::254
    Error wait:       14.510/60
    Last error:       Received: Bad peer AS
  Channel ipv6
    State:          DOWN

peer_x_000000 BGP        ---        start  2026-12-07 20:33:46  Active
  BGP state:          Active
    Neighbor address: 10.0.60.9
"""
BFD = """BIRD 2.0.12 ready.
layerlb_bfd:
IP address                Interface  State      Since         Interval  Timeout
10.0.60.254               eth0       Up         2026-12-07 20:33:47    0.300    0.900
fd00:60::254              eth0       Down       2026-12-07 20:33:47    1.000    0.000
"""


def test_birds_reply_becomes_each_sessions_state_error_prefixes_and_bfd() -> None:
    found = bird.sessions(PROTOCOLS, BFD)
    assert set(found) == {"peer_tor_0cf8ae", "peer_tor6_1a9a60", "peer_x_000000"}
    up = found["peer_tor_0cf8ae"]
    assert (up.state, up.prefixes_advertised, up.bfd, up.last_error) == ("Established", 2, "Up", None)
    assert up.since is not None and up.since.startswith("2026-12-07T")
    bad = found["peer_tor6_1a9a60"]
    assert (bad.state, bad.last_error, bad.bfd) == ("Idle", "Received: Bad peer AS", "Down")
    assert found["peer_x_000000"].last_error == bird.NO_CONNECTION
    assert bad.as_status("node1") == {
        "node": "node1",
        "state": "Idle",
        "since": bad.since,
        "lastError": "Received: Bad peer AS",
        "bfd": "Down",
    }


def test_bad_bgp_entries_are_reported_per_field_and_skipped() -> None:
    document = {
        "peers": {"node1": "10.0.60.1"},
        "vips": [],
        "bgp": {
            "peers": [
                {"name": "good", "peerAddress": "10.0.60.254", "peerASN": 64512, "localASN": 64513},
                {"name": "bad-asn", "peerAddress": "10.0.60.254", "peerASN": "x", "localASN": 64513},
                {
                    "name": "bad-hold",
                    "peerAddress": "10.0.60.254",
                    "peerASN": 1,
                    "localASN": 2,
                    "holdTime": 2,
                },
                {
                    "name": "bad-password",
                    "peerAddress": "::1",
                    "peerASN": 1,
                    "localASN": 2,
                    "password": 'a"b',
                },
                {
                    "name": "bad-source",
                    "peerAddress": "::1",
                    "peerASN": 1,
                    "localASN": 2,
                    "sourceAddress": "10.0.0.1",
                },
            ],
            "advertisements": [
                {"name": "ok", "communities": ["no-export", "1:2"], "localPreference": 5},
                {"name": "bad", "communities": ["70000:1"], "largeCommunities": ["1:2"]},
            ],
        },
    }
    inventory, problems = config.parse(document)
    assert inventory.bgp is not None
    assert [p.name for p in inventory.bgp.peers] == ["good"]
    assert [a.name for a in inventory.bgp.advertisements] == ["ok"]
    assert inventory.bgp.advertisements[0].communities == ((65535, 65281), (1, 2))
    assert problems == [
        # The core's messages, as the CLI and the API server give them (one validation path).
        "bgp.peers[1].peerASN: expected an integer, got 'x'",
        "bgp.peers[2].holdTime: holdTime must be 0 (no keepalives) or 3-65535 seconds, not 2",
        "bgp.peers[3].password: not 1-80 printable ASCII characters without double quotes or backslashes",
        "bgp.peers[4].sourceAddress: sourceAddress 10.0.0.1 and peerAddress ::1 are of different families; "
        "a session runs over IPv4 or IPv6",
        "bgp.advertisements[1].communities[0]: '70000:1' is not a community: ASN:VALUE with each part "
        "0-65535, or no-export, no-advertise, local-as, blackhole",
        "bgp.advertisements[1].largeCommunities[0]: '1:2' is not a large community: ASN:VALUE:VALUE with "
        "each part 0-4294967295",
    ]
