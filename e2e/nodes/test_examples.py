"""The examples on real nodes: the operator from the Helm chart, the forwarding pods run by a real kubelet.

Runs on the local cluster's nodes (`make test`) and, unchanged, on kind (`make kind-e2e`); see conftest.py.
Every example is applied with `kubectl`, moved onto in-cluster backends (`e2e/runner/lab.adapt`: the VIP
from the suite's VIPPool, the endpoints on three backend pods) and must become Ready (`kubectl wait`).
The proxy examples then carry real traffic from a client pod through their VIPs, which `network.Plumber`
routes (see its docstring). The host-network examples (kernel architectures, transparent proxying) are
checked for Ready; on the local nodes only those this kernel can run (no IPVS, no IP-in-IP here).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from e2e.nodes import pods
from e2e.nodes.network import Plumber
from e2e.nodes.platform import KIND_ENV, Platform
from e2e.runner import lab

ROOT = Path(__file__).resolve().parents[2]
POOL = "llb-nodes-pool"
READY = "300s"
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


def kubectl(platform: Platform, *args: str, stdin: str | None = None) -> str:
    return pods.kubectl(platform.env, *args, stdin=stdin, timeout=400)


def pod(
    platform: Platform, name: str, command: list[str], labels: dict[str, str], ready_port: int | None = None
) -> dict[str, Any]:
    """A pod of the layerlb image running `command`, with the suite's scripts under /scripts."""
    container: dict[str, Any] = {
        "name": name,
        "image": platform.image,
        "imagePullPolicy": "Never",
        "command": command,
        "stdin": True,  # examples/backends.py serves until its stdin closes
        "volumeMounts": [{"name": "scripts", "mountPath": "/scripts"}],
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    if ready_port is not None:
        container["readinessProbe"] = {"tcpSocket": {"port": ready_port}, "periodSeconds": 1}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": platform.namespace, "labels": labels},
        "spec": {
            "securityContext": {
                "runAsNonRoot": True,
                "seccompProfile": {"type": "RuntimeDefault"},
                "sysctls": [{"name": "net.ipv4.ip_unprivileged_port_start", "value": "0"}],
            },
            "containers": [container],
            "volumes": [{"name": "scripts", "configMap": {"name": "suite-scripts"}}],
        },
    }


@pytest.fixture(scope="module")
def backends(platform: Platform) -> Iterator[list[str]]:
    """Three backend pods b1-b3 (every port the examples use), a client pod, the VIPPool, the plumbing."""
    scripts = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "suite-scripts", "namespace": platform.namespace},
        "data": {
            "backends.py": (ROOT / "examples" / "backends.py").read_text(),
            "client.py": (ROOT / "e2e" / "runner" / "client.py").read_text(),
        },
    }
    manifests = [scripts]
    for index in (1, 2, 3):
        command = ["python3", "/scripts/backends.py", "--name", f"b{index}", "--host", "0.0.0.0"]
        command += [f"--http={port}" for port in lab.HTTP_PORTS] + [f"--udp={port}" for port in lab.UDP_PORTS]
        manifests.append(pod(platform, f"b{index}", command, {"app": "suite-backend"}, ready_port=9001))
    client = pod(
        platform, "client", ["python3", "-c", "import time; time.sleep(86400)"], {"app": "suite-client"}
    )
    manifests.append(client)
    pool = lab.vip_pool(POOL, [platform.namespace])
    pool["spec"]["addresses"] = [platform.vips]  # the lab's range is the pod runner's
    kubectl(platform, "apply", "-f", "-", stdin=yaml.safe_dump_all([*manifests, pool]))
    found = pods.wait_ready(platform.env, platform.namespace, "app in (suite-backend, suite-client)", count=4)
    addresses = sorted(
        (p["metadata"]["name"], p["status"]["podIP"]) for p in found if p["metadata"]["name"] != "client"
    )
    plumber = Plumber(platform)
    try:
        yield [address for _, address in addresses]
    finally:
        plumber.close()
        kubectl(platform, "delete", "llb", "--all", "-n", platform.namespace, "--wait=true", "--timeout=120s")
        kubectl(platform, "delete", "vippool", POOL, "--ignore-not-found")
        if plumber.errors:
            print("plumbing errors (last 10):", *plumber.errors, sep="\n  ")


def deploy(platform: Platform, file: str, addresses: list[str]) -> dict[str, Any]:
    """The example moved onto the backends, applied, Ready (`kubectl wait`); returns the LoadBalancer.

    If it is not Ready in time, the failure carries its forwarding pods' events and logs."""
    documents = lab.adapt(file, platform.namespace, addresses)
    name = next(d for d in documents if d["kind"] == "LoadBalancer")["metadata"]["name"]
    kubectl(platform, "apply", "-f", "-", stdin=yaml.safe_dump_all(documents))
    selector = f"layerlb.dev/loadbalancer={name}"
    pods.wait_ready(platform.env, platform.namespace, selector, timeout=float(READY.rstrip("s")))
    kubectl(
        platform,
        "wait",
        "--for=condition=Ready",
        f"--timeout={READY}",
        "-n",
        platform.namespace,
        f"llb/{name}",
    )
    found: dict[str, Any] = json.loads(
        kubectl(platform, "get", "llb", name, "-n", platform.namespace, "-o", "json")
    )
    return found


def ask(platform: Platform, function: str, *args: Any, **kwargs: Any) -> Counter[str]:
    """`e2e/runner/client.FUNCTION(*args)` run in the client pod; the answering backends, counted."""
    code = (
        "import json, sys; sys.path.insert(0, '/scripts'); import client; "
        f"print(json.dumps(client.{function}(*json.loads(sys.argv[1]), **json.loads(sys.argv[2]))))"
    )
    out = kubectl(
        platform,
        "exec",
        "-n",
        platform.namespace,
        "client",
        "--",
        "python3",
        "-c",
        code,
        json.dumps(args),
        json.dumps(kwargs),
    )
    lines: list[str] = json.loads(out)
    return Counter("ERROR" if line.startswith("ERROR") else line.split()[0] for line in lines)


def test_l7_proxy_routes_by_host_and_header(platform: Platform, backends: list[str]) -> None:
    vip = deploy(platform, "l7-proxy-routes.yaml", backends)["status"]["vip"]
    assert ask(platform, "http_get", vip, 8080, 3, "/v1/items", {"Host": "api.example.com"}) == Counter(
        {"b2:9002": 3}
    )
    canary = {"Host": "api.example.com", "X-Canary": "true"}
    assert ask(platform, "http_get", vip, 8080, 3, "/v1/items", canary) == Counter({"b3:9003": 3})


def test_l7_https_terminates_tls_and_balances(platform: Platform, backends: list[str]) -> None:
    vip = deploy(platform, "l7-https.yaml", backends)["status"]["vip"]
    answers = ask(platform, "http_get", vip, 8443, 9, tls_name="shop.example.com")
    assert set(answers) == {"b1:9001", "b2:9002", "b3:9003"}, answers


def test_l4_proxy_tcp_spreads_open_connections(platform: Platform, backends: list[str]) -> None:
    vip = deploy(platform, "l4-proxy-tcp.yaml", backends)["status"]["vip"]
    assert sorted(ask(platform, "http_held", vip, 8080, 3).elements()) == ["b1:9001", "b2:9002", "b3:9003"]


def test_l4_proxy_udp_keeps_a_client_on_one_backend(platform: Platform, backends: list[str]) -> None:
    vip = deploy(platform, "l4-proxy-udp.yaml", backends)["status"]["vip"]
    answers = ask(platform, "udp_ask", vip, 5353, 6)
    assert "ERROR" not in answers and len(answers) == 1, answers


@pytest.mark.parametrize("file", HOST_NETWORK)
def test_host_network_example_becomes_ready(platform: Platform, file: str, backends: list[str]) -> None:
    lb = deploy(platform, file, backends)
    name = lb["metadata"]["name"]
    kubectl(platform, "delete", "llb", name, "-n", platform.namespace, "--wait=true", "--timeout=180s")
