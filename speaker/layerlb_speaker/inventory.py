"""Kubernetes objects → the VIPs to announce and their eligible nodes, and the speakers' peers (pure).

- A LoadBalancer (layerlb.dev/v1alpha1) with `status.vip` is eligible on the nodes that run its Ready
  forwarding pods: the pods the operator labels `app.kubernetes.io/component=dataplane` and
  `layerlb.dev/loadbalancer=<its label value>` (operator/layerlb_operator/objects.py), Running, Ready,
  not terminating.
- A Service of type LoadBalancer with class `layerlb.dev/loadbalancer` (or no class, when the operator
  serves class-less Services) announces each `status.loadBalancer.ingress[].ip`. With
  `externalTrafficPolicy: Cluster` every Ready node may receive it (kube-proxy forwards from any node);
  with `Local` only the nodes with a ready endpoint (EndpointSlices; `ready` unset counts as ready, as
  the API documents). Nodes labelled `node.kubernetes.io/exclude-from-external-load-balancers` are
  never eligible, as for every cloud load balancer.
- Peers are the Nodes' InternalIPs (the first one, IPv4 preferred): speakers heartbeat on the node network.
- VIPPools say where their addresses are announced (`spec.announce`). A VIP belongs to the pool its owner
  names (a LoadBalancer's `spec.vipPool`, a Service's `layerlb.dev/vip-pool` annotation) when that pool
  holds the address, else to the first pool by name that holds it, as the allocator picks. Its eligible
  nodes are narrowed to those whose labels match the pool's `nodeSelector`, and it is answered only on
  the pool's `interfaces`; with `l2: false` it is not answered at all (`Vip.l2`: BGP only). An address in no pool (a `spec.vip` written outside every pool) is announced
  as before. A pool that does not validate (a stale CRD let it in) announces nothing: restrictions the
  speaker cannot read are not silently dropped.

Two objects claiming one address are merged (owners joined, eligible nodes united), so the address is
announced once. What cannot be announced because of a pool comes out as `Notice`s (`NoEligibleNode`,
`InvalidVIPPool`), which one speaker turns into Warning Events.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from layerlb_operator import objects
from layerlb_operator.vips import Block

from layerlb import api, validation
from layerlb_speaker.announcement import Address, Owner, Vip

SERVICE_CLASS = "layerlb.dev/loadbalancer"
EXCLUDE_LABEL = "node.kubernetes.io/exclude-from-external-load-balancers"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
POOL_ANNOTATION = "layerlb.dev/vip-pool"  # service_frontend.POOL_ANNOTATION (a test keeps them equal)
Object = Mapping[str, Any]


def _meta(obj: Object) -> Mapping[str, Any]:
    meta: Mapping[str, Any] = obj.get("metadata") or {}
    return meta


def _condition(obj: Object, kind: str) -> bool:
    conditions = (obj.get("status") or {}).get("conditions") or []
    return any(c.get("type") == kind and c.get("status") == "True" for c in conditions)


def ready_nodes(nodes: Iterable[Object]) -> set[str]:
    """Names of the Nodes whose Ready condition is True and that may carry external load balancers."""
    return {
        _meta(node)["name"]
        for node in nodes
        if _condition(node, "Ready") and EXCLUDE_LABEL not in (_meta(node).get("labels") or {})
    }


def peers(nodes: Iterable[Object]) -> dict[str, str]:
    """Node name → its InternalIP (IPv4 first), where its speaker heartbeats from."""
    found: dict[str, str] = {}
    for node in nodes:
        internal = [
            a.get("address", "")
            for a in (node.get("status") or {}).get("addresses") or []
            if a.get("type") == "InternalIP"
        ]
        parsed = []
        for text in internal:
            try:
                parsed.append(ipaddress.ip_address(text))
            except ValueError:
                continue
        if parsed:
            found[_meta(node)["name"]] = str(sorted(parsed, key=lambda a: a.version)[0])
    return found


def _serving_pod(pod: Object) -> bool:
    status = pod.get("status") or {}
    return (
        status.get("phase") == "Running"
        and _condition(pod, "Ready")
        and not _meta(pod).get("deletionTimestamp")
        and bool((pod.get("spec") or {}).get("nodeName"))
    )


def _owner(obj: Object, kind: str, api_version: str) -> Owner:
    meta = _meta(obj)
    return Owner(kind, meta.get("namespace", ""), meta.get("name", ""), meta.get("uid", ""), api_version)


def _address(text: object) -> Address | None:
    try:
        return ipaddress.ip_address(str(text))
    except ValueError:
        return None


def loadbalancer_vips(loadbalancers: Iterable[Object], pods: Iterable[Object]) -> list[Vip]:
    """The VIPs of LoadBalancer resources, eligible where their forwarding pods are Ready."""
    serving: dict[tuple[str, str], set[str]] = {}
    for pod in pods:
        labels = _meta(pod).get("labels") or {}
        if labels.get(objects.COMPONENT_LABEL) != "dataplane" or objects.LOADBALANCER_LABEL not in labels:
            continue
        if _serving_pod(pod):
            key = (_meta(pod).get("namespace", ""), labels[objects.LOADBALANCER_LABEL])
            serving.setdefault(key, set()).add(pod["spec"]["nodeName"])
    vips = []
    for lb in loadbalancers:
        address = _address((lb.get("status") or {}).get("vip"))
        if address is None:
            continue
        meta = _meta(lb)
        nodes = serving.get((meta.get("namespace", ""), objects.label_value(meta.get("name", ""))), set())
        vips.append(Vip(address, frozenset(nodes), (_owner(lb, "LoadBalancer", "layerlb.dev/v1alpha1"),)))
    return vips


def _announced(service: Object, classless: bool) -> bool:
    spec = service.get("spec") or {}
    if spec.get("type") != "LoadBalancer":
        return False
    cls = spec.get("loadBalancerClass")
    return cls == SERVICE_CLASS or (cls is None and classless)


def service_vips(
    services: Iterable[Object], slices: Iterable[Object], ready: set[str], classless: bool = False
) -> list[Vip]:
    """The ingress IPs of layerlb's Services of type LoadBalancer, eligible per externalTrafficPolicy."""
    endpoints: dict[tuple[str, str], set[str]] = {}
    for piece in slices:
        meta = _meta(piece)
        service = (meta.get("labels") or {}).get(SERVICE_NAME_LABEL)
        if not service:
            continue
        key = (meta.get("namespace", ""), service)
        for endpoint in piece.get("endpoints") or []:
            node = endpoint.get("nodeName")
            if node and (endpoint.get("conditions") or {}).get("ready") is not False:
                endpoints.setdefault(key, set()).add(node)
    vips = []
    for service in services:
        if not _announced(service, classless):
            continue
        meta = _meta(service)
        local = (service.get("spec") or {}).get("externalTrafficPolicy") == "Local"
        nodes = (
            endpoints.get((meta.get("namespace", ""), meta.get("name", "")), set()) & ready
            if local
            else ready
        )
        for ingress in ((service.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []:
            address = _address(ingress.get("ip"))
            if address is not None:
                vips.append(Vip(address, frozenset(nodes), (_owner(service, "Service", "v1"),)))
    return vips


# --- pools ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pool:
    """A VIPPool as the speaker reads it: its addresses and where they are announced.

    `invalid` holds its validation problems: then its (parseable) addresses are announced nowhere."""

    owner: Owner
    blocks: tuple[Block, ...]
    interfaces: tuple[str, ...] = ()
    selector: api.LabelSelector | None = None
    invalid: str = ""
    generation: int = 0  # metadata.generation: which spec a node's status entry describes (pool_status)
    l2: bool = True  # spec.announce.l2: false: BGP only, nobody answers ARP/NDP for its addresses

    def __contains__(self, address: object) -> bool:
        return any(address in block for block in self.blocks)

    @property
    def name(self) -> str:
        return self.owner.name


@dataclass(frozen=True)
class Notice:
    """Something a pool prevents that a speaker reports as a Warning: on the VIP's owners and the pool."""

    reason: str
    message: str
    vip: Vip | None = None
    pool: Owner | None = None


def pool_owner(name: str, uid: str = "") -> Owner:
    """The Owner of a (cluster-scoped) VIPPool, for Events."""
    return Owner("VIPPool", "", name, uid, api.API_VERSION)


def pool(document: Object) -> Pool | None:
    """The Pool of a VIPPool resource (None without a name); an invalid one keeps its problems."""
    meta = _meta(document)
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        return None
    owner = pool_owner(name, str(meta.get("uid") or ""))
    resource = {key: document.get(key) for key in ("apiVersion", "kind", "metadata", "spec")}
    resource["apiVersion"] = resource.get("apiVersion") or api.API_VERSION
    resource["kind"] = resource.get("kind") or "VIPPool"
    try:
        parsed = validation.validate(resource)
    except validation.Invalid as error:
        return Pool(owner, _blocks((document.get("spec") or {}).get("addresses")), invalid=str(error))
    assert isinstance(parsed, api.VIPPool)
    spec = parsed.spec
    blocks = tuple(Block(*api.address_block(text)) for text in spec.addresses)
    announce = spec.announce or api.Announce()
    generation = int(meta.get("generation") or 0)
    return Pool(
        owner, blocks, tuple(announce.interfaces or ()), announce.nodeSelector, "", generation, announce.l2
    )


def _blocks(addresses: object) -> tuple[Block, ...]:
    found = []
    for text in addresses if isinstance(addresses, list) else []:
        try:
            found.append(Block(*api.address_block(str(text))))
        except ValueError:
            continue
    return tuple(found)


def pools(documents: Iterable[Object]) -> tuple[Pool, ...]:
    """The Pools of VIPPool resources, by name."""
    found = [each for each in map(pool, documents) if each is not None]
    return tuple(sorted(found, key=lambda each: each.name))


def matches(selector: api.LabelSelector | None, labels: Mapping[str, str]) -> bool:
    """Whether `labels` satisfy a label selector, as Kubernetes decides: every part holds; empty or None
    matches everything. NotIn and DoesNotExist hold for a node without the label."""
    if selector is None:
        return True
    for key, value in (selector.matchLabels or {}).items():
        if labels.get(key) != value:
            return False
    for requirement in selector.matchExpressions or []:
        present = requirement.key in labels
        values = requirement.values or []
        operator = requirement.operator
        if operator == api.SelectorOperator.In and not (present and labels[requirement.key] in values):
            return False
        if operator == api.SelectorOperator.NotIn and present and labels[requirement.key] in values:
            return False
        if operator == api.SelectorOperator.Exists and not present:
            return False
        if operator == api.SelectorOperator.DoesNotExist and present:
            return False
    return True


def node_labels(nodes: Iterable[Object]) -> dict[str, dict[str, str]]:
    """Node name → its labels."""
    return {
        _meta(node)["name"]: dict(_meta(node).get("labels") or {})
        for node in nodes
        if _meta(node).get("name")
    }


def pool_of(address: Address, candidates: Iterable[Pool], named: str | None = None) -> Pool | None:
    """The pool `address` belongs to: the one named by its owner when that holds it, else the first by name."""
    holding = sorted((each for each in candidates if address in each), key=lambda each: each.name)
    for each in holding:
        if each.name == named:
            return each
    return holding[0] if holding else None


def _selector_text(selector: api.LabelSelector | None) -> str:
    return "" if selector is None else selector.model_dump_json(exclude_none=True)


def restricted(
    vips: Iterable[Vip],
    candidates: Iterable[Pool],
    labels: Mapping[str, Mapping[str, str]],
    named: Mapping[Address, str] | None = None,
) -> tuple[tuple[Vip, ...], tuple[Notice, ...]]:
    """Each VIP narrowed by its pool (see the module): eligible nodes matching the pool's nodeSelector, the
    pool's interfaces; and the notices of VIPs a pool keeps from being announced."""
    candidates = tuple(candidates)
    named = named or {}
    out: list[Vip] = []
    notices: list[Notice] = []
    invalid_reported: set[str] = set()
    for vip in vips:
        found = pool_of(vip.address, candidates, named.get(vip.address))
        if found is None:
            out.append(vip)
            continue
        if found.invalid:
            out.append(dataclasses.replace(vip, eligible=frozenset(), pool=found.owner))
            if found.name not in invalid_reported:
                invalid_reported.add(found.name)
                notices.append(
                    Notice(
                        "InvalidVIPPool",
                        f"VIPPool {found.name} is invalid, its addresses are not announced: {found.invalid}",
                        None,
                        found.owner,
                    )
                )
            continue
        eligible = frozenset(
            node
            for node in vip.eligible
            if found.selector is None or (node in labels and matches(found.selector, labels[node]))
        )
        interfaces = found.interfaces or vip.interfaces
        routable = vip.eligible if eligible != vip.eligible else None  # spec.announce is L2's only
        narrowed = dataclasses.replace(
            vip, eligible=eligible, interfaces=interfaces, pool=found.owner, l2=found.l2, routable=routable
        )
        if vip.eligible and not eligible:
            notices.append(
                Notice(
                    "NoEligibleNode",
                    f"{vip.address} is not announced: none of its eligible nodes ({', '.join(sorted(vip.eligible))}) "
                    f"matches VIPPool {found.name} spec.announce.nodeSelector {_selector_text(found.selector)}",
                    narrowed,
                    found.owner,
                )
            )
        out.append(narrowed)
    return tuple(out), tuple(notices)


def merged(vips: Iterable[Vip]) -> tuple[Vip, ...]:
    """One Vip per address: owners joined, eligible nodes united (a shared address is announced once)."""
    by_address: dict[Address, Vip] = {}
    for vip in vips:
        seen = by_address.get(vip.address)
        if seen is None:
            by_address[vip.address] = vip
        else:
            by_address[vip.address] = Vip(
                vip.address,
                seen.eligible | vip.eligible,
                seen.owners + vip.owners,
                seen.interfaces or vip.interfaces,
                seen.pool or vip.pool,
                seen.l2 and vip.l2,
            )
    return tuple(by_address[address] for address in sorted(by_address, key=lambda a: (a.version, a)))


def named_pools(loadbalancers: Iterable[Object], services: Iterable[Object]) -> dict[Address, str]:
    """Address → the pool its owner names (a LoadBalancer's `spec.vipPool`, a Service's annotation)."""
    named: dict[Address, str] = {}
    for lb in loadbalancers:
        address = _address((lb.get("status") or {}).get("vip"))
        name = (lb.get("spec") or {}).get("vipPool")
        if address is not None and isinstance(name, str):
            named.setdefault(address, name)
    for service in services:
        name = (_meta(service).get("annotations") or {}).get(POOL_ANNOTATION)
        if not isinstance(name, str):
            continue
        for ingress in ((service.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []:
            address = _address(ingress.get("ip"))
            if address is not None:
                named.setdefault(address, name)
    return named


def announced(
    nodes: Iterable[Object],
    loadbalancers: Iterable[Object],
    pods: Iterable[Object],
    services: Iterable[Object],
    slices: Iterable[Object],
    vippools: Iterable[Object] = (),
    classless: bool = False,
) -> tuple[tuple[Vip, ...], tuple[Notice, ...]]:
    """Every VIP to announce, narrowed by its VIPPool, and the notices of what a pool prevents."""
    nodes, loadbalancers, services = list(nodes), list(loadbalancers), list(services)
    ready = ready_nodes(nodes)
    all_vips = merged(
        [*loadbalancer_vips(loadbalancers, pods), *service_vips(services, slices, ready, classless)]
    )
    return restricted(all_vips, pools(vippools), node_labels(nodes), named_pools(loadbalancers, services))


def vips(
    nodes: Iterable[Object],
    loadbalancers: Iterable[Object],
    pods: Iterable[Object],
    services: Iterable[Object],
    slices: Iterable[Object],
    classless: bool = False,
    vippools: Iterable[Object] = (),
) -> tuple[Vip, ...]:
    """Every VIP to announce, from the cluster's objects as the API returns them (camelCase dicts)."""
    return announced(nodes, loadbalancers, pods, services, slices, vippools, classless)[0]
