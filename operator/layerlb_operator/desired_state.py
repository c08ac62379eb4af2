"""One LoadBalancer plus the cluster view in, the objects to apply and the status to write out — pure.

`reconcile` decides acceptance: invalid input (`InvalidSpec`, permanent: nothing to retry until the spec
changes) or a reference that cannot be met yet (`BackendNotFound`, `SecretNotFound`,
`InvalidCertificate`, `VIPConflict`, `NoVIPAvailable`, `NoAdminPortAvailable`: transient, retried and re-triggered by the
watched objects). `status_for` then assembles the status once the caller knows whether the objects
were written. Neither reads the clock, the API server or kopf.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from layerlb import api, plan, plan_contract, resolve, validation
from layerlb.render import formats
from layerlb_operator import admin_ports, objects, status
from layerlb_operator.cluster_view import ClusterView

Verdict = Literal["accepted", "invalid", "unresolvable"]


@dataclass(frozen=True)
class Outcome:
    """What reconciling one LoadBalancer decided."""

    verdict: Verdict
    accepted: dict[str, Any]  # the Accepted condition
    generation: int
    replicas: int = 1
    objects: list[dict[str, Any]] = field(default_factory=list)  # to apply; empty unless accepted
    plan: plan.Plan | None = None
    vip: str | None = None  # the VIP allocated now (None: none could be)
    admin_port: int | None = None  # the node port of host-network forwarding pods (None: pod network)
    backends: list[dict[str, Any]] | None = None  # status.backends; None: keep what the status says
    strict_arp: bool = False  # its forwarding pods make their nodes strict about ARP (status.STRICT_ARP)

    @property
    def transient(self) -> bool:
        """Whether retrying later may succeed without the spec changing."""
        return self.verdict == "unresolvable"


def key_of(document: Mapping[str, Any]) -> str:
    """`namespace/name` of a LoadBalancer document."""
    meta = document.get("metadata") or {}
    return f"{meta.get('namespace') or 'default'}/{meta.get('name')}"


def _essentials(document: Mapping[str, Any]) -> dict[str, Any]:
    """The parts `validate` judges: status and server-set metadata are not the user's input."""
    meta = document.get("metadata") or {}
    return {
        "apiVersion": document.get("apiVersion"),
        "kind": document.get("kind"),
        "metadata": {k: meta[k] for k in ("name", "namespace", "generation") if k in meta},
        "spec": document.get("spec"),
    }


def _backend_counts(resource: api.LoadBalancer, view: ClusterView) -> list[dict[str, Any]]:
    counts = []
    for index, backend in enumerate(resource.spec.backends):
        if backend.service is not None:
            ready, total = view.counts.get(f"spec.backends[{index}].service", (0, 0))
        else:
            # Static endpoints: their health is the data plane's to judge, so all count as ready here.
            ready = total = len(backend.endpoints or [])
        counts.append({"name": backend.name, "ready": ready, "total": total})
    return counts


def reconcile(
    document: Mapping[str, Any],
    view: ClusterView,
    settings: objects.Settings,
    host_admin_port: Callable[[], int | None] | None = None,
) -> Outcome:
    """Validate, resolve and render one LoadBalancer; never raises for bad or unresolvable input.

    `host_admin_port` picks the admin port of host-network forwarding pods (`admin_ports.choose` over
    what is held); without it they get the pod-network port, as for a single LoadBalancer."""
    meta = document.get("metadata") or {}
    generation = int(meta.get("generation") or 0)
    try:
        resource = validation.validate(_essentials(document))
    except validation.Invalid as error:
        message = "; ".join(str(problem) for problem in error.problems)
        return Outcome(
            "invalid",
            status.condition(status.ACCEPTED, False, "InvalidSpec", message, generation),
            generation,
        )
    assert isinstance(resource, api.LoadBalancer)
    replicas = resource.spec.replicas
    admin_port: int | None = None
    try:
        resolved = resolve.resolve(resource, view)
        if objects.privileged(resource.spec):
            admin_port = host_admin_port() if host_admin_port is not None else settings.admin_port
            if admin_port is None:
                ports = admin_ports.describe(settings.host_admin_ports)
                message = (
                    f"every host admin port ({ports}) is held by another host-network LoadBalancer "
                    f"(architectures nat, dsr, tunnel); widen {admin_ports.ENV} or delete one"
                )
                raise resolve.Unresolvable(
                    admin_ports.REASON, [validation.Problem("spec.architecture", message)]
                )
    except resolve.Unresolvable as error:
        message = "; ".join(str(problem) for problem in error.problems)
        accepted = status.condition(status.ACCEPTED, False, error.reason, message, generation)
        return Outcome(
            "unresolvable",
            accepted,
            generation,
            replicas,
            vip=view.allocated,
            backends=_backend_counts(resource, view),
        )
    stored, secrets = plan_contract.without_keys(resolved)
    desired = objects.desired(
        resource,
        str(meta.get("uid", "")),
        formats.dataplane(stored),
        settings,
        admin_port,
        secrets,
        resolved.vip,
    )
    accepted = status.condition(
        status.ACCEPTED, True, "Valid", "the spec is valid and every reference resolves", generation
    )
    return Outcome(
        "accepted",
        accepted,
        generation,
        replicas,
        objects=desired,
        plan=resolved,
        vip=view.allocated,
        admin_port=admin_port,
        backends=_backend_counts(resource, view),
        strict_arp=settings.strict_arp and objects.privileged(resource.spec),
    )


def programmed(outcome: Outcome, error: str | None) -> dict[str, Any]:
    """`Programmed`: the objects of this generation are written (error: why writing failed)."""
    generation = outcome.generation
    if outcome.verdict != "accepted":
        message = "nothing is written until the LoadBalancer is Accepted; running forwarding pods keep their last Plan"
        return status.condition(status.PROGRAMMED, False, "NotAccepted", message, generation)
    if error is not None:
        return status.condition(status.PROGRAMMED, False, "ApplyFailed", error, generation)
    names = ", ".join(
        f"{o['kind']} {o['metadata']['name']}"
        for o in outcome.objects
        if o["kind"] in ("ConfigMap", "Deployment", "Service")
    )
    return status.condition(
        status.PROGRAMMED,
        True,
        "Programmed",
        f"{names} and RBAC written for generation {generation}",
        generation,
    )


def status_for(
    previous: Mapping[str, Any],
    outcome: Outcome,
    *,
    apply_error: str | None,
    deployment_status: Mapping[str, Any] | None,
    reports: Mapping[str, status.PodReport],
    now: str,
    announced: str | None = None,
    needs_announcement: bool = False,
) -> dict[str, Any]:
    """The whole `status` to write; an invalid spec keeps the VIP and counts of the last good one.

    `needs_announcement`: Ready also waits for a speaker to announce the VIP (`announced`: the node)."""
    programmed_condition = programmed(outcome, apply_error)
    ready_condition = status.ready(
        generation=outcome.generation,
        replicas=outcome.replicas,
        programmed=programmed_condition["status"] == "True",
        deployment_status=deployment_status,
        reports=reports,
        announced=announced,
        vip=outcome.vip if needs_announcement else None,
    )
    conditions: Sequence[Mapping[str, Any]] = previous.get("conditions") or []
    invalid = outcome.verdict == "invalid"
    current = [outcome.accepted, programmed_condition, ready_condition]
    strict = status.strict_arp(generation=outcome.generation, reports=reports) if outcome.strict_arp else None
    if strict is not None:
        current.append(strict)
    return {
        "vip": previous.get("vip") if invalid else outcome.vip,
        "observedGeneration": outcome.generation,
        "conditions": status.merge(conditions, current, now),
        "backends": (previous.get("backends") or []) if outcome.backends is None else outcome.backends,
    }
