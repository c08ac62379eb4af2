"""`resolve.View` over what the operator watches: EndpointSlices, Services, TLS Secrets and VIPPools.

It reads mappings (kopf's in-memory indexes in the operator, plain dicts in tests) and never calls the
API server, so a re-render costs no request. Along the way it records what the status reports:
ready/total endpoint counts per backend and the VIP it allocated.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from layerlb import api, plan, resolve
from layerlb.resolve import Unresolvable
from layerlb.validation import Problem
from layerlb_operator import vips

Store = Mapping[Any, Collection[Any]]  # a kopf index: key → the values all objects gave for it
SERVICE_NAME_LABEL = "kubernetes.io/service-name"


def _first(store: Store, key: Any) -> Any:
    return next(iter(store.get(key, ())), None)


def slice_summary(body: Mapping[str, Any]) -> dict[str, Any]:
    """What the view needs of an EndpointSlice: address type, ports, and each endpoint's first address and readiness."""
    endpoints = []
    for endpoint in body.get("endpoints") or []:
        addresses = endpoint.get("addresses") or []
        if not addresses:
            continue
        conditions = endpoint.get("conditions") or {}
        # The API says an unknown readiness should be read as ready; a terminating endpoint is not ready.
        ready = conditions.get("ready") is not False and conditions.get("terminating") is not True
        endpoints.append({"address": addresses[0], "ready": ready})
    ports = [
        {"name": p.get("name") or "", "port": p.get("port"), "protocol": p.get("protocol") or "TCP"}
        for p in body.get("ports") or []
    ]
    return {"addressType": body.get("addressType"), "ports": ports, "endpoints": endpoints}


def service_summary(spec: Mapping[str, Any]) -> dict[str, Any]:
    """What the view needs of a Service: its ports (name, port, protocol)."""
    return {
        "ports": [
            {"name": p.get("name") or "", "port": p.get("port"), "protocol": p.get("protocol") or "TCP"}
            for p in spec.get("ports") or []
        ]
    }


def secret_summary(name: str, data: Mapping[str, Any] | None) -> dict[str, Any]:
    """Only the TLS fields of a Secret: the operator keeps nothing else in memory."""
    kept = {key: value for key, value in (data or {}).items() if key in ("tls.crt", "tls.key")}
    return {"metadata": {"name": name}, "data": kept}


@lru_cache(maxsize=512)
def _certificate(name: str, cert: str, key: str, path: str) -> plan.Certificate:
    # Reading a certificate's names runs openssl; endpoint changes re-render often, certificates rarely change.
    secret = {"metadata": {"name": name}, "data": {"tls.crt": cert, "tls.key": key}}
    return resolve.certificate_from_secret(secret, path)


@dataclass
class ClusterView:
    """The cluster as one LoadBalancer's resolution sees it."""

    services: Store
    slices: Store
    secrets: Store
    pools: Sequence[vips.Pool]
    holders: Mapping[str, str]  # address → `namespace/name` of the LoadBalancer holding it
    current_vip: str | None = None
    broken_pools: Mapping[str, str] = field(default_factory=dict)
    counts: dict[str, tuple[int, int]] = field(default_factory=dict)  # backend path → (ready, total)
    allocated: str | None = None
    vips_outside_pools: str = vips.ALLOW  # `--vips-outside-pools` (see vips.allocate)

    def service_endpoints(self, namespace: str, service: api.ServiceRef, path: str) -> list[plan.Endpoint]:
        """The ready endpoints of the Service port, one per (address, target port), from all its EndpointSlices."""
        found = _first(self.services, (namespace, service.name))
        if found is None:
            raise Unresolvable(
                "BackendNotFound",
                [Problem(f"{path}.name", f"Service {service.name} not found in namespace {namespace}")],
            )
        port = next((p for p in found["ports"] if p["port"] == service.port), None)
        if port is None:
            have = (
                ", ".join(f"{p['port']}" + (f" ({p['name']})" if p["name"] else "") for p in found["ports"])
                or "none"
            )
            raise Unresolvable(
                "BackendNotFound",
                [
                    Problem(
                        f"{path}.port",
                        f"Service {service.name} has no port {service.port}; its ports: {have}",
                    )
                ],
            )
        ready: dict[tuple[str, int], bool] = {}
        for summary in self.slices.get((namespace, service.name), ()):
            if summary["addressType"] not in ("IPv4", "IPv6"):
                continue  # FQDN slices name hosts, not addresses
            target = next(
                (
                    p["port"]
                    for p in summary["ports"]
                    if p["name"] == port["name"] and p["protocol"] == port["protocol"]
                ),
                None,
            )
            if target is None:
                continue
            for endpoint in summary["endpoints"]:
                try:
                    address = str(ipaddress.ip_address(endpoint["address"]))
                except ValueError:
                    continue
                key = (address, int(target))
                ready[key] = ready.get(key, False) or endpoint["ready"]
        self.counts[path] = (sum(ready.values()), len(ready))
        return [plan.Endpoint(address=a, port=p, weight=1) for (a, p), ok in sorted(ready.items()) if ok]

    def certificate(self, namespace: str, secret_name: str, path: str) -> plan.Certificate:
        """The certificate of a TLS Secret in the LoadBalancer's namespace."""
        secret = _first(self.secrets, (namespace, secret_name))
        if secret is None:
            raise Unresolvable(
                "SecretNotFound", [Problem(path, f"Secret {secret_name} not found in namespace {namespace}")]
            )
        data = secret.get("data") or {}
        return _certificate(secret_name, str(data.get("tls.crt", "")), str(data.get("tls.key", "")), path)

    def vip(self, resource: api.LoadBalancer) -> str:
        """The VIP from the pools (see `vips.allocate`), remembered in `allocated`."""
        namespace = resource.metadata.namespace or "default"
        self.allocated = vips.allocate(
            owner=f"{namespace}/{resource.metadata.name}",
            namespace=namespace,
            requested=resource.spec.vip,
            pool_name=resource.spec.vipPool,
            current=self.current_vip,
            pools=self.pools,
            holders=self.holders,
            broken_pools=self.broken_pools,
            outside_pools=self.vips_outside_pools,
        )
        return self.allocated


@dataclass
class Sources:
    """The watched state, keyed for lookups (kopf indexes in the operator, dicts in tests)."""

    loadbalancers: Store  # "namespace/name" → the LoadBalancer
    references: Store  # ("service" | "secret" | "instance", namespace, name) → "namespace/name"
    services: Store  # (namespace, name) → cluster_view.service_summary
    slices: Store  # (namespace, service name) → cluster_view.slice_summary, one per EndpointSlice
    secrets: Store  # (namespace, name) → cluster_view.secret_summary
    pools: Store  # name → the VIPPool
    deployments: Store  # (namespace, instance label) → the Deployment's status
    pods: Store  # (namespace, instance label) → (pod name, status.PodState)
    serving: Store  # (namespace, instance label) → the serving ConfigMap's data (pod name → report)
    admin_ports: Store = field(default_factory=dict)  # (namespace, instance label) → host admin port
    lbservices: Store = field(default_factory=dict)  # (namespace, name) → a Service layerlb may serve
