"""Every VIP attracts its traffic on the nodes' LAN from layerlb alone: the speaker DaemonSet answers ARP.

On the local nodes: the chart installed as the README says, a client namespace on the nodes'
LAN outside the cluster, VIPs from the LAN's own range (`nodes.LAN_VIPS`). The client's kernel asks for
a VIP by ARP like any host on a bare-metal network; arping shows which node's MAC answers. Nothing in
the suite routes a VIP: a pod-network LoadBalancer's VIP reaches its pods through the cluster's own
kube-proxy (its VIP Service), a Service of type LoadBalancer through kube-proxy as for any Service.

- each proxy example answers the LAN client through its VIP, announced by exactly one node that runs
  one of its ready forwarding pods, with an `Announcing` Event naming that node;
- `kubectl expose deployment --type=LoadBalancer` (class-less Services served, as the README's "first
  ten minutes on bare metal" turns on) gets an EXTERNAL-IP that the LAN client reaches;
- the announcing node's speaker killed (SIGKILL), and separately its forwarding pod deleted: the other
  node answers for the VIP and the client's requests succeed again.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from e2e import examples, harness
from e2e.cluster.nodes import CLIENT_IP, LAN_VIPS, LAN_VIPS6, client_netns
from e2e.nodes import pods
from e2e.nodes.chart_operator import RELEASE, RELEASE_NS
from e2e.nodes.platform import LocalNodes, Platform, PlatformError
from e2e.nodes.suite import POOL, apply_example, deploy, kubectl, pod, start_backends

SPEAKERS = f"app.kubernetes.io/instance={RELEASE},app.kubernetes.io/component=speaker"
UDP_ASK = (
    "import socket, sys; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(2); "
    "s.sendto(b'ping', (sys.argv[1], int(sys.argv[2]))); print(s.recv(200).decode())"
)


@dataclass
class Lan:
    local: LocalNodes
    addresses: list[str]  # of the backend pods b1-b3
    macs: dict[str, str]  # node name → the MAC of its LAN interface

    @property
    def namespace(self) -> str:
        return self.local.namespace

    def answering(self, vip: str) -> set[str]:
        """The nodes whose MAC answered for `vip` from the LAN client: ARP (arping) for IPv4, a Neighbor
        Solicitation (ndisc6) for IPv6. Unknown MACs are kept as they are (a node must not share one)."""
        if ":" in vip:
            argv, pattern = (
                ["ndisc6", "-m", "-n", "-r", "2", "-w", "500", vip, "eth0"],
                r"link-layer address:\s*",
            )
        else:
            argv, pattern = ["arping", "-c", "2", "-w", "3", "-i", "eth0", vip], r"from "
        # The tools' exit status says little (arping: non-zero for an extra answer too): read their lines.
        netns = f"--net=/run/netns/{client_netns(self.local.cluster.tag)}"
        out = subprocess.run(
            ["nsenter", netns, *argv], capture_output=True, text=True, timeout=30, check=False
        )
        found = set(re.findall(pattern + r"([0-9a-f:]{17})", out.stdout.lower()))
        return {node for node, mac in self.macs.items() if mac in found} | (found - set(self.macs.values()))

    def announcer(self, vip: str, among: set[str] | None = None) -> str:
        """The one node answering for `vip` (waiting until exactly one does, and one of `among` if given)."""

        def one() -> str | None:
            nodes = self.answering(vip)
            if len(nodes) == 1 and (among is None or nodes <= among):
                return next(iter(nodes))
            return None

        return harness.wait_for(f"exactly one node of {among or 'the LAN'} to answer for {vip}", one, 120)

    def get(self, vip: str, port: int, seconds: float = 2) -> str:
        host = f"[{vip}]" if ":" in vip else vip
        try:
            return self.local.client_exec(
                "curl", "-s", "--max-time", str(seconds), f"http://{host}:{port}/"
            ).strip()
        except PlatformError as error:
            return f"ERROR {error}"

    def answer(self, vip: str, port: int) -> str:
        """The first answer from `vip:port` to the LAN client, waiting for one."""
        return harness.wait_for(
            f"{vip}:{port} to answer the LAN client",
            lambda: None if (a := self.get(vip, port)).startswith("ERROR") or not a else a,
            timeout=120,
        )

    def pod_nodes(self, name: str) -> set[str]:
        ready = pods.wait_ready(self.local.env, self.namespace, f"layerlb.dev/loadbalancer={name}")
        return {p["spec"]["nodeName"] for p in ready}

    def events(self, name: str, reason: str) -> list[str]:
        listed = kubectl(
            self.local,
            "get",
            "events",
            "-n",
            self.namespace,
            "-o",
            "json",
            "--field-selector",
            f"involvedObject.name={name},reason={reason}",
        )
        return [e["message"] for e in json.loads(listed)["items"]]


@pytest.fixture(scope="module")
def lan(platform: Platform) -> Iterator[Lan]:
    assert isinstance(platform, LocalNodes)
    local = platform
    addresses = start_backends(local)
    # From `ip`, not /sys/class/net: `nsenter --net` keeps the host's /sys, which shows the host's interfaces.
    macs = {
        n.name: json.loads(local.node_exec(n.name, "ip", "-j", "link", "show", "eth0"))[0]["address"].lower()
        for n in local.cluster.node_list()
    }
    pods.wait_ready(local.env, RELEASE_NS, SPEAKERS, count=len(macs))
    try:
        yield Lan(local, addresses, macs)
    finally:
        kubectl(local, "delete", "llb", "--all", "-n", local.namespace, "--wait=true", "--timeout=120s")
        kubectl(local, "delete", "vippool", POOL, "--ignore-not-found")


@pytest.mark.parametrize(
    ("file", "port", "transport"),
    [
        ("l7-proxy-routes.yaml", 8080, "TCP"),
        ("l4-proxy-tcp.yaml", 8080, "TCP"),
        ("l4-proxy-udp.yaml", 5353, "UDP"),
    ],
)
def test_a_proxy_example_answers_the_lan_through_a_vip_one_of_its_nodes_announces(
    lan: Lan, file: str, port: int, transport: str
) -> None:
    lb = deploy(lan.local, file, lan.addresses)
    name, vip = lb["metadata"]["name"], lb["status"]["vip"]
    holder = lan.announcer(vip, among=lan.pod_nodes(name))
    if transport == "UDP":
        answer = harness.wait_for(
            f"{vip}:{port}/udp to answer the LAN client",
            lambda: _udp(lan, vip, port),
            timeout=120,
        )
    else:
        answer = lan.answer(vip, port)
    assert re.match(r"b[123]:", answer), answer
    service = json.loads(
        kubectl(lan.local, "get", "service", f"{name}-dataplane", "-n", lan.namespace, "-o", "json")
    )
    assert service["status"]["loadBalancer"]["ingress"] == [{"ip": vip, "ipMode": "VIP"}]
    assert service["spec"]["externalTrafficPolicy"] == "Local"
    announced = harness.wait_for(f"an Announcing Event on {name}", lambda: lan.events(name, "Announcing"), 60)
    assert any(holder in message and vip in message for message in announced), announced
    kubectl(lan.local, "delete", "llb", name, "-n", lan.namespace, "--wait=true", "--timeout=120s")


def _udp(lan: Lan, vip: str, port: int) -> str | None:
    try:
        return lan.local.client_exec("python3", "-c", UDP_ASK, vip, str(port)).strip() or None
    except PlatformError:
        return None


def _http_backend(local: LocalNodes, name: str, host: str) -> dict[str, Any]:
    """A backend pod labelled app=NAME answering HTTP on :8080 (bound to `host`) with its name."""
    argv = ["python3", "/scripts/backends.py", "--name", name, "--host", host, "--http=8080"]
    return pod(local, name, argv, {"app": name}, ready_port=8080)


def test_kubectl_expose_type_load_balancer_gets_an_external_ip_the_lan_reaches(lan: Lan) -> None:
    """The first thing a platform engineer types. Class-less Services are served once the chart is told to
    (`services.serveClassless`, as the README's first ten minutes on bare metal do); the address comes
    from the VIPPool, kube-proxy forwards it, and the speaker announces it from a Ready node."""
    local, namespace = lan.local, lan.namespace
    # The README's own command (its first ten minutes on bare metal), then the operator rolled out.
    pods.helm(
        local.env, *harness.readme_command("upgrade", "serveClassless")[1:], "--wait", "--timeout", "180s"
    )
    template = _http_backend(local, "web", "0.0.0.0")
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web", "namespace": namespace},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {"metadata": {"labels": {"app": "web"}}, "spec": template["spec"]},
        },
    }
    try:
        kubectl(local, "apply", "-f", "-", stdin=json.dumps(deployment))
        pods.wait_ready(local.env, namespace, "app=web", count=2)
        kubectl(
            local,
            "expose",
            "deployment",
            "web",
            "--type=LoadBalancer",
            "--port=80",
            "--target-port=8080",
            "-n",
            namespace,
        )
        external = harness.wait_for(
            "EXTERNAL-IP of service/web",
            lambda: kubectl(
                local,
                "get",
                "service",
                "web",
                "-n",
                namespace,
                "-o",
                "jsonpath={.status.loadBalancer.ingress[0].ip}",
            ).strip(),
            timeout=60,
        )
        table = kubectl(local, "get", "service", "web", "-n", namespace)
        assert re.search(rf"web\s+LoadBalancer\s+\S+\s+{re.escape(external)}\s", table), table
        lan.announcer(external)
        assert lan.answer(external, 80).startswith("web:8080 GET /"), external
        described = kubectl(local, "describe", "service", "web", "-n", namespace)
        assert "AddressAssigned" in described, described
        harness.wait_for(
            "an Announcing Event in kubectl describe",
            lambda: "Announcing" in kubectl(local, "describe", "service", "web", "-n", namespace),
            60,
        )
    finally:
        kubectl(
            local, "delete", "service,deployment", "web", "-n", namespace, "--ignore-not-found", "--wait=true"
        )
        pods.helm(
            local.env,
            "upgrade",
            RELEASE,
            "charts/layerlb",
            "--namespace",
            RELEASE_NS,
            "--reuse-values",
            "--set",
            "services.serveClassless=false",
            "--wait",
            "--timeout",
            "180s",
        )


def test_a_dual_stack_service_gets_an_address_of_each_family_and_both_answer_the_lan(lan: Lan) -> None:
    """PreferDualStack on a dual-stack cluster: one address per family from a pool of both; the IPv4 one is
    found by ARP, the IPv6 one by NDP (each answered by exactly one node), and both serve the LAN client."""
    local, namespace = lan.local, lan.namespace
    pool = examples.vip_pool("llb-dual", [namespace], LAN_VIPS)
    pool["spec"]["addresses"].append(LAN_VIPS6)
    pool["spec"]["autoAssign"] = False  # only for Services that name it
    backend = _http_backend(local, "dual", "::")
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": "dual",
            "namespace": namespace,
            "annotations": {"layerlb.dev/vip-pool": "llb-dual"},
        },
        "spec": {
            "type": "LoadBalancer",
            "loadBalancerClass": "layerlb.dev/loadbalancer",
            "ipFamilyPolicy": "PreferDualStack",
            "selector": {"app": "dual"},
            "ports": [{"name": "http", "port": 80, "targetPort": 8080}],
        },
    }
    kubectl(
        local,
        "apply",
        "-f",
        "-",
        stdin=json.dumps({"apiVersion": "v1", "kind": "List", "items": [pool, backend, service]}),
    )
    try:
        pods.wait_ready(local.env, namespace, "app=dual")

        def both() -> list[str] | None:
            listed = kubectl(local, "get", "service", "dual", "-n", namespace, "-o", "json")
            found = [e["ip"] for e in json.loads(listed)["status"].get("loadBalancer", {}).get("ingress", [])]
            return found if len(found) == 2 else None

        four, six = harness.wait_for("an address of each family on service/dual", both, 60)
        assert ":" not in four and ":" in six, (four, six)
        lan.announcer(four)  # by ARP
        lan.announcer(six)  # by NDP
        assert lan.answer(four, 80).startswith("dual:8080 GET /")
        assert lan.answer(six, 80).startswith("dual:8080 GET /")
    finally:
        kubectl(local, "delete", "service,pod", "dual", "-n", namespace, "--ignore-not-found", "--wait=true")
        kubectl(local, "delete", "vippool", "llb-dual", "--ignore-not-found")


def _speaker_pid(local: LocalNodes, node: str) -> int:
    """The process of the speaker on `node`: a `layerlb speaker` in that node's network namespace."""
    netns = os.stat(f"/run/netns/{local.netns(node)}").st_ino
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            command = (proc / "cmdline").read_bytes().split(b"\0")
            inode = os.stat(proc / "ns" / "net").st_ino
        except OSError:
            continue
        if inode == netns and b"speaker" in command and any(part.endswith(b"layerlb") for part in command):
            return int(proc.name)
    raise AssertionError(f"no speaker process in {node}'s network namespace")


def _neighbour(lan: Lan, vip: str) -> str | None:
    """The LAN client kernel's neighbour-cache MAC for `vip` (any state with an address), or None."""
    entries = json.loads(lan.local.client_exec("ip", "-j", "neigh", "show", vip, "dev", "eth0") or "[]")
    return next((str(e["lladdr"]).lower() for e in entries if e.get("lladdr")), None)


def _moved(lan: Lan, vip: str, port: int, to: str, since: float) -> tuple[float, float]:
    """Seconds from `since` until the LAN client's own neighbour cache points `vip` at `to` (the new
    holder's gratuitous ARP, read every 20 ms), and until only `to` answers ARP and a request succeeds."""
    cached: float = harness.wait_for(
        f"the LAN client's neighbour cache to point {vip} at {to}",
        lambda: time.monotonic() - since if _neighbour(lan, vip) == lan.macs[to] else None,
        timeout=60,
        every=0.02,
    )
    lan.announcer(vip, among={to})
    answer = lan.answer(vip, port)
    took = time.monotonic() - since
    assert re.match(r"b[123]:", answer), answer
    return cached, took


@pytest.fixture
def two_node_lb(lan: Lan) -> Iterator[tuple[str, str]]:
    """An L4 proxy LoadBalancer with a forwarding pod on each node; yields its name and VIP."""
    lb = deploy(lan.local, "l4-proxy-tcp.yaml", lan.addresses, name="failover", replicas=2)
    name, vip = lb["metadata"]["name"], lb["status"]["vip"]
    harness.wait_for("a forwarding pod on each node", lambda: len(lan.pod_nodes(name)) == len(lan.macs), 120)
    try:
        yield name, vip
    finally:
        kubectl(lan.local, "delete", "llb", name, "-n", lan.namespace, "--wait=true", "--timeout=120s")


def test_killing_the_announcing_speaker_moves_the_vip_to_the_other_node(
    lan: Lan, two_node_lb: tuple[str, str]
) -> None:
    _, vip = two_node_lb
    holder = lan.announcer(vip)
    lan.answer(vip, 8080)
    [other] = set(lan.macs) - {holder}
    killed = time.monotonic()
    os.kill(_speaker_pid(lan.local, holder), signal.SIGKILL)
    cached, took = _moved(lan, vip, 8080, other, killed)
    print(
        f"\nspeaker on {holder} killed: the LAN client's cache moved to {other} after {cached:.2f} s; "
        f"{other} alone answers ARP and serves after {took:.2f} s"
    )
    assert cached < 5, f"the VIP moved only after {cached:.2f} s"
    # The kubelet restarts the killed speaker; the VIP is answered by exactly one node again.
    pods.wait_ready(lan.local.env, RELEASE_NS, SPEAKERS, count=len(lan.macs))
    lan.announcer(vip)
    assert not lan.get(vip, 8080).startswith("ERROR")


def test_deleting_the_announcing_nodes_forwarding_pod_moves_the_vip_to_the_other_node(
    lan: Lan, two_node_lb: tuple[str, str]
) -> None:
    name, vip = two_node_lb
    holder = lan.announcer(vip)
    [other] = set(lan.macs) - {holder}
    [doomed] = [
        p["metadata"]["name"]
        for p in pods.wait_ready(lan.local.env, lan.namespace, f"layerlb.dev/loadbalancer={name}")
        if p["spec"]["nodeName"] == holder
    ]
    kubectl(lan.local, "cordon", holder)  # the replacement pod goes to the other node
    try:
        deleted = time.monotonic()
        kubectl(lan.local, "delete", "pod", doomed, "-n", lan.namespace, "--wait=false")
        cached, took = _moved(lan, vip, 8080, other, deleted)
        print(
            f"\nforwarding pod on {holder} deleted: the LAN client's cache moved to {other} after "
            f"{cached:.2f} s; {other} alone answers ARP and serves after {took:.2f} s"
        )
    finally:
        kubectl(lan.local, "uncordon", holder)


def test_the_lan_client_resolves_each_vip_with_its_own_kernel(lan: Lan) -> None:
    """Not arping alone: the client's kernel ARP (its neighbour cache) holds the announcing node's MAC."""
    lb = deploy(lan.local, "l4-proxy-tcp.yaml", lan.addresses, name="neighbour")
    vip = lb["status"]["vip"]
    holder = lan.announcer(vip)
    lan.answer(vip, 8080)
    neighbours = lan.local.client_exec("ip", "neigh", "show", vip)
    assert lan.macs[holder] in neighbours.lower(), neighbours
    assert CLIENT_IP not in neighbours
    kubectl(lan.local, "delete", "llb", "neighbour", "-n", lan.namespace, "--wait=true", "--timeout=120s")


def _ready(lan: Lan, name: str) -> tuple[str, str, str] | None:
    found = json.loads(kubectl(lan.local, "get", "llb", name, "-n", lan.namespace, "-o", "json"))
    ready = next((c for c in found.get("status", {}).get("conditions", []) if c["type"] == "Ready"), None)
    return None if ready is None else (ready["status"], ready["reason"], ready["message"])


def _not_announced(lan: Lan, name: str) -> tuple[str, str, str] | None:
    state = _ready(lan, name)
    return state if state is not None and state[1] == "NotAnnounced" else None


def test_ready_waits_until_a_node_announces_the_vip(lan: Lan) -> None:
    """The chart's operator runs with the speakers, so Ready means reachable from the LAN: a LoadBalancer
    whose pool lets no node announce serves on its pods yet stays NotAnnounced until a node may."""
    label = "layerlb.dev/e2e-announce"
    pool = examples.vip_pool("quiet", [lan.namespace], "172.28.0.251-172.28.0.252")
    pool["spec"]["autoAssign"] = False
    pool["spec"]["announce"] = {"nodeSelector": {"matchLabels": {label: "yes"}}}
    kubectl(lan.local, "apply", "-f", "-", stdin=json.dumps(pool))
    name = "unannounced"
    try:
        apply_example(lan.local, "l4-proxy-tcp.yaml", lan.addresses, name=name, vipPool="quiet")
        [node] = lan.pod_nodes(name)  # its forwarding pod is Ready...
        state: tuple[str, str, str] = harness.wait_for(
            f"{name} serving but NotAnnounced", lambda: _not_announced(lan, name), 120
        )
        assert state[0] == "False" and "no node announces 172.28.0.25" in state[2], state
        quiet_vip = state[2].split("no node announces ")[1].split()[0]
        assert lan.answering(quiet_vip) == set()  # ...but no node answers ARP for its VIP
        kubectl(lan.local, "label", "node", node, f"{label}=yes")
        kubectl(
            lan.local, "wait", "--for=condition=Ready", "--timeout=120s", "-n", lan.namespace, f"llb/{name}"
        )
        found = json.loads(kubectl(lan.local, "get", "llb", name, "-n", lan.namespace, "-o", "json"))
        vip = found["status"]["vip"]
        assert found["status"]["announcement"]["node"] == node
        ready = next(c for c in found["status"]["conditions"] if c["type"] == "Ready")
        assert ready["message"].endswith(f"; {vip} announced"), ready
        assert lan.announcer(vip) == node
        assert re.match(r"b[123]:", lan.answer(vip, 8080))
    finally:
        kubectl(lan.local, "label", "node", "--all", f"{label}-")
        kubectl(
            lan.local,
            "delete",
            "llb",
            name,
            "-n",
            lan.namespace,
            "--ignore-not-found",
            "--wait=true",
            "--timeout=120s",
        )
        kubectl(lan.local, "delete", "vippool", "quiet", "--ignore-not-found")
