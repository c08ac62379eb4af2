"""The Service reconciler writes only what differs, keeps other controllers' finalizers, releases once, and
shares its ledger with LoadBalancers (the real API server's view is in e2e/test_services.py)."""

from __future__ import annotations

import asyncio
from typing import Any

from layerlb_operator import (
    apiserver,
    cluster_view,
    objects,
    reconciler,
    service_frontend,
    service_loadbalancer,
)
from layerlb_operator.metrics import Metrics


class FakeClient(apiserver.Client):
    """Records the Service writes and updates the stored Service as the API server would."""

    def __init__(self, store: dict[tuple[str, str], list[dict[str, Any]]]) -> None:
        super().__init__(api_client=None)
        self.store = store
        self.calls: list[tuple[str, Any]] = []
        self.events: list[dict[str, Any]] = []

    def _body(self, namespace: str, name: str) -> dict[str, Any]:
        return self.store[(namespace, name)][0]

    def apply_service_status(self, namespace: str, name: str, status: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(("status", status))
        body = self._body(namespace, name)
        body["status"] = status
        return {"metadata": {"resourceVersion": "2"}}

    def drop_service_conditions(self, namespace: str, name: str, types: list[str]) -> dict[str, Any]:
        self.calls.append(("drop", types))
        body = self._body(namespace, name)
        kept = [c for c in (body.get("status") or {}).get("conditions") or [] if c["type"] not in types]
        body.setdefault("status", {})["conditions"] = kept
        return {"metadata": {"resourceVersion": "3"}}

    def set_service_finalizers(
        self, namespace: str, name: str, finalizers: list[str], resource_version: str
    ) -> dict[str, Any]:
        self.calls.append(("finalizers", finalizers))
        self._body(namespace, name)["metadata"]["finalizers"] = finalizers
        return {}

    def post_event(self, involved: dict[str, Any], event: dict[str, Any]) -> None:
        self.events.append(event)


def _service(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": "shop", "uid": f"uid-{name}", "resourceVersion": "1"},
        "spec": {
            "type": "LoadBalancer",
            "loadBalancerClass": service_frontend.CLASS,
            "ipFamilies": ["IPv4"],
            **spec,
        },
    }


def _pool() -> dict[str, Any]:
    return {
        "apiVersion": "layerlb.dev/v1alpha1",
        "kind": "VIPPool",
        "metadata": {"name": "public", "resourceVersion": "1"},
        "spec": {"addresses": ["192.0.2.0/31"]},
    }


def _setup(*services: dict[str, Any]) -> tuple[reconciler.Reconciler, FakeClient]:
    store = {("shop", s["metadata"]["name"]): [s] for s in services}
    client = FakeClient(store)
    worker = reconciler.Reconciler(client, objects.Settings(), Metrics(), now=lambda: "2026-01-01T00:00:00Z")
    empty: dict[Any, Any] = {}
    worker.bind(
        cluster_view.Sources(
            loadbalancers={}, references=empty, services=empty, slices=empty, secrets=empty,
            pools={"public": [_pool()]}, deployments=empty, pods=empty, serving=empty, lbservices=store,
        )
    )  # fmt: skip
    return worker, client


def test_a_served_service_gets_finalizer_then_status_once_and_an_event() -> None:
    web = _service("web")
    worker, client = _setup(web)
    assert asyncio.run(worker.services.sync(web)).verdict == "accepted"
    assert [kind for kind, _ in client.calls] == ["finalizers", "status"]
    assert web["metadata"]["finalizers"] == [service_frontend.FINALIZER]
    assert web["status"]["loadBalancer"]["ingress"] == [{"ip": "192.0.2.0", "ipMode": "VIP"}]
    assert [(e["type"], e["reason"]) for e in client.events] == [("Normal", "AddressAssigned")]
    asyncio.run(worker.services.sync(web))  # nothing changed: nothing written, nothing told
    assert len(client.calls) == 2 and len(client.events) == 1
    assert worker.metrics.render().count("layerlb_operator_service_addresses_allocated 1") == 1


def test_a_release_keeps_other_controllers_finalizers_and_tells_once() -> None:
    web = _service("web")
    web["metadata"]["finalizers"] = ["example.com/keep"]
    worker, client = _setup(web)
    asyncio.run(worker.services.sync(web))
    web["spec"] = {"type": "ClusterIP"}
    asyncio.run(worker.services.sync(web))
    assert client.calls[-2:] == [("status", {}), ("finalizers", ["example.com/keep"])]
    assert [e["reason"] for e in client.events] == ["AddressAssigned", "AddressReleased"]
    assert "released 192.0.2.0" in client.events[-1]["message"]
    asyncio.run(worker.services.sync(web))  # a later view: nothing more to release or tell
    assert len(client.events) == 2
    assert worker.ledger.holders(worker.services.holdings()) == {}


def test_a_release_drops_the_speakers_announced_conditions_too() -> None:
    """Nobody announces an address the Service gave back: the speakers' conditions go with the operator's
    (the speakers stop writing for a Service no longer served, so nothing else would remove them)."""
    web = _service("web")
    worker, client = _setup(web)
    asyncio.run(worker.services.sync(web))
    announced = {"type": "layerlb.dev/AnnouncedIPv4", "status": "True", "reason": "Announced",
                 "message": "192.0.2.0 from node1 on eth0", "lastTransitionTime": "2026-12-07T00:00:00Z"}  # fmt: skip
    web["status"]["conditions"] = [*web["status"].get("conditions", []), announced]
    web["spec"] = {"type": "ClusterIP"}
    asyncio.run(worker.services.sync(web))
    assert ("drop", ["layerlb.dev/AnnouncedIPv4"]) in client.calls
    assert client.calls[-1] == ("finalizers", [])
    assert not service_frontend.speaker_conditions(web)


def test_a_waiting_service_gets_the_address_another_service_releases() -> None:
    a, b, c = _service("a"), _service("b"), _service("c")
    worker, _ = _setup(a, b, c)
    for service in (a, b):
        asyncio.run(worker.services.sync(service))
    refused = asyncio.run(worker.services.sync(c))
    assert refused.verdict == "refused" and not refused.transient  # woken by events, not a timer
    assert c["status"]["conditions"][0]["reason"] == "PoolExhausted"
    a["spec"] = {"type": "ClusterIP"}
    asyncio.run(worker.services.sync(a))
    assert service_frontend.owner_of("shop", "c") in worker.queue  # woken by the release
    asyncio.run(worker.services.sync(c))
    assert c["status"]["loadBalancer"]["ingress"][0]["ip"] == "192.0.2.0"


class DerivingClient(FakeClient):
    """Also stores the derived LoadBalancers it applies and deletes, as the API server would."""

    def __init__(self, store: dict[tuple[str, str], list[dict[str, Any]]]) -> None:
        super().__init__(store)
        self.loadbalancers: dict[str, list[dict[str, Any]]] = {}

    def apply(self, obj: dict[str, Any], *, force: bool = True) -> dict[str, Any]:
        self.calls.append(("apply", force))
        key = f"{obj['metadata']['namespace']}/{obj['metadata']['name']}"
        stored = {**obj, "metadata": {**obj["metadata"], "uid": f"uid-{key}"}}
        self.loadbalancers[key] = [stored]
        return stored

    def delete_loadbalancer(self, namespace: str, name: str, uid: str) -> dict[str, Any]:
        self.calls.append(("delete", uid))
        self.loadbalancers.pop(f"{namespace}/{name}", None)
        return {}


def _deriving(*services: dict[str, Any]) -> tuple[reconciler.Reconciler, DerivingClient]:
    worker, plain = _setup(*services)
    client = DerivingClient(plain.store)
    worker.client = client
    assert worker.sources is not None
    worker.sources.loadbalancers = client.loadbalancers  # the watch sees what was applied
    return worker, client


def test_a_derived_load_balancer_is_created_once_without_force_and_deleted_with_the_annotation() -> None:
    web = _service("web", ports=[{"name": "http", "port": 80}])
    web["metadata"]["annotations"] = {service_loadbalancer.ARCHITECTURE_ANNOTATION: "proxy"}
    worker, client = _deriving(web)
    asyncio.run(worker.services.sync(web))
    assert [c for c in client.calls if c[0] == "apply"] == [("apply", False)]  # a create never takes over
    assert web["status"]["loadBalancer"]["ingress"] == [{"ip": "192.0.2.0", "ipMode": "Proxy"}]
    assert [e["reason"] for e in client.events] == ["AddressAssigned", "LoadBalancerCreated"]
    calls = len(client.calls)
    asyncio.run(worker.services.sync(web))  # unchanged: no apply, no status
    assert len(client.calls) == calls
    web["metadata"]["annotations"] = {}
    asyncio.run(worker.services.sync(web))
    assert ("delete", "uid-shop/svc-web") in client.calls and client.loadbalancers == {}
    assert web["status"]["loadBalancer"]["ingress"] == [{"ip": "192.0.2.0", "ipMode": "VIP"}]
    assert "LoadBalancerDeleted" in [e["reason"] for e in client.events]


def test_a_users_load_balancer_of_the_derived_name_is_never_applied_nor_deleted() -> None:
    web = _service("web", ports=[{"name": "http", "port": 80}])
    web["metadata"]["annotations"] = {service_loadbalancer.ARCHITECTURE_ANNOTATION: "nat"}
    worker, client = _deriving(web)
    theirs = {"metadata": {"name": "svc-web", "namespace": "shop", "uid": "theirs"}, "spec": {"mode": "L7"}}
    client.loadbalancers["shop/svc-web"] = [theirs]
    asyncio.run(worker.services.sync(web))
    web["metadata"]["annotations"] = {}
    asyncio.run(worker.services.sync(web))
    assert not [c for c in client.calls if c[0] in ("apply", "delete")]
    assert client.loadbalancers["shop/svc-web"] == [theirs]
    assert [e["reason"] for e in client.events][:2] == ["AddressAssigned", "NameInUse"]


def test_the_speakers_announced_condition_neither_triggers_a_write_nor_is_applied_by_the_operator() -> None:
    web = _service("web")
    worker, client = _setup(web)
    asyncio.run(worker.services.sync(web))
    announced = {
        "type": "layerlb.dev/AnnouncedIPv4", "status": "True", "reason": "Announced",
        "message": "192.0.2.0 from node2 on eth0", "lastTransitionTime": "2026-01-01T00:00:01Z",
    }  # fmt: skip
    # The speaker's server-side apply, back through the watch (a new object, as the watch delivers).
    web["status"] = {**web["status"], "conditions": [*web["status"]["conditions"], announced]}
    asyncio.run(worker.services.sync(web))
    assert [kind for kind, _ in client.calls] == ["finalizers", "status"]  # no write, no loop
    # A restarted operator does not see it as its own either.
    restarted, again = _setup(web)
    asyncio.run(restarted.services.sync(web))
    assert [kind for kind, _ in again.calls] == []
    # What the operator applies (its whole intent as a field manager) never names the speaker's type, so
    # server-side apply leaves that entry to the speaker's manager.
    applied = [status for kind, status in client.calls if kind == "status"]
    assert all(c["type"] in service_frontend.CONDITION_TYPES for s in applied for c in s["conditions"])
