"""What the e2e modules share: waiting on conditions, the operator run under its own ServiceAccount, and
the selector-less Services whose endpoints a test (or a measurement) sets itself.

The operator runs as a subprocess (`python -m layerlb.cli operator`) bound to exactly the rules of
`layerlb_operator.rbac`, so a missing permission fails the tests. Each module gives it its own namespace
(and Lease), so modules do not see each other's LoadBalancers.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from layerlb_operator import rbac

from e2e.cluster.cluster import Cluster
from e2e.kube import ROOT, Kubectl

DEADLINE = 30.0
T = TypeVar("T")


def wait_for(what: str, probe: Callable[[], T | None], timeout: float = DEADLINE, every: float = 0.2) -> T:
    """Poll `probe` every `every` seconds until it returns something truthy; fail with `what` after
    `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; last seen: {last!r}")


def readme_command(verb: str, containing: str = "") -> list[str]:
    """The README's one `helm VERB ...` line (that contains `containing`), as argv: the tests run the
    commands users copy."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    lines = re.findall(rf"^\s*helm {verb} .*$", readme, flags=re.M)
    [line] = [found.strip() for found in lines if containing in found]
    return shlex.split(line)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


class Operator:
    """One `layerlb operator` process watching `namespace`, with its log file and metrics port."""

    def __init__(
        self, kubeconfig: Path, log: Path, namespace: str, lease: str, extra_args: Sequence[str] = ()
    ) -> None:
        self.port = free_port()
        self.log = log
        env = {**os.environ, "KUBECONFIG": str(kubeconfig), "LAYERLB_DEBUG": "1"}
        command = [
            sys.executable,
            "-m",
            "layerlb.cli",
            "operator",
            "--namespace",
            namespace,
            "--peering",
            lease,
        ]
        command += ["--metrics", f"127.0.0.1:{self.port}", *extra_args]
        with log.open("ab") as out:
            self.process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)

    def metrics(self) -> dict[str, float]:
        """The metrics as `name{labels}` → value; empty while the server is not up."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=2) as answer:
                text = answer.read().decode()
        except OSError:
            return {}
        samples = (line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
        return {name: float(value) for name, value in samples}

    def stop(self) -> int:
        """SIGTERM, as a pod is stopped; returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=60)

    def tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-40:])


def operator_kubeconfig(
    k8s: Cluster, kubectl: Kubectl, folder: Path, namespace: str, system_namespace: str, lease: str
) -> Path:
    """A kubeconfig for a ServiceAccount bound to the rules of `layerlb_operator.rbac` (and the Lease)."""
    account = {"kind": "ServiceAccount", "name": "layerlb-operator", "namespace": system_namespace}
    role_name = f"{namespace}-operator"
    manifests: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": system_namespace}},
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": "layerlb-operator", "namespace": system_namespace},
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": role_name},
            "rules": rbac.cluster_rules(),
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": role_name},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role_name},
            "subjects": [account],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": f"{role_name}-lease", "namespace": namespace},
            "rules": rbac.lease_rules(lease.split("/")[1]),
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": f"{role_name}-lease", "namespace": namespace},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "Role",
                "name": f"{role_name}-lease",
            },
            "subjects": [account],
        },
    ]
    kubectl.ok("apply", "-f", "-", stdin=yaml.safe_dump_all(manifests))
    token = kubectl.ok("create", "token", "layerlb-operator", "-n", system_namespace, "--duration=2h").strip()
    admin = yaml.safe_load(k8s.kubeconfig.read_text())
    return token_kubeconfig(
        folder / "operator.kubeconfig", admin["clusters"][0]["cluster"], "operator", token
    )


def token_kubeconfig(path: Path, cluster: dict[str, Any], user: str, token: str) -> Path:
    """A kubeconfig at `path` that reaches `cluster` (a kubeconfig's cluster entry) as `user` with a
    ServiceAccount `token`: a component run under exactly its own RBAC."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "e2e", "cluster": cluster}],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": user, "context": {"cluster": "e2e", "user": user}}],
        "current-context": user,
    }
    path.write_text(yaml.safe_dump(config))
    return path


def get(kubectl: Kubectl, kind: str, name: str, namespace: str | None) -> dict[str, Any] | None:
    args = ["get", kind, name, "-o", "json", "--show-managed-fields"] + (
        ["-n", namespace] if namespace else []
    )
    done = kubectl(*args)
    return json.loads(done.stdout) if done.returncode == 0 else None


def fresh_namespace(kubectl: Kubectl, namespace: str) -> None:
    """`namespace` exists and is not terminating (one left by an earlier run on a reused cluster must go first)."""
    wait_for(
        f"namespace {namespace} to finish terminating",
        lambda: (
            (get(kubectl, "namespace", namespace, None) or {}).get("status", {}).get("phase") != "Terminating"
        ),
        timeout=90,
    )
    kubectl.ok(
        "apply", "-f", "-", stdin=f"apiVersion: v1\nkind: Namespace\nmetadata: {{name: {namespace}}}\n"
    )


def service_and_slice(namespace: str, name: str, addresses: Sequence[str], port: int) -> list[dict[str, Any]]:
    """A selector-less Service `name` (port 80 → `port`) and its one EndpointSlice `NAME-1` with `addresses`
    ready: no controller writes endpoints for such a Service, so re-applying this moves them at will."""
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"ports": [{"name": "http", "port": 80, "targetPort": port}]},
    }
    endpoint_slice = {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": f"{name}-1",
            "namespace": namespace,
            "labels": {
                "kubernetes.io/service-name": name,
                "endpointslice.kubernetes.io/managed-by": "e2e.layerlb.dev",
            },
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
        "endpoints": [{"addresses": [a], "conditions": {"ready": True}} for a in addresses],
    }
    return [service, endpoint_slice]
