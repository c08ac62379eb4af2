"""The examples on a kind cluster: the operator from the Helm chart, the forwarding pods run by a real kubelet.

Collected only in kind mode (see conftest.py): `e2e/kind/run.sh` builds the image, creates the cluster,
installs the chart (image overridden, watching NAMESPACE) and runs this module. UNVERIFIED on the
machines layerlb is developed on (no Docker engine there); written for a laptop or GitHub Actions.

Every example is applied with `kubectl`, moved onto in-cluster backends (`e2e/runner/lab.adapt`: the VIP
from the suite's VIPPool, the endpoints on three backend pods) and must become Ready (`kubectl wait`).
The proxy examples then carry real traffic from a client pod through their VIPs, which `network.Plumber`
routes (see its docstring). The host-network examples (kernel architectures, transparent proxying) are
applied one at a time (their host ports allow one per node) and checked for Ready only.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from e2e.kind.network import Plumber
from e2e.runner import lab

ROOT = Path(__file__).resolve().parents[2]
NAMESPACE = os.environ.get("LAYERLB_KIND_NAMESPACE", "llb-kind")
IMAGE = os.environ.get("LAYERLB_KIND_IMAGE", "layerlb:kind-e2e")
POOL = "llb-kind-pool"
VIPS = "198.18.10.10-198.18.10.250"
READY = "300s"
HOST_NETWORK_EXAMPLES = [
    "l7-transparent.yaml", "l4-nat-nftables.yaml", "l4-nat-ipvs.yaml", "l4-dsr.yaml", "l4-tunnel.yaml",
]  # fmt: skip


def kubectl(*args: str, stdin: str | None = None, timeout: float = 400) -> str:
    done = subprocess.run(["kubectl", *args], input=stdin, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"kubectl {' '.join(args)}: {done.stderr}"
    return done.stdout


def pod(
    name: str, command: list[str], labels: dict[str, str], ready_port: int | None = None
) -> dict[str, Any]:
    """A pod of the layerlb image running `command`, with the suite's scripts under /scripts."""
    container: dict[str, Any] = {
        "name": name,
        "image": IMAGE,
        "imagePullPolicy": "Never",
        "command": command,
        "stdin": True,  # examples/backends.py serves until its stdin closes
        "volumeMounts": [{"name": "scripts", "mountPath": "/scripts"}],
    }
    if ready_port is not None:
        container["readinessProbe"] = {"tcpSocket": {"port": ready_port}, "periodSeconds": 1}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": NAMESPACE, "labels": labels},
        "spec": {
            "securityContext": {
                "runAsNonRoot": True,
                "sysctls": [{"name": "net.ipv4.ip_unprivileged_port_start", "value": "0"}],
            },
            "containers": [container],
            "volumes": [{"name": "scripts", "configMap": {"name": "kind-scripts"}}],
        },
    }


@pytest.fixture(scope="module")
def backends() -> Iterator[list[str]]:
    """Three backend pods b1-b3 (every port the examples use), a client pod, the VIPPool, the plumbing."""
    scripts = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "kind-scripts", "namespace": NAMESPACE},
        "data": {
            "backends.py": (ROOT / "examples" / "backends.py").read_text(),
            "client.py": (ROOT / "e2e" / "runner" / "client.py").read_text(),
        },
    }
    pods = [scripts]
    for index in (1, 2, 3):
        command = ["python", "/scripts/backends.py", "--name", f"b{index}", "--host", "0.0.0.0"]
        command += [f"--http={port}" for port in lab.HTTP_PORTS] + [f"--udp={port}" for port in lab.UDP_PORTS]
        pods.append(pod(f"b{index}", command, {"app": "kind-backend"}, ready_port=9001))
    pods.append(pod("client", ["python", "-c", "import time; time.sleep(86400)"], {"app": "kind-client"}))
    pool = lab.vip_pool(POOL, [NAMESPACE])
    pool["spec"]["addresses"] = [VIPS]  # the lab's range is the pod runner's; kind's network needs its own
    kubectl("apply", "-f", "-", stdin=yaml.safe_dump_all([*pods, pool]))
    kubectl(
        "wait",
        "--for=condition=Ready",
        "--timeout=180s",
        "-n",
        NAMESPACE,
        "pod/b1",
        "pod/b2",
        "pod/b3",
        "pod/client",
    )
    addresses = [
        json.loads(kubectl("get", "pod", f"b{i}", "-n", NAMESPACE, "-o", "json"))["status"]["podIP"]
        for i in (1, 2, 3)
    ]
    plumber = Plumber(NAMESPACE)
    try:
        yield addresses
    finally:
        plumber.close()
        subprocess.run(
            ["kubectl", "delete", "llb", "--all", "-n", NAMESPACE, "--wait=true", "--timeout=120s"],
            check=False,
        )
        subprocess.run(["kubectl", "delete", "vippool", POOL, "--ignore-not-found"], check=False)
        if plumber.errors:
            print("plumbing errors (last 10):", *plumber.errors, sep="\n  ")


def deploy(file: str, addresses: list[str]) -> dict[str, Any]:
    """The example moved onto the backends, applied, Ready (`kubectl wait`); returns the LoadBalancer."""
    documents = lab.adapt(file, NAMESPACE, addresses)
    name = next(d for d in documents if d["kind"] == "LoadBalancer")["metadata"]["name"]
    kubectl("apply", "-f", "-", stdin=yaml.safe_dump_all(documents))
    kubectl("wait", "--for=condition=Ready", f"--timeout={READY}", "-n", NAMESPACE, f"llb/{name}")
    found: dict[str, Any] = json.loads(kubectl("get", "llb", name, "-n", NAMESPACE, "-o", "json"))
    return found


def ask(function: str, *args: Any, **kwargs: Any) -> Counter[str]:
    """`e2e/runner/client.FUNCTION(*args)` run in the client pod; the answering backends, counted."""
    code = (
        "import json, sys; sys.path.insert(0, '/scripts'); import client; "
        f"print(json.dumps(client.{function}(*json.loads(sys.argv[1]), **json.loads(sys.argv[2]))))"
    )
    out = kubectl(
        "exec", "-n", NAMESPACE, "client", "--", "python", "-c", code, json.dumps(args), json.dumps(kwargs)
    )
    lines: list[str] = json.loads(out)
    return Counter("ERROR" if line.startswith("ERROR") else line.split()[0] for line in lines)


def test_l7_proxy_routes_by_host_and_header(backends: list[str]) -> None:
    vip = deploy("l7-proxy-routes.yaml", backends)["status"]["vip"]
    assert ask("http_get", vip, 8080, 3, "/v1/items", {"Host": "api.example.com"}) == Counter({"b2:9002": 3})
    canary = {"Host": "api.example.com", "X-Canary": "true"}
    assert ask("http_get", vip, 8080, 3, "/v1/items", canary) == Counter({"b3:9003": 3})


def test_l7_https_terminates_tls_and_balances(backends: list[str]) -> None:
    vip = deploy("l7-https.yaml", backends)["status"]["vip"]
    answers = ask("http_get", vip, 8443, 9, tls_name="shop.example.com")
    assert set(answers) == {"b1:9001", "b2:9002", "b3:9003"}, answers


def test_l4_proxy_tcp_spreads_open_connections(backends: list[str]) -> None:
    vip = deploy("l4-proxy-tcp.yaml", backends)["status"]["vip"]
    assert sorted(ask("http_held", vip, 8080, 3).elements()) == ["b1:9001", "b2:9002", "b3:9003"]


def test_l4_proxy_udp_keeps_a_client_on_one_backend(backends: list[str]) -> None:
    vip = deploy("l4-proxy-udp.yaml", backends)["status"]["vip"]
    answers = ask("udp_ask", vip, 5353, 6)
    assert "ERROR" not in answers and len(answers) == 1, answers


@pytest.mark.parametrize("file", HOST_NETWORK_EXAMPLES)
def test_host_network_example_becomes_ready(file: str, backends: list[str]) -> None:
    lb = deploy(file, backends)
    name = lb["metadata"]["name"]
    kubectl("delete", "llb", name, "-n", NAMESPACE, "--wait=true", "--timeout=180s")
