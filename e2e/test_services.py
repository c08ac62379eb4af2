"""Services of type LoadBalancer on a real API server: addresses from VIPPools, `status.loadBalancer.ingress`
with `ipMode`, conditions, Events, the finalizer, and every bad input refused without touching others.

Two operators run as subprocesses under their own ServiceAccounts (bound to exactly the rules of
`layerlb_operator.rbac`): one serves classless Services too (`--serve-classless-services`) in `llb-svc`,
the other does not, in `llb-svc-off`. The local API server is dual-stack for Services (IPv4 first).
No kubelet runs and nothing is announced here: this is the controller's half (the speaker's is
tested on real nodes).
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

NS, NS_OFF = "llb-svc", "llb-svc-off"
CLASS = "layerlb.dev/loadbalancer"
ASSIGNED = "layerlb.dev/AddressAssigned"
ARCHITECTURE = "layerlb.dev/ArchitectureAccepted"
FINALIZER = "layerlb.dev/service"
POOLS = ("svc-v4", "svc-v6", "svc-tiny", "svc-fenced")
TIMEOUT = 60.0  # two busy cores: generous, and every wait is on a condition


KUBECONFIGS: dict[str, Path] = {}  # namespace → its operator's kubeconfig, for a restart


def _operator(k8s: Cluster, kubectl: Kubectl, folder: Path, namespace: str, *args: str) -> Operator:
    fresh_namespace(kubectl, namespace)
    lease = f"{namespace}/layerlb-operator"
    config = harness.operator_kubeconfig(k8s, kubectl, folder, namespace, f"{namespace}-system", lease)
    KUBECONFIGS[namespace] = config
    running = Operator(config, folder / "operator.log", namespace, lease, args)
    wait_for(
        f"the operator of {namespace} to lead",
        lambda: running.metrics().get("layerlb_operator_leader") == 1,
        TIMEOUT,
    )
    return running


@pytest.fixture(scope="module")
def operator(
    k8s: Cluster, kubectl: Kubectl, crds_installed: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Operator]:
    """The operator serving classless Services too, in NS; the pools the tests draw from."""
    apply(
        kubectl,
        pool("svc-v4", ["192.0.2.192/28"]),
        pool("svc-v6", ["2001:db8:15::/125"]),
        pool("svc-tiny", ["198.51.100.9/32"], auto=False),
        pool("svc-fenced", ["203.0.113.0/30"], namespaces=["somewhere-else"]),
    )
    running = _operator(k8s, kubectl, tmp_path_factory.mktemp("svc-on"), NS, "--serve-classless-services")
    yield running
    if running.process.poll() is not None:  # a test stopped it: nobody would remove the finalizers
        for found in json.loads(kubectl.ok("get", "svc", "-n", NS, "-o", "json"))["items"]:
            kubectl(
                "patch",
                "svc",
                found["metadata"]["name"],
                "-n",
                NS,
                "--type=merge",
                "-p",
                '{"metadata": {"finalizers": null}}',
            )
    kubectl("delete", "svc,llb,deployment", "--all", "-n", NS, "--wait=true", "--timeout=60s")
    running.stop()
    kubectl("delete", "vippool", *POOLS, "--ignore-not-found")
    kubectl("delete", "namespace", NS, "--wait=false")


@pytest.fixture(scope="module")
def operator_off(
    operator: Operator, k8s: Cluster, kubectl: Kubectl, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Operator]:
    """An operator with the default settings (classless Services not served), in NS_OFF."""
    running = _operator(k8s, kubectl, tmp_path_factory.mktemp("svc-off"), NS_OFF)
    yield running
    kubectl("delete", "svc", "--all", "-n", NS_OFF, "--wait=true", "--timeout=60s")
    running.stop()
    kubectl("delete", "namespace", NS_OFF, "--wait=false")


def apply(kubectl: Kubectl, *documents: dict[str, Any]) -> None:
    kubectl.ok("apply", "-f", "-", stdin=yaml.safe_dump_all(documents))


def pool(
    name: str, addresses: list[str], auto: bool = True, namespaces: list[str] | None = None
) -> dict[str, Any]:
    spec = {"addresses": addresses, "namespaces": namespaces or [NS, NS_OFF], "autoAssign": auto}
    return {"apiVersion": "layerlb.dev/v1alpha1", "kind": "VIPPool", "metadata": {"name": name}, "spec": spec}


def service(
    name: str,
    namespace: str = NS,
    *,
    cls: str | None = CLASS,
    annotations: dict[str, str] | None = None,
    **spec: Any,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace, "annotations": annotations or {}},
        "spec": {"type": "LoadBalancer", "ports": [{"name": "http", "port": 80, "targetPort": 8080}], **spec},
    }
    if cls is not None:
        body["spec"]["loadBalancerClass"] = cls
    return body


def get_service(kubectl: Kubectl, name: str, namespace: str = NS) -> dict[str, Any]:
    found = harness.get(kubectl, "service", name, namespace)
    assert found is not None, f"Service {namespace}/{name} missing"
    return found


def ingress(found: dict[str, Any]) -> list[dict[str, Any]]:
    return list(((found.get("status") or {}).get("loadBalancer") or {}).get("ingress") or [])


def condition(found: dict[str, Any], kind: str) -> dict[str, Any]:
    return next((c for c in (found.get("status") or {}).get("conditions") or [] if c["type"] == kind), {})


def wait_ingress(kubectl: Kubectl, name: str, count: int = 1, namespace: str = NS) -> dict[str, Any]:
    def probe() -> dict[str, Any] | None:
        found = get_service(kubectl, name, namespace)
        return found if len(ingress(found)) == count else None

    return wait_for(f"{namespace}/{name}: {count} ingress address(es)", probe, TIMEOUT)


def wait_refused(kubectl: Kubectl, name: str, reason: str, kind: str = ASSIGNED) -> dict[str, Any]:
    def probe() -> dict[str, Any] | None:
        found = condition(get_service(kubectl, name), kind)
        return found if (found.get("status"), found.get("reason")) == ("False", reason) else None

    return wait_for(f"{name}: {kind}=False {reason}", probe, TIMEOUT)


def events(kubectl: Kubectl, name: str, namespace: str = NS) -> list[dict[str, Any]]:
    selector = f"involvedObject.kind=Service,involvedObject.name={name}"
    listed = json.loads(
        kubectl.ok("get", "events", "-n", namespace, "--field-selector", selector, "-o", "json")
    )
    return list(listed["items"])


def wait_event(kubectl: Kubectl, name: str, reason: str, kind: str = "Warning") -> dict[str, Any]:
    def probe() -> dict[str, Any] | None:
        return next((e for e in events(kubectl, name) if (e["type"], e["reason"]) == (kind, reason)), None)

    return wait_for(f"{name}: a {kind} Event {reason}", probe, TIMEOUT)


def test_a_service_of_layerlbs_class_gets_an_address_for_kube_proxy_with_an_event_and_a_finalizer(
    operator: Operator, kubectl: Kubectl
) -> None:
    apply(kubectl, service("web"))
    found = wait_ingress(kubectl, "web")
    [entry] = ingress(found)
    assert entry["ip"].startswith("192.0.2.") and entry["ipMode"] == "VIP"
    assert FINALIZER in found["metadata"]["finalizers"]
    assigned = condition(found, ASSIGNED)
    assert (assigned["status"], assigned["reason"]) == ("True", "AddressAssigned")
    assert entry["ip"] in assigned["message"] and "VIPPool svc-v4" in assigned["message"]
    assert assigned["lastTransitionTime"]  # no observedGeneration: Services have no metadata.generation
    assert condition(found, ARCHITECTURE)["reason"] == "KubeProxy"
    event = wait_event(kubectl, "web", "AddressAssigned", "Normal")
    assert entry["ip"] in event["message"]
    table = kubectl.ok("get", "svc", "web", "-n", NS)
    assert entry["ip"] in table.splitlines()[1].split()  # the EXTERNAL-IP column
    # The operator writes nothing more while nothing changes.
    version = found["metadata"]["resourceVersion"]
    apply(kubectl, service("web"))
    assert get_service(kubectl, "web")["metadata"]["resourceVersion"] == version


def test_kubectl_expose_of_a_deployment_gets_an_external_ip_when_classless_services_are_served(
    operator: Operator, kubectl: Kubectl
) -> None:
    kubectl.ok("create", "deployment", "shop", "--image=registry.invalid/backend:1", "--port=8080", "-n", NS)
    kubectl.ok(
        "expose", "deployment", "shop", "--type=LoadBalancer", "--port=80", "--target-port=8080", "-n", NS
    )

    def external_ip() -> str | None:
        row = kubectl.ok("get", "svc", "shop", "-n", NS, "--no-headers").split()
        return row[3] if row[3] != "<pending>" else None

    address = wait_for("EXTERNAL-IP of kubectl expose", external_ip, TIMEOUT)
    assert address.startswith("192.0.2.")
    assert "loadBalancerClass" not in get_service(kubectl, "shop")["spec"]


def test_classless_services_are_left_alone_by_default_and_other_classes_always(
    operator: Operator, operator_off: Operator, kubectl: Kubectl
) -> None:
    apply(kubectl, service("classless", NS_OFF, cls=None), service("theirs", cls="example.com/other-lb"))
    # Both operators work, and saw the two Services above before these two:
    apply(kubectl, service("ours", NS_OFF), service("after-theirs"))
    assert ingress(wait_ingress(kubectl, "ours", namespace=NS_OFF))[0]["ip"].startswith("192.0.2.")
    wait_ingress(kubectl, "after-theirs")
    for name, namespace in [("classless", NS_OFF), ("theirs", NS)]:  # ...and touches neither of these
        found = get_service(kubectl, name, namespace)
        assert ingress(found) == [] and not found["status"].get("conditions"), found["status"]
        assert FINALIZER not in (found["metadata"].get("finalizers") or [])
        assert not any(m["manager"] == "layerlb-operator" for m in found["metadata"]["managedFields"])
        assert events(kubectl, name, namespace) == []


def test_dual_stack_services_get_one_address_per_family_in_their_order(
    operator: Operator, kubectl: Kubectl
) -> None:
    apply(
        kubectl,
        service("dual", ipFamilyPolicy="RequireDualStack"),
        service("dual6", ipFamilyPolicy="PreferDualStack", ipFamilies=["IPv6", "IPv4"]),
    )
    dual = [entry["ip"] for entry in ingress(wait_ingress(kubectl, "dual", 2))]
    assert dual[0].startswith("192.0.2.") and dual[1].startswith("2001:db8:15::"), dual
    dual6 = [entry["ip"] for entry in ingress(wait_ingress(kubectl, "dual6", 2))]
    assert dual6[0].startswith("2001:db8:15::") and dual6[1].startswith("192.0.2."), dual6
    assert len(set(dual + dual6)) == 4


def test_an_address_is_asked_for_by_annotation_and_the_deprecated_field_with_a_warning(
    operator: Operator, kubectl: Kubectl
) -> None:
    apply(
        kubectl,
        service(
            "pinned",
            annotations={"layerlb.dev/addresses": "192.0.2.205,2001:db8:15::5"},
            ipFamilyPolicy="RequireDualStack",
        ),
        service("legacy", loadBalancerIP="192.0.2.204"),
    )
    assert [e["ip"] for e in ingress(wait_ingress(kubectl, "pinned", 2))] == ["192.0.2.205", "2001:db8:15::5"]
    assert [e["ip"] for e in ingress(wait_ingress(kubectl, "legacy"))] == ["192.0.2.204"]
    warning = wait_event(kubectl, "legacy", "DeprecatedLoadBalancerIP")
    assert "layerlb.dev/addresses" in warning["message"] and "192.0.2.204" in warning["message"]


def _example_loadbalancer(name: str, vip: str) -> dict[str, Any]:
    document: dict[str, Any] = next(
        d
        for d in yaml.safe_load_all((ROOT / "examples" / "l4-proxy-tcp.yaml").read_text())
        if d["kind"] == "LoadBalancer"
    )
    document["metadata"] = {"name": name, "namespace": NS}
    document["spec"]["vip"] = vip
    return document


@pytest.mark.parametrize(
    ("name", "annotations", "spec", "reason", "says"),
    [
        (
            "outside", {"layerlb.dev/addresses": "198.18.0.1"}, {}, "AddressNotInPool",
            ["metadata.annotations[layerlb.dev/addresses]: 198.18.0.1 is in no VIPPool", "svc-v4 (192.0.2.192-192.0.2.207)"],
        ),
        (
            "fenced", {"layerlb.dev/addresses": "203.0.113.1"}, {}, "AddressNotInPool",
            ["203.0.113.1 is in no VIPPool the Service may use"],
        ),
        (
            "wrong-family", {"layerlb.dev/addresses": "2001:db8:15::1"}, {}, "AddressFamilyMismatch",
            ["2001:db8:15::1 is IPv6 but the Service's spec.ipFamilies is [IPv4]"],
        ),
        (
            "no-such-pool", {"layerlb.dev/vip-pool": "nope"}, {}, "PoolNotFound",
            ["metadata.annotations[layerlb.dev/vip-pool]: VIPPool 'nope' not found", "svc-v4"],
        ),
        (
            "not-an-ip", {"layerlb.dev/addresses": "192.0.2.300"}, {}, "InvalidAddresses",
            ["'192.0.2.300' is not an IP address"],
        ),
    ],
)  # fmt: skip
def test_bad_input_is_a_warning_and_a_condition_naming_the_field_and_value(
    operator: Operator,
    kubectl: Kubectl,
    name: str,
    annotations: dict[str, str],
    spec: dict[str, Any],
    reason: str,
    says: list[str],
) -> None:
    before = get_service(kubectl, "web") if harness.get(kubectl, "service", "web", NS) else None
    apply(kubectl, service(name, annotations=annotations, **spec))
    refused = wait_refused(kubectl, name, reason)
    for text in says:
        assert text in refused["message"], refused["message"]
    event = wait_event(kubectl, name, reason)
    assert event["message"] == refused["message"]
    found = get_service(kubectl, name)
    assert ingress(found) == [] and FINALIZER in found["metadata"]["finalizers"]
    if before is not None:  # other Services untouched
        assert (
            get_service(kubectl, "web")["metadata"]["resourceVersion"]
            == before["metadata"]["resourceVersion"]
        )


def test_an_address_a_load_balancer_holds_is_in_use_for_services_and_back(
    operator: Operator, kubectl: Kubectl
) -> None:
    apply(kubectl, _example_loadbalancer("holder", "192.0.2.206"))
    wait_for(
        "LoadBalancer holder to hold its VIP",
        lambda: (
            (harness.get(kubectl, "llb", "holder", NS) or {}).get("status", {}).get("vip") == "192.0.2.206"
        ),
        TIMEOUT,
    )
    apply(kubectl, service("taken", annotations={"layerlb.dev/addresses": "192.0.2.206"}))
    refused = wait_refused(kubectl, "taken", "AddressInUse")
    assert "192.0.2.206 is already held by LoadBalancer llb-svc/holder" in refused["message"]
    wait_event(kubectl, "taken", "AddressInUse")
    # And a LoadBalancer asking for a Service's address is a VIPConflict naming the Service.
    web_ip = ingress(wait_ingress(kubectl, "web"))[0]["ip"]
    apply(kubectl, _example_loadbalancer("grabber", web_ip))

    def conflict() -> dict[str, Any] | None:
        found = harness.get(kubectl, "llb", "grabber", NS) or {}
        conditions: list[dict[str, Any]] = (found.get("status") or {}).get("conditions") or []
        accepted = next((c for c in conditions if c["type"] == "Accepted"), {})
        return accepted if accepted.get("reason") == "VIPConflict" else None

    assert (
        f"{web_ip} is already the VIP of Service llb-svc/web"
        in wait_for("grabber VIPConflict", conflict, TIMEOUT)["message"]
    )
    # Deleting the LoadBalancer frees its address for the waiting Service.
    kubectl.ok("delete", "llb", "holder", "grabber", "-n", NS, "--wait=true", "--timeout=60s")
    assert [e["ip"] for e in ingress(wait_ingress(kubectl, "taken"))] == ["192.0.2.206"]
    wait_event(kubectl, "taken", "AddressAssigned", "Normal")


def test_an_exhausted_pool_waits_until_a_deleted_service_releases_its_address(
    operator: Operator, kubectl: Kubectl
) -> None:
    apply(kubectl, service("tiny-a", annotations={"layerlb.dev/vip-pool": "svc-tiny"}))
    assert [e["ip"] for e in ingress(wait_ingress(kubectl, "tiny-a"))] == ["198.51.100.9"]
    apply(kubectl, service("tiny-b", annotations={"layerlb.dev/vip-pool": "svc-tiny"}))
    refused = wait_refused(kubectl, "tiny-b", "PoolExhausted")
    assert "no free IPv4 address in VIPPool(s) svc-tiny: all 1 are in use" in refused["message"]
    wait_event(kubectl, "tiny-b", "PoolExhausted")
    kubectl.ok("delete", "svc", "tiny-a", "-n", NS, "--wait=true", "--timeout=60s")  # the finalizer lets go
    assert [e["ip"] for e in ingress(wait_ingress(kubectl, "tiny-b"))] == ["198.51.100.9"]


def test_a_type_change_away_from_load_balancer_releases_the_address_and_the_finalizer(
    operator: Operator, kubectl: Kubectl
) -> None:
    apply(kubectl, service("leaving", annotations={"layerlb.dev/addresses": "192.0.2.203"}))
    wait_ingress(kubectl, "leaving")
    # Kubernetes clears spec.loadBalancerClass with the type: the class changes away from layerlb too.
    kubectl.ok("patch", "svc", "leaving", "-n", NS, "--type=merge", "-p", '{"spec": {"type": "ClusterIP"}}')

    def released() -> dict[str, Any] | None:
        found = get_service(kubectl, "leaving")
        done = FINALIZER not in (found["metadata"].get("finalizers") or []) and not ingress(found)
        return found if done and not condition(found, ASSIGNED) else None

    found = wait_for("leaving: address and finalizer released", released, TIMEOUT)
    assert "loadBalancerClass" not in found["spec"]
    assert "192.0.2.203" in wait_event(kubectl, "leaving", "AddressReleased", "Normal")["message"]
    # Back to LoadBalancer, of another class: untouched; its old address is free for others.
    kubectl.ok(
        "patch", "svc", "leaving", "-n", NS, "--type=merge",
        "-p", '{"spec": {"type": "LoadBalancer", "loadBalancerClass": "example.com/other-lb"}}',
    )  # fmt: skip
    apply(kubectl, service("arriving", annotations={"layerlb.dev/addresses": "192.0.2.203"}))
    assert [e["ip"] for e in ingress(wait_ingress(kubectl, "arriving"))] == ["192.0.2.203"]
    assert ingress(get_service(kubectl, "leaving")) == []


def test_an_unknown_architecture_is_refused_on_its_own_condition_and_keeps_the_address(
    operator: Operator, kubectl: Kubectl
) -> None:
    apply(kubectl, service("typo", annotations={"layerlb.dev/architecture": "nta"}))
    refused = wait_refused(kubectl, "typo", "InvalidArchitecture", ARCHITECTURE)
    assert refused["message"] == (
        "metadata.annotations[layerlb.dev/architecture]: 'nta' is not an architecture; valid: nat, dsr, tunnel, "
        "proxy (or no annotation: the cluster's kube-proxy forwards the address)"
    )
    assert wait_event(kubectl, "typo", "InvalidArchitecture")["message"] == refused["message"]
    assert ingress(wait_ingress(kubectl, "typo"))[0]["ipMode"] == "VIP"


def test_metrics_count_served_services_and_their_addresses(operator: Operator, kubectl: Kubectl) -> None:
    wait_ingress(kubectl, "web")
    metrics = operator.metrics()
    assert metrics["layerlb_operator_services"] >= 1
    assert metrics["layerlb_operator_service_addresses_allocated"] >= 1


def test_a_restarted_operator_rebuilds_who_holds_what_from_the_statuses(
    operator: Operator, kubectl: Kubectl
) -> None:
    listed = json.loads(kubectl.ok("get", "svc", "-n", NS, "-o", "json"))["items"]
    held = {entry["ip"] for found in listed for entry in ingress(found)}
    # The front end's Services: a LoadBalancer's own VIP Service goes with it (garbage collection may lag).
    versions = {
        found["metadata"]["name"]: found["metadata"]["resourceVersion"]
        for found in listed
        if not found["metadata"].get("ownerReferences")
    }
    assert len(held) >= 5
    assert operator.stop() == 0, operator.tail()
    restarted = Operator(
        KUBECONFIGS[NS], operator.log.parent / "operator-2.log", NS, f"{NS}/layerlb-operator",
        ["--serve-classless-services"],
    )  # fmt: skip
    operator.process = restarted.process  # the module fixture stops whichever runs now
    wait_for(
        "the restarted operator to lead",
        lambda: restarted.metrics().get("layerlb_operator_leader") == 1,
        TIMEOUT,
    )
    apply(kubectl, service("newcomer", ipFamilyPolicy="RequireDualStack"))
    fresh = {entry["ip"] for entry in ingress(wait_ingress(kubectl, "newcomer", 2))}
    assert not fresh & held, fresh & held
    listed = json.loads(kubectl.ok("get", "svc", "-n", NS, "-o", "json"))["items"]
    unchanged = {
        f["metadata"]["name"]: f["metadata"]["resourceVersion"]
        for f in listed
        if f["metadata"]["name"] in versions
    }
    assert unchanged == versions  # nothing that was right is rewritten
