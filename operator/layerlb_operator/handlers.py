"""kopf wiring, and nothing else: what to watch, what to index, which call each event makes.

Indexes keep the watched state in memory for lookups (a LoadBalancer by the Service, Secret or
forwarding pods and their serving reports it refers to; EndpointSlices by Service; ...). LoadBalancer changes are reconciled in
kopf's handlers, with kopf's finalizer and retries; changes of the objects they refer to go through the
reconciler's debounced queue. Every handler is a few lines; the work is in `reconciler`.

Services of type LoadBalancer are served from the raw event stream, not kopf's lifecycle handlers: kopf
would annotate every such Service with its bookkeeping and own its finalizer; the operator's own
finalizer and status writes (`service_reconciler`) touch nothing else of a Service the user owns.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import kopf

from layerlb_operator import admin_ports, cluster_view, objects, reconciler, service_frontend, status

LOADBALANCERS = ("layerlb.dev", "v1alpha1", "loadbalancers")
VIPPOOLS = ("layerlb.dev", "v1alpha1", "vippools")
BGPPEERS = ("layerlb.dev", "v1alpha1", "bgppeers")
DATAPLANE = {objects.NAME_LABEL: "layerlb", objects.COMPONENT_LABEL: "dataplane"}
SERVING = {objects.NAME_LABEL: "layerlb", objects.REPORT_LABEL: "serving"}
INDEXES = (
    "loadbalancers", "references", "services", "slices", "secrets", "pools", "deployments", "pods", "serving",
    "admin_ports", "lbservices",
)  # fmt: skip

_reconciler: reconciler.Reconciler | None = None


def install(instance: reconciler.Reconciler) -> None:
    """Give the handlers the reconciler to call (main does, before kopf starts)."""
    global _reconciler
    _reconciler = instance


def _bound(kwargs: Mapping[str, Any]) -> reconciler.Reconciler:
    """The reconciler, with kopf's live indexes (passed to every handler as keyword arguments) bound."""
    assert _reconciler is not None, "handlers.install() was not called"
    if _reconciler.sources is None:
        _reconciler.bind(cluster_view.Sources(**{name: kwargs[name] for name in INDEXES}))
    return _reconciler


def _plain(body: kopf.Body) -> dict[str, Any]:
    return {key: body[key] for key in ("apiVersion", "kind", "metadata", "spec", "status") if key in body}


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    """Own names for kopf's bookkeeping on LoadBalancers; kopf's per-handler Events only for failures.

    The CRDs must exist when the operator starts (the chart installs them first): with scanning off, kopf
    serves the resources it finds at startup.
    """
    settings.persistence.finalizer = "layerlb.dev/cleanup"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="layerlb.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="layerlb.dev", key="last-handled-configuration"
    )
    settings.posting.level = logging.ERROR
    # Through an API server outage the watches retry every 2 s for 10 minutes (kopf's default gives up after
    # 54 s and stops the operator): the first attempt after the outage is then at most 2 s late, and the
    # operator resumes from what it has instead of a restart and a cold start.
    settings.networking.error_backoffs = (0.5, 1.0, *([2.0] * 300))
    # The resources are fixed and namespaces explicit: no watching of CRDs and namespaces (and no RBAC for it).
    settings.scanning.disabled = True
    # Pods, Deployments and ConfigMaps are watched for ours only: filtered by the API server, not after
    # every ConfigMap and Pod of the cluster crossed the wire (kopf's `labels=` filters client-side).
    for resource, wanted in [
        (("v1", "pods"), DATAPLANE),
        (("apps", "deployments"), DATAPLANE),
        (("v1", "configmaps"), SERVING),
    ]:
        settings.watching.label_selectors[resource] = ",".join(f"{k}={v}" for k, v in sorted(wanted.items()))


# Indexes: kopf keeps them current before any handler of the same event runs.


@kopf.index(*LOADBALANCERS, id="loadbalancers")
def index_loadbalancer(body: kopf.Body, namespace: str | None, name: str, **_: Any) -> dict[str, Any]:
    return {f"{namespace}/{name}": _plain(body)}


@kopf.index(*LOADBALANCERS, id="references")
def index_references(
    spec: kopf.Spec, namespace: str | None, name: str, **_: Any
) -> dict[tuple[str, str, str], str]:
    key = f"{namespace}/{name}"
    namespace = namespace or "default"
    found = {("instance", namespace, objects.label_value(name)): key}
    for backend in spec.get("backends") or []:
        if isinstance(backend, dict) and isinstance(backend.get("service"), dict):
            found[("service", namespace, str(backend["service"].get("name")))] = key
    for listener in spec.get("listeners") or []:
        tls = listener.get("tls") if isinstance(listener, dict) else None
        if isinstance(tls, dict):
            for secret in [tls.get("secretName"), *(tls.get("extraSecretNames") or [])]:
                found[("secret", namespace, str(secret))] = key
    return found


@kopf.index("v1", "services", id="services")
def index_service(
    spec: kopf.Spec, namespace: str | None, name: str, **_: Any
) -> dict[tuple[str | None, str], Any]:
    return {(namespace, name): cluster_view.service_summary(spec)}


@kopf.index("v1", "services", id="lbservices")
def index_lb_service(
    body: kopf.Body, namespace: str | None, name: str, **_: Any
) -> dict[tuple[str | None, str], Any] | None:
    """Services of type LoadBalancer of layerlb's class or none, and those still holding its finalizer."""
    document = _plain(body)
    if service_frontend.is_load_balancer(document) or service_frontend.has_finalizer(document):
        return {(namespace, name): document}
    return None


@kopf.index("discovery.k8s.io", "v1", "endpointslices", id="slices")
def index_slice(
    body: kopf.Body, namespace: str | None, labels: kopf.Labels, **_: Any
) -> dict[tuple[str | None, str], Any] | None:
    service = labels.get(cluster_view.SERVICE_NAME_LABEL)
    return {(namespace, service): cluster_view.slice_summary(body)} if service else None


@kopf.index("v1", "secrets", id="secrets")
def index_secret(
    body: kopf.Body, namespace: str | None, name: str, **_: Any
) -> dict[tuple[str | None, str], Any]:
    return {(namespace, name): cluster_view.secret_summary(name, body.get("data"))}


@kopf.index(*VIPPOOLS, id="pools")
def index_pool(body: kopf.Body, name: str, **_: Any) -> dict[str, Any]:
    return {name: _plain(body)}


@kopf.index("apps", "v1", "deployments", labels=DATAPLANE, id="deployments")
def index_deployment(body: kopf.Body, namespace: str | None, labels: kopf.Labels, **_: Any) -> dict[Any, Any]:
    return {(namespace, labels.get(objects.LOADBALANCER_LABEL)): dict(body.get("status") or {})}


@kopf.index("apps", "v1", "deployments", labels=DATAPLANE, id="admin_ports")
def index_admin_port(body: kopf.Body, namespace: str | None, labels: kopf.Labels, **_: Any) -> dict[Any, Any]:
    """The node ports of host-network forwarding pods, so each LoadBalancer keeps its own (admin_ports)."""
    port = admin_ports.port_of(body)
    return {} if port is None else {(namespace, labels.get(objects.LOADBALANCER_LABEL)): port}


@kopf.index("v1", "pods", labels=DATAPLANE, id="pods")
def index_pod(
    body: kopf.Body, namespace: str | None, name: str, labels: kopf.Labels, **_: Any
) -> dict[Any, Any]:
    return {(namespace, labels.get(objects.LOADBALANCER_LABEL)): (name, status.pod_state(body))}


@kopf.index("v1", "configmaps", labels=SERVING, id="serving")
def index_serving(body: kopf.Body, namespace: str | None, labels: kopf.Labels, **_: Any) -> dict[Any, Any]:
    return {(namespace, labels.get(objects.LOADBALANCER_LABEL)): dict(body.get("data") or {})}


# LoadBalancers: kopf's lifecycle, finalizer and retries.


@kopf.on.resume(*LOADBALANCERS)
@kopf.on.create(*LOADBALANCERS)
@kopf.on.update(*LOADBALANCERS)
async def reconcile_loadbalancer(body: kopf.Body, retry: int, **kwargs: Any) -> None:
    result = await _bound(kwargs).sync(_plain(body))
    if result.transient:
        raise kopf.TemporaryError(result.message, delay=reconciler.backoff(retry + 1))


@kopf.on.delete(*LOADBALANCERS)
async def delete_loadbalancer(body: kopf.Body, **kwargs: Any) -> None:
    await _bound(kwargs).forget(_plain(body))


# What LoadBalancers refer to: re-render the affected ones through the debounced queue. These handlers are
# coroutines so that they run on the event loop: kopf runs plain functions in worker threads, from where
# waking the queue's asyncio.Event is not safe.


@kopf.on.event("v1", "services")
async def service_changed(body: kopf.Body, namespace: str | None, name: str, **kwargs: Any) -> None:
    worker = _bound(kwargs)
    worker.touch(("service", namespace, name))
    if worker.services.relevant(body):
        worker.services.touch(namespace, name)


@kopf.on.event("discovery.k8s.io", "v1", "endpointslices")
async def slice_changed(namespace: str | None, labels: kopf.Labels, **kwargs: Any) -> None:
    _bound(kwargs).touch(("service", namespace, labels.get(cluster_view.SERVICE_NAME_LABEL)))


@kopf.on.event("v1", "secrets")
async def secret_changed(namespace: str | None, name: str, **kwargs: Any) -> None:
    _bound(kwargs).touch(("secret", namespace, name))


@kopf.on.event("apps", "v1", "deployments", labels=DATAPLANE)
@kopf.on.event("v1", "configmaps", labels=SERVING)
async def dataplane_changed(namespace: str | None, labels: kopf.Labels, **kwargs: Any) -> None:
    _bound(kwargs).touch(("instance", namespace, labels.get(objects.LOADBALANCER_LABEL)))


@kopf.on.event("v1", "pods", labels=DATAPLANE)
async def pod_changed(
    type: str | None, namespace: str | None, name: str, labels: kopf.Labels, **kwargs: Any
) -> None:
    instance = ("instance", namespace, labels.get(objects.LOADBALANCER_LABEL))
    worker = _bound(kwargs)
    worker.touch(instance)
    if type == "DELETED":
        worker.pod_gone(instance, name)


@kopf.on.event(*LOADBALANCERS)
async def loadbalancer_changed(body: kopf.Body, type: str | None, **kwargs: Any) -> None:
    """A Service's derived LoadBalancer reads on the Service (its status included, which kopf's update
    handlers do not see); a deleted LoadBalancer may free a name a Service waits for; a speaker's
    announcement may make it Ready."""
    worker = _bound(kwargs)
    worker.services.loadbalancer_changed(_plain(body), deleted=type == "DELETED")
    if type != "DELETED":
        worker.announcement_changed(_plain(body))


@kopf.on.event(*VIPPOOLS)
async def pool_changed(body: kopf.Body, type: str | None, **kwargs: Any) -> None:
    """A new or changed pool re-renders what draws from it; every event (the speakers' status writes
    too) brings its `InterfacesFound` condition up to date."""
    _bound(kwargs).pool_changed(_plain(body), deleted=type == "DELETED")


@kopf.on.event(*BGPPEERS)
async def peer_changed(body: kopf.Body, type: str | None, **kwargs: Any) -> None:
    """Every BGPPeer event (the speakers' session entries too) brings its `Established` condition up to date."""
    if type != "DELETED":
        await _bound(kwargs).peer_changed(_plain(body))
