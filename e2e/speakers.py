"""Speaker processes in network namespaces against a real API server with no kubelet, for the e2e labs.

Shared by e2e/test_announcement_status.py (L2) and e2e/test_bgp_kube.py (BGP): the Nodes are objects only,
made Ready and their Leases renewed by the test (`node`, `node_status`, `renew_leases`); a LoadBalancer is
made eligible on a node by a forwarding pod object marked Running and Ready (`forwarding_pod`); each
speaker runs under a ServiceAccount bound to exactly the chart's speaker RBAC (`speaker_kubeconfig`) and
reaches the API server (127.0.0.1 on the host) through a socat relay over a Unix socket (`api_relay`,
`start_speaker`).
"""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from layerlb_operator import objects

from e2e import harness
from e2e.cluster.cluster import Cluster
from e2e.kube import ROOT, Kubectl

if TYPE_CHECKING:
    from tests.netns import Namespace, Spawned


def apply(kubectl: Kubectl, *documents: dict[str, Any]) -> None:
    kubectl.ok("apply", "-f", "-", stdin=yaml.safe_dump_all(documents))


def now(micro: bool = False) -> str:
    moment = datetime.datetime.now(datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ" if micro else "%Y-%m-%dT%H:%M:%SZ")


def node(name: str) -> dict[str, Any]:
    """A Node object tainted so that nothing waits for a kubelet there."""
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
        "spec": {"taints": [{"key": "layerlb.dev/e2e-no-kubelet", "effect": "NoSchedule"}]},
    }


def node_status(kubectl: Kubectl, name: str, address: str) -> None:
    """The Node Ready with `address` as its InternalIP, as a kubelet would say."""
    moment = now()
    ready = {
        "type": "Ready", "status": "True", "reason": "KubeletReady", "message": "the test says so",
        "lastHeartbeatTime": moment, "lastTransitionTime": moment,
    }  # fmt: skip
    status = {"status": {"conditions": [ready], "addresses": [{"type": "InternalIP", "address": address}]}}
    kubectl.ok("patch", "node", name, "--subresource=status", "--type=merge", "-p", json.dumps(status))


def renew_leases(kubectl: Kubectl, nodes: Iterable[str], stop: threading.Event) -> None:
    """Node Leases renewed as a kubelet would, so the node lifecycle controller keeps the Nodes Ready."""
    while not stop.is_set():
        leases = [
            {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": name, "namespace": "kube-node-lease"},
                "spec": {"holderIdentity": name, "leaseDurationSeconds": 40, "renewTime": now(micro=True)},
            }
            for name in nodes
        ]
        kubectl("apply", "-f", "-", stdin=yaml.safe_dump_all(leases))
        stop.wait(5.0)


def ready_nodes(kubectl: Kubectl, addresses: Mapping[str, str], stop: threading.Event) -> threading.Thread:
    """Node objects for `addresses` (name → InternalIP), Ready, their Leases renewed until `stop` by the
    thread returned (started)."""
    for name, address in addresses.items():
        apply(kubectl, node(name))
        node_status(kubectl, name, address)
    renewer = threading.Thread(target=renew_leases, args=(kubectl, list(addresses), stop), daemon=True)
    renewer.start()
    return renewer


def remove_nodes(
    kubectl: Kubectl, names: Iterable[str], stop: threading.Event, renewer: threading.Thread
) -> None:
    """Stops `ready_nodes`' renewer and deletes the Nodes `names` and their Leases."""
    stop.set()
    renewer.join(timeout=10)
    kubectl("delete", "node", *names, "--ignore-not-found")
    kubectl("delete", "lease", "-n", "kube-node-lease", *names, "--ignore-not-found")


def pool(name: str, namespace: str, addresses: list[str], **spec: Any) -> dict[str, Any]:
    """A VIPPool of `addresses` for `namespace` only, assigned on request only."""
    return {
        "apiVersion": "layerlb.dev/v1alpha1",
        "kind": "VIPPool",
        "metadata": {"name": name},
        "spec": {"addresses": addresses, "namespaces": [namespace], "autoAssign": False, **spec},
    }


def speaker_kubeconfig(
    k8s: Cluster, kubectl: Kubectl, folder: Path, namespace: str, bgp: bool = False
) -> Path:
    """A kubeconfig for a ServiceAccount `speaker` in `{namespace}-system` bound to exactly the chart's
    speaker ClusterRole (as `{namespace}-speaker`) and, with `bgp`, its BGP Role in that namespace."""
    from tests.test_chart import template

    flags = ["--set", "speaker.bgp.enabled=true"] if bgp else []
    rendered = [d for d in yaml.safe_load_all(template("--show-only", "templates/speaker.yaml", *flags)) if d]
    [cluster_role] = [d for d in rendered if d["kind"] == "ClusterRole"]
    system = f"{namespace}-system"
    account = {"kind": "ServiceAccount", "name": "speaker", "namespace": system}
    rbac = "rbac.authorization.k8s.io"
    documents: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": system}},
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "speaker", "namespace": system}},
        {
            "apiVersion": f"{rbac}/v1",
            "kind": "ClusterRole",
            "metadata": {"name": f"{namespace}-speaker"},
            "rules": cluster_role["rules"],
        },
        {
            "apiVersion": f"{rbac}/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": f"{namespace}-speaker"},
            "roleRef": {"apiGroup": rbac, "kind": "ClusterRole", "name": f"{namespace}-speaker"},
            "subjects": [account],
        },
    ]
    if bgp:
        [role] = [d for d in rendered if d["kind"] == "Role"]
        documents += [
            {
                "apiVersion": f"{rbac}/v1",
                "kind": "Role",
                "metadata": {"name": "speaker", "namespace": system},
                "rules": role["rules"],
            },
            {
                "apiVersion": f"{rbac}/v1",
                "kind": "RoleBinding",
                "metadata": {"name": "speaker", "namespace": system},
                "roleRef": {"apiGroup": rbac, "kind": "Role", "name": "speaker"},
                "subjects": [account],
            },
        ]
    apply(kubectl, *documents)
    token = kubectl.ok("create", "token", "speaker", "-n", system, "--duration=2h").strip()
    admin = yaml.safe_load(k8s.kubeconfig.read_text())
    return harness.token_kubeconfig(
        folder / "speaker.kubeconfig", admin["clusters"][0]["cluster"], "speaker", token
    )


def api_port(k8s: Cluster) -> int:
    server = yaml.safe_load(k8s.kubeconfig.read_text())["clusters"][0]["cluster"]["server"]
    return int(server.rsplit(":", 1)[1].strip("/"))


def api_relay(socket_path: Path, port: int) -> subprocess.Popen[bytes]:
    """The host's end of the relay: the API server's `port` on a Unix socket a namespace can reach."""
    return subprocess.Popen(
        ["socat", f"UNIX-LISTEN:{socket_path},fork,unlink-early", f"TCP:127.0.0.1:{port}"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


def start_speaker(
    space: Namespace, name: str, kubeconfig: Path, socket_path: Path, port: int, heartbeat: int, *flags: str
) -> Spawned:
    """`layerlb speaker` for node `name` in `space` (its interface eth0, heartbeats on `heartbeat`), the API
    server's `port` relayed to 127.0.0.1 there over `socket_path`; `flags` are the speaker's others."""
    space.popen(
        ["socat", f"TCP-LISTEN:{port},bind=127.0.0.1,fork,reuseaddr", f"UNIX-CONNECT:{socket_path}"],
        "api relay",
    )
    command = [
        "env", f"KUBECONFIG={kubeconfig}", f"PYTHONPATH={ROOT}", sys.executable, "-m",
        "layerlb.cli", "speaker", "--node", name, "--port", str(heartbeat), "--interface", "eth0", *flags,
    ]  # fmt: skip
    return space.popen(command, f"speaker {name}")


def condition(body: dict[str, Any], kind: str) -> dict[str, Any] | None:
    found = (body.get("status") or {}).get("conditions") or []
    return next((c for c in found if c.get("type") == kind), None)


def loadbalancer(namespace: str, name: str, pool: str) -> dict[str, Any]:
    """examples/l4-proxy-tcp.yaml's LoadBalancer as `name`, its VIP from `pool`."""
    document: dict[str, Any] = next(
        d
        for d in yaml.safe_load_all((ROOT / "examples" / "l4-proxy-tcp.yaml").read_text())
        if d["kind"] == "LoadBalancer"
    )
    document["metadata"] = {"name": name, "namespace": namespace}
    document["spec"].pop("vip", None)
    document["spec"]["vipPool"] = pool
    return document


def forwarding_pod(kubectl: Kubectl, namespace: str, loadbalancer: str, node: str) -> None:
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
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {
            "nodeName": node,
            "containers": [{"name": "dataplane", "image": "layerlb:e2e"}],
            "tolerations": [{"operator": "Exists"}],
        },
    }
    apply(kubectl, pod)
    ready = {"type": "Ready", "status": "True", "lastTransitionTime": now()}
    status = {"status": {"phase": "Running", "conditions": [ready]}}
    kubectl.ok(
        "patch", "pod", name, "-n", namespace, "--subresource=status", "--type=merge", "-p", json.dumps(status),
    )  # fmt: skip
