"""Day-2 operations on real nodes: what a user does to a serving LoadBalancer, and what it must survive.

A renewed TLS Secret is served without a restart; a Service's endpoints scale up and down under a
continuous stream of requests without one failing; the operator's leader pod is deleted (its standby
takes over, a new pod replaces it) and no forwarding pod or status changes; broken LoadBalancers are
refused with their reason while a serving one carries on. The chart's operator, the forwarding pods, the
backends and the client are all real pods (see conftest.py); runs on the local nodes and on kind.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from layerlb_operator import objects

from e2e import examples, harness
from e2e.kube import Kubectl
from e2e.nodes import pods
from e2e.nodes.chart_operator import OPERATOR_PODS, RELEASE_NS, ChartOperator
from e2e.nodes.platform import LocalNodes, Platform
from e2e.nodes.suite import POOL, ask, call, count, deploy, kubectl, requests_throughout, start_backends


@dataclass
class Lab:
    platform: Platform
    addresses: list[str]  # of the backend pods b1-b3
    kubectl: Kubectl  # never raises: for the checks that expect a refusal

    def deploy(self, file: str, name: str | None = None, **spec: Any) -> dict[str, Any]:
        return deploy(self.platform, file, self.addresses, name, **spec)

    def load_balancer(self, name: str) -> dict[str, Any]:
        found: dict[str, Any] = json.loads(
            kubectl(self.platform, "get", "llb", name, "-n", self.platform.namespace, "-o", "json")
        )
        return found

    def diagnosis(self) -> str:
        """What a failed request needs: the LoadBalancers, the pods and, on local nodes, their routes."""
        namespace = self.platform.namespace
        parts = [kubectl(self.platform, "get", "llb,pods", "-n", namespace, "-o", "wide")]
        if isinstance(self.platform, LocalNodes):
            for node in self.platform.cluster.node_list():
                parts.append(f"{node.name}: {self.platform.node_exec(node.name, 'ip', 'route')}")
        return "\n".join(parts)

    def pods_of(self, name: str) -> list[dict[str, Any]]:
        listed = kubectl(
            self.platform, "get", "pods", "-n", self.platform.namespace,
            "-l", f"layerlb.dev/loadbalancer={name}", "-o", "json",
        )  # fmt: skip
        items: list[dict[str, Any]] = json.loads(listed)["items"]
        return items


@pytest.fixture(scope="module")
def lab(platform: Platform) -> Iterator[Lab]:
    addresses = start_backends(platform)
    try:
        yield Lab(platform, addresses, Kubectl(platform.env))
    finally:
        kubectl(platform, "delete", "llb", "--all", "-n", platform.namespace, "--wait=true", "--timeout=120s")
        kubectl(platform, "delete", "vippool", POOL, "--ignore-not-found")


def test_tls_keys_stay_in_secrets_and_a_renewed_certificate_is_served(lab: Lab, tmp_path: Path) -> None:
    """The Plan ConfigMap carries no private key (ConfigMaps are readable by far more roles than Secrets);
    the pod reads the key from the Secret, which its Role allows by name and no other; renewing the Secret
    (as cert-manager does) changes the served certificate, with no pod restarted."""
    namespace = lab.platform.namespace
    vip = lab.deploy("l7-https.yaml")["status"]["vip"]
    [pod] = lab.pods_of("shop-tls")[:1]
    stored = kubectl(
        lab.platform,
        "get",
        "configmap",
        objects.plan_configmap_name("shop-tls"),
        "-n",
        namespace,
        "-o",
        "json",
    )
    assert "BEGIN CERTIFICATE" in stored and "PRIVATE KEY" not in stored
    account = f"system:serviceaccount:{namespace}:{objects.dataplane_name('shop-tls')}"
    for secret, allowed in (("shop-tls", "yes"), ("some-other-secret", "no")):
        answer = lab.kubectl("auth", "can-i", "get", f"secret/{secret}", "-n", namespace, "--as", account)
        assert answer.stdout.strip() == allowed, (secret, answer.stdout, answer.stderr)

    key, cert = tmp_path / "renewed.key", tmp_path / "renewed.crt"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-days", "2", "-subj", "/CN=shop.example.com", "-addext", "subjectAltName=DNS:shop.example.com",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    der = subprocess.run(
        ["openssl", "x509", "-in", str(cert), "-outform", "DER"], check=True, capture_output=True
    )
    renewed = hashlib.sha256(der.stdout).hexdigest()

    def served() -> str:
        fingerprint: str = call(lab.platform, "served_certificate", vip, 8443, "shop.example.com")
        return fingerprint

    before = served()
    assert not before.startswith("ERROR") and before != renewed, before
    secret = kubectl(
        lab.platform, "create", "secret", "tls", "shop-tls", f"--cert={cert}", f"--key={key}",
        "-n", namespace, "--dry-run=client", "-o", "yaml",
    )  # fmt: skip
    kubectl(lab.platform, "apply", "-f", "-", stdin=secret)
    harness.wait_for("the renewed certificate to be served", lambda: served() == renewed, timeout=120)
    over_tls = ask(lab.platform, "http_get", vip, 8443, 3, tls_name="shop.example.com")
    assert "ERROR" not in over_tls, over_tls
    [after] = [p for p in lab.pods_of("shop-tls") if p["metadata"]["uid"] == pod["metadata"]["uid"]]
    assert after["status"]["containerStatuses"][0]["restartCount"] == 0, "renewal restarted the pod"
    kubectl(lab.platform, "delete", "llb", "shop-tls", "-n", namespace, "--wait=true", "--timeout=120s")


def test_scaling_the_services_endpoints_moves_traffic_without_a_failed_request(lab: Lab) -> None:
    """A selector-less Service whose EndpointSlice the test rewrites: b1, then b1-b3, then b3 alone; a
    client sends requests throughout, and not one fails (removed backends drain, added ones join)."""
    namespace = lab.platform.namespace
    b1, b2, b3 = lab.addresses

    def endpoints(addresses: list[str]) -> None:
        documents = harness.service_and_slice(namespace, "app", addresses, 9001)
        kubectl(lab.platform, "apply", "-f", "-", stdin=yaml.safe_dump_all(documents))

    endpoints([b1])
    service_backed = [{"name": "app", "service": {"name": "app", "port": 80}, "algorithm": "round-robin"}]
    vip = lab.deploy("l4-proxy-tcp.yaml", name="scaled", backends=service_backed)["status"]["vip"]
    seen: list[str] = []

    def serving(expected: set[str]) -> bool:
        lines: list[str] = call(lab.platform, "http_get", vip, 8080, 6)
        seen.extend(lines)
        return set(count(lines)) == expected

    with requests_throughout(lab.platform, vip, 8080, "scaled") as background:
        harness.wait_for("only b1 to serve", lambda: serving({"b1:9001"}), timeout=120)
        endpoints([b1, b2, b3])
        harness.wait_for(
            "all three to serve", lambda: serving({"b1:9001", "b2:9001", "b3:9001"}), timeout=120
        )
        endpoints([b3])
        harness.wait_for("only b3 to serve", lambda: serving({"b3:9001"}), timeout=120)
    counted = count(background)
    assert sum(counted.values()) > 20, counted  # the loop ran throughout
    failed = [line for line in background + seen if line.startswith("ERROR")]
    assert not failed, failed[:5]
    assert {"b1:9001", "b2:9001", "b3:9001"} <= set(counted), counted
    kubectl(lab.platform, "delete", "llb", "scaled", "-n", namespace, "--wait=true", "--timeout=120s")
    kubectl(lab.platform, "delete", "service", "app", "-n", namespace)


def _settled(lab: Lab, name: str, replicas: int = 2) -> dict[str, Any] | None:
    """The LoadBalancer once every replica serves and its status reads the same twice, 2 s apart."""
    first = lab.load_balancer(name)
    ready: dict[str, Any] = next(
        (c for c in first.get("status", {}).get("conditions", []) if c["type"] == "Ready"), {}
    )
    if not str(ready.get("message", "")).startswith(f"{replicas}/{replicas} "):
        return None
    time.sleep(2)  # the observation window: nothing may write meanwhile
    second = lab.load_balancer(name)
    return second if second["status"] == first["status"] else None


def test_broken_load_balancers_are_refused_with_a_reason_and_the_others_keep_serving(lab: Lab) -> None:
    """A missing Service and a taken VIP each get Accepted=False with their reason and no forwarding pod;
    nothing changes for a LoadBalancer already serving: its status stays, and its traffic never fails."""
    namespace = lab.platform.namespace
    deployed = lab.deploy("l7-proxy-routes.yaml")
    name, vip = deployed["metadata"]["name"], deployed["status"]["vip"]
    # Ready needs one serving replica; the status this test keeps is the one with both: the second replica's
    # readiness may still move the VIP to its node (rendezvous over the eligible nodes) and rewrite Ready.
    shop = harness.wait_for(f"{name}'s status settled with both replicas", lambda: _settled(lab, name), 120)
    missing = [{"name": "app", "service": {"name": "nowhere", "port": 80}}]
    broken = {
        "no-service": ("BackendNotFound", {"backends": missing}),
        "taken-vip": ("VIPConflict", {"vip": vip}),
    }
    with requests_throughout(lab.platform, vip, 8080, "broken") as background:
        for broken_name, (_, spec) in broken.items():
            documents = examples.adapt("l4-proxy-tcp.yaml", namespace, lab.addresses, broken_name, **spec)
            kubectl(lab.platform, "apply", "-f", "-", stdin=yaml.safe_dump_all(documents))
        for broken_name, (reason, _) in broken.items():

            def refused(name: str = broken_name, reason: str = reason) -> bool:
                conditions = (lab.load_balancer(name).get("status") or {}).get("conditions") or []
                accepted: dict[str, Any] = next((c for c in conditions if c["type"] == "Accepted"), {})
                return accepted.get("status") == "False" and accepted.get("reason") == reason

            harness.wait_for(f"{broken_name}: Accepted=False {reason}", refused, timeout=120)
            assert not lab.pods_of(broken_name), f"{broken_name} got a forwarding pod"
        # The refusals are written; a few more requests to the serving VIP after them.
        after: list[str] = call(lab.platform, "http_get", vip, 8080, 3)
    kubectl(lab.platform, "delete", "llb", *broken, "-n", namespace, "--wait=true", "--timeout=120s")
    assert "ERROR" not in count(after), (after, lab.diagnosis())
    counted = count(background)
    assert sum(counted.values()) > 5 and counted["ERROR"] == 0, background[:5]
    assert lab.load_balancer(name)["status"] == shop["status"]


def test_losing_the_operator_leader_leaves_serving_pods_and_their_status_alone(lab: Lab) -> None:
    """The leading operator pod is deleted: the standby takes the Lease and resumes every LoadBalancer, the
    Deployment starts a new pod; not one forwarding pod is replaced, not one status changes, and the VIP
    keeps answering throughout."""
    namespace = lab.platform.namespace
    shop = lab.deploy("l7-proxy-routes.yaml", name="steady")
    vip = shop["status"]["vip"]
    operator = ChartOperator(lab.kubectl)
    leader = harness.wait_for("an operator leader", operator.leader, timeout=120)

    def snapshot() -> tuple[set[str], dict[str, Any]]:
        listed = kubectl(
            lab.platform, "get", "pods", "-n", namespace, "-l", "layerlb.dev/loadbalancer", "-o", "json"
        )
        uids = {p["metadata"]["uid"] for p in json.loads(listed)["items"]}
        statuses = {
            o["metadata"]["name"]: o["status"]
            for o in json.loads(kubectl(lab.platform, "get", "llb", "-n", namespace, "-o", "json"))["items"]
        }
        return uids, statuses

    uids, statuses = snapshot()
    assert uids and all(c["status"] == "True" for s in statuses.values() for c in s["conditions"]), statuses
    with requests_throughout(lab.platform, vip, 8080, "leader") as background:
        kubectl(lab.platform, "delete", "pod", leader, "-n", RELEASE_NS, "--wait=true", "--timeout=120s")
        successor = harness.wait_for(
            "another pod to lead", lambda: (found := operator.leader()) != leader and found, timeout=180
        )
        harness.wait_for(
            f"{successor} to resume every LoadBalancer",
            lambda: (
                operator.metrics().get('layerlb_operator_reconciles_total{result="accepted"}', 0)
                >= len(statuses)
            ),
            timeout=180,
        )
        deployment = kubectl(lab.platform, "get", "deployment", "layerlb", "-n", RELEASE_NS, "-o", "json")
        replicas = json.loads(deployment)["spec"]["replicas"]
        pods.wait_ready(lab.platform.env, RELEASE_NS, OPERATOR_PODS, count=replicas, timeout=180)
    assert snapshot() == (uids, statuses), "forwarding pods were replaced or statuses changed"
    counted = count(background)
    assert sum(counted.values()) > 5 and counted["ERROR"] == 0, background[:5]
    kubectl(lab.platform, "delete", "llb", "steady", "-n", namespace, "--wait=true", "--timeout=120s")
