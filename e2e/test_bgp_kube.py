"""BGP in Kubernetes mode, on a real API server with an independent router: BGPPeer and BGPAdvertisement
applied with kubectl, three `layerlb speaker --bgp` processes peering with FRR, and the operator.

The routed lab is tests/kernel/bgp_lab.py's (FRR's zebra, bgpd and bfdd in a `router` namespace, three
node namespaces, a client behind the router); each node's speaker reaches the API server (127.0.0.1 on
the host) through a socat relay over a Unix socket, under a ServiceAccount bound to exactly the chart's
speaker ClusterRole and its BGP Role (`get` on Secrets in the speaker's namespace), as
e2e/test_announcement_status.py does for L2 (both through e2e/speakers.py). The Nodes are objects only (no kubelet), Ready, their Leases
renewed by the test; a LoadBalancer is made eligible on every node by forwarding pod objects the test
marks Running and Ready. Its pool is BGP only (`spec.announce.l2: false`).

Shown: the router learns the VIP from all three nodes (its own FIB: three next hops) and the client's
connections reach all three; each node's session in the BGPPeer's `status.nodes` (Established, one prefix,
BFD Up) and the operator's `Established` condition "3/3 nodes Established"; the LoadBalancer's
`status.announcement` says BGP and names the three nodes; a BGPPeer whose password Secret is in another
namespace, or missing, opens no session and says why in each node's `lastError` (the condition False),
while the good sessions carry on. Needs root (network namespaces), socat and FRR.
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from e2e import harness, speakers
from e2e.cluster.cluster import Cluster
from e2e.harness import Operator, fresh_namespace, wait_for
from e2e.kube import Kubectl

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("socat") is None or not Path("/usr/lib/frr/bgpd").exists(),
    reason="needs root (network namespaces), socat and FRR",
)

NS = "llb-bgp"
SYSTEM = f"{NS}-system"  # the speakers' namespace: the only one they may read Secrets in
TIMEOUT = 60.0
VIP = "198.51.100.90"
PORT = 17948  # the speakers' heartbeat port inside their namespaces
PASSWORD_SECRET = "tor-password"


def _peer(name: str, address: str, secret: dict[str, str], **extra: Any) -> dict[str, Any]:
    from tests.kernel.bgp_lab import NODE_ASN, ROUTER_ASN

    spec = {"peerAddress": address, "peerASN": ROUTER_ASN, "localASN": NODE_ASN, "holdTime": 9}
    return {
        "apiVersion": "layerlb.dev/v1alpha1",
        "kind": "BGPPeer",
        "metadata": {"name": name},
        "spec": {**spec, "passwordSecret": secret, **extra},
    }


def _get(kubectl: Kubectl, kind: str, name: str, namespace: str | None = None) -> dict[str, Any]:
    return harness.get(kubectl, kind, name, namespace) or {}


def _entries(kubectl: Kubectl, peer: str) -> dict[str, dict[str, Any]]:
    found = (_get(kubectl, "bgppeer", peer).get("status") or {}).get("nodes") or []
    return {entry["node"]: entry for entry in found}


@pytest.fixture(scope="module")
def lab(
    k8s: Cluster, kubectl: Kubectl, crds_installed: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Any]:
    """The routed lab with FRR, the operator, three Nodes with their speakers in BGP mode."""
    from tests.kernel.bgp_lab import NODES, PASSWORD, bgp_lab

    folder = tmp_path_factory.mktemp("bgp")
    fresh_namespace(kubectl, NS)
    speakers.apply(kubectl, speakers.pool("bgp-only", NS, [f"{VIP}/32"], announce={"l2": False}))
    stop = threading.Event()
    renewer = speakers.ready_nodes(kubectl, NODES, stop)
    lease = f"{NS}/layerlb-operator"
    config = harness.operator_kubeconfig(k8s, kubectl, folder, NS, f"{NS}-op-system", lease)
    operator = Operator(config, folder / "operator.log", NS, lease, ["--ready-needs-announcement"])
    speaker_config = speakers.speaker_kubeconfig(k8s, kubectl, folder, NS, bgp=True)
    kubectl.ok(
        "create", "secret", "generic", PASSWORD_SECRET, "-n", SYSTEM, f"--from-literal=password={PASSWORD}"
    )
    port = speakers.api_port(k8s)
    socket_path = folder / "api.sock"
    relay = speakers.api_relay(socket_path, port)
    running = []
    try:
        with bgp_lab(folder, [VIP]) as network:
            for name, space in network.nodes.items():
                flags = [
                    "--heartbeat-interval", "0.1", "--dead-after", "0.5", "--announce-count", "1",
                    "--bgp", "--bgp-dir", str(folder / f"bgp-{name}"), "--namespace", SYSTEM,
                ]  # fmt: skip
                running.append(
                    speakers.start_speaker(space, name, speaker_config, socket_path, port, PORT, *flags)
                )
            wait_for(
                "the operator to lead",
                lambda: operator.metrics().get("layerlb_operator_leader") == 1,
                TIMEOUT,
            )
            for each in running:
                each.wait_for_line("joined", timeout=TIMEOUT)
            yield network
            for each in running:
                (folder / f"{each.what.split()[-1]}.log").write_text(each.stderr())
    finally:
        try:
            kubectl("delete", "llb,pod", "--all", "-n", NS, "--wait=true", "--timeout=60s")
            kubectl("delete", "bgppeer,bgpadvertisement", "--all", "--ignore-not-found")
            operator.stop()
        finally:
            relay.terminate()
            relay.wait(timeout=10)
            speakers.remove_nodes(kubectl, NODES, stop, renewer)
            kubectl("delete", "vippool", "bgp-only", "--ignore-not-found")
            kubectl("delete", "clusterrole,clusterrolebinding", f"{NS}-speaker", "--ignore-not-found")
            kubectl("delete", "namespace", NS, SYSTEM, "--wait=false")


def test_bgp_resources_applied_with_kubectl_are_advertised_by_every_node_and_reported_per_node(
    lab: Any, kubectl: Kubectl
) -> None:
    from tests.kernel.bgp_lab import NODES, ROUTER

    speakers.apply(
        kubectl,
        _peer("tor", ROUTER, {"name": PASSWORD_SECRET, "namespace": SYSTEM}, bfd={}),
        {
            "apiVersion": "layerlb.dev/v1alpha1",
            "kind": "BGPAdvertisement",
            "metadata": {"name": "edge"},
            "spec": {"vipPools": ["bgp-only"], "peers": ["tor"], "communities": ["65000:90"]},
        },
    )
    speakers.apply(kubectl, speakers.loadbalancer(NS, "web", "bgp-only"))
    wait_for("the VIP", lambda: (_get(kubectl, "llb", "web", NS).get("status") or {}).get("vip"), TIMEOUT)
    for node in NODES:
        speakers.forwarding_pod(kubectl, NS, "web", node)
    everyone = set(NODES.values())
    wait_for(f"{VIP} learned from every node", lambda: lab.next_hops(f"{VIP}/32") == everyone, TIMEOUT)
    assert set(lab.ask(VIP, 40)) == set(NODES)

    def all_up() -> dict[str, dict[str, Any]] | None:
        entries = _entries(kubectl, "tor")
        up = set(entries) == set(NODES) and all(
            e["state"] == "Established" and e.get("prefixesAdvertised") == 1 and e.get("bfd") == "Up"
            for e in entries.values()
        )
        return entries if up else None

    entries = wait_for("each node's session in the BGPPeer's status", all_up, TIMEOUT)
    assert all(entry["observedGeneration"] == 1 for entry in entries.values())
    condition = wait_for(
        "the operator's Established condition",
        lambda: (
            (c := speakers.condition(_get(kubectl, "bgppeer", "tor"), "Established"))
            and c["status"] == "True"
            and c
        ),
        TIMEOUT,
    )
    assert (condition["reason"], condition["message"]) == ("Established", "3/3 nodes Established")
    columns = kubectl.ok("get", "bgppeer", "tor", "-o", "wide")
    assert "3/3 nodes Established" in columns, columns
    announcement = wait_for(
        "the LoadBalancer's announcement",
        lambda: (_get(kubectl, "llb", "web", NS).get("status") or {}).get("announcement"),
        TIMEOUT,
    )
    assert announcement["protocol"] == "BGP" and announcement["address"] == VIP
    assert announcement["nodes"] == sorted(NODES) and announcement["node"] == ", ".join(sorted(NODES))
    ready = wait_for(
        "Ready", lambda: (c := speakers.condition(_get(kubectl, "llb", "web", NS), "Ready")) and c, TIMEOUT
    )
    assert ready.get("reason") != "NotAnnounced", ready


def test_a_peer_whose_secret_is_elsewhere_or_missing_says_so_per_node_and_the_good_sessions_carry_on(
    lab: Any, kubectl: Kubectl
) -> None:
    from tests.kernel.bgp_lab import NODES

    speakers.apply(
        kubectl,
        _peer("elsewhere", "10.0.60.250", {"name": PASSWORD_SECRET, "namespace": "default"}),
        _peer("missing", "10.0.60.251", {"name": "no-such-secret", "namespace": SYSTEM}),
    )
    why = {
        "elsewhere": f"passwordSecret: Secret default/{PASSWORD_SECRET} is outside the speaker's namespace "
        f"{SYSTEM}, where it may read Secrets only; create the Secret there",
        "missing": f"passwordSecret: Secret {SYSTEM}/no-such-secret not found",
    }
    for peer, message in why.items():

        def reported(peer: str = peer, message: str = message) -> bool:
            entries = _entries(kubectl, peer)
            return set(entries) == set(NODES) and all(
                e["state"] == "Idle" and e.get("lastError") == message for e in entries.values()
            )

        wait_for(f"{peer}'s lastError on every node", reported, TIMEOUT)
        condition = wait_for(
            f"{peer}'s condition",
            lambda peer=peer: speakers.condition(_get(kubectl, "bgppeer", peer), "Established"),  # type: ignore[misc]
            TIMEOUT,
        )
        assert (condition["status"], condition["reason"]) == ("False", "NotEstablished")
        assert condition["message"].startswith("0/3 nodes Established; node1: Idle (passwordSecret: ")
    for node in NODES:  # the good sessions stayed up and kept their routes
        entry = _entries(kubectl, "tor")[node]
        assert entry["state"] == "Established" and entry["prefixesAdvertised"] == 1
