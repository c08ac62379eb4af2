"""The host-network examples that keep the client's address carry traffic on real nodes, from a client on
the nodes' LAN outside the cluster: L4 nat on nftables and L7 transparent to backend pods on both nodes,
L4 dsr on nftables to a backend on another node's own network, answering the client directly.

Each VIP reaches its node from the LAN client the way it would on bare metal: the client's kernel asks by ARP,
and the speaker on the node holding the ready forwarding pod answers (nothing in the suite routes a VIP).
nat and the transparent proxy forward with the client's own address as the source, so the backends'
replies must pass the forwarding node again (for nat to undo the translation, for the transparent proxy
to reach its socket): a network running them routes the clients through the load balancer. Here each
node that does not hold the forwarding pod routes the client's address through the node that does, as
such a network would; the node holding it needs nothing. A DSR backend owns the VIP on its loopback and
never answers ARP for it, as its administrator would set it up. Kernel LoadBalancers also share a node
under the real scheduler. Local platform only: the client namespace is the local cluster's
(`nodes.CLIENT_IP`); on kind these examples are checked for Ready (test_examples.py).
"""

from __future__ import annotations

import contextlib
import json
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from e2e import examples, harness
from e2e.cluster.nodes import CLIENT_IP
from e2e.nodes import pods
from e2e.nodes.platform import LocalNodes, Platform, PlatformError
from e2e.nodes.suite import POOL, deploy, kubectl, start_backends

UDP_ASK = (
    "import socket, sys; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(3); "
    "s.sendto(b'ping', (sys.argv[1], int(sys.argv[2]))); print(s.recv(200).decode())"
)


@dataclass
class Lab:
    local: LocalNodes
    addresses: list[str]


@pytest.fixture(scope="module")
def lab(platform: Platform) -> Iterator[Lab]:
    """The backend pods; each VIP reaches its node from the LAN client by the speaker's ARP answers."""
    assert isinstance(platform, LocalNodes)
    local = platform
    addresses = start_backends(local)
    try:
        yield Lab(local, addresses)
    finally:
        kubectl(local, "delete", "llb", "--all", "-n", local.namespace, "--wait=true", "--timeout=120s")
        kubectl(local, "delete", "vippool", POOL, "--ignore-not-found")


def replies_through(lab: Lab, name: str) -> list[str]:
    """Route the client's replies through the node of LoadBalancer `name`'s (one) forwarding pod; returns
    the nodes given a route."""
    [pod] = pods.wait_ready(lab.local.env, lab.local.namespace, f"layerlb.dev/loadbalancer={name}")
    holder, address = pod["spec"]["nodeName"], pod["status"]["hostIP"]
    others = [n.name for n in lab.local.cluster.node_list() if n.name != holder]
    for node in others:
        lab.local.node_exec(node, "ip", "route", "replace", f"{CLIENT_IP}/32", "via", address)
    return others


def forget_replies(lab: Lab, nodes: list[str]) -> None:
    for node in nodes:
        lab.local.node_exec(node, "ip", "route", "del", f"{CLIENT_IP}/32")


def http(lab: Lab, vip: str, port: int, seconds: float = 5) -> str:
    try:
        return lab.local.client_exec(
            "curl", "-s", "--max-time", str(seconds), f"http://{vip}:{port}/"
        ).strip()
    except PlatformError as error:
        return f"ERROR {error}"


def answering(lab: Lab, vip: str, port: int) -> str:
    """The first answer from the VIP to the LAN client: a LoadBalancer is Ready before the speaker's
    announcement reaches the client (and before its replies are routed), so this waits for it."""
    return harness.wait_for(
        f"{vip}:{port} to answer the LAN client",
        lambda: None if (answer := http(lab, vip, port, 2)).startswith("ERROR") or not answer else answer,
        timeout=120,
    )


@contextlib.contextmanager
def routed_replies(lab: Lab, name: str) -> Iterator[None]:
    routed = replies_through(lab, name)
    try:
        yield
    finally:
        forget_replies(lab, routed)


@contextlib.contextmanager
def serving(
    lab: Lab, file: str, port: int, edit: Callable[[dict[str, Any]], None] | None = None
) -> Iterator[str]:
    """The example deployed (changed by `edit`), Ready, its client's replies routed through its node, its
    VIP answering the LAN client on `port`; yields the VIP; removed after."""
    lb = deploy(lab.local, file, lab.addresses, edit=edit)
    vip, name = lb["status"]["vip"], lb["metadata"]["name"]
    try:
        with routed_replies(lab, name):
            answering(lab, vip, port)
            yield vip
    finally:
        kubectl(lab.local, "delete", "llb", name, "-n", lab.local.namespace, "--wait=true", "--timeout=120s")


def admin_of(lab: Lab, vip: str) -> tuple[str, int]:
    """The node address and admin port of the (one) forwarding pod serving `vip`: with the node's network,
    its admin server listens on the node's wildcard address (`0.0.0.0:<port>`)."""
    lbs = json.loads(kubectl(lab.local, "get", "llb", "-n", lab.local.namespace, "-o", "json"))["items"]
    [name] = [lb["metadata"]["name"] for lb in lbs if lb.get("status", {}).get("vip") == vip]
    [pod] = pods.wait_ready(lab.local.env, lab.local.namespace, f"layerlb.dev/loadbalancer={name}")
    [port] = [p["containerPort"] for p in pod["spec"]["containers"][0]["ports"] if p.get("name") == "admin"]
    return pod["status"]["hostIP"], int(port)


def admin_answer(lab: Lab, address: str, port: int) -> str:
    """What the LAN client gets from `/healthz` there: `<HTTP status> exit=<curl's exit code>` (7: refused)."""
    url = f"http://{address}:{port}/healthz"
    command = f'curl -s -o /dev/null -w "%{{http_code}}" --max-time 10 {url}; echo " exit=$?"'
    return lab.local.client_exec("sh", "-c", command).strip()


def test_l7_transparent_reaches_every_backend_with_the_clients_address(lab: Lab) -> None:
    with serving(lab, "l7-transparent.yaml", 8080) as vip:
        answers = [http(lab, vip, 8080) for _ in range(30)]
    assert all(a.endswith(f"from={CLIENT_IP}") for a in answers), answers  # the backend saw the client
    assert set(Counter(a.split()[0] for a in answers)) == {"b1:9001", "b2:9002", "b3:9003"}, answers


def test_l4_nat_keeps_a_client_on_one_backend_over_tcp_and_udp_with_its_address(lab: Lab) -> None:
    with serving(lab, "l4-nat-nftables.yaml", 53) as vip:
        over_tcp = [http(lab, vip, 53) for _ in range(6)]
        over_udp = [lab.local.client_exec("python3", "-c", UDP_ASK, vip, "53").strip() for _ in range(6)]
        # The VIP guard (issue #18): the forwarding pod's admin port is on the node's address, not the VIP's.
        node, admin = admin_of(lab, vip)
        on_node, on_vip = admin_answer(lab, node, admin), admin_answer(lab, vip, admin)
    assert on_node == "200 exit=0", on_node
    assert on_vip == "000 exit=7", on_vip  # refused (a TCP reset), not a timeout
    assert all(a.endswith(f"from={CLIENT_IP}") for a in over_tcp), over_tcp
    assert len({a.split()[0] for a in over_tcp}) == 1, over_tcp  # source-hash: one client, one backend
    assert len({a.split()[0] for a in over_udp}) == 1 and "ping" in over_udp[0], over_udp
    print(json.dumps({"tcp": over_tcp[0], "udp": over_udp[0]}))


def test_l4_nat_ipvs_example_on_nftables_balances_by_weight(lab: Lab) -> None:
    """The IPVS example, moved onto the nftables engine (this kernel has no IPVS; the guest runs it as
    is): its weights 1, 1, 2 show in how the client's connections spread."""

    def on_nftables(document: dict[str, Any]) -> None:
        # nftables does round-robin or source-hash only, and no ClientIP affinity; one replica, because
        # without masquerade the backends' single return route must lead to the LB that translated.
        spec = document["spec"]
        spec.update(engine="nftables", replicas=1)
        spec.pop("sessionAffinity")
        for backend in spec["backends"]:
            backend["algorithm"] = "round-robin"

    with serving(lab, "l4-nat-ipvs.yaml", 5432, edit=on_nftables) as vip:
        answers = [http(lab, vip, 5432) for _ in range(40)]
    assert all(a.endswith(f"from={CLIENT_IP}") for a in answers), answers
    counted = Counter(a.split()[0] for a in answers)
    # weights 1, 1, 2: the third endpoint of the example is b3
    assert counted["b3:5432"] >= 1.5 * max(counted["b1:5432"], counted["b2:5432"]) > 0, counted


def test_deleting_a_load_balancer_removes_its_pod_kernel_state_and_vip(lab: Lab) -> None:
    """Deleting a kernel LoadBalancer takes its forwarding pod, its nftables table and its VIP off the node
    (the node's other tables stay), and frees the VIP for another LoadBalancer to ask for."""
    local, namespace = lab.local, lab.local.namespace
    lb = deploy(local, "l4-nat-nftables.yaml", lab.addresses, name="gone")
    vip = lb["status"]["vip"]
    [pod] = pods.wait_ready(local.env, namespace, "layerlb.dev/loadbalancer=gone")
    node = pod["spec"]["nodeName"]
    table = f"layerlb_{namespace}_gone".replace("-", "_")
    assert table in local.node_exec(node, "nft", "list", "tables").replace("-", "_")
    assert vip in local.node_exec(node, "ip", "-br", "addr", "show", "dev", "lo")

    kubectl(local, "delete", "llb", "gone", "-n", namespace, "--wait=true", "--timeout=120s")
    pods.wait_gone(local.env, namespace, "layerlb.dev/loadbalancer=gone", timeout=120)
    assert table not in local.node_exec(node, "nft", "list", "tables").replace("-", "_")
    assert vip not in local.node_exec(node, "ip", "-br", "addr", "show", "dev", "lo")
    again = deploy(local, "l4-proxy-tcp.yaml", lab.addresses, name="again", vip=vip)
    assert again["status"]["vip"] == vip
    kubectl(local, "delete", "llb", "again", "-n", namespace, "--wait=true", "--timeout=120s")


def test_kernel_load_balancers_share_a_node_each_on_its_own_admin_port(lab: Lab) -> None:
    """Host-network forwarding pods take a node port for their admin server. Three kernel LoadBalancers on
    two nodes: two share one, which the real scheduler allows only because their ports differ (with one
    fixed port the third pod stays Pending). Each serves; deleting one leaves its neighbour's pod alone."""
    names = [f"shared-{index}" for index in range(3)]
    vips = {}
    for name in names:
        vips[name] = deploy(lab.local, "l4-nat-nftables.yaml", lab.addresses, name)["status"]["vip"]
    placed = {
        name: pods.wait_ready(lab.local.env, lab.local.namespace, f"layerlb.dev/loadbalancer={name}")[0]
        for name in names
    }
    by_node: dict[str, list[str]] = {}
    for name, pod in placed.items():
        by_node.setdefault(pod["spec"]["nodeName"], []).append(name)
    [sharing] = [together for together in by_node.values() if len(together) >= 2][:1]
    ports = {name: _admin_port(placed[name]) for name in sharing}
    assert len(set(ports.values())) == len(sharing), ports
    for name in names:
        with routed_replies(lab, name):
            answer = answering(lab, vips[name], 53)
        assert answer.endswith(f"from={CLIENT_IP}"), (name, answer)
    gone, kept = sharing[0], sharing[1]
    before = placed[kept]
    kubectl(lab.local, "delete", "llb", gone, "-n", lab.local.namespace, "--wait=true", "--timeout=120s")
    [after] = pods.wait_ready(lab.local.env, lab.local.namespace, f"layerlb.dev/loadbalancer={kept}")
    assert after["metadata"]["uid"] == before["metadata"]["uid"]
    assert after["status"]["containerStatuses"][0]["restartCount"] == 0
    with routed_replies(lab, kept):
        assert answering(lab, vips[kept], 53).endswith(f"from={CLIENT_IP}")
    for name in names:
        kubectl(
            lab.local, "delete", "llb", name, "-n", lab.local.namespace, "--ignore-not-found", "--wait=true"
        )


def _admin_port(pod: dict[str, Any]) -> int:
    [port] = [p["containerPort"] for p in pod["spec"]["containers"][0]["ports"] if p.get("name") == "admin"]
    return int(port)


def host_network_backend(node: str, image: str, namespace: str) -> dict[str, Any]:
    """A backend on `node`'s own network (as a DSR backend must be: on the load balancer's L2 segment),
    answering as `hb-NODE` on the DSR example's ports and its health port."""
    command = ["python3", "/scripts/backends.py", "--name", f"hb-{node}", "--host", "0.0.0.0"]
    command += ["--http=80", "--http=443", "--http=8081"]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": f"hb-{node}", "namespace": namespace, "labels": {"app": "dsr-backend"}},
        "spec": {
            "nodeName": node,
            "hostNetwork": True,
            "containers": [
                {
                    "name": "backend",
                    "image": image,
                    "imagePullPolicy": "Never",
                    "command": command,
                    "stdin": True,  # backends.py serves until its stdin closes
                    # Root for ports 80/443 on the node's network (no per-pod sysctl on the host network).
                    "securityContext": {"runAsUser": 0, "allowPrivilegeEscalation": False},
                    "readinessProbe": {"tcpSocket": {"port": 8081}, "periodSeconds": 1},
                    "volumeMounts": [{"name": "scripts", "mountPath": "/scripts"}],
                }
            ],
            "volumes": [{"name": "scripts", "configMap": {"name": "suite-scripts"}}],
        },
    }


@contextlib.contextmanager
def vip_on_loopback(lab: Lab, node: str, vip: str) -> Iterator[None]:
    """What a DSR backend's administrator does: the VIP on lo, and never answering ARP for it."""
    knobs = ("net.ipv4.conf.all.arp_ignore", "net.ipv4.conf.all.arp_announce")
    saved = {k: lab.local.node_exec(node, "sysctl", "-n", k).strip() for k in knobs}
    lab.local.node_exec(node, "sysctl", "-qw", f"{knobs[0]}=1", f"{knobs[1]}=2")
    lab.local.node_exec(node, "ip", "addr", "add", f"{vip}/32", "dev", "lo")
    try:
        yield
    finally:
        lab.local.node_exec(node, "ip", "addr", "del", f"{vip}/32", "dev", "lo")
        lab.local.node_exec(node, "sysctl", "-qw", *(f"{k}={v}" for k, v in saved.items()))


def test_l4_dsr_on_nftables_a_backend_on_the_lan_answers_the_client_directly(lab: Lab) -> None:
    local, namespace = lab.local, lab.local.namespace
    node_ips = {n.name: n.ip for n in local.cluster.node_list()}
    kubectl(local, "apply", "-f", "-", stdin=json.dumps(
        {"apiVersion": "v1", "kind": "List", "items": [host_network_backend(n, local.image, namespace) for n in node_ips]}
    ))  # fmt: skip
    pods.wait_ready(local.env, namespace, "app=dsr-backend", count=len(node_ips))
    [document] = [
        d
        for d in examples.adapt("l4-dsr.yaml", namespace, list(node_ips.values()))
        if d["kind"] == "LoadBalancer"
    ]
    # The forwarding node cannot also be a backend (the engine refuses: a frame rewritten to its own MAC
    # would go nowhere), so the backend's node is cordoned while the forwarding pod is placed.
    forwarder, backend_node = sorted(node_ips)[:2]
    spec = document["spec"]
    spec["engine"] = "nftables"
    [backend] = spec["backends"]
    backend["algorithm"] = "round-robin"  # dsr on nftables: a hash per flow (maglev is IPVS's)
    backend["endpoints"] = [{"address": node_ips[backend_node]}]
    name = document["metadata"]["name"]
    others = [backend_node]
    kubectl(local, "cordon", backend_node)
    try:
        kubectl(local, "apply", "-f", "-", stdin=json.dumps(document))
        [pod] = pods.wait_ready(local.env, namespace, f"layerlb.dev/loadbalancer={name}", timeout=120)
        kubectl(local, "uncordon", backend_node)
        holder = pod["spec"]["nodeName"]
        assert holder == forwarder, holder
        kubectl(local, "wait", "--for=condition=Ready", "--timeout=120s", "-n", namespace, f"llb/{name}")
        vip = json.loads(kubectl(local, "get", "llb", name, "-n", namespace, "-o", "json"))["status"]["vip"]
        with contextlib.ExitStack() as stack:
            for node in others:
                stack.enter_context(vip_on_loopback(lab, node, vip))
            answers = [answering(lab, vip, 80)] + [http(lab, vip, 80) for _ in range(5)]
        tables = local.node_exec(holder, "nft", "list", "tables")
    finally:
        kubectl(local, "uncordon", backend_node)
        kubectl(
            local,
            "delete",
            "llb",
            name,
            "-n",
            namespace,
            "--ignore-not-found",
            "--wait=true",
            "--timeout=120s",
        )
        kubectl(local, "delete", "pods", "-n", namespace, "-l", "app=dsr-backend", "--wait=false")
    assert all(a.endswith(f"from={CLIENT_IP}") for a in answers), answers  # the backend saw the client
    assert {a.split()[0] for a in answers} == {f"hb-{n}:80" for n in others}, answers
    assert "table netdev layerlb_" in tables, tables  # the MAC rewrite at the forwarding node's ingress
