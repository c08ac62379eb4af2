"""The chart's operator as the tests see it: its pods, which of them leads, the leader's metrics, the logs."""

from __future__ import annotations

import json
from typing import Any

from e2e import harness
from e2e.kube import Kubectl
from e2e.nodes import pods
from e2e.nodes.platform import Platform

RELEASE, RELEASE_NS = "layerlb", "layerlb-system"  # as in the README
INSTANCE = f"app.kubernetes.io/instance={RELEASE}"  # every object of the release
OPERATOR_PODS = f"{INSTANCE},app.kubernetes.io/component=operator"  # not the speaker DaemonSet's pods


def install(platform: Platform) -> None:
    """The chart installed with the README's own `helm install` command, as a user would, into a cluster
    where `platform.namespace` exists; returns once the operator's pods are Ready (or fails with their
    events and logs)."""
    pods.kubectl(platform.env, "create", "namespace", platform.namespace)
    pods.helm(platform.env, *harness.readme_command("install")[1:])
    pods.wait_ready(platform.env, RELEASE_NS, OPERATOR_PODS, timeout=180)


def _get(kubectl: Kubectl, kind: str, name: str, namespace: str) -> dict[str, Any] | None:
    done = kubectl("get", kind, name, "-n", namespace, "-o", "json")
    found: dict[str, Any] | None = json.loads(done.stdout) if done.returncode == 0 else None
    return found


class ChartOperator:
    """The chart's operator pods on the nodes: their logs, and the leader's metrics through the API server's
    pod proxy (the API server reaches pods through its egress selector, as `kubectl logs` does)."""

    def __init__(self, kubectl: Kubectl) -> None:
        self.kubectl = kubectl

    def pods(self) -> list[dict[str, Any]]:
        listed = json.loads(
            self.kubectl.ok("get", "pods", "-n", RELEASE_NS, "-l", OPERATOR_PODS, "-o", "json")
        )
        return [p for p in listed["items"] if not p["metadata"].get("deletionTimestamp")]

    def leader(self) -> str | None:
        """The pod holding the Lease (its identity starts with the pod's name)."""
        holder = ((_get(self.kubectl, "lease", "layerlb-operator", RELEASE_NS) or {}).get("spec") or {}).get(
            "holderIdentity"
        )
        names = [p["metadata"]["name"] for p in self.pods()]
        return next((n for n in names if holder and holder.startswith(f"{n}-")), None)

    def metrics(self) -> dict[str, float]:
        """The leader's metrics as `name{labels}` → value; empty while there is none."""
        leader = self.leader()
        if leader is None:
            return {}
        done = self.kubectl(
            "get", "--raw", f"/api/v1/namespaces/{RELEASE_NS}/pods/{leader}:8080/proxy/metrics"
        )
        if done.returncode != 0:
            return {}
        samples = (
            line.rsplit(" ", 1) for line in done.stdout.splitlines() if line and not line.startswith("#")
        )
        return {name: float(value) for name, value in samples}

    def logs(self) -> str:
        """Every operator pod's log, this run's and (after a restart) the previous one's."""
        parts = []
        for pod in self.pods():
            for previous in ((), ("--previous",)):
                done = self.kubectl("logs", "-n", RELEASE_NS, pod["metadata"]["name"], *previous)
                if done.returncode == 0:
                    parts.append(done.stdout)
        return "\n".join(parts)

    def tail(self) -> str:
        return "\n".join(self.logs().splitlines()[-40:])
