"""The local cluster's nodes are dual-stack, IPv4 first: what a dual-stack Service ("gets two
addresses, both answer") stands on.

A cluster of two real nodes for this module (the pause and backend images only): Node InternalIPs and pod
IPs of both families, IPv4 first; a Service that asks nothing stays IPv4 single-stack; a PreferDualStack
Service gets a cluster IP of each family and kube-proxy forwards both, from a pod on one node to a backend
on the other; pods reach each other across nodes over IPv6; the LAN client reaches the nodes over IPv6,
and a NodePort and a LoadBalancer's ingress addresses of both families through kube-proxy.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
from collections.abc import Iterator
from functools import partial
from typing import Any

import pytest

from e2e.cluster import cluster as local_cluster
from e2e.cluster import nodes as node_kit
from e2e.cluster.cluster import Cluster
from e2e.harness import wait_for
from e2e.images import build

NAMESPACE = "default"
BACKEND = "localhost/backend:dev"
# A LoadBalancer's ingress addresses for the test, outside every node, pod and Service range; no
# controller serves its class, the test writes its status as one would.
LB_CLASS = "e2e.layerlb.dev/none"
LB_IPS = ("198.18.20.1", "fd00:198:18::1")


@pytest.fixture(scope="module")
def k8s(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    local_cluster.remove_stale()
    local_cluster.ensure_binaries(with_nodes=True)  # first: the pause image compiles from its module
    images = build.build_all(only=["pause", "backend"])
    started = local_cluster.up(
        tmp_path_factory.mktemp("dual-stack") / "cluster",
        nodes=2,
        images=[image.path for image in images.values()],
        owner=os.getpid(),
    )
    try:
        yield started
    finally:
        local_cluster.down(started.state_dir)


def kubectl(k8s: Cluster, *args: str, stdin: str | None = None, check: bool = True) -> str:
    done = subprocess.run(
        ["kubectl", *args], input=stdin, env=k8s.env(), capture_output=True, text=True, timeout=120
    )
    if check and done.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def get(k8s: Cluster, kind: str, name: str) -> dict[str, Any]:
    found: dict[str, Any] = json.loads(kubectl(k8s, "get", kind, name, "-n", NAMESPACE, "-o", "json"))
    return found


def in_netns(netns: str, *argv: str) -> str | None:
    """stdout of ``argv`` run in ``netns``, None when it fails."""
    done = subprocess.run(
        ["nsenter", f"--net={node_kit.NETNS_DIR / netns}", *argv], capture_output=True, text=True, timeout=30
    )
    return done.stdout if done.returncode == 0 else None


def url(address: str, port: int) -> str:
    return f"http://[{address}]:{port}/" if ":" in address else f"http://{address}:{port}/"


@pytest.fixture(scope="module")
def lab(k8s: Cluster) -> Cluster:
    """A web backend on node2 answering its name, a client pod on node1, both Ready."""
    backend = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "web", "namespace": NAMESPACE, "labels": {"app": "web"}},
        "spec": {
            "nodeName": "node2",
            "containers": [
                {
                    "name": "web",
                    "image": BACKEND,
                    "imagePullPolicy": "Never",
                    # busybox httpd listens on [::], so on both families.
                    "command": [
                        "sh",
                        "-c",
                        "echo $HOSTNAME > /tmp/index.html && exec httpd -f -p 8080 -h /tmp",
                    ],
                    "readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1},
                }
            ],
        },
    }
    client = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "client", "namespace": NAMESPACE},
        "spec": {
            "nodeName": "node1",
            "terminationGracePeriodSeconds": 0,
            "containers": [
                {"name": "client", "image": BACKEND, "imagePullPolicy": "Never", "command": ["sleep", "3600"]}
            ],
        },
    }
    kubectl(
        k8s,
        "apply",
        "-f",
        "-",
        stdin=json.dumps({"apiVersion": "v1", "kind": "List", "items": [backend, client]}),
    )
    kubectl(k8s, "wait", "--for=condition=Ready", "--timeout=120s", "-n", NAMESPACE, "pod/web", "pod/client")
    return k8s


def from_client_pod(k8s: Cluster, address: str, port: int) -> str | None:
    """An HTTP GET from the client pod (node1), on a new connection; None when it fails."""
    done = subprocess.run(
        [
            "kubectl",
            "exec",
            "-n",
            NAMESPACE,
            "client",
            "--",
            "timeout",
            "5",
            "wget",
            "-qO-",
            url(address, port),
        ],
        env=k8s.env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    return done.stdout.strip() if done.returncode == 0 else None


def service(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}], **spec},
    }


def test_every_node_has_an_internal_ip_of_each_family_ipv4_first(k8s: Cluster) -> None:
    for node in k8s.node_list():
        addresses = get(k8s, "node", node.name)["status"]["addresses"]
        internal = [a["address"] for a in addresses if a["type"] == "InternalIP"]
        assert internal == [node.ip, node.ip6], addresses


def test_pods_get_an_address_of_each_family_ipv4_first(lab: Cluster) -> None:
    for name, node in (("web", "node2"), ("client", "node1")):
        [layout] = [n for n in lab.node_list() if n.name == node]
        pod = get(lab, "pod", name)
        ips = [entry["ip"] for entry in pod["status"]["podIPs"]]
        assert len(ips) == 2 and pod["status"]["podIP"] == ips[0], pod["status"]
        assert ipaddress.ip_address(ips[0]) in ipaddress.ip_network(layout.pod_cidr), ips
        assert ipaddress.ip_address(ips[1]) in ipaddress.ip_network(layout.pod_cidr6), ips


def test_a_service_that_asks_nothing_stays_ipv4_single_stack(lab: Cluster) -> None:
    kubectl(lab, "apply", "-f", "-", stdin=json.dumps(service("plain", {})))
    spec = get(lab, "service", "plain")["spec"]
    assert spec["ipFamilies"] == ["IPv4"] and spec["ipFamilyPolicy"] == "SingleStack", spec
    assert len(spec["clusterIPs"]) == 1


def test_a_dual_stack_service_answers_on_both_cluster_ips_from_a_pod_on_another_node(lab: Cluster) -> None:
    kubectl(lab, "apply", "-f", "-", stdin=json.dumps(service("dual", {"ipFamilyPolicy": "PreferDualStack"})))
    spec = get(lab, "service", "dual")["spec"]
    assert spec["ipFamilies"] == ["IPv4", "IPv6"], spec
    v4, v6 = spec["clusterIPs"]
    assert ipaddress.ip_address(v4).version == 4 and ipaddress.ip_address(v6).version == 6, spec
    assert ipaddress.ip_address(v6) in ipaddress.ip_network(local_cluster.SERVICE_CIDR_V6)
    for address in (v4, v6):  # kube-proxy of each family on node1, the backend on node2
        assert wait_for(f"{address} to answer", partial(from_client_pod, lab, address, 80)) == "web"


def test_a_pod_reaches_another_nodes_pod_over_ipv6(lab: Cluster) -> None:
    web_v6 = get(lab, "pod", "web")["status"]["podIPs"][1]["ip"]
    assert from_client_pod(lab, web_v6, 8080) == "web"
    ping = kubectl(lab, "exec", "-n", NAMESPACE, "client", "--", "ping", "-6", "-c", "1", "-W", "5", web_v6)
    assert "1 packets received" in ping, ping


def test_the_lan_client_reaches_the_nodes_over_ipv6(k8s: Cluster) -> None:
    client = node_kit.client_netns(k8s.tag)
    for node in k8s.node_list():
        ping = in_netns(client, "ping", "-6", "-c", "1", "-W", "5", node.ip6)
        assert ping is not None and " 0% packet loss" in ping, ping


def test_the_lan_client_reaches_a_dual_stack_node_port_on_each_nodes_addresses(lab: Cluster) -> None:
    kubectl(
        lab,
        "apply",
        "-f",
        "-",
        stdin=json.dumps(service("nodeport", {"type": "NodePort", "ipFamilyPolicy": "PreferDualStack"})),
    )
    port = int(get(lab, "service", "nodeport")["spec"]["ports"][0]["nodePort"])
    client = node_kit.client_netns(lab.tag)
    for node in lab.node_list():
        for address in (node.ip, node.ip6):
            answer = wait_for(
                f"node port {port} on {address} from the LAN",
                partial(in_netns, client, "curl", "-s", "--max-time", "5", url(address, port)),
            )
            assert answer.strip() == "web"


def test_a_dual_stack_load_balancers_ingress_addresses_both_answer_the_lan(lab: Cluster) -> None:
    """The LoadBalancer's two ingress addresses (ipMode VIP, written as a controller would) reach the backend
    through node1's kube-proxy, each family; the LAN client routes them to node1 (an L2 speaker's job)."""
    spec = {
        "type": "LoadBalancer",
        "ipFamilyPolicy": "PreferDualStack",
        "loadBalancerClass": LB_CLASS,
        "allocateLoadBalancerNodePorts": False,
    }
    kubectl(lab, "apply", "-f", "-", stdin=json.dumps(service("lb", spec)))
    ingress = [{"ip": address, "ipMode": "VIP"} for address in LB_IPS]
    kubectl(
        lab,
        "patch",
        "service",
        "lb",
        "-n",
        NAMESPACE,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps({"status": {"loadBalancer": {"ingress": ingress}}}),
    )
    client = node_kit.client_netns(lab.tag)
    [node1] = [n for n in lab.node_list() if n.name == "node1"]
    for address in LB_IPS:
        family, gateway = ("-6", node1.ip6) if ":" in address else ("-4", node1.ip)
        node_kit.ip(family, "route", "replace", address, "via", gateway, netns=client)
    try:
        for address in LB_IPS:
            answer = wait_for(
                f"{address} from the LAN",
                partial(in_netns, client, "curl", "-s", "--max-time", "5", url(address, 80)),
            )
            assert answer.strip() == "web"
    finally:
        for address in LB_IPS:
            node_kit.ip("-6" if ":" in address else "-4", "route", "del", address, netns=client, check=False)
