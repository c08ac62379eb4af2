"""The LoadBalancer's conditions, so that users and `kubectl wait` read one truthful story.

Conditions follow the Kubernetes API conventions: one per type (`Accepted`, `Programmed`, `Ready`, and
`StrictARP` for host-network forwarding pods), each with the generation it describes, and a
`lastTransitionTime` that moves only when its status flips.
Everything here is pure; the caller passes the time.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from layerlb import plan_contract

ACCEPTED = "Accepted"
PROGRAMMED = "Programmed"
READY = "Ready"
TYPES = (ACCEPTED, PROGRAMMED, READY)
# Host-network forwarding pods put the VIP on their node's loopback; the node must then leave ARP for it to
# the speaker (`layerlb_dataplane.kernel.strict_arp`). Only there, and only once a pod has reported.
STRICT_ARP = "StrictARP"

# Status fields another writer owns: the L2 speaker holding the VIP writes `status.announcement` (a merge
# patch of that key only). The operator never writes them (its merge patches name only its own keys, so
# they stay) and never compares them, so a speaker's write never makes the operator write again.
SPEAKER_FIELDS = ("announcement",)

# `Ready` False for a LoadBalancer that serves but whose VIP no speaker announces yet (operators started
# with --ready-needs-announcement: the chart's, when it runs the speakers).
NOT_ANNOUNCED = "NotAnnounced"


@dataclass(frozen=True)
class PodReport:
    """What one forwarding pod says: the Plan generation it serves, whether its readiness passes, and what
    its node lacks though it serves (its warnings, one a line)."""

    generation: int | None
    ready: bool
    warnings: str | None = None


@dataclass(frozen=True)
class PodState:
    """What the operator reads from a forwarding Pod object: whether it runs and passes its readiness."""

    running: bool
    ready: bool


@dataclass(frozen=True)
class Event:
    """A Kubernetes Event to post on the LoadBalancer."""

    type: str  # Normal | Warning
    reason: str
    message: str


def operator_owned(status: Mapping[str, Any]) -> dict[str, Any]:
    """A LoadBalancer's `status` without the fields the speakers write (`SPEAKER_FIELDS`)."""
    return {key: value for key, value in status.items() if key not in SPEAKER_FIELDS}


def condition(kind: str, ok: bool, reason: str, message: str, generation: int) -> dict[str, Any]:
    """One condition without its transition time (see `merge`)."""
    return {
        "type": kind,
        "status": "True" if ok else "False",
        "reason": reason,
        "message": message,
        "observedGeneration": generation,
    }


def pod_state(pod: Mapping[str, Any]) -> PodState:
    """A Pod's phase and Ready condition, as the kubelet (or the e2e pod runner) sets them."""
    pod_status = pod.get("status") or {}
    conditions = pod_status.get("conditions") or []
    ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)
    return PodState(running=pod_status.get("phase") == "Running" or ready, ready=ready)


def _generation(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def reports(pods: Iterable[tuple[str, PodState]], serving: Mapping[str, Any] | None) -> dict[str, PodReport]:
    """Each live forwarding pod's report: its entries in the serving ConfigMap (`layerlb.plan_contract`) with
    its Ready.

    Entries of pods that no longer exist are ignored: a pod's name is never reused by its ReplicaSet.
    """
    served = serving or {}
    return {
        name: PodReport(
            _generation(served.get(name)),
            state.ready,
            served.get(name + plan_contract.WARNINGS_SUFFIX) or None,
        )
        for name, state in pods
    }


def cleanup_pending(pods: Iterable[tuple[str, PodState]], serving: Mapping[str, Any] | None) -> list[str]:
    """The running forwarding pods that have not yet reported the removal of their state (sorted)."""
    served = serving or {}
    return sorted(name for name, state in pods if state.running and served.get(name) != plan_contract.REMOVED)


def ready(
    *,
    generation: int,
    replicas: int,
    programmed: bool,
    deployment_status: Mapping[str, Any] | None,
    reports: Mapping[str, PodReport],
    announced: str | None = None,
    vip: str | None = None,
) -> dict[str, Any]:
    """`Ready`: at least one forwarding pod passes its readiness and serves this generation's Plan, and,
    where the speakers announce VIPs (`vip` given), one of them announces it: the node named in
    `announced` (the speaker's `status.announcement`), else the VIP answers nobody's ARP outside the node
    and "Ready" would be a promise the network does not keep.

    Both the Deployment's `readyReplicas` (the kubelet's view of `/readyz`) and the pods' own reports
    must agree: a ready pod still on the previous generation does not count.
    """
    ready_replicas = int((deployment_status or {}).get("readyReplicas") or 0)
    reporting = sum(1 for r in reports.values() if r.ready and r.generation == generation)
    serving = min(reporting, ready_replicas) if programmed else 0
    message = f"{serving}/{replicas} forwarding pods serve generation {generation}"
    if serving < 1:
        return condition(READY, False, "Pending", message, generation)
    if vip is not None:
        if not announced:
            return condition(
                READY,
                False,
                NOT_ANNOUNCED,
                f"{message}; no node announces {vip} yet (status.announcement: the speakers'; their "
                "Events on this LoadBalancer say why)",
                generation,
            )
        # Not which node: the holder may move (ANNOUNCED BY shows it), and Ready would be rewritten each time.
        message += f"; {vip} announced"
    return condition(READY, True, "Serving", message, generation)


def announced_by(status_: Mapping[str, Any], vip: str | None) -> str | None:
    """The node a speaker says announces `vip` (`status.announcement`), or None."""
    announcement = status_.get("announcement") or {}
    if vip is None or announcement.get("address") != vip or not announcement.get("node"):
        return None
    return str(announcement["node"])


def strict_arp(*, generation: int, reports: Mapping[str, PodReport]) -> dict[str, Any] | None:
    """`StrictARP`: whether the nodes of the (host-network) forwarding pods leave ARP for the VIP to the speaker.

    False (`NodeAnswersARP`, with each pod's warning: what could not be set and what the administrator must
    set) as soon as one live pod reports it could not make its node strict: that node answers ARP for the
    VIP next to the speaker, and clients may flip between MACs. True once a pod has reported and none
    warns. None (no condition) before any pod has reported: nothing is known yet.
    """
    warned = {name: r.warnings for name, r in sorted(reports.items()) if r.warnings}
    if warned:
        message = "; ".join(f"pod {name}: {text}" for name, text in warned.items())
        return condition(STRICT_ARP, False, "NodeAnswersARP", message, generation)
    if any(r.generation is not None for r in reports.values()):
        message = (
            "the forwarding pods' nodes leave ARP for the VIP to the speaker "
            "(arp_ignore=1, arp_announce=2 on their interfaces)"
        )
        return condition(STRICT_ARP, True, "Enforced", message, generation)
    return None


def merge(
    previous: Sequence[Mapping[str, Any]], current: Sequence[Mapping[str, Any]], now: str
) -> list[dict[str, Any]]:
    """`current` with each `lastTransitionTime` kept from `previous` unless the status changed."""
    before = {c.get("type"): c for c in previous}
    merged = []
    for item in current:
        old = before.get(item["type"]) or {}
        kept = old.get("lastTransitionTime") if old.get("status") == item["status"] else None
        merged.append({**item, "lastTransitionTime": kept or now})
    return merged


def transitions(previous: Sequence[Mapping[str, Any]], current: Sequence[Mapping[str, Any]]) -> list[Event]:
    """Events for the conditions whose status or reason changed: Normal when True, Warning when False."""
    before = {c.get("type"): c for c in previous}
    events = []
    for item in current:
        old = before.get(item["type"])
        if old is not None and (old.get("status"), old.get("reason")) == (item["status"], item["reason"]):
            continue
        ok = item["status"] == "True"
        events.append(
            Event(
                "Normal" if ok else "Warning",
                item["reason"],
                f"{item['type']}={item['status']}: {item['message']}",
            )
        )
    return events


def status_of(conditions: Sequence[Mapping[str, Any]], kind: str) -> str:
    """The status ("True", "False", "Unknown") of one condition type."""
    return next((str(c.get("status")) for c in conditions if c.get("type") == kind), "Unknown")


def reason_of(conditions: Sequence[Mapping[str, Any]], kind: str) -> str:
    """The reason of one condition type, or "" when absent."""
    return next((str(c.get("reason", "")) for c in conditions if c.get("type") == kind), "")
