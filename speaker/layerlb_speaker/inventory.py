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

Two objects claiming one address are merged (owners joined, eligible nodes united), so the address is
announced once.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from typing import Any

from layerlb_operator import objects

from layerlb_speaker.announcement import Address, Owner, Vip

SERVICE_CLASS = "layerlb.dev/loadbalancer"
EXCLUDE_LABEL = "node.kubernetes.io/exclude-from-external-load-balancers"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
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
            )
    return tuple(by_address[address] for address in sorted(by_address, key=lambda a: (a.version, a)))


def vips(
    nodes: Iterable[Object],
    loadbalancers: Iterable[Object],
    pods: Iterable[Object],
    services: Iterable[Object],
    slices: Iterable[Object],
    classless: bool = False,
) -> tuple[Vip, ...]:
    """Every VIP to announce, from the cluster's objects as the API returns them (camelCase dicts)."""
    ready = ready_nodes(nodes)
    return merged(
        [*loadbalancer_vips(loadbalancers, pods), *service_vips(services, slices, ready, classless)]
    )
