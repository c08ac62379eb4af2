"""BGP in Kubernetes mode, on a real API server with an independent router: BGPPeer and BGPAdvertisement
applied with kubectl, three `layerlb speaker --bgp` processes peering with FRR, and the operator.

The routed lab is tests/kernel/bgp_lab.py's (FRR's zebra, bgpd and bfdd in a `router` namespace, three
node namespaces, a client behind the router); each node's speaker reaches the API server (127.0.0.1 on
the host) through a socat relay over a Unix socket, under a ServiceAccount bound to exactly the chart's
speaker ClusterRole and its BGP Role (`get` on Secrets in the speaker's namespace), as
e2e/test_announcement_status.py does for L2. The Nodes are objects only (no kubelet), Ready, their Leases
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

import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from layerlb_operator import objects

from e2e import harness
from e2e.cluster.cluster import Cluster
from e2e.harness import Operator, fresh_namespace, wait_for
from e2e.kube import ROOT, Kubectl
from e2e.test_announcement_status import _api_port, _node, _now, apply

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


def _node_status(kubectl: Kubectl, name: str, address: str) -> None:
    now = _now()
    ready = {
        "type": "Ready", "status": "True", "reason": "KubeletReady", "message": "the test says so",
        "lastHeartbeatTime": now, "lastTransitionTime": now,
    }  # fmt: skip
    status = {"status": {"conditions": [ready], "addresses": [{"type": "InternalIP", "address": address}]}}
    kubectl.ok("patch", "node", name, "--subresource=status", "--type=merge", "-p", json.dumps(status))


def _renew_leases(kubectl: Kubectl, nodes: list[str], stop: threading.Event) -> None:
    while not stop.is_set():
        leases = [
            {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": node, "namespace": "kube-node-lease"},
                "spec": {"holderIdentity": node, "leaseDurationSeconds": 40, "renewTime": _now(micro=True)},
            }
            for node in nodes
        ]
        kubectl("apply", "-f", "-", stdin=yaml.safe_dump_all(leases))
        stop.wait(5.0)


def _speaker_kubeconfig(k8s: Cluster, kubectl: Kubectl, folder: Path) -> Path:
    """A kubeconfig for a ServiceAccount bound to exactly the chart's speaker ClusterRole and BGP Role."""
    from tests.test_chart import template

    rendered = [
        d
        for d in yaml.safe_load_all(
            template("--show-only", "templates/speaker.yaml", "--set", "speaker.bgp.enabled=true")
        )
        if d
    ]
    [cluster_role] = [d for d in rendered if d["kind"] == "ClusterRole"]
    [role] = [d for d in rendered if d["kind"] == "Role"]
    account = {"kind": "ServiceAccount", "name": "speaker", "namespace": SYSTEM}
    rbac = "rbac.authorization.k8s.io"
    apply(
        kubectl,
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": SYSTEM}},
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "speaker", "namespace": SYSTEM}},
        {
            "apiVersion": f"{rbac}/v1",
            "kind": "ClusterRole",
            "metadata": {"name": f"{NS}-speaker"},
            "rules": cluster_role["rules"],
        },
        {
            "apiVersion": f"{rbac}/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": f"{NS}-speaker"},
            "roleRef": {"apiGroup": rbac, "kind": "ClusterRole", "name": f"{NS}-speaker"},
            "subjects": [account],
        },
        {
            "apiVersion": f"{rbac}/v1",
            "kind": "Role",
            "metadata": {"name": "speaker", "namespace": SYSTEM},
            "rules": role["rules"],
        },
        {
            "apiVersion": f"{rbac}/v1",
            "kind": "RoleBinding",
            "metadata": {"name": "speaker", "namespace": SYSTEM},
            "roleRef": {"apiGroup": rbac, "kind": "Role", "name": "speaker"},
            "subjects": [account],
        },
    )
    token = kubectl.ok("create", "token", "speaker", "-n", SYSTEM, "--duration=2h").strip()
    admin = yaml.safe_load(k8s.kubeconfig.read_text())
    return harness.token_kubeconfig(
        folder / "speaker.kubeconfig", admin["clusters"][0]["cluster"], "speaker", token
    )


def _loadbalancer(name: str, pool: str) -> dict[str, Any]:
    document: dict[str, Any] = next(
        d
        for d in yaml.safe_load_all((ROOT / "examples" / "l4-proxy-tcp.yaml").read_text())
        if d["kind"] == "LoadBalancer"
    )
    document["metadata"] = {"name": name, "namespace": NS}
    document["spec"].pop("vip", None)
    document["spec"]["vipPool"] = pool
    return document


def _forwarding_pod(kubectl: Kubectl, loadbalancer: str, node: str) -> None:
    """A forwarding pod object of `loadbalancer` on `node`, Running and Ready (no kubelet runs here)."""
    labels = {
        objects.NAME_LABEL: "layerlb",
        objects.COMPONENT_LABEL: "dataplane",
        objects.INSTANCE_LABEL: objects.label_value(loadbalancer),
        objects.LOADBALANCER_LABEL: objects.label_value(loadbalancer),
    }
    name = f"{loadbalancer}-fake-{node}"
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": NS, "labels": labels},
        "spec": {
            "nodeName": node,
            "containers": [{"name": "dataplane", "image": "layerlb:e2e"}],
            "tolerations": [{"operator": "Exists"}],
        },
    }
    apply(kubectl, pod)
    ready = {"type": "Ready", "status": "True", "lastTransitionTime": _now()}
    status = {"status": {"phase": "Running", "conditions": [ready]}}
    kubectl.ok(
        "patch", "pod", name, "-n", NS, "--subresource=status", "--type=merge", "-p", json.dumps(status)
    )


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


def _condition(body: dict[str, Any], kind: str) -> dict[str, Any] | None:
    found = (body.get("status") or {}).get("conditions") or []
    return next((c for c in found if c.get("type") == kind), None)


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
    names = list(NODES)
    apply(
        kubectl,
        {
            "apiVersion": "layerlb.dev/v1alpha1",
            "kind": "VIPPool",
            "metadata": {"name": "bgp-only"},
            "spec": {
                "addresses": [f"{VIP}/32"],
                "namespaces": [NS],
                "autoAssign": False,
                "announce": {"l2": False},
            },
        },
    )
    for name in names:
        apply(kubectl, _node(name))
        _node_status(kubectl, name, NODES[name])
    stop = threading.Event()
    renewer = threading.Thread(target=_renew_leases, args=(kubectl, names, stop), daemon=True)
    renewer.start()
    lease = f"{NS}/layerlb-operator"
    config = harness.operator_kubeconfig(k8s, kubectl, folder, NS, f"{NS}-op-system", lease)
    operator = Operator(config, folder / "operator.log", NS, lease, ["--ready-needs-announcement"])
    speaker_config = _speaker_kubeconfig(k8s, kubectl, folder)
    kubectl.ok(
        "create", "secret", "generic", PASSWORD_SECRET, "-n", SYSTEM, f"--from-literal=password={PASSWORD}"
    )
    port = _api_port(k8s)
    socket_path = folder / "api.sock"
    relay = subprocess.Popen(
        ["socat", f"UNIX-LISTEN:{socket_path},fork,unlink-early", f"TCP:127.0.0.1:{port}"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    speakers = []
    try:
        with bgp_lab(folder, [VIP]) as network:
            for name, space in network.nodes.items():
                space.popen(
                    [
                        "socat", f"TCP-LISTEN:{port},bind=127.0.0.1,fork,reuseaddr",
                        f"UNIX-CONNECT:{socket_path}",
                    ],
                    "api relay",
                )  # fmt: skip
                command = [
                    "env", f"KUBECONFIG={speaker_config}", f"PYTHONPATH={ROOT}", sys.executable, "-m",
                    "layerlb.cli", "speaker", "--node", name, "--port", str(PORT), "--interface", "eth0",
                    "--heartbeat-interval", "0.1", "--dead-after", "0.5", "--announce-count", "1",
                    "--bgp", "--bgp-dir", str(folder / f"bgp-{name}"), "--namespace", SYSTEM,
                ]  # fmt: skip
                speakers.append(space.popen(command, f"speaker {name}"))
            wait_for(
                "the operator to lead",
                lambda: operator.metrics().get("layerlb_operator_leader") == 1,
                TIMEOUT,
            )
            for each in speakers:
                each.wait_for_line("joined", timeout=TIMEOUT)
            yield network
            for each in speakers:
                (folder / f"{each.what.split()[-1]}.log").write_text(each.stderr())
    finally:
        try:
            kubectl("delete", "llb,pod", "--all", "-n", NS, "--wait=true", "--timeout=60s")
            kubectl("delete", "bgppeer,bgpadvertisement", "--all", "--ignore-not-found")
            operator.stop()
        finally:
            relay.terminate()
            relay.wait(timeout=10)
            stop.set()
            renewer.join(timeout=10)
            kubectl("delete", "node", *names, "--ignore-not-found")
            kubectl("delete", "lease", "-n", "kube-node-lease", *names, "--ignore-not-found")
            kubectl("delete", "vippool", "bgp-only", "--ignore-not-found")
            kubectl("delete", "clusterrole,clusterrolebinding", f"{NS}-speaker", "--ignore-not-found")
            kubectl("delete", "namespace", NS, SYSTEM, "--wait=false")


def test_bgp_resources_applied_with_kubectl_are_advertised_by_every_node_and_reported_per_node(
    lab: Any, kubectl: Kubectl
) -> None:
    from tests.kernel.bgp_lab import NODES, ROUTER

    apply(
        kubectl,
        _peer("tor", ROUTER, {"name": PASSWORD_SECRET, "namespace": SYSTEM}, bfd={}),
        {
            "apiVersion": "layerlb.dev/v1alpha1",
            "kind": "BGPAdvertisement",
            "metadata": {"name": "edge"},
            "spec": {"vipPools": ["bgp-only"], "peers": ["tor"], "communities": ["65000:90"]},
        },
    )
    apply(kubectl, _loadbalancer("web", "bgp-only"))
    wait_for("the VIP", lambda: (_get(kubectl, "llb", "web", NS).get("status") or {}).get("vip"), TIMEOUT)
    for node in NODES:
        _forwarding_pod(kubectl, "web", node)
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
            (c := _condition(_get(kubectl, "bgppeer", "tor"), "Established")) and c["status"] == "True" and c
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
        "Ready", lambda: (c := _condition(_get(kubectl, "llb", "web", NS), "Ready")) and c, TIMEOUT
    )
    assert ready.get("reason") != "NotAnnounced", ready


def test_a_peer_whose_secret_is_elsewhere_or_missing_says_so_per_node_and_the_good_sessions_carry_on(
    lab: Any, kubectl: Kubectl
) -> None:
    from tests.kernel.bgp_lab import NODES

    apply(
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
            lambda peer=peer: _condition(_get(kubectl, "bgppeer", peer), "Established"),  # type: ignore[misc]
            TIMEOUT,
        )
        assert (condition["status"], condition["reason"]) == ("False", "NotEstablished")
        assert condition["message"].startswith("0/3 nodes Established; node1: Idle (passwordSecret: ")
    for node in NODES:  # the good sessions stayed up and kept their routes
        entry = _entries(kubectl, "tor")[node]
        assert entry["state"] == "Established" and entry["prefixesAdvertised"] == 1
