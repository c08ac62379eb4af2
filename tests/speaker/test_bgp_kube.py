"""Kubernetes mode's BGP, pure parts: BGPPeer/BGPAdvertisement objects → the intent (the core's validation,
passwords from Secrets of the speaker's namespace only, a bad Secret as the peer's problem), and this node's
entries in the BGPPeers' `status.nodes` (written only on a change, removed when no longer selected, Nodes
gone cleared by one speaker)."""

from __future__ import annotations

import asyncio
import ipaddress
from typing import Any

import pytest
from layerlb_speaker import bgp, bgp_resources, bgp_status, bird
from layerlb_speaker.announcement import Vip

NS = "layerlb-system"


def peer_object(name: str, uid: str = "", generation: int = 1, **spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"peerAddress": "10.0.60.254", "peerASN": 64512, "localASN": 64513}
    return {
        "apiVersion": "layerlb.dev/v1alpha1",
        "kind": "BGPPeer",
        "metadata": {"name": name, "uid": uid or f"uid-{name}", "generation": generation},
        "spec": base | spec,
    }


def ad_object(name: str, **spec: Any) -> dict[str, Any]:
    return {"kind": "BGPAdvertisement", "metadata": {"name": name}, "spec": spec}


SECRETS = {(NS, "tor"): {"password": "s3cret"}, (NS, "quoted"): {"password": 'a"b'}}


def read_secret(namespace: str, name: str, key: str) -> str:
    data = SECRETS.get((namespace, name))
    if data is None:
        raise bgp_resources.SecretProblem(f"passwordSecret: Secret {namespace}/{name} not found")
    return data[key]


LABELS = {"node1": {"rack": "a"}, "node2": {"rack": "b"}}


def test_resources_become_the_intent_through_the_cores_validation() -> None:
    peers = [
        peer_object("tor", passwordSecret={"name": "tor", "namespace": NS}, bfd={}, holdTime=9),
        peer_object("rack-a", nodeSelector={"matchLabels": {"rack": "a"}}, peerAddress="fd00::1"),
        peer_object("broken", holdTime=2),
    ]
    ads = [
        ad_object("all", communities=["no-export"], localPreference=50),
        ad_object("bad", communities=["x"]),
    ]
    intent, invalid = bgp_resources.intent(peers, ads, LABELS, read_secret, NS)
    assert [p.name for p in intent.peers] == ["rack-a", "tor"]
    tor = intent.peers[1]
    assert (tor.password, tor.hold, tor.bfd, tor.problem) == ("s3cret", 9, bgp.Bfd(), "")
    assert intent.peers[0].address == ipaddress.ip_address("fd00::1")
    assert intent.advertisements == (
        bgp.Advertisement("all", communities=((65535, 65281),), local_preference=50),
    )
    assert invalid == [
        "BGPPeer broken: holdTime: holdTime must be 0 (no keepalives) or 3-65535 seconds, not 2",
        "BGPAdvertisement bad: communities[0]: 'x' is not a community: ASN:VALUE with each part 0-65535, or "
        "no-export, no-advertise, local-as, blackhole",
    ]
    assert [p.name for p in bgp.selected(intent, "node2")] == ["tor"]


@pytest.mark.parametrize(
    ("ref", "problem"),
    [
        (
            {"name": "tor", "namespace": "kube-system"},
            "passwordSecret: Secret kube-system/tor is outside the speaker's namespace layerlb-system, where "
            "it may read Secrets only; create the Secret there",
        ),
        ({"name": "gone", "namespace": NS}, "passwordSecret: Secret layerlb-system/gone not found"),
        (
            {"name": "quoted", "namespace": NS},
            "passwordSecret: Secret layerlb-system/quoted key password: not 1-80 printable ASCII characters "
            "without double quotes or backslashes",
        ),
    ],
)
def test_a_peer_whose_secret_cannot_be_used_opens_no_session_and_says_why(
    ref: dict[str, str], problem: str
) -> None:
    intent, invalid = bgp_resources.intent(
        [peer_object("tor", passwordSecret=ref)], [ad_object("all")], LABELS, read_secret, NS
    )
    assert invalid == []
    [tor] = intent.peers
    assert tor.problem == problem and tor.password is None
    vips = [Vip(ipaddress.ip_address("198.51.100.10"), frozenset({"node1"}))]
    assert bgp.desired(intent, "node1", "10.0.60.1", vips).sessions == ()
    entries = bgp_status.entries(intent, "node1", {}, {"tor": 3})
    assert entries == {"tor": {"state": "Idle", "lastError": problem, "observedGeneration": 3}}


def intent_of(*peers: dict[str, Any]) -> bgp.Intent:
    return bgp_resources.intent(peers, [], LABELS, read_secret, NS)[0]


def test_the_node_applies_its_entry_on_each_selecting_peer_only_on_a_change() -> None:
    peers = [peer_object("tor"), peer_object("rack-b", nodeSelector={"matchLabels": {"rack": "b"}})]
    intent = intent_of(*peers)
    states = {"tor": bird.SessionState("Established", "2026-12-07T20:00:00+00:00", None, 2, "Up")}
    wanted = bgp_status.entries(intent, "node1", states, bgp_status.generations(peers))
    assert wanted == {
        "tor": {
            "state": "Established",
            "since": "2026-12-07T20:00:00+00:00",
            "prefixesAdvertised": 2,
            "bfd": "Up",
            "observedGeneration": 1,
        }
    }
    publisher = bgp_status.Publisher("node1")
    [write] = publisher.update(wanted, peers, None, clears=False)
    assert write.field_manager() == "layerlb-speaker/node1"
    assert write.body() == {
        "apiVersion": "layerlb.dev/v1alpha1",
        "kind": "BGPPeer",
        "metadata": {"name": "tor", "uid": "uid-tor"},
        "status": {"nodes": [{"node": "node1", **wanted["tor"]}]},
    }
    assert publisher.update(wanted, peers, None, clears=False) == []  # nothing changed: nothing written
    # A restarted speaker finds its entry stored and writes nothing either.
    stored = [dict(peers[0], status={"nodes": [{"node": "node1", **wanted["tor"]}]}), peers[1]]
    assert bgp_status.Publisher("node1").update(wanted, stored, None, clears=False) == []
    # Deselected (or BGP gone): one apply without the entry removes it.
    [removal] = publisher.update({}, peers, None, clears=False)
    assert removal.entry is None and removal.body()["status"] == {}


def test_the_first_live_speaker_removes_the_entries_of_nodes_that_are_gone() -> None:
    peer = peer_object("tor")
    peer["status"] = {"nodes": [{"node": "node1", "state": "Idle"}, {"node": "gone", "state": "Idle"}]}
    writes = bgp_status.Publisher("node1").update({"tor": {"state": "Idle"}}, [peer], {"node1"}, clears=True)
    assert [(w.node, w.entry) for w in writes] == [("gone", None)]
    assert writes[0].field_manager() == "layerlb-speaker/gone"
    assert bgp_status.Publisher("node1").update({"tor": {"state": "Idle"}}, [peer], None, clears=True) == []


class Routes:
    """A stand-in announcer: what the runtime asks BGP for."""

    def __init__(self) -> None:
        self.desired: bgp.Desired | None = None

    def want(self, desired: bgp.Desired) -> None:
        self.desired = desired


def test_a_pool_with_l2_off_is_advertised_over_bgp_but_answered_by_no_node() -> None:
    from layerlb_speaker import inventory
    from layerlb_speaker.membership import Heartbeat, Timing
    from layerlb_speaker.runtime import Inventory, Settings, Speaker

    from tests.speaker.test_runtime_pools import FakeResponder, Recorder

    pools = [
        {
            "metadata": {"name": "bgp-only"},
            "spec": {"addresses": ["198.51.100.0/28"], "announce": {"l2": False}},
        },
        {"metadata": {"name": "both"}, "spec": {"addresses": ["203.0.113.0/28"]}},
    ]
    vips = (
        Vip(ipaddress.ip_address("198.51.100.1"), frozenset({"node1"})),
        Vip(ipaddress.ip_address("203.0.113.1"), frozenset({"node1"})),
    )
    restricted, _ = inventory.restricted(vips, inventory.pools(pools), LABELS)
    assert [vip.l2 for vip in restricted] == [False, True]
    speaker = Speaker(Settings("node1", ("eth0",), timing=Timing(0.1, 0.5, 0.0)), Recorder(), lambda: 0.0)
    responder = FakeResponder()
    speaker.responders = {"eth0": responder}  # type: ignore[dict-item]
    speaker.membership.heard(Heartbeat("node1", True, True), 0.0)
    routes = Routes()
    speaker.bgp = routes  # type: ignore[assignment]
    intent = bgp_resources.intent([peer_object("tor")], [ad_object("all")], LABELS, read_secret, NS)[0]
    speaker.update(Inventory(restricted, {"node1": "10.0.60.1"}, True, bgp=intent))

    async def reconcile() -> None:  # a takeover schedules its gratuitous ARP in the loop
        speaker.reconcile()

    asyncio.run(reconcile())
    assert responder.held == [ipaddress.ip_address("203.0.113.1")]  # ARP for the L2 pool's VIP only
    assert set(speaker.holders) == {ipaddress.ip_address("203.0.113.1")}
    assert routes.desired is not None
    assert {str(p) for p in routes.desired.prefixes()} == {"198.51.100.1/32", "203.0.113.1/32"}


def test_a_bgp_only_vip_is_written_by_the_first_advertising_node_naming_every_advertising_node() -> None:
    from layerlb_speaker import statuses
    from layerlb_speaker.announcement import Member, Owner

    lb = Owner("LoadBalancer", "shop", "web", "uid-web", "layerlb.dev/v1alpha1")
    address = ipaddress.ip_address("198.51.100.1")
    vip = Vip(address, frozenset({"node1", "node2", "node3"}), (lb,), l2=False)
    rack_b = peer_object("tor", nodeSelector={"matchExpressions": [{"key": "rack", "operator": "Exists"}]})
    intent = bgp_resources.intent([rack_b], [ad_object("all")], LABELS, read_secret, NS)[0]
    live = {name: Member(name) for name in ("node1", "node2", "node3")}
    advertisers = bgp.advertisers(intent, live, [vip])
    assert advertisers == {address: ("node1", "node2")}  # node3 has no rack label: no session
    writes = {node: statuses.Publisher(node).update([vip], {}, live, {}, "t0", advertisers) for node in live}
    assert writes["node2"] == [] and writes["node3"] == []
    [write] = writes["node1"]
    assert write.announcement() == {
        "address": "198.51.100.1",
        "node": "node1, node2",
        "nodes": ["node1", "node2"],
        "interfaces": [],
        "protocol": "BGP",
        "since": "t0",
    }
    assert write.condition()["message"] == "198.51.100.1 over BGP from node1, node2"
    # Nobody advertises it any more: the speaker ranking first for the address clears it.
    clearer = min(live, key=lambda node: announcement_rank(address, live).index(node))
    [cleared] = statuses.Publisher(clearer).update([vip], {}, live, {}, "t1", {})
    assert cleared.announcement() is None and "BGP only" in cleared.condition()["message"]


def announcement_rank(address: Any, members: Any) -> list[str]:
    from layerlb_speaker import announcement

    return announcement.rank(address, members)


def test_a_pools_l2_node_selector_narrows_who_answers_arp_but_not_who_advertises_over_bgp() -> None:
    from layerlb_speaker import inventory

    pools = [
        {
            "metadata": {"name": "edge"},
            "spec": {
                "addresses": ["198.51.100.0/28"],
                "announce": {"nodeSelector": {"matchLabels": {"rack": "a"}}},
            },
        }
    ]
    vip = Vip(ipaddress.ip_address("198.51.100.1"), frozenset({"node1", "node2"}))
    [narrowed], _ = inventory.restricted([vip], inventory.pools(pools), LABELS)
    assert narrowed.eligible == {"node1"}  # L2: rack a only
    assert narrowed.advertisers == {"node1", "node2"}  # BGP: the BGPAdvertisement's and BGPPeer's say
    intent = bgp_resources.intent([peer_object("tor")], [ad_object("all")], LABELS, read_secret, NS)[0]
    assert len(bgp.desired(intent, "node2", "10.0.60.2", [narrowed]).prefixes()) == 1


class FakeCore:
    """CoreV1Api's read of a Secret: the stored ones, else the API's 404 (or 403 where forbidden)."""

    def __init__(self, secrets: dict[tuple[str, str], dict[str, str]], forbidden: set[str]) -> None:
        self.secrets, self.forbidden, self.reads = secrets, forbidden, 0

    def read_namespaced_secret(self, name: str, namespace: str, **_: Any) -> Any:
        import base64
        import json
        from types import SimpleNamespace

        from kubernetes.client.exceptions import ApiException

        self.reads += 1
        if namespace in self.forbidden:
            raise ApiException(status=403, reason="Forbidden")
        if (namespace, name) not in self.secrets:
            raise ApiException(status=404, reason="Not Found")
        data = {k: base64.b64encode(v.encode()).decode() for k, v in self.secrets[(namespace, name)].items()}
        return SimpleNamespace(data=json.dumps({"data": data}).encode())


def test_the_cluster_reads_a_password_once_per_ttl_and_says_what_is_wrong_with_a_secret() -> None:
    from kubernetes import client as k8s
    from layerlb_speaker import kube

    cluster = kube.Cluster(k8s.ApiClient(), "node1", 30.0, False, bgp=True, namespace=NS)
    assert {"bgppeers", "bgpadvertisements"} <= set(cluster.watches)
    core = FakeCore({(NS, "tor"): {"password": "s3cret\n"}}, {"kube-system"})
    cluster.core = core  # type: ignore[assignment]
    assert cluster.read_secret(NS, "tor", "password") == "s3cret"
    assert cluster.read_secret(NS, "tor", "password") == "s3cret" and core.reads == 1  # cached
    problems = {}
    for namespace, name, key in ((NS, "tor", "md5"), (NS, "gone", "password"), ("kube-system", "x", "k")):
        with pytest.raises(bgp_resources.SecretProblem) as caught:
            cluster.read_secret(namespace, name, key)
        problems[name] = str(caught.value)
    assert problems == {
        "tor": f"passwordSecret: Secret {NS}/tor has no key 'md5' (its keys: password)",
        "gone": f"passwordSecret: Secret {NS}/gone not found",
        "x": "passwordSecret: Secret kube-system/x: forbidden (the speaker may read Secrets in its own namespace only)",
    }
    assert not cluster._secrets_due()
    assert (
        "bgppeers" not in kube.Cluster(k8s.ApiClient(), "node1", 30.0, False).watches
    )  # L2 only: no BGP watch
