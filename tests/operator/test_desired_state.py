"""`desired_state.reconcile` turns a LoadBalancer and the cluster view into objects and a status, never raising for bad input."""

from __future__ import annotations

import base64
import ipaddress
import json
from pathlib import Path
from typing import Any

import yaml
from layerlb_operator import cluster_view, desired_state, objects, status, vips

ROOT = Path(__file__).resolve().parents[2]
NOW = "2026-01-01T00:00:00Z"
POOL = vips.Pool("public", (vips.Block(ipaddress.ip_address("192.0.2.64"), 32),))


def _document(name: str = "web", generation: int = 2, **spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "mode": "L7",
        "architecture": "proxy",
        "listeners": [{"name": "http", "port": 8080, "protocol": "HTTP"}],
        "backends": [{"name": "app", "service": {"name": "app", "port": 80}}],
        "defaultBackend": "app",
    }
    base.update(spec)
    return {
        "apiVersion": "layerlb.dev/v1alpha1",
        "kind": "LoadBalancer",
        "metadata": {
            "name": name,
            "namespace": "shop",
            "generation": generation,
            "uid": "uid-9",
            "resourceVersion": "5",
        },
        "spec": base,
        "status": {},
    }


def _slice(*endpoints: tuple[str, bool | None], port: int = 8080, port_name: str = "http") -> dict[str, Any]:
    body = {
        "addressType": "IPv4",
        "ports": [{"name": port_name, "port": port, "protocol": "TCP"}],
        "endpoints": [
            {"addresses": [address], "conditions": {} if ready is None else {"ready": ready}}
            for address, ready in endpoints
        ],
    }
    return cluster_view.slice_summary(body)


def _view(
    slices: list[dict[str, Any]] | None = None,
    service_ports: list[dict[str, Any]] | None = None,
    secrets: dict[tuple[str, str], Any] | None = None,
    pools: list[vips.Pool] | None = None,
    holders: dict[str, str] | None = None,
) -> cluster_view.ClusterView:
    ports = service_ports if service_ports is not None else [{"name": "http", "port": 80, "protocol": "TCP"}]
    return cluster_view.ClusterView(
        services={("shop", "app"): [cluster_view.service_summary({"ports": ports})]},
        slices={("shop", "app"): slices or []},
        secrets={key: [value] for key, value in (secrets or {}).items()},
        pools=pools if pools is not None else [POOL],
        holders=holders or {},
    )


def _plan(outcome: desired_state.Outcome) -> dict[str, Any]:
    config_map = next(obj for obj in outcome.objects if obj["kind"] == "ConfigMap")
    plan: dict[str, Any] = json.loads(config_map["data"]["plan.json"])
    return plan


def test_a_service_backend_resolves_to_its_ready_endpoints_on_the_target_port() -> None:
    view = _view([_slice(("10.1.0.2", True), ("10.1.0.1", None), ("10.1.0.3", False))])
    outcome = desired_state.reconcile(_document(), view, objects.Settings())
    assert outcome.verdict == "accepted"
    assert outcome.accepted["status"] == "True"
    endpoints = _plan(outcome)["backends"][0]["endpoints"]
    assert endpoints == [
        {"address": "10.1.0.1", "port": 8080, "weight": 1},
        {"address": "10.1.0.2", "port": 8080, "weight": 1},
    ]
    assert outcome.backends == [{"name": "app", "ready": 2, "total": 3}]
    assert outcome.vip == "192.0.2.64"
    assert [obj["kind"] for obj in outcome.objects] == [
        "ServiceAccount",
        "Role",
        "RoleBinding",
        "ConfigMap",
        "ConfigMap",
        "Deployment",
        "Service",  # the VIP Service, through which kube-proxy sends the VIP to the pods
    ]


def test_endpoints_repeated_across_slices_count_once() -> None:
    view = _view(
        [
            _slice(("10.1.0.1", False)),
            _slice(("10.1.0.1", True)),
            _slice(("10.1.0.9", True), port_name="other"),
        ]
    )
    outcome = desired_state.reconcile(_document(), view, objects.Settings())
    assert outcome.backends == [{"name": "app", "ready": 1, "total": 1}]


def test_a_missing_service_is_backend_not_found_and_transient() -> None:
    view = _view()
    view.services = {}
    outcome = desired_state.reconcile(_document(), view, objects.Settings())
    assert (outcome.verdict, outcome.accepted["reason"]) == ("unresolvable", "BackendNotFound")
    assert outcome.transient
    assert (
        outcome.accepted["message"]
        == "spec.backends[0].service.name: Service app not found in namespace shop"
    )
    assert outcome.objects == []
    assert outcome.backends == [{"name": "app", "ready": 0, "total": 0}]
    assert outcome.vip == "192.0.2.64"  # the VIP is held while the backend is missing


def test_a_service_without_the_port_says_which_ports_it_has() -> None:
    view = _view(service_ports=[{"name": "grpc", "port": 9000, "protocol": "TCP"}])
    outcome = desired_state.reconcile(_document(), view, objects.Settings())
    assert (
        outcome.accepted["message"]
        == "spec.backends[0].service.port: Service app has no port 80; its ports: 9000 (grpc)"
    )


def test_an_invalid_spec_is_refused_with_validation_problems_and_is_permanent() -> None:
    document = _document(vip="not-an-ip", replicas=0)
    outcome = desired_state.reconcile(document, _view(), objects.Settings())
    assert (outcome.verdict, outcome.accepted["reason"]) == ("invalid", "InvalidSpec")
    assert not outcome.transient
    assert "spec.replicas: 0 is out of range; must be >= 1" in outcome.accepted["message"]
    assert outcome.objects == []


def test_tls_secrets_missing_or_unusable_have_their_own_reasons() -> None:
    https: dict[str, Any] = {
        "listeners": [{"name": "https", "port": 8443, "protocol": "HTTPS", "tls": {"secretName": "cert"}}],
    }
    missing = desired_state.reconcile(_document(**https), _view(), objects.Settings())
    assert missing.accepted["reason"] == "SecretNotFound"
    broken = _view(secrets={("shop", "cert"): cluster_view.secret_summary("cert", {"tls.crt": "eA=="})})
    assert (
        desired_state.reconcile(_document(**https), broken, objects.Settings()).accepted["reason"]
        == "InvalidCertificate"
    )
    example = next(
        d for d in yaml.safe_load_all((ROOT / "examples/l7-https.yaml").read_text()) if d["kind"] == "Secret"
    )
    data = {key: base64.b64encode(value.encode()).decode() for key, value in example["stringData"].items()}
    good = _view(secrets={("shop", "cert"): cluster_view.secret_summary("cert", data)})
    outcome = desired_state.reconcile(_document(**https), good, objects.Settings())
    assert outcome.verdict == "accepted"
    assert _plan(outcome)["listeners"][0]["certificates"][0]["names"] == ["shop.example.com"]


def test_a_vip_held_elsewhere_is_a_conflict() -> None:
    view = _view(holders={"192.0.2.70": "demo/other"})
    outcome = desired_state.reconcile(_document(vip="192.0.2.70"), view, objects.Settings())
    assert outcome.accepted["reason"] == "VIPConflict"
    assert outcome.vip is None


def test_the_status_reports_vip_counts_and_three_conditions_for_the_generation() -> None:
    outcome = desired_state.reconcile(_document(), _view([_slice(("10.1.0.1", True))]), objects.Settings())
    new = desired_state.status_for({}, outcome, apply_error=None, deployment_status=None, reports={}, now=NOW)
    assert new["vip"] == "192.0.2.64"
    assert new["observedGeneration"] == 2
    assert new["backends"] == [{"name": "app", "ready": 1, "total": 1}]
    kinds = {c["type"]: (c["status"], c["reason"]) for c in new["conditions"]}
    assert kinds == {
        "Accepted": ("True", "Valid"),
        "Programmed": ("True", "Programmed"),
        "Ready": ("False", "Pending"),
    }
    assert all(c["observedGeneration"] == 2 and c["lastTransitionTime"] == NOW for c in new["conditions"])


def test_a_failed_apply_is_not_programmed() -> None:
    outcome = desired_state.reconcile(_document(), _view(), objects.Settings())
    new = desired_state.status_for(
        {}, outcome, apply_error="500: boom", deployment_status=None, reports={}, now=NOW
    )
    programmed = next(c for c in new["conditions"] if c["type"] == status.PROGRAMMED)
    assert (programmed["status"], programmed["reason"], programmed["message"]) == (
        "False",
        "ApplyFailed",
        "500: boom",
    )


def test_an_invalid_spec_keeps_the_last_good_vip_and_counts() -> None:
    previous = {"vip": "192.0.2.99", "backends": [{"name": "app", "ready": 3, "total": 3}], "conditions": []}
    outcome = desired_state.reconcile(_document(replicas=0), _view(), objects.Settings())
    new = desired_state.status_for(
        previous, outcome, apply_error=None, deployment_status=None, reports={}, now=NOW
    )
    assert new["vip"] == "192.0.2.99"
    assert new["backends"] == previous["backends"]
    programmed = next(c for c in new["conditions"] if c["type"] == status.PROGRAMMED)
    assert (programmed["status"], programmed["reason"]) == ("False", "NotAccepted")
