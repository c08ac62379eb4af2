"""The `ipvs` format: a nat, dsr or tunnel Plan as ipvsadm-restore rules, and the IPVS decisions behind
them (forwarding method, scheduler, persistence) that the IPVS kernel engine programs too."""

from __future__ import annotations

from dataclasses import dataclass

from layerlb import api, plan
from layerlb.render import shared

IPVS_ARCHITECTURES = api.ENGINE_ARCHITECTURES[api.Engine.ipvs]

IPVS_FORWARDING = {
    api.Architecture.nat: "-m",
    api.Architecture.dsr: "-g",
    api.Architecture.tunnel: "-i",
}


# Scheduler flags so that a weight-0 server's hashed clients move to another server instead of failing.
IPVS_SCHEDULER_FLAGS: dict[str, str] = {"sh": "sh-fallback", "mh": "mh-fallback"}
# `mh` with `mh-port` hashes the client's address and port (the flow), not the address alone.
MH_FLOW_FLAGS = "mh-fallback,mh-port"
# Architectures whose flows a router may move between nodes (ECMP) with no state following them.
FLOW_HASHED_ARCHITECTURES = (api.Architecture.dsr, api.Architecture.tunnel)


def ipvs_scheduler(backend: plan.Backend) -> str:
    """The IPVS scheduler that balances a backend the way its algorithm promises, as near as IPVS can
    (`nat`; `dsr` and `tunnel` hash every flow instead: `ipvs_schedule`).

    | algorithm          | scheduler | why                                                               |
    |--------------------|-----------|-------------------------------------------------------------------|
    | round-robin        | rr / wrr  | rr when every weight above 0 is equal, else weighted round-robin  |
    | least-connections  | wlc       | weighted least-connections                                        |
    | random-two-choices | wlc       | power of two choices approximates least-connections               |
    | source-hash        | sh        | hash of the source address over the weighted servers              |
    | maglev             | mh        | IPVS' Maglev hashing                                              |
    | ring-hash          | mh        | IPVS has no ring; Maglev is its consistent hash (few remaps too)  |

    IPVS skips servers of weight 0 in every scheduler, so they drain; the hashing schedulers need the
    `-b sh-fallback` / `-b mh-fallback` flag for that (`IPVS_SCHEDULER_FLAGS`), or they keep hashing
    clients to the weight-0 server and refuse them (seen in the QEMU guest).
    """
    algorithm = backend.algorithm
    if algorithm is api.Algorithm.round_robin:
        weights = {endpoint.weight for endpoint in backend.endpoints if endpoint.weight > 0}
        return "rr" if len(weights) <= 1 else "wrr"
    if algorithm in (api.Algorithm.least_connections, api.Algorithm.random_two_choices):
        return "wlc"
    if algorithm is api.Algorithm.source_hash:
        return "sh"
    return "mh"


def ipvs_schedule(p: plan.Plan, backend: plan.Backend) -> tuple[str, str | None]:
    """The scheduler and its `-b` flags for a Plan's backend: per algorithm for `nat`, and for `dsr` and
    `tunnel` always Maglev (`mh`), so that every node sends a flow to the same backend.

    A router spreading the VIP over nodes with ECMP moves established flows to another node whenever a
    node joins or leaves. In `dsr` and `tunnel` the replies bypass the nodes, so no node holds state
    another could take over; the new node must make the same choice from the packet alone. `mh` with
    `mh-port` hashes (client address, client port) — the service fixes protocol, VIP and port, so that
    is the flow — with fixed hash keys through a table built from the real servers and their weights, the
    same on every node that holds the same servers in the same order (the engine keeps that order,
    `diff`). Round-robin and the connection-counting algorithms keep per-node counters that no two nodes
    share, so under `dsr`/`tunnel` they balance by this consistent flow hash instead (as Katran and
    Cilium's Maglev do); weights are honoured. The hashing algorithms (`source-hash`, `ring-hash`,
    `maglev`: their key is the client address, as the API says) and ClientIP affinity (its persistence
    templates live on one node) hash the client address alone (`mh` without `mh-port`): all of a
    client's connections reach one backend, from every node — consistent across nodes all the same.
    """
    if p.architecture not in FLOW_HASHED_ARCHITECTURES:
        scheduler = ipvs_scheduler(backend)
        return scheduler, IPVS_SCHEDULER_FLAGS.get(scheduler)
    by_client = (
        backend.algorithm in api.HASHING_ALGORITHMS or p.session_affinity.type is api.AffinityType.ClientIP
    )
    return "mh", IPVS_SCHEDULER_FLAGS["mh"] if by_client else MH_FLOW_FLAGS


@dataclass(frozen=True)
class IPVSService:
    """What the template needs to write one virtual service and its real servers as ipvsadm-restore lines."""

    comment: str
    service: str
    scheduler: str
    persistence: int | None
    servers: tuple[str, ...]
    flags: str | None = None


def ipvs_services(p: plan.Plan) -> list[IPVSService]:
    """One IPVS virtual service per listener, all forwarding to the serving backend."""
    backend = shared.serving_backend(p)
    method = IPVS_FORWARDING[p.architecture]
    affinity = p.session_affinity
    persistence = affinity.timeout_seconds if affinity.type is api.AffinityType.ClientIP else None
    services = []
    for listener in p.listeners:
        protocol = "-u" if listener.transport == "UDP" else "-t"
        service = f"{protocol} {shared.host_port(p.vip, listener.port)}"
        servers = tuple(
            f"-r {shared.host_port(e.address, e.port or listener.port)} {method} -w {e.weight}"
            for e in backend.endpoints
        )
        scheduler, flags = ipvs_schedule(p, backend)
        consistent = ": Maglev, the same on every node" if scheduler != ipvs_scheduler(backend) else ""
        comment = (
            f"{p.key} listener {listener.name} ({listener.transport} {listener.port}) "
            f"-> backend {backend.name} ({backend.algorithm}{consistent})"
        )
        services.append(IPVSService(comment, service, scheduler, persistence, servers, flags))
    return services


def unsupported(p: plan.Plan) -> str | None:
    """Why the ipvs format cannot render `p` (a message naming the field), or None when it can."""
    return shared.kernel_unsupported(p, "ipvs", api.Engine.ipvs, IPVS_ARCHITECTURES)


def ipvs(p: plan.Plan) -> str:
    """The ipvsadm-restore rules of a nat, dsr or tunnel Plan; call `unsupported` first."""
    return shared.template("ipvs.j2").render(header=shared.header(p), services=ipvs_services(p))
