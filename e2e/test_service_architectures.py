"""Services asking for a layerlb architecture (`layerlb.dev/architecture`) on a real API server: the derived
LoadBalancer `svc-<service>` on the Service's own address, owned by the Service (garbage-collected with it
by kube-controller-manager), `ipMode` Proxy or VIP, refusals as a Warning and a condition, the annotation's
removal deleting it, a user's LoadBalancer of that name left alone, and nothing rewritten when nothing
changed, across a restart too.

One operator, as in e2e/test_services.py (same helpers), in its own namespace with its own pools. No kubelet
runs here, so the forwarding pods never become Ready: the derived LoadBalancer's `Ready` is False
(`Pending`) and reads so on the Service; traffic through it is the real-node suite's.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from e2e import harness
from e2e.cluster.cluster import Cluster
from e2e.harness import Operator, wait_for
from e2e.kube import Kubectl
from e2e.test_services import KUBECONFIGS, TIMEOUT, _operator, apply, condition, ingress

NS = "llb-svc-arch"
ARCHITECTURE = "layerlb.dev/ArchitectureAccepted"
READY = "layerlb.dev/LoadBalancerReady"
POOLS = ("arch-v4", "arch-v6")


@pytest.fixture(scope="module")
def operator(
    k8s: Cluster, kubectl: Kubectl, crds_installed: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Operator]:
    """The operator serving NS; two pools for it only."""
    documents = [
        {
            "apiVersion": "layerlb.dev/v1alpha1",
            "kind": "VIPPool",
            "metadata": {"name": name},
            "spec": {"addresses": [block], "namespaces": [NS]},
        }
        for name, block in zip(POOLS, ["192.0.2.224/28", "2001:db8:16::/125"], strict=True)
    ]
    apply(kubectl, *documents)
    running = _operator(k8s, kubectl, tmp_path_factory.mktemp("svc-arch"), NS)
    yield running
    if running.process.poll() is not None:  # a test stopped it: nobody would remove the finalizers
        for found in json.loads(kubectl.ok("get", "svc", "-n", NS, "-o", "json"))["items"]:
            kubectl(
                "patch", "svc", found["metadata"]["name"], "-n", NS, "--type=merge",
                "-p", '{"metadata": {"finalizers": null}}',
            )  # fmt: skip
    kubectl("delete", "svc,llb", "--all", "-n", NS, "--wait=true", "--timeout=60s")
    running.stop()
    kubectl("delete", "vippool", *POOLS, "--ignore-not-found")
    kubectl("delete", "namespace", NS, "--wait=false")


def service(
    name: str,
    architecture: str | None,
    *,
    ports: list[dict[str, Any]] | None = None,
    annotations: dict[str, str] | None = None,
    **spec: Any,
) -> dict[str, Any]:
    notes = dict(annotations or {})
    if architecture is not None:
        notes["layerlb.dev/architecture"] = architecture
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": NS, "annotations": notes},
        "spec": {
            "type": "LoadBalancer",
            "loadBalancerClass": "layerlb.dev/loadbalancer",
            "ports": ports or [{"name": "http", "port": 80, "targetPort": 8080}],
            **spec,
        },
    }


def get_service(kubectl: Kubectl, name: str) -> dict[str, Any]:
    found = harness.get(kubectl, "service", name, NS)
    assert found is not None, f"Service {NS}/{name} missing"
    return found


def derived(kubectl: Kubectl, service_name: str) -> dict[str, Any] | None:
    return harness.get(kubectl, "llb", f"svc-{service_name}", NS)


def wait_condition(kubectl: Kubectl, name: str, kind: str, state: str, reason: str) -> dict[str, Any]:
    def probe() -> dict[str, Any] | None:
        found = condition(get_service(kubectl, name), kind)
        return found if (found.get("status"), found.get("reason")) == (state, reason) else None

    return wait_for(f"{name}: {kind}={state} {reason}", probe, TIMEOUT)


def wait_event(kubectl: Kubectl, name: str, reason: str, kind: str = "Warning") -> dict[str, Any]:
    selector = f"involvedObject.kind=Service,involvedObject.name={name}"

    def probe() -> dict[str, Any] | None:
        listed = json.loads(kubectl.ok("get", "events", "-n", NS, "--field-selector", selector, "-o", "json"))
        return next((e for e in listed["items"] if (e["type"], e["reason"]) == (kind, reason)), None)

    return wait_for(f"{name}: a {kind} Event {reason}", probe, TIMEOUT)


def versions(kubectl: Kubectl, *names: str) -> dict[str, str]:
    """resourceVersion of each Service and of its derived LoadBalancer (absent: "-")."""
    found = {}
    for name in names:
        found[f"svc/{name}"] = get_service(kubectl, name)["metadata"]["resourceVersion"]
        found[f"llb/svc-{name}"] = ((derived(kubectl, name) or {}).get("metadata") or {}).get(
            "resourceVersion", "-"
        )
    return found


def settled(kubectl: Kubectl, *names: str) -> dict[str, str]:
    """The resourceVersions once they stay put for 3 s (the operator's writes done)."""
    last: dict[str, str] = {}

    def probe() -> dict[str, str] | None:
        nonlocal last
        now = versions(kubectl, *names)
        done = now if now == last else None
        last = now
        if done is None:
            time.sleep(3)
        return done

    return wait_for(f"{', '.join(names)} to settle", probe, TIMEOUT * 2)


def accepted(loadbalancer: dict[str, Any]) -> dict[str, Any]:
    conditions = (loadbalancer.get("status") or {}).get("conditions") or []
    return next((c for c in conditions if c["type"] == "Accepted"), {})


def test_proxy_gets_a_derived_load_balancer_on_the_services_address_with_ip_mode_proxy(
    operator: Operator, kubectl: Kubectl
) -> None:
    apply(kubectl, service("web", "proxy"))
    created = wait_condition(kubectl, "web", ARCHITECTURE, "True", "LoadBalancerCreated")
    found = get_service(kubectl, "web")
    [entry] = ingress(found)
    assert entry["ipMode"] == "Proxy" and entry["ip"].startswith("192.0.2.2"), entry
    assert created["message"] == (
        f"LoadBalancer {NS}/svc-web (L4 proxy, VIP {entry['ip']}) forwards the Service through layerlb's "
        "forwarding pods (ipMode Proxy)"
    )
    assert wait_event(kubectl, "web", "LoadBalancerCreated", "Normal")["message"] == created["message"]
    loadbalancer = derived(kubectl, "web")
    assert loadbalancer is not None
    assert loadbalancer["metadata"]["labels"]["layerlb.dev/service"] == "web"
    assert loadbalancer["metadata"]["ownerReferences"] == [
        {
            "apiVersion": "v1",
            "kind": "Service",
            "name": "web",
            "uid": found["metadata"]["uid"],
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    spec = loadbalancer["spec"]
    assert (spec["mode"], spec["architecture"], spec["vip"]) == ("L4", "proxy", entry["ip"])
    assert spec["listeners"] == [{"name": "http", "port": 80, "protocol": "TCP"}]
    assert [b["service"] for b in spec["backends"]] == [{"name": "web", "port": 80}]
    # The LoadBalancer takes the Service's address (the ledger shares it), and its Ready reads on the Service.
    wait_for(
        "svc-web to hold the Service's address, accepted",
        lambda: (
            (lb := derived(kubectl, "web")) is not None
            and (lb.get("status") or {}).get("vip") == entry["ip"]
            and accepted(lb).get("status") == "True"
        ),
        TIMEOUT,
    )
    ready = wait_condition(kubectl, "web", READY, "False", "Pending")  # no kubelet: no forwarding pod runs
    assert ready["message"].startswith(f"LoadBalancer {NS}/svc-web (L4 proxy, VIP {entry['ip']}): 0/1")
    # An unchanged Service writes nothing: neither to itself nor to its LoadBalancer.
    before = settled(kubectl, "web")
    apply(kubectl, service("web", "proxy"))
    time.sleep(3)
    assert versions(kubectl, "web") == before


def test_nat_gets_ip_mode_proxy_and_names_its_engine(operator: Operator, kubectl: Kubectl) -> None:
    """ipMode Proxy for the kernel architectures too: kube-proxy must not DNAT the address itself."""
    apply(
        kubectl,
        service(
            "db", "nat", ports=[{"name": "pg", "port": 5432, "targetPort": 15432}],
            annotations={"layerlb.dev/engine": "nftables"},
        ),
    )  # fmt: skip
    wait_condition(kubectl, "db", ARCHITECTURE, "True", "LoadBalancerCreated")
    [entry] = ingress(get_service(kubectl, "db"))
    assert entry["ipMode"] == "Proxy"
    loadbalancer = derived(kubectl, "db")
    assert loadbalancer is not None
    spec = loadbalancer["spec"]
    assert (spec["architecture"], spec["engine"], spec["vip"]) == ("nat", "nftables", entry["ip"])


@pytest.mark.parametrize(
    ("name", "architecture", "spec", "says"),
    [
        (
            "two-ports", "proxy",
            {"ports": [{"name": "http", "port": 80}, {"name": "https", "port": 443}]},
            "spec.ports: the Service has 2 ports (http 80/TCP, https 443/TCP), but a LoadBalancer derived for "
            "architecture proxy must have exactly one",
        ),
        (
            "mapped", "dsr", {},
            "spec.ports[0].targetPort: 8080 differs from port 80, but architecture dsr cannot change the "
            "destination port",
        ),
        (
            "dual", "proxy", {"ipFamilyPolicy": "RequireDualStack"},
            "spec.ipFamilyPolicy: the Service has 2 addresses",
        ),
    ],
)  # fmt: skip
def test_what_a_derived_load_balancer_cannot_serve_is_refused_while_kube_proxy_forwards(
    operator: Operator, kubectl: Kubectl, name: str, architecture: str, spec: dict[str, Any], says: str
) -> None:
    apply(kubectl, service(name, architecture, **spec))
    refused = wait_condition(kubectl, name, ARCHITECTURE, "False", "UnsupportedService")
    assert refused["message"].startswith(says), refused["message"]
    assert "kube-proxy forwards the address" in refused["message"]
    assert wait_event(kubectl, name, "UnsupportedService")["message"] == refused["message"]
    found = get_service(kubectl, name)
    assert ingress(found) and all(e["ipMode"] == "VIP" for e in ingress(found))  # the address stays
    assert derived(kubectl, name) is None


def test_an_engine_without_an_architecture_is_a_warning_while_kube_proxy_forwards(
    operator: Operator, kubectl: Kubectl
) -> None:
    apply(kubectl, service("engine-only", None, annotations={"layerlb.dev/engine": "nftables"}))
    refused = wait_condition(kubectl, "engine-only", ARCHITECTURE, "False", "InvalidEngine")
    assert refused["message"].startswith(
        "metadata.annotations[layerlb.dev/engine]: 'nftables' takes effect only with "
        "metadata.annotations[layerlb.dev/architecture]"
    ), refused["message"]
    assert wait_event(kubectl, "engine-only", "InvalidEngine")["message"] == refused["message"]
    assert [e["ipMode"] for e in ingress(get_service(kubectl, "engine-only"))] == ["VIP"]
    assert derived(kubectl, "engine-only") is None


def test_removing_the_annotation_deletes_the_derived_load_balancer_and_keeps_the_address(
    operator: Operator, kubectl: Kubectl
) -> None:
    apply(kubectl, service("switch", "proxy"))
    wait_condition(kubectl, "switch", ARCHITECTURE, "True", "LoadBalancerCreated")
    [before] = ingress(get_service(kubectl, "switch"))
    assert before["ipMode"] == "Proxy"
    apply(kubectl, service("switch", None))
    wait_condition(kubectl, "switch", ARCHITECTURE, "True", "KubeProxy")
    wait_for("svc-switch deleted", lambda: derived(kubectl, "switch") is None, TIMEOUT)
    assert ingress(get_service(kubectl, "switch")) == [{"ip": before["ip"], "ipMode": "VIP"}]
    event = wait_event(kubectl, "switch", "LoadBalancerDeleted", "Normal")
    assert event["message"].startswith(f"deleted LoadBalancer {NS}/svc-switch")
    # Asking again brings it back on the same address.
    apply(kubectl, service("switch", "proxy"))
    wait_condition(kubectl, "switch", ARCHITECTURE, "True", "LoadBalancerCreated")
    assert ingress(get_service(kubectl, "switch")) == [{"ip": before["ip"], "ipMode": "Proxy"}]


def test_deleting_the_service_garbage_collects_its_load_balancer_and_frees_the_address(
    operator: Operator, kubectl: Kubectl
) -> None:
    apply(kubectl, service("doomed", "proxy"))
    wait_condition(kubectl, "doomed", ARCHITECTURE, "True", "LoadBalancerCreated")
    [entry] = ingress(get_service(kubectl, "doomed"))
    wait_for("svc-doomed", lambda: derived(kubectl, "doomed"), TIMEOUT)
    kubectl.ok("delete", "svc", "doomed", "-n", NS, "--wait=true", "--timeout=60s")
    # The operator leaves it to kube-controller-manager's garbage collector (the owner reference).
    wait_for("svc-doomed garbage-collected", lambda: derived(kubectl, "doomed") is None, TIMEOUT)
    apply(kubectl, service("heir", None, annotations={"layerlb.dev/addresses": entry["ip"]}))
    wait_condition(kubectl, "heir", "layerlb.dev/AddressAssigned", "True", "AddressAssigned")
    assert [e["ip"] for e in ingress(get_service(kubectl, "heir"))] == [entry["ip"]]


def test_a_users_load_balancer_of_the_derived_name_is_left_alone(
    operator: Operator, kubectl: Kubectl
) -> None:
    theirs = {
        "apiVersion": "layerlb.dev/v1alpha1",
        "kind": "LoadBalancer",
        "metadata": {"name": "svc-mine", "namespace": NS},
        "spec": {
            "mode": "L4",
            "architecture": "proxy",
            "vip": "198.18.0.5",
            "listeners": [{"name": "tcp", "port": 9000, "protocol": "TCP"}],
            "backends": [{"name": "app", "endpoints": [{"address": "10.0.0.1", "port": 9000}]}],
        },
    }
    apply(kubectl, theirs)
    stored = wait_for("svc-mine", lambda: derived(kubectl, "mine"), TIMEOUT)
    apply(kubectl, service("mine", "proxy"))
    refused = wait_condition(kubectl, "mine", ARCHITECTURE, "False", "NameInUse")
    assert f"LoadBalancer {NS}/svc-mine exists and is not this Service's" in refused["message"]
    wait_event(kubectl, "mine", "NameInUse")
    assert ingress(get_service(kubectl, "mine"))[0]["ipMode"] == "VIP"
    now = derived(kubectl, "mine")
    assert now is not None and now["spec"] == stored["spec"] and not now["metadata"].get("ownerReferences")
    applied = [m for m in now["metadata"]["managedFields"] if m["operation"] == "Apply"]
    assert not any(m["manager"] == "layerlb-operator" for m in applied), applied
    # Once the user's is gone, the Service gets its own.
    kubectl.ok("delete", "llb", "svc-mine", "-n", NS, "--wait=true", "--timeout=60s")
    wait_condition(kubectl, "mine", ARCHITECTURE, "True", "LoadBalancerCreated")
    own = derived(kubectl, "mine")
    assert own is not None and own["metadata"]["ownerReferences"][0]["name"] == "mine"


def test_a_restarted_operator_rewrites_nothing_and_keeps_the_shared_addresses(
    operator: Operator, kubectl: Kubectl
) -> None:
    names = ("web", "db", "switch", "mine")
    before = settled(kubectl, *names)
    assert operator.stop() == 0, operator.tail()
    restarted = Operator(
        KUBECONFIGS[NS], operator.log.parent / "operator-2.log", NS, f"{NS}/layerlb-operator"
    )
    operator.process = restarted.process  # the module fixture stops whichever runs now
    wait_for(
        "the restarted operator to lead",
        lambda: restarted.metrics().get("layerlb_operator_leader") == 1,
        TIMEOUT,
    )
    apply(kubectl, service("newcomer", "proxy"))
    wait_condition(kubectl, "newcomer", ARCHITECTURE, "True", "LoadBalancerCreated")
    taken = {entry["ip"] for name in names for entry in ingress(get_service(kubectl, name))}
    assert not {e["ip"] for e in ingress(get_service(kubectl, "newcomer"))} & taken
    time.sleep(3)
    assert versions(kubectl, *names) == before
    for name in names:
        loadbalancer = derived(kubectl, name)
        assert loadbalancer is not None and accepted(loadbalancer).get("reason") != "VIPConflict"
