"""Conditions follow the API conventions: transition times move only on flips, Ready needs a serving pod."""

from __future__ import annotations

from layerlb_operator import status

T0, T1 = "2026-01-01T00:00:00Z", "2026-01-01T00:05:00Z"


def _accepted(ok: bool, reason: str, message: str = "", generation: int = 1) -> dict[str, object]:
    return status.condition(status.ACCEPTED, ok, reason, message, generation)


def test_a_new_condition_gets_the_current_time() -> None:
    merged = status.merge([], [_accepted(True, "Valid")], T0)
    assert merged[0]["lastTransitionTime"] == T0


def test_the_transition_time_stays_while_the_status_stays_even_if_reason_or_message_change() -> None:
    before = status.merge([], [_accepted(False, "BackendNotFound", "Service a")], T0)
    after = status.merge(before, [_accepted(False, "SecretNotFound", "Secret b", generation=2)], T1)
    assert after[0]["lastTransitionTime"] == T0
    assert (after[0]["reason"], after[0]["message"], after[0]["observedGeneration"]) == (
        "SecretNotFound",
        "Secret b",
        2,
    )


def test_the_transition_time_moves_when_the_status_flips() -> None:
    before = status.merge([], [_accepted(False, "BackendNotFound")], T0)
    assert status.merge(before, [_accepted(True, "Valid")], T1)[0]["lastTransitionTime"] == T1


def test_ready_is_pending_without_forwarding_pods() -> None:
    ready = status.ready(generation=4, replicas=2, programmed=True, deployment_status=None, reports={})
    assert (ready["status"], ready["reason"]) == ("False", "Pending")
    assert ready["message"] == "0/2 forwarding pods serve generation 4"
    assert ready["observedGeneration"] == 4


def test_ready_pods_that_do_not_report_this_generation_do_not_count() -> None:
    reports = {
        "p1": status.PodReport(generation=3, ready=True),
        "p2": status.PodReport(generation=None, ready=True),
    }
    ready = status.ready(
        generation=4, replicas=2, programmed=True, deployment_status={"readyReplicas": 2}, reports=reports
    )
    assert ready["status"] == "False"


def test_one_ready_pod_serving_this_generation_makes_the_load_balancer_ready() -> None:
    reports = {
        "p1": status.PodReport(generation=4, ready=True),
        "p2": status.PodReport(generation=4, ready=False),
    }
    ready = status.ready(
        generation=4, replicas=2, programmed=True, deployment_status={"readyReplicas": 1}, reports=reports
    )
    assert (ready["status"], ready["reason"], ready["message"]) == (
        "True", "Serving", "1/2 forwarding pods serve generation 4",
    )  # fmt: skip


def test_the_deployment_must_agree_that_pods_are_ready() -> None:
    reports = {"p1": status.PodReport(generation=4, ready=True)}
    ready = status.ready(generation=4, replicas=1, programmed=True, deployment_status={}, reports=reports)
    assert ready["status"] == "False"


def test_nothing_is_ready_before_it_is_programmed() -> None:
    reports = {"p1": status.PodReport(generation=4, ready=True)}
    ready = status.ready(
        generation=4, replicas=1, programmed=False, deployment_status={"readyReplicas": 1}, reports=reports
    )
    assert ready["status"] == "False"


def test_a_pod_runs_and_is_ready_by_its_phase_and_ready_condition() -> None:
    ready = {"status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}}
    assert status.pod_state(ready) == status.PodState(running=True, ready=True)
    starting = {"status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "False"}]}}
    assert status.pod_state(starting) == status.PodState(running=True, ready=False)
    assert status.pod_state({"status": {"phase": "Pending"}}) == status.PodState(running=False, ready=False)


def test_reports_join_the_live_pods_with_their_entries_in_the_serving_configmap() -> None:
    pods = [
        ("p1", status.PodState(True, True)),
        ("p2", status.PodState(True, False)),
        ("p3", status.PodState(True, True)),
    ]
    serving = {"p1": "7", "p2": "6", "p3": "removed", "gone": "7"}  # "gone": a pod that no longer exists
    assert status.reports(pods, serving) == {
        "p1": status.PodReport(7, True),
        "p2": status.PodReport(6, False),
        "p3": status.PodReport(None, True),
    }
    assert status.reports(pods[:1], None) == {"p1": status.PodReport(None, True)}


def test_cleanup_waits_only_for_running_pods_that_have_not_reported_removed() -> None:
    pods = [
        ("b", status.PodState(running=True, ready=True)),
        ("a", status.PodState(running=True, ready=False)),
        ("pending", status.PodState(running=False, ready=False)),
        ("done", status.PodState(running=True, ready=True)),
    ]
    assert status.cleanup_pending(pods, {"done": "removed", "b": "7"}) == ["a", "b"]
    assert status.cleanup_pending(pods, {"a": "removed", "b": "removed", "done": "removed"}) == []
    assert status.cleanup_pending([], None) == []


def test_events_are_posted_for_changed_conditions_only() -> None:
    before = [_accepted(False, "BackendNotFound", "Service a")]
    assert status.transitions(before, [_accepted(False, "BackendNotFound", "Service a again")]) == []
    events = status.transitions(before, [_accepted(True, "Valid", "ok")])
    assert events == [status.Event("Normal", "Valid", "Accepted=True: ok")]
    warning = status.transitions([], [_accepted(False, "VIPConflict", "taken")])
    assert warning == [status.Event("Warning", "VIPConflict", "Accepted=False: taken")]


def test_where_speakers_announce_ready_also_waits_for_the_vips_announcement() -> None:
    reports = {"p1": status.PodReport(generation=4, ready=True)}
    serving = {"generation": 4, "replicas": 1, "programmed": True, "deployment_status": {"readyReplicas": 1}}
    waiting = status.ready(**serving, reports=reports, vip="192.0.2.7")  # type: ignore[arg-type]
    assert (waiting["status"], waiting["reason"]) == ("False", "NotAnnounced")
    assert waiting["message"].startswith(
        "1/1 forwarding pods serve generation 4; no node announces 192.0.2.7"
    )
    done = status.ready(**serving, reports=reports, vip="192.0.2.7", announced="node-2")  # type: ignore[arg-type]
    assert (done["status"], done["reason"], done["message"]) == (
        "True", "Serving", "1/1 forwarding pods serve generation 4; 192.0.2.7 announced",
    )  # fmt: skip
    pending = status.ready(**{**serving, "programmed": False}, reports=reports, vip="192.0.2.7")  # type: ignore[arg-type]
    assert pending["reason"] == "Pending"  # not serving comes first: no announcement makes it Ready


def test_an_announcement_counts_only_for_the_current_vip() -> None:
    announcement = {"announcement": {"address": "192.0.2.7", "node": "node-2", "protocol": "L2"}}
    assert status.announced_by(announcement, "192.0.2.7") == "node-2"
    assert status.announced_by(announcement, "192.0.2.8") is None  # a VIP changed: the old one's holder
    assert status.announced_by({}, "192.0.2.7") is None
    assert status.announced_by(announcement, None) is None
