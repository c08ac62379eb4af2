"""Strict ARP from the operator's side: host-network forwarding pods are told to enforce it, and what they
report about their nodes becomes the LoadBalancer's `StrictARP` condition (and its Warning Event)."""

from __future__ import annotations

from typing import Any

from layerlb_dataplane.kernel import strict_arp
from layerlb_operator import desired_state, objects, status

from layerlb import plan_contract
from tests.operator.test_desired_state import NOW, _document, _slice, _view

NAT: dict[str, Any] = {
    "mode": "L4",
    "architecture": "nat",
    "engine": "nftables",
    "replicas": 2,
    "listeners": [{"name": "tcp", "port": 8080, "protocol": "TCP"}],
}
WARNING = "this node answers ARP for its loopback VIPs on eth0 next to the L2 speaker (...)"


def _env(outcome: desired_state.Outcome) -> dict[str, Any]:
    [deployment] = [o for o in outcome.objects if o["kind"] == "Deployment"]
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e.get("value") for e in container["env"]}


def _outcome(settings: objects.Settings | None = None, **spec: Any) -> desired_state.Outcome:
    view = _view([_slice(("10.1.0.1", True))])
    return desired_state.reconcile(_document(**spec), view, settings or objects.Settings())


def _strict(outcome: desired_state.Outcome, reports: dict[str, status.PodReport]) -> dict[str, Any] | None:
    new = desired_state.status_for(
        {}, outcome, apply_error=None, deployment_status=None, reports=reports, now=NOW
    )
    return next((c for c in new["conditions"] if c["type"] == status.STRICT_ARP), None)


def test_host_network_forwarding_pods_are_told_to_enforce_strict_arp() -> None:
    assert _env(_outcome(**NAT))[strict_arp.ENV] == "1"
    assert strict_arp.ENV not in _env(_outcome())  # a pod-network proxy puts nothing on the node
    assert strict_arp.ENV not in _env(_outcome(objects.Settings(strict_arp=False), **NAT))


def test_the_operator_setting_comes_from_its_environment() -> None:
    assert objects.Settings.from_environment({}).strict_arp
    assert not objects.Settings.from_environment({objects.STRICT_ARP_ENV: "false"}).strict_arp
    assert not objects.Settings.from_environment({objects.STRICT_ARP_ENV: "0"}).strict_arp
    assert objects.STRICT_ARP_ENV == strict_arp.ENV


def test_a_pods_warning_makes_strict_arp_false_with_its_words_and_a_warning_event() -> None:
    outcome = _outcome(**NAT)
    reports = {"web-a": status.PodReport(2, True), "web-b": status.PodReport(2, True, WARNING)}
    condition = _strict(outcome, reports)
    assert condition is not None
    assert (condition["status"], condition["reason"]) == ("False", "NodeAnswersARP")
    assert condition["message"] == f"pod web-b: {WARNING}"
    [event] = status.transitions([], [condition])
    assert (event.type, event.reason) == ("Warning", "NodeAnswersARP")


def test_strict_arp_is_true_once_pods_report_without_warnings_and_absent_before() -> None:
    outcome = _outcome(**NAT)
    assert _strict(outcome, {}) is None
    assert _strict(outcome, {"web-a": status.PodReport(None, False)}) is None
    condition = _strict(outcome, {"web-a": status.PodReport(2, True)})
    assert condition is not None and (condition["status"], condition["reason"]) == ("True", "Enforced")


def test_no_strict_arp_condition_where_no_pod_puts_the_vip_on_a_node() -> None:
    reports = {"web-a": status.PodReport(2, True, WARNING)}
    assert _strict(_outcome(), reports) is None
    assert _strict(_outcome(objects.Settings(strict_arp=False), **NAT), reports) is None


def test_reports_read_the_pods_warnings_key_the_data_plane_writes() -> None:
    served = {"web-a": "2", "web-a" + plan_contract.WARNINGS_SUFFIX: WARNING, "web-b": "2"}
    pods = [("web-a", status.PodState(True, True)), ("web-b", status.PodState(True, True))]
    assert status.reports(pods, served) == {
        "web-a": status.PodReport(2, True, WARNING),
        "web-b": status.PodReport(2, True, None),
    }
    assert status.cleanup_pending(pods, served) == ["web-a", "web-b"]
