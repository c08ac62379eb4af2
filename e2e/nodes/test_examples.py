"""The examples on real nodes: the operator from the Helm chart, the forwarding pods run by a real kubelet.

Runs on the local cluster's nodes (`make test`) and, unchanged, on kind (`make kind-e2e`); see conftest.py.
Every example is applied with `kubectl`, moved onto in-cluster backends (`e2e/examples.adapt`: the VIP
from the suite's VIPPool, the endpoints on three backend pods) and must become Ready (`kubectl wait`).
The proxy examples then carry real traffic from a client pod through their VIPs, which reach the
forwarding pods the way a real cluster's do: the cluster's kube-proxy forwards each LoadBalancer's VIP
Service (nothing in the suite routes a VIP). The host-network examples (kernel architectures, transparent proxying) are
checked for Ready; on the local nodes only those this kernel can run (no IPVS, no IP-in-IP here).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from e2e.nodes.platform import KIND_ENV, Platform
from e2e.nodes.suite import POOL, ask, deploy, kubectl, start_backends

# Per platform: the kernels of kind's hosts have IPVS and IP-in-IP; this machine's has neither.
HOST_NETWORK_EXAMPLES = {
    "kind": [
        "l7-transparent.yaml",
        "l4-nat-nftables.yaml",
        "l4-nat-ipvs.yaml",
        "l4-dsr.yaml",
        "l4-tunnel.yaml",
    ],
    "local": ["l7-transparent.yaml", "l4-nat-nftables.yaml"],
}
HOST_NETWORK = HOST_NETWORK_EXAMPLES["kind" if os.environ.get(KIND_ENV) else "local"]


@dataclass
class Lab:
    addresses: list[str]  # of the backend pods b1-b3


@pytest.fixture(scope="module")
def backends(platform: Platform) -> Iterator[Lab]:
    """Three backend pods b1-b3, a client pod and the VIPPool."""
    addresses = start_backends(platform)
    try:
        yield Lab(addresses)
    finally:
        kubectl(platform, "delete", "llb", "--all", "-n", platform.namespace, "--wait=true", "--timeout=120s")
        kubectl(platform, "delete", "vippool", POOL, "--ignore-not-found")


def test_l7_proxy_routes_by_host_and_header(platform: Platform, backends: Lab) -> None:
    vip = deploy(platform, "l7-proxy-routes.yaml", backends.addresses)["status"]["vip"]
    assert ask(platform, "http_get", vip, 8080, 3, "/v1/items", {"Host": "api.example.com"}) == Counter(
        {"b2:9002": 3}
    )
    canary = {"Host": "api.example.com", "X-Canary": "true"}
    assert ask(platform, "http_get", vip, 8080, 3, "/v1/items", canary) == Counter({"b3:9003": 3})


def test_l7_https_terminates_tls_and_balances(platform: Platform, backends: Lab) -> None:
    vip = deploy(platform, "l7-https.yaml", backends.addresses)["status"]["vip"]
    answers = ask(platform, "http_get", vip, 8443, 9, tls_name="shop.example.com")
    assert set(answers) == {"b1:9001", "b2:9002", "b3:9003"}, answers


def test_l4_proxy_tcp_spreads_open_connections(platform: Platform, backends: Lab) -> None:
    vip = deploy(platform, "l4-proxy-tcp.yaml", backends.addresses)["status"]["vip"]
    assert sorted(ask(platform, "http_held", vip, 8080, 3).elements()) == ["b1:9001", "b2:9002", "b3:9003"]


def test_l4_proxy_udp_keeps_a_client_on_one_backend(platform: Platform, backends: Lab) -> None:
    vip = deploy(platform, "l4-proxy-udp.yaml", backends.addresses)["status"]["vip"]
    answers = ask(platform, "udp_ask", vip, 5353, 6)
    assert "ERROR" not in answers and len(answers) == 1, answers


@pytest.mark.parametrize("file", HOST_NETWORK)
def test_host_network_example_becomes_ready(platform: Platform, file: str, backends: Lab) -> None:
    lb = deploy(platform, file, backends.addresses)
    name = lb["metadata"]["name"]
    kubectl(platform, "delete", "llb", name, "-n", platform.namespace, "--wait=true", "--timeout=180s")
