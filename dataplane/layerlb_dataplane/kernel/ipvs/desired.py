"""The IPVS table a Plan should give: what `layerlb.render.ipvs_rules` renders for it, with the targets' health.

The engine programs exactly what `layerlb.render.ipvs_rules` renders for the Plan (format `ipvs`): it takes
`ipvs_rules.ipvs_services(plan)` — one virtual service per listener (TCP `-t`, UDP `-u`), the scheduler
from `ipvs_rules.ipvs_scheduler`, persistence (`-p`) for ClientIP affinity, real servers with their weights
and `-m` (nat), `-g` (dsr) or `-i` (tunnel) — and changes two things only. The weight of a real server
whose target is not usable (health down) becomes 0: IPVS schedules no new connection to a server of
weight 0 and keeps forwarding the ones it has. And the hashing schedulers get their fallback flag
(`-b sh-fallback`, `-b mh-fallback`): without it, `sh` and `mh` keep hashing clients to a server of
weight 0 and then find no destination, so the clients of a down or draining server are refused instead
of moved (checked in the guest); with it they go to the next available server. (The render carries the flag: `ipvs_rules.IPVS_SCHEDULER_FLAGS`.)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from layerlb import plan as plan_model
from layerlb.render import ipvs_rules, shared
from layerlb_dataplane.core.targets import Target
from layerlb_dataplane.kernel.ipvs import table


def services(
    plan: plan_model.Plan, targets: Mapping[str, Sequence[Target]]
) -> dict[table.ServiceKey, table.VirtualService]:
    """The virtual services `plan` renders to, with weight 0 for real servers whose target is not usable
    (and the fallback flag of a hashing scheduler).

    A target marked `draining` is left out (it drains like an endpoint gone from the Plan).
    """
    reason = ipvs_rules.unsupported(plan)
    if reason is not None:
        raise ValueError(reason)
    backend = shared.serving_backend(plan)
    given = {(t.address, t.port): t for t in targets.get(backend.name, ())}
    found = [given.get((e.address, e.port)) for e in backend.endpoints]
    kept = [target is None or not target.draining for target in found]
    usable = [target is None or target.usable for target in found]
    # Listeners repeat the same real servers: one (never mutated) object per line and verdict.
    made: dict[tuple[str, bool], table.RealServer] = {}
    services: dict[table.ServiceKey, table.VirtualService] = {}
    for rendered in ipvs_rules.ipvs_services(plan):
        key = table.parse_service_option(rendered.service)
        service = table.VirtualService(key, rendered.scheduler, rendered.persistence, rendered.flags)
        for text, keep, up in zip(rendered.servers, kept, usable, strict=True):
            if not keep:
                continue
            server = made.get((text, up))
            if server is None:
                server = made[(text, up)] = table.parse_server_option(text)
                if not up:
                    server.weight = 0
            service.servers[server.key] = server
        services[key] = service
    return services


def verdicts(plan: plan_model.Plan, targets: Mapping[str, Sequence[Target]]) -> tuple[str, ...]:
    """What `desired` reads of the targets, endpoint by endpoint: equal verdicts, equal desired state."""
    backend = shared.serving_backend(plan)
    given = {(t.address, t.port): t for t in targets.get(backend.name, ())}
    return tuple(_verdict(given.get((e.address, e.port))) for e in backend.endpoints)


def _verdict(target: Target | None) -> str:
    if target is None:
        return "absent"
    if target.draining:
        return "draining"
    return "usable" if target.usable else "unusable"
