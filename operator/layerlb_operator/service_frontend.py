"""Services of type LoadBalancer as a front end: which ones layerlb serves, what each asks for, the
addresses it gets and the status it shows — pure (no kopf, no API server, no clock).

The decisions, also in the README ("Services of type LoadBalancer"):

- **Class.** A Service is served when `spec.type` is `LoadBalancer` and `spec.loadBalancerClass` is
  `layerlb.dev/loadbalancer`, or is absent and the operator serves classless Services
  (`--serve-classless-services`, `LAYERLB_SERVE_CLASSLESS_SERVICES`, the chart's
  `services.serveClassless`; off by default, since a cluster may run another implementation for them).
  A Service of another class is never touched.
- **One address per IP family**, in the order of `spec.ipFamilies` (the families of the Service's cluster
  IPs: the only ones kube-proxy can forward). `SingleStack` → the first family; `PreferDualStack` →
  every family that a pool the Service may use has addresses of (at least the first); `RequireDualStack`
  → both, or a refusal naming the missing family.
- **A specific address** per family by the annotation `layerlb.dev/addresses: "192.0.2.10,2001:db8::10"`.
  `spec.loadBalancerIP` (deprecated upstream since Kubernetes 1.24) is honoured when the annotation is
  absent, with a Warning Event saying to use the annotation. Unlike a LoadBalancer's `spec.vip`, a
  Service's address must lie in a VIPPool that the Service may use (one serving its namespace; the
  named one when it names one): a Service is usually written by someone who does not own the network.
- **The pool** by the annotation `layerlb.dev/vip-pool: NAME` (which must serve the namespace), else the
  `autoAssign` pools serving the namespace, by name. An address once assigned is kept while it stays
  eligible, so it never moves under running traffic; a failed request releases it (the status shows no
  address the Service does not hold).
- **Forwarding.** By default none of layerlb's forwarding pods: the address is announced and the
  cluster's own kube-proxy forwards it to the endpoints (`ipMode: VIP`), as with MetalLB: no extra hop,
  `externalTrafficPolicy` honoured by kube-proxy, and any Service works. The annotation
  `layerlb.dev/architecture: nat|dsr|tunnel|proxy` asks for layerlb's own forwarding instead: a
  LoadBalancer derived from the Service (`service_loadbalancer`: its name, spec, refusals, and how its
  status reads here), with `ipMode: Proxy` for `proxy`. The annotation is judged on its own condition
  (`layerlb.dev/ArchitectureAccepted`) while the address stays: a typo or a Service the derived
  LoadBalancer cannot serve is refused there and kube-proxy keeps forwarding, so the address never
  lacks a forwarder.

Refusals carry a reason, the field path (or annotation), the offending value and what would be valid.
Permanent ones (`InvalidAddresses`, `AddressFamilyMismatch`, `InvalidArchitecture`) wait for the
Service to change; the others (`AddressInUse`, `AddressNotInPool`, `PoolNotFound`, `PoolNotAllowed`,
`NoVIPPool`, `PoolExhausted`) may also be cured by a VIPPool change or a released address, which
re-trigger the Service.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from layerlb.resolve import Unresolvable
from layerlb.validation import Problem
from layerlb_operator import objects, service_loadbalancer, status, vips

CLASS: Final = objects.SERVICE_CLASS
FINALIZER: Final = "layerlb.dev/service"
ADDRESSES_ANNOTATION: Final = "layerlb.dev/addresses"
POOL_ANNOTATION: Final = "layerlb.dev/vip-pool"
ARCHITECTURE_ANNOTATION: Final = service_loadbalancer.ARCHITECTURE_ANNOTATION
ARCHITECTURES: Final = service_loadbalancer.ARCHITECTURES
ADDRESS_ASSIGNED: Final = "layerlb.dev/AddressAssigned"
ARCHITECTURE_ACCEPTED: Final = "layerlb.dev/ArchitectureAccepted"
LOADBALANCER_READY: Final = service_loadbalancer.LOADBALANCER_READY
CONDITION_TYPES: Final = (ADDRESS_ASSIGNED, ARCHITECTURE_ACCEPTED, LOADBALANCER_READY)
PERMANENT: Final = frozenset({"InvalidAddresses", "AddressFamilyMismatch", "InvalidArchitecture"})

FAMILIES: Final = {"IPv4": 4, "IPv6": 6}
ADDRESSES_PATH: Final = f"metadata.annotations[{ADDRESSES_ANNOTATION}]"
POOL_PATH: Final = f"metadata.annotations[{POOL_ANNOTATION}]"
ARCHITECTURE_PATH: Final = service_loadbalancer.ARCHITECTURE_PATH
LOAD_BALANCER_IP_PATH: Final = "spec.loadBalancerIP"

Address = vips.Address


def family_name(version: int) -> str:
    """`IPv4` or `IPv6`, as `spec.ipFamilies` spells them."""
    return f"IPv{version}"


def owner_of(namespace: str, name: str) -> str:
    """The Service's name in the VIP ledger, distinct from any LoadBalancer's (`namespace/name`)."""
    return f"{vips.SERVICE_OWNER}{namespace}/{name}"


def key_of(service: Mapping[str, Any]) -> tuple[str, str]:
    """(namespace, name) of a Service document."""
    meta = service.get("metadata") or {}
    return str(meta.get("namespace") or "default"), str(meta.get("name"))


def is_load_balancer(service: Mapping[str, Any]) -> bool:
    """Whether the Service is of type LoadBalancer with layerlb's class or no class (one layerlb may serve)."""
    spec = service.get("spec") or {}
    return spec.get("type") == "LoadBalancer" and spec.get("loadBalancerClass") in (None, CLASS)


def load_balancers_own(service: Mapping[str, Any]) -> bool:
    """Whether a LoadBalancer controls the Service: its VIP Service (`objects.vip_service`), whose address
    and status the LoadBalancer's reconciler writes; the front end leaves it alone."""
    owners = (service.get("metadata") or {}).get("ownerReferences") or []
    return any(
        o.get("kind") == "LoadBalancer"
        and o.get("controller")
        and str(o.get("apiVersion", "")).startswith("layerlb.dev/")
        for o in owners
    )


def served(service: Mapping[str, Any], serve_classless: bool) -> bool:
    """Whether layerlb serves this Service now (a Service being deleted is no longer served, nor one a
    LoadBalancer controls)."""
    spec = service.get("spec") or {}
    if (service.get("metadata") or {}).get("deletionTimestamp") or load_balancers_own(service):
        return False
    if spec.get("type") != "LoadBalancer":
        return False
    cls = spec.get("loadBalancerClass")
    return cls == CLASS or (cls is None and serve_classless)


# The speakers' conditions on a Service: `layerlb.dev/AnnouncedIPv4|6`, who announces each address
# (speaker/layerlb_speaker/statuses.py; tests/test_speaker_statuses_contract.py keeps the two in step).
SPEAKER_CONDITION_PREFIX: Final = "layerlb.dev/Announced"


def speaker_conditions(service: Mapping[str, Any]) -> list[str]:
    """The types of the speakers' conditions the Service carries."""
    conditions = (service.get("status") or {}).get("conditions") or []
    return [str(c["type"]) for c in conditions if str(c.get("type", "")).startswith(SPEAKER_CONDITION_PREFIX)]


def has_finalizer(service: Mapping[str, Any]) -> bool:
    """Whether the Service carries layerlb's finalizer, i.e. layerlb served it and has not released it."""
    return FINALIZER in ((service.get("metadata") or {}).get("finalizers") or [])


def ingress_addresses(service: Mapping[str, Any]) -> tuple[str, ...]:
    """The `ip`s of `status.loadBalancer.ingress`, in order."""
    ingress = ((service.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []
    return tuple(str(item["ip"]) for item in ingress if isinstance(item, dict) and item.get("ip"))


def ledger_entry(service: Mapping[str, Any], serve_classless: bool) -> tuple[str, ...]:
    """What the Service holds in the VIP ledger: its ingress addresses when layerlb serves it or has not
    released it yet (its finalizer), else nothing (another implementation's addresses are not ours)."""
    if served(service, serve_classless) or has_finalizer(service):
        return ingress_addresses(service)
    return ()


@dataclass(frozen=True)
class Request:
    """What a Service asks for, parsed and checked on its own (without the pools)."""

    owner: str
    namespace: str
    families: tuple[int, ...]  # IP versions, in spec.ipFamilies order
    policy: str  # SingleStack | PreferDualStack | RequireDualStack
    requested: Mapping[int, str] = field(default_factory=dict)  # IP version → the address asked for
    requested_path: str = ADDRESSES_PATH  # where the requested addresses were written
    pool: str | None = None
    current: tuple[str, ...] = ()  # the addresses in its status now


def _refuse(reason: str, path: str, message: str) -> Unresolvable:
    return Unresolvable(reason, [Problem(path, message)])


def _requested(text: str, path: str, families: Sequence[int]) -> dict[int, str]:
    expected = "a comma-separated list of IP addresses, at most one per family, e.g. 192.0.2.10,2001:db8::10"
    found: dict[int, str] = {}
    allowed = ", ".join(family_name(v) for v in families)
    for item in (part.strip() for part in text.split(",")):
        try:
            address = ipaddress.ip_address(item)
        except ValueError:
            raise _refuse(
                "InvalidAddresses", path, f"{item!r} is not an IP address; expected {expected}"
            ) from None
        if address.version in found:
            raise _refuse(
                "InvalidAddresses",
                path,
                f"{found[address.version]} and {address} are both {family_name(address.version)}; expected {expected}",
            )
        if address.version not in families:
            raise _refuse(
                "AddressFamilyMismatch",
                path,
                f"{address} is {family_name(address.version)} but the Service's spec.ipFamilies is "
                f"[{allowed}]; give an address of {allowed}, or make the Service dual-stack "
                "(spec.ipFamilyPolicy: PreferDualStack)",
            )
        found[address.version] = str(address)
    return found


def request_of(service: Mapping[str, Any]) -> Request:
    """The Service's request; raises `Unresolvable` (InvalidAddresses, AddressFamilyMismatch) for bad input."""
    namespace, name = key_of(service)
    meta = service.get("metadata") or {}
    spec = service.get("spec") or {}
    annotations = meta.get("annotations") or {}
    families = tuple(FAMILIES[f] for f in spec.get("ipFamilies") or [] if f in FAMILIES) or (4,)
    policy = str(spec.get("ipFamilyPolicy") or "SingleStack")
    text = annotations.get(ADDRESSES_ANNOTATION)
    path = ADDRESSES_PATH
    if text is None and spec.get("loadBalancerIP"):
        text, path = str(spec["loadBalancerIP"]), LOAD_BALANCER_IP_PATH
    requested = _requested(str(text), path, families) if text is not None and str(text).strip() else {}
    if text is not None and not requested:
        raise _refuse(
            "InvalidAddresses",
            path,
            "is empty; give one address per family (192.0.2.10,2001:db8::10) or remove it",
        )
    pool = annotations.get(POOL_ANNOTATION)
    return Request(
        owner=owner_of(namespace, name),
        namespace=namespace,
        families=families,
        policy=policy,
        requested=requested,
        requested_path=path,
        pool=str(pool) if pool is not None else None,
        current=ingress_addresses(service),
    )


def architecture_of(service: Mapping[str, Any]) -> str | None:
    """The architecture the annotation asks for (None: kube-proxy forwards); `Unresolvable` when unknown."""
    value = ((service.get("metadata") or {}).get("annotations") or {}).get(ARCHITECTURE_ANNOTATION)
    if value is None:
        return None
    if value not in ARCHITECTURES:
        raise _refuse(
            "InvalidArchitecture",
            ARCHITECTURE_PATH,
            f"{value!r} is not an architecture; valid: {', '.join(ARCHITECTURES)} "
            "(or no annotation: the cluster's kube-proxy forwards the address)",
        )
    return str(value)


@dataclass(frozen=True)
class Assignment:
    """The addresses a Service gets, one per family in `spec.ipFamilies` order, and their pools."""

    addresses: tuple[str, ...]
    pools: tuple[str, ...]

    def describe(self) -> str:
        """`192.0.2.10 (VIPPool public), 2001:db8::10 (VIPPool public6)`."""
        return ", ".join(f"{a} (VIPPool {p})" for a, p in zip(self.addresses, self.pools, strict=True))


def describe_pool(pool: vips.Pool) -> str:
    """`public (192.0.2.0-192.0.2.15)`: a pool and its addresses, for messages."""
    blocks = ", ".join(f"{block.first}-{block.at(block.size - 1)}" for block in pool.blocks)
    return f"{pool.name} ({blocks})"


def _may_use(request: Request, pools: Sequence[vips.Pool], broken: Mapping[str, str]) -> list[vips.Pool]:
    """The pools a requested address may come from: the named one, else every pool serving the namespace."""
    serving = [pool for pool in pools if pool.serves(request.namespace)]
    if request.pool is None:
        return serving
    named = [pool for pool in pools if pool.name == request.pool]
    if not named:
        why = f" ({broken[request.pool]})" if request.pool in broken else ""
        choices = ", ".join(pool.name for pool in serving) or "none"
        raise _refuse(
            "PoolNotFound",
            POOL_PATH,
            f"VIPPool {request.pool!r} not found{why}; VIPPools serving namespace {request.namespace}: {choices}",
        )
    if not named[0].serves(request.namespace):
        choices = ", ".join(pool.name for pool in serving) or "none"
        raise _refuse(
            "PoolNotAllowed",
            POOL_PATH,
            f"VIPPool {request.pool!r} does not serve namespace {request.namespace}; "
            f"VIPPools serving it: {choices}",
        )
    return named


def _families(request: Request, automatic: Sequence[vips.Pool]) -> tuple[int, ...]:
    if request.policy == "RequireDualStack" and len(request.families) > 1:
        return request.families
    if request.policy == "PreferDualStack" and len(request.families) > 1:
        possible = tuple(
            version
            for version in request.families
            if version in request.requested or any(version in pool.versions() for pool in automatic)
        )
        return possible or request.families[:1]
    return request.families[:1]


def assign(
    request: Request,
    pools: Sequence[vips.Pool],
    holders: Mapping[str, str],
    broken_pools: Mapping[str, str] | None = None,
) -> Assignment:
    """The addresses for the Service, or `Unresolvable` saying which request cannot be met and why.

    `holders` maps every held address to its owner (LoadBalancers and Services alike, see
    `vips.Ledger`); this Service's own entries are ignored, so it keeps what it holds.
    """
    ordered = sorted(pools, key=lambda pool: pool.name)
    may_use = _may_use(request, ordered, broken_pools or {})
    automatic = may_use if request.pool is not None else [pool for pool in may_use if pool.auto_assign]
    taken = {address for address, holder in holders.items() if holder != request.owner}
    addresses: list[str] = []
    chosen: list[str] = []
    for version in _families(request, automatic):
        wanted = request.requested.get(version)
        if wanted is not None:
            address = ipaddress.ip_address(wanted)
            if wanted in taken:
                raise _refuse(
                    "AddressInUse",
                    request.requested_path,
                    f"{wanted} is already held by {vips.describe_holder(holders[wanted])}; "
                    "ask for another address, or none to get a free one",
                )
            covering = [pool for pool in may_use if address in pool]
            if not covering:
                usable = "; ".join(describe_pool(pool) for pool in may_use) or "none"
                raise _refuse(
                    "AddressNotInPool",
                    request.requested_path,
                    f"{wanted} is in no VIPPool the Service may use (VIPPools "
                    + (f"named by {POOL_PATH}" if request.pool else f"serving namespace {request.namespace}")
                    + f": {usable})",
                )
            addresses.append(wanted)
            chosen.append(covering[0].name)
            continue
        found = _automatic(request, version, automatic, taken)
        addresses.append(found[0])
        chosen.append(found[1])
    return Assignment(tuple(addresses), tuple(chosen))


def _automatic(
    request: Request, version: int, automatic: Sequence[vips.Pool], taken: set[str]
) -> tuple[str, str]:
    """(address, pool) of `version` for the Service: its current one while eligible, else the first free."""
    family = family_name(version)
    candidates = [pool for pool in automatic if version in pool.versions()]
    if not candidates:
        if request.pool is not None:
            raise _refuse(
                "PoolExhausted" if automatic else "NoVIPPool",
                POOL_PATH,
                f"VIPPool {request.pool!r} has no {family} addresses, and the Service needs one "
                f"(spec.ipFamilies, spec.ipFamilyPolicy {request.policy})",
            )
        raise _refuse(
            "NoVIPPool",
            "spec.ipFamilies",
            f"no VIPPool with autoAssign and {family} addresses serves namespace {request.namespace} "
            f"(spec.ipFamilyPolicy {request.policy}); create one, name one in {POOL_PATH}, or ask for an "
            f"address in {ADDRESSES_PATH}",
        )
    for text in request.current:
        kept = _parse(text)
        if kept is None or kept.version != version or str(kept) in taken:
            continue
        for pool in candidates:
            if kept in pool:
                return str(kept), pool.name
    for pool in candidates:
        free = vips.first_free(pool, taken, version)
        if free is not None:
            return free, pool.name
    names = ", ".join(pool.name for pool in candidates)
    total = sum(pool.size_of(version) for pool in candidates)
    raise _refuse(
        "PoolExhausted",
        POOL_PATH if request.pool is not None else "spec.ipFamilies",
        f"no free {family} address in VIPPool(s) {names}: all {total} are in use",
    )


# kube-proxy (and layerlb's kernel architectures) forward with the address as the packets' destination:
# `VIP`. A proxy that terminates the connection (layerlb's `proxy`) is `Proxy`: see
# `service_loadbalancer.ip_mode`.
IP_MODE: Final = "VIP"


def ingress(addresses: Sequence[str], ip_mode: str = IP_MODE) -> list[dict[str, str]]:
    """`status.loadBalancer.ingress`: one entry per address."""
    return [{"ip": address, "ipMode": ip_mode} for address in addresses]


KUBE_PROXY = (
    "the cluster's kube-proxy forwards the address to the endpoints (ipMode VIP); no layerlb forwarding pods"
)


@dataclass(frozen=True)
class Forwarding:
    """Who forwards the Service's address: the `ArchitectureAccepted` condition (and the derived
    LoadBalancer's `Ready` reflected), the ipMode, and what to do with the derived LoadBalancer."""

    accepted: dict[str, Any]
    ip_mode: str = IP_MODE
    ready: dict[str, Any] | None = None  # layerlb.dev/LoadBalancerReady
    loadbalancer: dict[str, Any] | None = None  # the derived LoadBalancer to apply (None: there is none)
    remove: bool = False  # delete the stored derived LoadBalancer (one this Service controls)


def forwarding(
    service: Mapping[str, Any],
    addresses: Sequence[str],
    derived: Mapping[str, Any] | None,
    generation: int = 0,
) -> Forwarding:
    """Who forwards the Service: kube-proxy, or layerlb's pods through the derived LoadBalancer.

    `derived` is the stored LoadBalancer with the derived name, whoever owns it. Without the annotation
    `ArchitectureAccepted` is True `KubeProxy`; an unknown value is `InvalidArchitecture`; a valid one
    gets the derived LoadBalancer once the Service has its address, or a refusal saying why it cannot
    (see `service_loadbalancer`). Whenever there is no derived LoadBalancer, kube-proxy forwards the
    address (`ipMode: VIP`) and a derived one this Service controls is removed; one it does not control
    is the user's (`NameInUse`) and never touched.
    """
    ours = derived is not None and service_loadbalancer.controlled_by(derived, service)
    meta = service.get("metadata") or {}
    name = service_loadbalancer.name_of(str(meta.get("name")))
    where = f"LoadBalancer {meta.get('namespace') or 'default'}/{name}"

    def kube_proxy(ok: bool, reason: str, message: str) -> Forwarding:
        accepted = _condition(ARCHITECTURE_ACCEPTED, ok, reason, message, generation)
        return Forwarding(accepted, remove=ours)

    try:
        architecture = architecture_of(service)
    except Unresolvable as error:  # its message says kube-proxy forwards
        return kube_proxy(False, error.reason, _message(error))
    if architecture is None:
        engine = (meta.get("annotations") or {}).get(service_loadbalancer.ENGINE_ANNOTATION)
        if engine is not None:  # an engine alone would be silently ignored: say so instead
            return kube_proxy(
                False,
                service_loadbalancer.INVALID_ENGINE,
                f"{service_loadbalancer.ENGINE_PATH}: {engine!r} takes effect only with {ARCHITECTURE_PATH} "
                f"(nat, dsr or tunnel); add that annotation or remove this one; {KUBE_PROXY}",
            )
        return kube_proxy(True, "KubeProxy", KUBE_PROXY)
    if not addresses:
        return kube_proxy(
            False,
            "AddressNotAssigned",
            f"{ARCHITECTURE_PATH}: {where} (architecture {architecture}) is created once the Service has "
            f"an address (see {ADDRESS_ASSIGNED})",
        )
    try:
        desired = service_loadbalancer.translate(service, architecture, addresses)
    except Unresolvable as error:
        return kube_proxy(False, error.reason, f"{_message(error)}; {KUBE_PROXY}")
    if derived is not None and not ours:
        message = (
            f"{ARCHITECTURE_PATH}: {where} exists and is not this Service's (no controller reference to it), "
            f"so layerlb leaves it alone; delete or rename it to have layerlb create the Service's own; "
            f"{KUBE_PROXY}"
        )
        return Forwarding(
            _condition(ARCHITECTURE_ACCEPTED, False, service_loadbalancer.NAME_IN_USE, message, generation)
        )
    if derived is not None and (derived.get("metadata") or {}).get("deletionTimestamp"):
        message = f"{where} is being deleted; it is created again once it is gone; {KUBE_PROXY}"
        return Forwarding(
            _condition(ARCHITECTURE_ACCEPTED, False, service_loadbalancer.DELETING, message, generation)
        )
    ok, reason, message, ready = service_loadbalancer.reflected(derived, desired)
    return Forwarding(
        _condition(ARCHITECTURE_ACCEPTED, ok, reason, message, generation),
        service_loadbalancer.ip_mode(architecture) if ok else IP_MODE,
        ready,
        desired,
    )


@dataclass(frozen=True)
class Decision:
    """What serving one Service decided: its addresses (none when refused), its conditions, its Events,
    and what to do with its derived LoadBalancer."""

    addresses: tuple[str, ...]
    ingress: list[dict[str, str]]
    conditions: list[dict[str, Any]]  # ours, without lastTransitionTime (see status.merge)
    refusal: str | None = None  # the AddressAssigned reason when no address could be assigned
    warnings: list[status.Event] = field(default_factory=list)  # to post once per Service and value
    loadbalancer: dict[str, Any] | None = None  # the derived LoadBalancer to apply when it differs
    remove_loadbalancer: bool = False  # delete the derived LoadBalancer this Service controls

    @property
    def waiting(self) -> bool:
        """Whether a released address or a VIPPool change may cure the refusal."""
        return self.refusal is not None and self.refusal not in PERMANENT


def decide(
    service: Mapping[str, Any],
    *,
    pools: Sequence[vips.Pool],
    holders: Mapping[str, str],
    broken_pools: Mapping[str, str] | None = None,
    current: Sequence[str] | None = None,
    derived: Mapping[str, Any] | None = None,
) -> Decision:
    """Serve one Service (already known to be served): its addresses, ingress and conditions, and its
    derived LoadBalancer (see `forwarding`).

    `current` overrides the addresses the Service holds (the caller's claim, newer than a status not yet
    seen through the watch); `derived` is the stored LoadBalancer of the derived name, if any (its
    claim on the Service's address is the Service's own: `holders` need not leave it out).
    """
    # Services have no metadata.generation (the API server never sets it): then no observedGeneration.
    generation = int((service.get("metadata") or {}).get("generation") or 0)
    spec = service.get("spec") or {}
    annotations = (service.get("metadata") or {}).get("annotations") or {}
    warnings = []
    if spec.get("loadBalancerIP"):
        used = "ignored: the annotation wins" if ADDRESSES_ANNOTATION in annotations else "honoured"
        warnings.append(
            status.Event(
                "Warning",
                "DeprecatedLoadBalancerIP",
                f"spec.loadBalancerIP {spec['loadBalancerIP']!r} is deprecated ({used}); use the annotation "
                f'{ADDRESSES_ANNOTATION}: "{spec["loadBalancerIP"]}" instead (one address per family)',
            )
        )
    namespace, name = key_of(service)
    if derived is not None and service_loadbalancer.controlled_by(derived, service):
        holders = vips.shared(holders, service_loadbalancer.key_of(namespace, name))
    try:
        request = request_of(service)
        if current is not None:
            request = dataclasses.replace(request, current=tuple(current))
        assignment = assign(request, pools, holders, broken_pools)
    except Unresolvable as error:
        refused = _condition(ADDRESS_ASSIGNED, False, error.reason, _message(error), generation)
        forwarded = forwarding(service, (), derived, generation)
        return Decision(
            (), [], [refused, forwarded.accepted], error.reason, warnings,
            remove_loadbalancer=forwarded.remove,
        )  # fmt: skip
    families = ", ".join(family_name(ipaddress.ip_address(a).version) for a in assignment.addresses)
    assigned = _condition(
        ADDRESS_ASSIGNED,
        True,
        "AddressAssigned",
        f"assigned {assignment.describe()} for {families} (spec.ipFamilyPolicy {request.policy})",
        generation,
    )
    forwarded = forwarding(service, assignment.addresses, derived, generation)
    conditions = [assigned, forwarded.accepted] + ([forwarded.ready] if forwarded.ready else [])
    return Decision(
        assignment.addresses,
        ingress(assignment.addresses, forwarded.ip_mode),
        conditions,
        None,
        warnings,
        forwarded.loadbalancer,
        forwarded.remove,
    )


def _condition(kind: str, ok: bool, reason: str, message: str, generation: int) -> dict[str, Any]:
    found = status.condition(kind, ok, reason, message, generation)
    if not generation:
        del found["observedGeneration"]
    return found


def _parse(text: str) -> Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _message(error: Unresolvable) -> str:
    return "; ".join(str(problem) for problem in error.problems)


def our_conditions(service: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The Service's conditions of layerlb's types, as stored."""
    found = (service.get("status") or {}).get("conditions") or []
    return [dict(c) for c in found if isinstance(c, dict) and c.get("type") in CONDITION_TYPES]
