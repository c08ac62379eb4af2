"""The Service reconciler writes only what differs, keeps other controllers' finalizers, releases once, and
shares its ledger with LoadBalancers (the real API server's view is in e2e/test_services.py)."""

from __future__ import annotations

import asyncio
from typing import Any

from layerlb_operator import apiserver, objects, reconciler, service_frontend
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
        reconciler.Sources(
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
