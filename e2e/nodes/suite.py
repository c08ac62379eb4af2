"""The real-node suite's parts, shared by its tests and the demo: backend and client pods of the project's
image, the examples moved onto them, and calls made from the client pod."""

from __future__ import annotations

import contextlib
import json
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml

from e2e import examples
from e2e.nodes import pods
from e2e.nodes.platform import Platform

ROOT = Path(__file__).resolve().parents[2]
POOL = "llb-nodes-pool"
READY = "300s"
BACKENDS = "app in (suite-backend, suite-client)"


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
        "volumeMounts": [
            {"name": "scripts", "mountPath": "/scripts"},
            {"name": "tmp", "mountPath": "/tmp"},  # the read-only root's one writable place
        ],
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
            "volumes": [
                {"name": "scripts", "configMap": {"name": "suite-scripts"}},
                {"name": "tmp", "emptyDir": {}},
            ],
        },
    }


def start_backends(platform: Platform) -> list[str]:
    """Three backend pods b1-b3 (every port the examples use), a client pod and the VIPPool; returns the
    backends' addresses once all four pods are Ready."""
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
        command += [f"--http={port}" for port in examples.HTTP_PORTS] + [
            f"--udp={port}" for port in examples.UDP_PORTS
        ]
        manifests.append(pod(platform, f"b{index}", command, {"app": "suite-backend"}, ready_port=9001))
    client = pod(
        platform, "client", ["python3", "-c", "import time; time.sleep(86400)"], {"app": "suite-client"}
    )
    manifests.append(client)
    pool = examples.vip_pool(POOL, [platform.namespace], platform.vips)
    kubectl(platform, "apply", "-f", "-", stdin=yaml.safe_dump_all([*manifests, pool]))
    found = pods.wait_ready(platform.env, platform.namespace, BACKENDS, count=4)
    return [address for _, address in sorted(
        (p["metadata"]["name"], p["status"]["podIP"]) for p in found if p["metadata"]["name"] != "client"
    )]  # fmt: skip


def apply_example(
    platform: Platform,
    file: str,
    addresses: list[str],
    name: str | None = None,
    edit: Callable[[dict[str, Any]], None] | None = None,
    **spec: Any,
) -> str:
    """The example moved onto the backends (renamed `name`, its spec updated with `spec`, then changed
    by `edit(document)`, when given) and applied; returns the LoadBalancer's name."""
    documents = examples.adapt(file, platform.namespace, addresses, name, **spec)
    document = next(d for d in documents if d["kind"] == "LoadBalancer")
    if edit is not None:
        edit(document)
    kubectl(platform, "apply", "-f", "-", stdin=yaml.safe_dump_all(documents))
    applied: str = document["metadata"]["name"]
    return applied


def deploy(
    platform: Platform,
    file: str,
    addresses: list[str],
    name: str | None = None,
    edit: Callable[[dict[str, Any]], None] | None = None,
    **spec: Any,
) -> dict[str, Any]:
    """The example moved onto the backends (see `apply_example`), applied, Ready (`kubectl wait`); returns
    the LoadBalancer. A pod-network one is also reachable from the client pod by then: its VIP reaches
    the pods through the cluster's kube-proxy (the VIP Service), which Ready does not wait for.

    If it is not Ready in time, the failure carries its forwarding pods' events and logs."""
    name = apply_example(platform, file, addresses, name, edit, **spec)
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
    spec_found = found["spec"]
    if spec_found.get("architecture") == "proxy":
        listener = spec_found["listeners"][0]
        transport = "UDP" if listener["protocol"] == "UDP" else "TCP"
        [answer] = call(platform, "reachable", found["status"]["vip"], listener["port"], transport)
        assert not answer.startswith("ERROR"), f"{name}: {answer}"
    return found


def ask(platform: Platform, function: str, *args: Any, **kwargs: Any) -> Counter[str]:
    """`e2e/runner/client.FUNCTION(*args)` run in the client pod; the answering backends, counted."""
    return count(call(platform, function, *args, **kwargs))


def count(lines: list[str]) -> Counter[str]:
    """`b2:9002 GET / ...` → how many answers came from it; failed requests count under `ERROR`."""
    return Counter("ERROR" if line.startswith("ERROR") else line.split()[0] for line in lines)


def call(platform: Platform, function: str, *args: Any, **kwargs: Any) -> Any:
    """`e2e/runner/client.FUNCTION(*args, **kwargs)` run in the client pod; what it returned."""
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
    return json.loads(out)


@contextlib.contextmanager
def requests_throughout(platform: Platform, vip: str, port: int, tag: str) -> Iterator[list[str]]:
    """GETs to `vip:port` from the client pod, one after another on new connections, for as long as the
    block runs; the list holds every answer once the block has ended."""
    stop = f"/tmp/stop-{tag}"
    answers: list[str] = []
    loop = threading.Thread(
        target=lambda: answers.extend(call(platform, "http_until", vip, port, stop)), daemon=True
    )
    loop.start()
    try:
        yield answers
    finally:
        kubectl(platform, "exec", "-n", platform.namespace, "client", "--", "touch", stop)
        loop.join(120)
