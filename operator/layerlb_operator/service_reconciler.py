"""Brings Services of type LoadBalancer to their desired state: addresses, status, finalizer and Events.

The one path for every trigger (a Service created, changed or deleted; a VIPPool changed; an address
released by a LoadBalancer or a Service): read the Service from the watched state, run the pure
`service_frontend.decide`, claim its addresses in the VIP ledger shared with LoadBalancers (before any
await, so allocations never interleave), then write only what differs:

1. layerlb's finalizer `layerlb.dev/service`, added before the first address is written, so that the
   address is released when the Service goes: on deletion, on a type change away from LoadBalancer (which
   also clears `spec.loadBalancerClass`), or when classless Services stop being served, the operator
   clears the ingress and its conditions and removes the finalizer;
2. `status.loadBalancer.ingress` and the conditions, by server-side apply under the operator's field
   manager (it owns its own condition types only);
3. the LoadBalancer derived from the Service when it asks for a layerlb architecture
   (`service_loadbalancer`), by server-side apply under the same field manager, only when the stored one
   differs; created without `force`, so a LoadBalancer someone else created under that name in the
   meantime is a conflict, never taken over. It is deleted (with the uid as precondition: only the
   object this Service controls) when the Service no longer asks for it or it cannot serve, and when
   the Service leaves the class or type; a Service being deleted leaves it to the garbage collector
   (its owner reference);
4. Events: `AddressAssigned` (Normal) naming the addresses, a Warning naming the field and the value for
   every refusal, `AddressReleased` on release, `DeprecatedLoadBalancerIP` once per Service and value
   (Services have no `metadata.generation`, so their conditions carry no `observedGeneration`);
   `LoadBalancerCreated` and `LoadBalancerDeleted` for the derived LoadBalancer, and a Warning with its
   own reason and message when it refuses.

Services ride the LoadBalancers' queue under the key `Service namespace/name`, due at once (no
debounce): the target is the status within a second of the Service's creation.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from layerlb_operator import apiserver, service_frontend, service_loadbalancer, status, vips
from layerlb_operator.cluster_view import Sources
from layerlb_operator.debounce import Debouncer
from layerlb_operator.sync_result import Result


class LoadBalancerWorker(Protocol):
    """What a Service's reconciliation shares with the LoadBalancers' (`reconciler.Reconciler`): the API
    client, the VIP ledger, the queue and the watched state, per-key locks, Events. A protocol, so the two
    reconcilers do not import each other: the LoadBalancers' one creates this one."""

    client: apiserver.Client
    ledger: vips.Ledger
    queue: Debouncer[str]
    sources: Sources | None
    now: Callable[[], str]

    def statuses(self) -> dict[str, str]: ...

    def lock(self, key: str) -> asyncio.Lock: ...

    def valid_pools(self, sources: Sources) -> tuple[list[vips.Pool], dict[str, str]]: ...

    def post(self, document: Mapping[str, Any], events: list[status.Event]) -> None: ...

    def touch_all(self, only: Callable[[Mapping[str, Any]], bool] = ...) -> None: ...

    def waiting_for_vip(self, body: Mapping[str, Any]) -> bool: ...


log = logging.getLogger("layerlb.operator")


def _comparable(conditions: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    keys = ("type", "status", "reason", "message", "observedGeneration")
    return sorted(tuple(c.get(k) for k in keys) for c in conditions)


def _ingress(service: Mapping[str, Any]) -> list[dict[str, Any]]:
    found = ((service.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []
    return [{k: v for k, v in dict(item).items() if k in ("ip", "ipMode")} for item in found]


class ServiceReconciler:
    """The Service front end's state between triggers; shares the LoadBalancers' ledger, queue and client."""

    def __init__(self, owner: LoadBalancerWorker, serve_classless: bool = False) -> None:
        self.owner = owner
        self.serve_classless = serve_classless
        self._written: dict[str, tuple[str, list[dict[str, Any]], list[dict[str, Any]]]] = {}
        self._warned: set[tuple[str, str]] = set()  # (uid, spec.loadBalancerIP) given the deprecation Warning

    # Triggers.

    def relevant(self, service: Mapping[str, Any]) -> bool:
        """Whether a Service event concerns layerlb (a LoadBalancer Service of its class or none, or one
        still carrying its finalizer)."""
        return service_frontend.is_load_balancer(service) or service_frontend.has_finalizer(service)

    def touch(self, namespace: str | None, name: str) -> None:
        """Reconcile this Service now (through the queue, no debounce)."""
        self.owner.queue.touch(service_frontend.owner_of(namespace or "default", name), 0.0)

    def touch_waiting(self, only: Callable[[Mapping[str, Any]], bool] | None = None) -> None:
        """Re-reconcile the served Services (`only` those it picks): a VIPPool changed or an address was freed."""
        sources = self.owner.sources
        if sources is None:
            return
        for (namespace, name), bodies in list(sources.lbservices.items()):
            if any(only is None or only(body) for body in bodies):
                self.owner.queue.touch(service_frontend.owner_of(str(namespace), str(name)), 0.0)

    def waiting(self, body: Mapping[str, Any]) -> bool:
        """Whether a Service waits for an address that a release may give it."""
        conditions = service_frontend.our_conditions(body)
        reason = status.reason_of(conditions, service_frontend.ADDRESS_ASSIGNED)
        return bool(reason) and reason != "AddressAssigned" and reason not in service_frontend.PERMANENT

    @staticmethod
    def waiting_for_name(body: Mapping[str, Any]) -> bool:
        """Whether a Service waits for its derived LoadBalancer's name (`NameInUse`) or for its old
        derived LoadBalancer to be gone: a LoadBalancer's deletion may cure it."""
        reason = status.reason_of(
            service_frontend.our_conditions(body), service_frontend.ARCHITECTURE_ACCEPTED
        )
        return reason in (service_loadbalancer.NAME_IN_USE, service_loadbalancer.DELETING)

    def loadbalancer_changed(self, loadbalancer: Mapping[str, Any], deleted: bool = False) -> None:
        """A LoadBalancer changed: re-reconcile the Service controlling it (its status reads on the
        Service), and on a deletion the Services waiting for a LoadBalancer's name."""
        owner = service_loadbalancer.sharing_owner(loadbalancer)
        if owner is not None:
            self.owner.queue.touch(owner, 0.0)
        if deleted:
            self.touch_waiting(self.waiting_for_name)

    @staticmethod
    def shared(holders: Mapping[str, str], loadbalancer: Mapping[str, Any]) -> dict[str, str]:
        """`holders` as a LoadBalancer's VIP allocation sees them: without its Service's address when it
        is that Service's derived LoadBalancer (`vips.shared`)."""
        return vips.shared(holders, service_loadbalancer.sharing_owner(loadbalancer))

    def derived(self, namespace: str, name: str) -> Mapping[str, Any] | None:
        """The stored LoadBalancer bearing the Service's derived name, whoever owns it."""
        sources = self.owner.sources
        if sources is None:
            return None
        found = sources.loadbalancers.get(service_loadbalancer.key_of(namespace, name), ())
        return next(iter(found), None)

    def holdings(self) -> dict[str, tuple[str, ...]]:
        """Ledger owner → the addresses the Services' statuses show (for `vips.Ledger.holders`)."""
        sources = self.owner.sources
        found: dict[str, tuple[str, ...]] = {}
        for (namespace, name), bodies in sources.lbservices.items() if sources else ():
            for body in bodies:
                held = service_frontend.ledger_entry(body, self.serve_classless)
                if held:
                    found[service_frontend.owner_of(str(namespace), str(name))] = held
        return found

    def served_count(self) -> int:
        """How many Services layerlb serves now, for the metrics."""
        sources = self.owner.sources
        bodies = (b for bs in (sources.lbservices.values() if sources else ()) for b in bs)
        return sum(1 for body in bodies if service_frontend.served(body, self.serve_classless))

    def addresses_count(self) -> int:
        """How many addresses Services hold, for the metrics."""
        holders = self.owner.ledger.holders({**self.owner.statuses(), **self.holdings()})
        return sum(1 for holder in holders.values() if holder.startswith(vips.SERVICE_OWNER))

    # Reconciling.

    async def sync_key(self, key: str) -> Result:
        """Reconcile the Service of queue key `Service namespace/name` (gone: release what it held)."""
        namespace, _, name = key.removeprefix(vips.SERVICE_OWNER).partition("/")
        sources = self.owner.sources
        body = next(iter(sources.lbservices.get((namespace, name), ())), None) if sources else None
        if body is None:
            if key in self.owner.ledger.claims:
                self._forget(key)
            return Result("skipped")
        return await self.sync(body)

    def _forget(self, owner: str) -> None:
        self.owner.ledger.release(owner)
        self._written.pop(owner, None)
        self.owner.touch_all(self.owner.waiting_for_vip)
        self.touch_waiting(self.waiting)

    async def sync(self, body: Mapping[str, Any]) -> Result:
        """Reconcile one Service; reports API failures (retried with backoff), never raises for its content."""
        namespace, name = service_frontend.key_of(body)
        owner = service_frontend.owner_of(namespace, name)
        async with self.owner.lock(owner):
            try:
                if not service_frontend.served(body, self.serve_classless):
                    await self._release(body, owner)
                    return Result("skipped")
                return await self._serve(body, owner)
            except apiserver.ApiError as error:
                if error.status == 404:
                    return Result("skipped")
                if error.status == 409:  # our view was stale: the watch brings the newer Service
                    return Result("skipped")
                log.warning("Service %s/%s: %s", namespace, name, error)
                return Result("failed", str(error))

    async def _serve(self, body: Mapping[str, Any], owner: str) -> Result:
        sources = self.owner.sources
        assert sources is not None
        namespace, name = service_frontend.key_of(body)
        meta = body.get("metadata") or {}
        uid = str(meta.get("uid", ""))
        pools, broken = self.owner.valid_pools(sources)
        ledger = self.owner.ledger
        claimed = ledger.claims.get(owner) if owner not in ledger.released else ()
        current = None if claimed is None else ((claimed,) if isinstance(claimed, str) else claimed)
        written = self._written.get(owner)
        previous_ingress, previous_conditions = (
            (written[1], written[2])
            if written is not None and written[0] == uid
            else (_ingress(body), service_frontend.our_conditions(body))
        )
        derived = self.derived(namespace, name)
        decision = service_frontend.decide(
            body,
            pools=pools,
            holders=ledger.holders({**self.owner.statuses(), **self.holdings()}),
            broken_pools=broken,
            current=current,
            derived=derived,
        )
        ledger.claim(owner, decision.addresses)  # before any await: allocations never interleave
        if current and not set(current) <= set(decision.addresses):
            self.owner.touch_all(self.owner.waiting_for_vip)  # an address was freed
        if not service_frontend.has_finalizer(body):
            finalizers = [*(meta.get("finalizers") or []), service_frontend.FINALIZER]
            await asyncio.to_thread(
                self.owner.client.set_service_finalizers,
                namespace,
                name,
                finalizers,
                str(meta.get("resourceVersion", "")),
            )
        events = await self._derive(body, decision, derived)
        conditions = status.merge(previous_conditions, decision.conditions, self.owner.now())
        if decision.ingress != previous_ingress or _comparable(conditions) != _comparable(
            previous_conditions
        ):
            await asyncio.to_thread(
                self.owner.client.apply_service_status,
                namespace,
                name,
                {
                    "loadBalancer": {"ingress": decision.ingress} if decision.ingress else {},
                    "conditions": conditions,
                },
            )
            self._written[owner] = (uid, decision.ingress, conditions)
        events = self._events(previous_ingress, previous_conditions, decision, conditions) + events
        asked = str((body.get("spec") or {}).get("loadBalancerIP") or "")
        if decision.warnings and (uid, asked) not in self._warned:
            self._warned.add((uid, asked))
            events += decision.warnings
        if events:
            await asyncio.to_thread(self.owner.post, body, events)
        if decision.refusal is not None:
            # Not retried on a timer: what may cure it (a VIPPool change, a released address, the Service
            # itself changing) re-triggers the Service.
            return Result("refused", decision.conditions[0]["message"])
        return Result("accepted")

    async def _derive(
        self, body: Mapping[str, Any], decision: service_frontend.Decision, derived: Mapping[str, Any] | None
    ) -> list[status.Event]:
        """Apply the derived LoadBalancer when it differs from the stored one, or delete the stored one this
        Service controls when there should be none; the Events saying so."""
        desired = decision.loadbalancer
        if desired is not None:
            if derived is None or not service_loadbalancer.up_to_date(derived, desired):
                # Creating: no force, so a LoadBalancer someone created meanwhile under the name is a 409.
                await asyncio.to_thread(self.owner.client.apply, desired, force=derived is not None)
            return []
        if decision.remove_loadbalancer and derived is not None:
            return await self._delete_derived(
                derived, "the Service no longer asks for it, or it cannot serve it"
            )
        return []

    async def _delete_derived(self, derived: Mapping[str, Any], why: str) -> list[status.Event]:
        meta = derived.get("metadata") or {}
        if meta.get("deletionTimestamp"):
            return []
        try:
            await asyncio.to_thread(
                self.owner.client.delete_loadbalancer,
                str(meta.get("namespace") or "default"),
                str(meta.get("name")),
                str(meta.get("uid", "")),
            )
        except apiserver.ApiError as error:
            if error.status in (404, 409):  # gone already, or no longer the object this Service controlled
                return []
            raise
        what = service_loadbalancer.describe(derived)
        return [status.Event("Normal", "LoadBalancerDeleted", f"deleted {what}: {why}")]

    def _events(
        self,
        previous_ingress: list[dict[str, Any]],
        previous: list[dict[str, Any]],
        decision: service_frontend.Decision,
        conditions: list[dict[str, Any]],
    ) -> list[status.Event]:
        """An Event per condition whose status or reason changed (or whose addresses changed); the
        first, default `ArchitectureAccepted=True` is not news."""
        before = {c.get("type"): c for c in previous}
        moved = [i.get("ip") for i in previous_ingress] != list(decision.addresses)
        events = []
        for item in conditions:
            old = before.get(item["type"])
            same = old is not None and (old.get("status"), old.get("reason")) == (
                item["status"],
                item["reason"],
            )
            if item["type"] == service_frontend.ADDRESS_ASSIGNED and moved and item["status"] == "True":
                same = False
            if same or (old is None and item["reason"] == "KubeProxy"):
                continue
            if item["type"] == service_frontend.LOADBALANCER_READY and item["status"] != "True":
                continue  # the LoadBalancer tells its own story; the Service hears when it serves
            kind = "Normal" if item["status"] == "True" else "Warning"
            events.append(status.Event(kind, item["reason"], item["message"]))
        return events

    async def _release(self, body: Mapping[str, Any], owner: str) -> None:
        """No longer served (deleted, type or class changed, classless no longer served): give the address
        back, clear what layerlb wrote, and remove the finalizer."""
        namespace, name = service_frontend.key_of(body)
        meta = body.get("metadata") or {}
        had = self.owner.ledger.claims.get(owner) or service_frontend.ingress_addresses(body)
        ours = service_frontend.has_finalizer(body)
        derived = self.derived(namespace, name)
        # A Service being deleted leaves its derived LoadBalancer to the garbage collector (its owner reference).
        if (
            derived is not None
            and service_loadbalancer.controlled_by(derived, body)
            and not meta.get("deletionTimestamp")
        ):
            events = await self._delete_derived(derived, "the Service is no longer served by layerlb")
            if events:
                await asyncio.to_thread(self.owner.post, body, events)
        if owner in self.owner.ledger.claims or ours:
            self._forget(owner)
        if not ours:
            return
        version = str(meta.get("resourceVersion", ""))
        written = service_frontend.ingress_addresses(body) or service_frontend.our_conditions(body)
        announced = service_frontend.speaker_conditions(body)
        if written and not meta.get("deletionTimestamp"):
            cleared = await asyncio.to_thread(self.owner.client.apply_service_status, namespace, name, {})
            version = str((cleared.get("metadata") or {}).get("resourceVersion") or version)
        if announced and not meta.get("deletionTimestamp"):
            # The speakers' "who announces" conditions describe an address the Service no longer holds;
            # no speaker writes them again (it announces only served Services), so they go with ours.
            dropped = await asyncio.to_thread(
                self.owner.client.drop_service_conditions, namespace, name, announced
            )
            version = str((dropped.get("metadata") or {}).get("resourceVersion") or version)
        finalizers = [f for f in meta.get("finalizers") or [] if f != service_frontend.FINALIZER]
        await asyncio.to_thread(
            self.owner.client.set_service_finalizers, namespace, name, finalizers, version
        )
        if not had:  # a later view of a Service released already: nothing to tell
            return
        addresses = ", ".join((had,) if isinstance(had, str) else had)
        why = "is being deleted" if meta.get("deletionTimestamp") else "is no longer served by layerlb"
        spec = body.get("spec") or {}
        detail = f"type {spec.get('type')}" + (
            f", class {spec['loadBalancerClass']}" if spec.get("loadBalancerClass") else ", no class"
        )
        event = status.Event(
            "Normal", "AddressReleased", f"released {addresses}: the Service {why} ({detail})"
        )
        if not meta.get("deletionTimestamp"):
            await asyncio.to_thread(self.owner.post, body, [event])
        log.info("Service %s/%s: released %s", namespace, name, addresses)
