"""A LoadBalancer's `spec.vip` outside every VIPPool, on a real API server: refused or honoured as
`--vips-outside-pools` says (docs/security.md, "Namespace admins").

The speakers answer ARP/NDP (and advertise over BGP) for every VIP, so an honoured address that no
VIPPool grants lets whoever may create a LoadBalancer take over any address of the nodes' LAN, such as
its gateway's. The chart runs the operator with `refuse`; the bare binary keeps `allow`. Both are run
here as subprocesses under the operator's exact RBAC (no kubelet: forwarding pods stay Pending), one
after the other on the same Lease.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml

from e2e import harness
from e2e.cluster.cluster import Cluster
from e2e.harness import Operator, fresh_namespace, wait_for
from e2e.kube import ROOT, Kubectl

NS = "llb-outside"
SYSTEM_NS = "llb-outside-system"
LEASE = f"{NS}/layerlb-operator"
GATEWAY = "192.0.2.254"  # the LAN's gateway, say: in no VIPPool
POOL = "outside-e2e"  # what the namespace may use
POOL_RANGE = "198.51.100.40-198.51.100.43"
GRANT = "outside-e2e-gateway"  # the cluster admin granting GATEWAY after all
TIMEOUT = 90


@pytest.fixture(scope="module")
def operator_kubeconfig(
    k8s: Cluster, kubectl: Kubectl, crds_installed: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Path]:
    fresh_namespace(kubectl, NS)
    folder = tmp_path_factory.mktemp("outside-pools")
    yield harness.operator_kubeconfig(k8s, kubectl, folder, NS, SYSTEM_NS, LEASE)
    kubectl("delete", "namespace", NS, "--wait=false")


@contextmanager
def operator_with(kubeconfig: Path, kubectl: Kubectl, setting: str) -> Iterator[Operator]:
    """The operator with `--vips-outside-pools=setting`, leading; the test's objects go before it stops."""
    log = kubeconfig.parent / f"operator-{setting}.log"
    running = Operator(kubeconfig, log, NS, LEASE, ["--vips-outside-pools", setting])
    try:
        wait_for(
            f"the operator ({setting}) to lead",
            lambda: running.metrics().get("layerlb_operator_leader") == 1,
            TIMEOUT,
        )
        yield running
    finally:
        kubectl("delete", "llb", "--all", "-n", NS, "--wait=true", "--timeout=60s")
        kubectl("delete", "vippool", POOL, GRANT, "--ignore-not-found")
        running.stop()


def apply(kubectl: Kubectl, *documents: dict[str, Any]) -> None:
    kubectl.ok("apply", "-f", "-", stdin=yaml.safe_dump_all(documents))


def load_balancer(name: str, vip: str) -> dict[str, Any]:
    """examples/l4-proxy-tcp.yaml (static endpoints: nothing else to wait for) in NS, asking for `vip`."""
    document: dict[str, Any] = next(
        d
        for d in yaml.safe_load_all((ROOT / "examples" / "l4-proxy-tcp.yaml").read_text())
        if d["kind"] == "LoadBalancer"
    )
    document["metadata"] = {"name": name, "namespace": NS}
    document["spec"]["vip"] = vip
    return document


def pool(name: str, addresses: list[str]) -> dict[str, Any]:
    spec = {"addresses": addresses, "namespaces": [NS], "autoAssign": True}
    return {"apiVersion": "layerlb.dev/v1alpha1", "kind": "VIPPool", "metadata": {"name": name}, "spec": spec}


def status(kubectl: Kubectl, name: str) -> dict[str, Any]:
    return (harness.get(kubectl, "llb", name, NS) or {}).get("status") or {}


def accepted(kubectl: Kubectl, name: str, state: str, reason: str | None = None) -> dict[str, Any]:
    """The Accepted condition once it is `state` (with `reason`, when given)."""

    def probe() -> dict[str, Any] | None:
        conditions: list[dict[str, Any]] = status(kubectl, name).get("conditions") or []
        found = next((c for c in conditions if c["type"] == "Accepted"), {})
        ok = found.get("status") == state and (reason is None or found.get("reason") == reason)
        return found if ok else None

    return wait_for(f"{name}: Accepted={state} {reason or ''}", probe, TIMEOUT)


def warnings(kubectl: Kubectl, name: str, reason: str) -> list[dict[str, Any]]:
    selector = f"involvedObject.kind=LoadBalancer,involvedObject.name={name},reason={reason}"
    listed = json.loads(kubectl.ok("get", "events", "-n", NS, "--field-selector", selector, "-o", "json"))
    return [event for event in listed["items"] if event.get("type") == "Warning"]


def test_refuse_makes_a_vip_outside_every_pool_a_conflict_until_a_pool_grants_it(
    operator_kubeconfig: Path, kubectl: Kubectl
) -> None:
    with operator_with(operator_kubeconfig, kubectl, "refuse"):
        apply(kubectl, pool(POOL, [POOL_RANGE]), load_balancer("hijack", GATEWAY))
        refused = accepted(kubectl, "hijack", "False", "VIPConflict")
        message = refused["message"]
        # The field, the offending address, and what would be valid.
        assert f"spec.vip: {GATEWAY} is in no VIPPool" in message, message
        assert f"create a VIPPool covering it that serves namespace {NS}" in message, message
        assert f"{POOL} ({POOL_RANGE})" in message, message
        assert "leave spec.vip out" in message, message
        assert "vip" not in status(kubectl, "hijack")  # nothing for a speaker to announce
        assert harness.get(kubectl, "configmap", "hijack-plan", NS) is None  # and nothing forwards
        [event] = wait_for(
            "the VIPConflict Warning", lambda: warnings(kubectl, "hijack", "VIPConflict"), TIMEOUT
        )
        assert GATEWAY in event["message"] and "spec.vip" in event["message"], event

        # The cluster admin grants the address with a VIPPool serving the namespace: now it is honoured.
        apply(kubectl, pool(GRANT, [f"{GATEWAY}/32"]))
        accepted(kubectl, "hijack", "True")
        assert status(kubectl, "hijack")["vip"] == GATEWAY


def test_allow_honours_a_vip_outside_every_pool_as_written(
    operator_kubeconfig: Path, kubectl: Kubectl
) -> None:
    with operator_with(operator_kubeconfig, kubectl, "allow"):
        apply(kubectl, pool(POOL, [POOL_RANGE]), load_balancer("written", GATEWAY))
        accepted(kubectl, "written", "True")
        assert status(kubectl, "written")["vip"] == GATEWAY
        assert not warnings(kubectl, "written", "VIPConflict")
