"""The operator on a real API server: LoadBalancers in, owned objects, VIPs and conditions out.

The operator runs as a subprocess (`python -m layerlb.cli operator`) under its own ServiceAccount, bound
to exactly the rules of `layerlb_operator.rbac`, so a missing permission fails here. Everything the
tests create is applied with `kubectl` into the namespace `llb-e2e`, which the operator is told to watch.
No kubelet runs: forwarding pods stay Pending, so `Ready` is False with reason Pending throughout.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from e2e import harness
from e2e.cluster.cluster import Cluster
from e2e.harness import Operator, fresh_namespace, wait_for
from e2e.kube import ROOT, Kubectl

NS = "llb-e2e"
SYSTEM_NS = "llb-e2e-system"
LEASE = f"{NS}/layerlb-operator"


@pytest.fixture(scope="module")
def operator_kubeconfig(
    k8s: Cluster, kubectl: Kubectl, crds_installed: None, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    fresh_namespace(kubectl, NS)
    folder = tmp_path_factory.mktemp("operator")
    return harness.operator_kubeconfig(k8s, kubectl, folder, NS, SYSTEM_NS, LEASE)


@pytest.fixture(scope="module")
def operator(operator_kubeconfig: Path, kubectl: Kubectl) -> Iterator[Operator]:
    """The leading operator, running for the whole module; LoadBalancers are deleted before it stops."""
    running = Operator(operator_kubeconfig, operator_kubeconfig.parent / "operator-1.log", NS, LEASE)
    wait_for("the operator to lead", lambda: running.metrics().get("layerlb_operator_leader") == 1)
    yield running
    kubectl("delete", "llb", "--all", "-n", NS, "--wait=true", "--timeout=60s")
    kubectl("delete", "vippool", "e2e-pool", "e2e-tiny", "--ignore-not-found")
    running.stop()
    kubectl("delete", "namespace", NS, "--wait=false")


def apply(kubectl: Kubectl, *documents: dict[str, Any]) -> None:
    kubectl.ok("apply", "-f", "-", stdin=yaml.safe_dump_all(documents))


def get(kubectl: Kubectl, kind: str, name: str, namespace: str | None = NS) -> dict[str, Any] | None:
    return harness.get(kubectl, kind, name, namespace)


def condition(kubectl: Kubectl, name: str, kind: str) -> dict[str, Any]:
    found = get(kubectl, "llb", name) or {}
    conditions = (found.get("status") or {}).get("conditions") or []
    return next((c for c in conditions if c["type"] == kind), {})


def wait_condition(
    kubectl: Kubectl, name: str, kind: str, status: str, reason: str | None = None
) -> dict[str, Any]:
    def probe() -> dict[str, Any] | None:
        found = condition(kubectl, name, kind)
        ok = found.get("status") == status and (reason is None or found.get("reason") == reason)
        return found if ok else None

    return wait_for(f"{name}: {kind}={status} {reason or ''}", probe)


def example(file: str, name: str, **spec: Any) -> dict[str, Any]:
    """An example from `examples/`, moved into the test namespace, without its VIP unless given."""
    document: dict[str, Any] = next(
        d for d in yaml.safe_load_all((ROOT / "examples" / file).read_text()) if d["kind"] == "LoadBalancer"
    )
    document["metadata"] = {"name": name, "namespace": NS}
    document["spec"].pop("vip", None)
    document["spec"].update(spec)
    return document


def pool(name: str, addresses: list[str], auto: bool = True) -> dict[str, Any]:
    spec = {"addresses": addresses, "namespaces": [NS], "autoAssign": auto}
    return {"apiVersion": "layerlb.dev/v1alpha1", "kind": "VIPPool", "metadata": {"name": name}, "spec": spec}


def service_and_slice(name: str, *addresses: str) -> list[dict[str, Any]]:
    """A selector-less Service and the EndpointSlice a test controls (port 80 → 8080)."""
    return harness.service_and_slice(NS, name, addresses, 8080)


def plan_of(kubectl: Kubectl, name: str) -> dict[str, Any] | None:
    config_map = get(kubectl, "configmap", f"{name}-plan")
    return json.loads(config_map["data"]["plan.json"]) if config_map else None


def endpoints_of(plan: dict[str, Any] | None) -> list[str]:
    if plan is None:
        return []
    return [f"{e['address']}:{e['port']}" for e in plan["backends"][0]["endpoints"]]


def versions(kubectl: Kubectl) -> dict[str, str]:
    """resourceVersion of every object the operator owns in the test namespace, in one request."""
    kinds = "configmap,deployment,serviceaccount,role,rolebinding"
    listed = json.loads(
        kubectl.ok("get", kinds, "-n", NS, "-l", "app.kubernetes.io/name=layerlb", "-o", "json")
    )
    return {f"{o['kind']}/{o['metadata']['name']}": o["metadata"]["resourceVersion"] for o in listed["items"]}


def statuses(kubectl: Kubectl) -> dict[str, Any]:
    listed = json.loads(kubectl.ok("get", "llb", "-n", NS, "-o", "json"))
    return {o["metadata"]["name"]: o.get("status") for o in listed["items"]}


def test_examples_are_accepted_programmed_and_draw_their_vips_from_the_pool(
    operator: Operator, kubectl: Kubectl
) -> None:
    apply(kubectl, pool("e2e-pool", ["192.0.2.128/29"]))
    apply(kubectl, example("l7-proxy-routes.yaml", "shop"), example("l4-nat-ipvs.yaml", "db"))
    for name in ("shop", "db"):
        wait_condition(kubectl, name, "Accepted", "True", "Valid")
        wait_condition(kubectl, name, "Programmed", "True")
        ready = condition(kubectl, name, "Ready")
        assert (ready["status"], ready["reason"]) == ("False", "Pending")
    shop, db = get(kubectl, "llb", "shop"), get(kubectl, "llb", "db")
    assert shop and db
    vips = {shop["status"]["vip"], db["status"]["vip"]}
    assert vips <= {f"192.0.2.{i}" for i in range(128, 136)} and len(vips) == 2
    assert shop["status"]["observedGeneration"] == shop["metadata"]["generation"]
    plan = plan_of(kubectl, "shop")
    assert (
        plan and plan["vip"] == shop["status"]["vip"] and plan["generation"] == shop["metadata"]["generation"]
    )

    for lb in (shop, db):
        name = lb["metadata"]["name"]
        for kind, child in [("configmap", f"{name}-plan")] + [
            (kind, f"{name}-dataplane") for kind in ("deployment", "serviceaccount", "role", "rolebinding")
        ]:
            owned = get(kubectl, kind, child)
            assert owned, f"{kind}/{child} missing"
            [owner] = owned["metadata"]["ownerReferences"]
            assert (owner["uid"], owner["controller"]) == (lb["metadata"]["uid"], True)
            managers = {entry["manager"] for entry in owned["metadata"]["managedFields"]}
            assert "layerlb-operator" in managers
    shop_pod = (get(kubectl, "deployment", "shop-dataplane") or {})["spec"]["template"]["spec"]
    db_pod = (get(kubectl, "deployment", "db-dataplane") or {})["spec"]["template"]["spec"]
    assert not shop_pod.get("hostNetwork") and shop_pod["securityContext"]["runAsNonRoot"] is True
    assert shop_pod["containers"][0]["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert db_pod["hostNetwork"] is True
    assert db_pod["containers"][0]["securityContext"]["capabilities"]["add"] == ["NET_ADMIN", "NET_RAW"]
    assert (get(kubectl, "deployment", "db-dataplane") or {})["spec"]["replicas"] == 2


def test_a_service_backend_follows_its_endpointslice_within_seconds(
    operator: Operator, kubectl: Kubectl
) -> None:
    apply(kubectl, *service_and_slice("app", "10.1.0.1"))
    apply(
        kubectl,
        example(
            "l4-proxy-tcp.yaml", "tcp", backends=[{"name": "app", "service": {"name": "app", "port": 80}}]
        ),
    )
    wait_condition(kubectl, "tcp", "Programmed", "True")
    assert endpoints_of(plan_of(kubectl, "tcp")) == ["10.1.0.1:8080"]
    apply(kubectl, *service_and_slice("app", "10.1.0.1", "10.1.0.2"))
    wait_for(
        "the Plan to list the new endpoint",
        lambda: endpoints_of(plan_of(kubectl, "tcp")) == ["10.1.0.1:8080", "10.1.0.2:8080"],
        timeout=10,
    )
    wait_for(
        "status.backends to count both endpoints",
        lambda: (
            ((get(kubectl, "llb", "tcp") or {}).get("status") or {}).get("backends")
            == [{"name": "app", "ready": 2, "total": 2}]
        ),
        timeout=10,
    )


def test_a_missing_service_is_backend_not_found_until_it_appears(
    operator: Operator, kubectl: Kubectl
) -> None:
    apply(
        kubectl,
        example(
            "l4-proxy-tcp.yaml", "late", backends=[{"name": "app", "service": {"name": "late", "port": 80}}]
        ),
    )
    refused = wait_condition(kubectl, "late", "Accepted", "False", "BackendNotFound")
    assert "Service late not found" in refused["message"]
    assert condition(kubectl, "shop", "Accepted")["status"] == "True"
    apply(kubectl, *service_and_slice("late", "10.1.0.9"))
    wait_condition(kubectl, "late", "Accepted", "True")
    wait_for("the late Plan", lambda: endpoints_of(plan_of(kubectl, "late")) == ["10.1.0.9:8080"])


def test_a_taken_vip_is_a_conflict_and_others_keep_serving(operator: Operator, kubectl: Kubectl) -> None:
    taken = (get(kubectl, "llb", "shop") or {})["status"]["vip"]
    apply(kubectl, example("l7-proxy-routes.yaml", "copycat", vip=taken))
    refused = wait_condition(kubectl, "copycat", "Accepted", "False", "VIPConflict")
    assert f"{taken} is already the VIP of LoadBalancer {NS}/shop" in refused["message"]
    assert condition(kubectl, "shop", "Accepted")["status"] == "True"
    assert get(kubectl, "configmap", "copycat-plan") is None
    kubectl.ok("delete", "llb", "copycat", "-n", NS)


def test_an_exhausted_pool_gives_no_vip_until_a_deleted_load_balancer_frees_one(
    operator: Operator, kubectl: Kubectl
) -> None:
    apply(kubectl, pool("e2e-tiny", ["203.0.113.5/32"], auto=False))
    apply(kubectl, example("l4-proxy-udp.yaml", "first", vipPool="e2e-tiny"))
    wait_condition(kubectl, "first", "Programmed", "True")
    apply(kubectl, example("l4-proxy-udp.yaml", "second", vipPool="e2e-tiny"))
    refused = wait_condition(kubectl, "second", "Accepted", "False", "NoVIPAvailable")
    assert "no free address in VIPPool(s) e2e-tiny" in refused["message"]
    assert condition(kubectl, "shop", "Accepted")["status"] == "True"

    kubectl.ok("delete", "llb", "first", "-n", NS, "--wait=true", "--timeout=60s")
    wait_condition(kubectl, "second", "Accepted", "True")
    assert (get(kubectl, "llb", "second") or {})["status"]["vip"] == "203.0.113.5"
    wait_for(
        "the garbage collector to remove first's objects",
        lambda: all(
            get(kubectl, kind, name) is None
            for kind, name in [
                ("configmap", "first-plan"),
                ("deployment", "first-dataplane"),
                ("role", "first-dataplane"),
            ]
        ),
    )


def test_a_standby_writes_nothing_and_a_restart_changes_nothing_that_was_right(
    operator: Operator, kubectl: Kubectl, operator_kubeconfig: Path
) -> None:
    names = ("shop", "db", "tcp", "late", "second")
    for name in names:
        wait_condition(kubectl, name, "Programmed", "True")
    before, observed = versions(kubectl), statuses(kubectl)
    assert len(before) == 6 * len(names), sorted(before)  # 2 ConfigMaps, SA, Role, binding, Deployment
    apply(kubectl, example("l7-proxy-routes.yaml", "shop"), example("l4-nat-ipvs.yaml", "db"))  # unchanged

    standby = Operator(operator_kubeconfig, operator_kubeconfig.parent / "operator-2.log", NS, LEASE)
    try:
        wait_for("the standby's metrics", lambda: "layerlb_operator_leader" in standby.metrics())
        metrics = standby.metrics()
        assert metrics["layerlb_operator_leader"] == 0, standby.tail()
        assert not [k for k, v in metrics.items() if k.startswith("layerlb_operator_writes_total") and v], (
            metrics
        )
        assert sum(v for k, v in metrics.items() if k.startswith("layerlb_operator_reconciles_total")) == 0

        assert operator.stop() == 0, operator.tail()
        wait_for("the standby to take over", lambda: standby.metrics().get("layerlb_operator_leader") == 1)
        wait_for(
            "the new leader to resume every LoadBalancer",
            lambda: (
                standby.metrics().get('layerlb_operator_reconciles_total{result="accepted"}', 0) >= len(names)
            ),
        )
        assert versions(kubectl) == before
        assert statuses(kubectl) == observed
    finally:
        operator.process = standby.process  # the module fixture cleans up with whichever leads now
        operator.log = standby.log
