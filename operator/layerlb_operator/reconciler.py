"""Brings LoadBalancers to their desired state against the API server; the kopf handlers only call into it.

`Reconciler.sync` is the one path for every trigger (a LoadBalancer created, changed or resumed; a
Service, EndpointSlice, Secret, VIPPool, Deployment or forwarding pod that it refers to changed):
read the cluster view from the watched state in memory, run the pure `desired_state.reconcile`, claim the VIP,
server-side apply the objects, and patch the status when it differs. Triggers from watched objects
go through a debounced queue, so a burst of endpoint changes costs one re-render per LoadBalancer.
Changes of a LoadBalancer's own forwarding pods, their serving reports and their Deployment only move
its status (`Ready`, ready counts), so they wait `status_delay` (0.05 s), long enough to take a pod's
status patch and the Deployment's follow-up together, instead of the full debounce: otherwise `Ready`
would lag the pod that serves by up to half a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
from collections import Counter
from collections.abc import Callable, Hashable, Mapping
from typing import Any

from layerlb import plan_contract, validation
from layerlb_operator import (
    admin_ports,
    apiserver,
    bgp_status,
    desired_state,
    objects,
    pool_status,
    service_reconciler,
    status,
    vips,
)
from layerlb_operator.cluster_view import ClusterView, Sources, Store
from layerlb_operator.debounce import Debouncer
from layerlb_operator.metrics import Metrics
from layerlb_operator.sync_result import Result

log = logging.getLogger("layerlb.operator")

# How long a deletion waits for the forwarding pods to confirm their kernel state is gone.
CLEANUP_SECONDS = 60.0

# The queue key of a VIPPool's status (LoadBalancers are "namespace/name", Services vips.SERVICE_OWNER...).
POOL_KEY = "VIPPool "

# Accepted reasons that a VIP (or host admin port) released elsewhere may cure.
WAITING_FOR_VIP = ("VIPConflict", "NoVIPAvailable", admin_ports.REASON)


def backoff(attempt: int) -> float:
    """Seconds before retry `attempt` (1, 2, 3, ...) of a transient failure: 1, 2, 4, ... up to 60."""
    return float(min(60, 2 ** max(0, attempt - 1)))


def rfc3339(moment: datetime.datetime | None = None) -> str:
    """A timestamp as conditions and Events carry it (seconds, UTC)."""
    return (moment or datetime.datetime.now(datetime.UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")


def _first(store: Store, key: Any) -> Any:
    return next(iter(store.get(key, ())), None)


def _port_owner(meta: Mapping[str, Any]) -> str:
    """Who holds a host admin port: the LoadBalancer as its Deployment's labels name it."""
    return f"{meta.get('namespace') or 'default'}/{objects.label_value(str(meta.get('name')))}"


def _comparable(value: Mapping[str, Any]) -> dict[str, Any]:
    # The API server drops null fields; compare what it would store.
    return {key: item for key, item in value.items() if item is not None}


class Reconciler:
    """The operator's state between triggers: VIP claims, per-LoadBalancer locks, the debounced queue."""

    def __init__(
        self,
        client: apiserver.Client,
        settings: objects.Settings,
        metrics: Metrics,
        *,
        debounce: float = 0.5,
        status_delay: float = 0.05,
        concurrency: int = 8,
        now: Callable[[], str] = rfc3339,
        cleanup_timeout: float = CLEANUP_SECONDS,
        serve_classless: bool = False,
        ready_needs_announcement: bool = False,
        vips_outside_pools: str = vips.ALLOW,
    ) -> None:
        self.client = client
        # Whether a spec.vip that no VIPPool covers is honoured (vips.allocate; the chart refuses it).
        self.vips_outside_pools = vips_outside_pools
        # Ready waits for a speaker's `status.announcement` (the chart's operator, when it runs speakers).
        self.ready_needs_announcement = ready_needs_announcement
        self._announced: dict[str, bool] = {}  # key → whether the last status saw its VIP announced
        self.settings = settings
        self.metrics = metrics
        self.now = now
        self.concurrency = concurrency
        self.cleanup_timeout = cleanup_timeout
        self._changed: dict[Hashable, asyncio.Event] = {}  # instance → set when its pods or reports change
        self._pruning: set[asyncio.Task[None]] = set()
        self.ledger = vips.Ledger()
        self.port_ledger = vips.Ledger()  # host admin ports claimed, owner "namespace/instance label"
        self.queue: Debouncer[str] = Debouncer(debounce)
        self.status_delay = status_delay
        self.sources: Sources | None = None
        self._locks: dict[str, asyncio.Lock] = {}
        self._written: dict[str, tuple[str, dict[str, Any]]] = {}  # key → (uid, status last written)
        self._attempts: Counter[str] = Counter()
        self._pools: dict[tuple[str, str], vips.Pool | str] = {}
        self._pool_specs: dict[str, tuple[str, int]] = {}  # VIPPool name → (uid, generation) last handled
        # Services of type LoadBalancer: the same ledger, queue, pools and client (service_reconciler).
        self.services = service_reconciler.ServiceReconciler(self, serve_classless)
        metrics.vips = self.vips_allocated
        metrics.services = self.services.served_count
        metrics.service_addresses = self.services.addresses_count

    def bind(self, sources: Sources) -> Sources:
        """Use these watched-state lookups from now on (the handlers pass kopf's indexes)."""
        self.sources = sources
        return sources

    def statuses(self) -> dict[str, str]:
        """Ledger owner → VIP, as the LoadBalancers' statuses show them."""
        return self._statuses(self.sources) if self.sources else {}

    def _holdings(self, sources: Sources) -> dict[str, str | tuple[str, ...]]:
        """Every address the statuses show as held: LoadBalancers' VIPs and Services' ingress addresses."""
        return {**self._statuses(sources), **self.services.holdings()}

    def _statuses(self, sources: Sources) -> dict[str, str]:
        statuses = {}
        for key, bodies in sources.loadbalancers.items():
            for body in bodies:
                vip = (body.get("status") or {}).get("vip")
                if isinstance(vip, str):
                    statuses[str(key)] = vip
        return statuses

    def vips_allocated(self) -> int:
        """How many addresses LoadBalancers hold, for the metrics."""
        return len(self.ledger.holders(self._holdings(self.sources))) if self.sources else 0

    def lock(self, key: str) -> asyncio.Lock:
        """The lock that serializes the syncs of one LoadBalancer or Service (`Service namespace/name`)."""
        return self._locks.setdefault(key, asyncio.Lock())

    def valid_pools(self, sources: Sources) -> tuple[list[vips.Pool], dict[str, str]]:
        """The VIPPools that parse (parsed once per resourceVersion), and the broken ones with why."""
        return self._valid_pools(sources)

    def _valid_pools(self, sources: Sources) -> tuple[list[vips.Pool], dict[str, str]]:
        pools, broken = [], {}
        for name, bodies in sources.pools.items():
            for body in bodies:
                # By generation, not resourceVersion: status writes (the speakers', the operator's) leave
                # the spec as it was and must neither re-parse it nor grow this cache.
                meta = body.get("metadata") or {}
                version = f"{meta.get('uid', '')}/{meta.get('generation', '')}"
                cached = self._pools.get((str(name), version))
                if cached is None:
                    try:
                        cached = vips.pool_from(body)
                    except validation.Invalid as error:
                        cached = f"invalid: {error}"
                        log.warning("VIPPool %s is not used: %s", name, error)
                    self._pools[(str(name), version)] = cached
                if isinstance(cached, vips.Pool):
                    pools.append(cached)
                else:
                    broken[str(name)] = cached
        return pools, broken

    def _previous(self, key: str, document: Mapping[str, Any]) -> dict[str, Any]:
        uid = str((document.get("metadata") or {}).get("uid", ""))
        written = self._written.get(key)
        if written is not None and written[0] == uid:
            return written[1]
        return _comparable(status.operator_owned(document.get("status") or {}))

    async def sync(self, document: Mapping[str, Any]) -> Result:
        """Reconcile one LoadBalancer document now; never raises for its content, only reports."""
        key = desired_state.key_of(document)
        meta = document.get("metadata") or {}
        sources = self.sources
        if meta.get("deletionTimestamp") or sources is None:
            return Result("skipped")
        async with self._locks.setdefault(key, asyncio.Lock()):
            previous = self._previous(key, document)
            pools, broken = self._valid_pools(sources)
            view = ClusterView(
                sources.services,
                sources.slices,
                sources.secrets,
                pools,
                # A LoadBalancer derived from a Service shares that Service's address (vips.shared).
                self.services.shared(self.ledger.holders(self._holdings(sources)), document),
                current_vip=previous.get("vip"),
                broken_pools=broken,
                vips_outside_pools=self.vips_outside_pools,
            )
            owner = _port_owner(meta)
            held = self.port_ledger.holders(
                {
                    f"{ns}/{label}": str(port)
                    for (ns, label), ports in sources.admin_ports.items()
                    for port in ports
                }
            )
            outcome = desired_state.reconcile(
                document,
                view,
                self.settings,
                lambda: admin_ports.choose(owner, held, self.settings.host_admin_ports),
            )
            if outcome.verdict != "invalid":
                self.ledger.claim(key, outcome.vip)  # before any await: allocations never interleave
            if outcome.admin_port is not None:
                self.port_ledger.claim(owner, str(outcome.admin_port))
            elif outcome.verdict == "accepted":
                self.port_ledger.claim(owner, None)  # pod network: it holds no node port
            apply_error = None
            if outcome.objects:
                try:
                    await asyncio.to_thread(self._apply_all, outcome.objects)
                except apiserver.ApiError as error:
                    apply_error = str(error)
            instance = (str(meta.get("namespace") or "default"), objects.label_value(str(meta.get("name"))))
            new = desired_state.status_for(
                previous,
                outcome,
                apply_error=apply_error,
                deployment_status=_first(sources.deployments, instance),
                reports=status.reports(sources.pods.get(instance, ()), _first(sources.serving, instance)),
                now=self.now(),
                announced=status.announced_by(document.get("status") or {}, outcome.vip),
                needs_announcement=self.ready_needs_announcement,
            )
            self._announced[key] = bool(status.announced_by(document.get("status") or {}, new.get("vip")))
            result = Result(
                "failed" if apply_error else outcome.verdict, apply_error or outcome.accepted["message"]
            )
            if _comparable(new) != previous:
                try:
                    await asyncio.to_thread(self.client.patch_status, instance[0], str(meta.get("name")), new)
                except apiserver.ApiError as error:
                    if error.status == 404:
                        return Result("skipped")
                    result = Result("failed", f"status: {error}")
                else:
                    self._written[key] = (str(meta.get("uid", "")), _comparable(new))
                    events = status.transitions(previous.get("conditions") or [], new["conditions"])
                    if events:
                        await asyncio.to_thread(self._post, document, events)
            conditions = new["conditions"]
            self.metrics.reconciled(
                key,
                result.verdict,
                status.status_of(conditions, status.ACCEPTED),
                status.status_of(conditions, status.READY),
            )
            return result

    def _apply_all(self, desired: list[dict[str, Any]]) -> None:
        """Server-side apply each object; a Service's `status` (the VIP Service's ingress) goes to its status
        subresource after it, since an apply to the object itself ignores status."""
        for obj in desired:
            body = {k: v for k, v in obj.items() if k != "status"}
            self.client.apply(body)
            if obj["kind"] == "Service" and "status" in obj:
                meta = obj["metadata"]
                self.client.apply_service_status(meta["namespace"], meta["name"], obj["status"])

    def post(self, document: Mapping[str, Any], events: list[status.Event]) -> None:
        """Post `events` about `document` (a LoadBalancer or a Service), blocking."""
        self._post(document, events)

    def _post(self, document: Mapping[str, Any], events: list[status.Event]) -> None:
        now = self.now()
        for event in events:
            body = {"type": event.type, "reason": event.reason, "message": event.message[:1024]}
            self.client.post_event(dict(document), {**body, "firstTimestamp": now, "lastTimestamp": now})

    def touch(self, reference: Hashable) -> None:
        """A watched object changed: re-render the LoadBalancers that refer to it, debounced (briefly for
        an `("instance", ...)` reference: a forwarding pod, its report or its Deployment, which move only
        the status)."""
        changed = self._changed.get(reference)
        if changed is not None:
            changed.set()
        if self.sources is not None:
            delay = (
                self.status_delay if isinstance(reference, tuple) and reference[:1] == ("instance",) else None
            )
            for key in self.sources.references.get(reference, ()):
                self.queue.touch(str(key), delay)

    def announcement_changed(self, document: Mapping[str, Any]) -> None:
        """A LoadBalancer event: when a speaker wrote its VIP's first announcement (or removed the last) since
        the last status was computed, and Ready depends on it, compute the status again (kopf's update handlers
        never see a status-only change)."""
        if not self.ready_needs_announcement:
            return
        key = desired_state.key_of(document)
        current = document.get("status") or {}
        if key in self._announced and self._announced[key] != bool(
            status.announced_by(current, current.get("vip"))
        ):
            self.queue.touch(key, self.status_delay)  # not on a move from node to node: Ready is the same

    def pod_gone(self, instance: tuple[str, str | None, str | None], pod: str) -> None:
        """A forwarding pod was deleted: drop its entry from the serving ConfigMap so entries do not pile up.

        Only on deletion (a pod name never returns): pruning pods merely absent from the index could drop
        the report of a pod that reported before the index saw it.
        """
        if self.sources is None or pod not in (_first(self.sources.serving, instance[1:]) or {}):
            return
        for key in self.sources.references.get(instance, ()):
            namespace, name = str(key).split("/", 1)
            task = asyncio.get_running_loop().create_task(self._unreport(namespace, name, pod))
            self._pruning.add(task)
            task.add_done_callback(self._pruning.discard)

    async def _unreport(self, namespace: str, name: str, pod: str) -> None:
        path = f"{apiserver.collection_path('v1', 'ConfigMap', namespace)}/{objects.serving_configmap_name(name)}"
        try:
            await asyncio.to_thread(
                self.client.write, "ConfigMap", "PATCH", path,
                query=[("fieldManager", self.client.field_manager)],
                body={"data": {pod: None, pod + plan_contract.WARNINGS_SUFFIX: None}}, content_type=apiserver.MERGE_PATCH,
            )  # fmt: skip
        except apiserver.ApiError as error:
            if error.status != 404:  # gone with its LoadBalancer: nothing to prune
                log.warning("could not drop the report of deleted pod %s/%s: %s", namespace, pod, error)

    def touch_all(self, only: Callable[[Mapping[str, Any]], bool] = lambda body: True) -> None:
        """Re-render every LoadBalancer (that `only` picks), debounced: a VIPPool changed, or a VIP was freed."""
        if self.sources is not None:
            for key, bodies in self.sources.loadbalancers.items():
                if any(only(body) for body in bodies):
                    self.queue.touch(str(key))

    async def before_delete(self, document: Mapping[str, Any]) -> None:
        """The finalizer's wait: the forwarding pods remove their state before the objects are collected.

        The kernel architectures leave IPVS services, nftables tables and VIP addresses on the nodes when a
        pod merely stops (so restarts do not cut connections); only a Plan leaving the source removes
        them. So the Plan ConfigMap gets the empty Plan list, and the deletion waits until every running
        forwarding pod reports `removed`, at most `cleanup_timeout` seconds: then a Warning Event says
        which pods did not confirm, and the deletion goes on (it never hangs on a broken node). Without
        running pods there is nothing to wait for.
        """
        sources = self.sources
        if sources is None:
            return
        meta = document.get("metadata") or {}
        namespace, name = str(meta.get("namespace") or "default"), str(meta.get("name"))
        instance = ("instance", namespace, objects.label_value(name))

        def pending() -> list[str]:
            where = instance[1:]
            return status.cleanup_pending(sources.pods.get(where, ()), _first(sources.serving, where))

        if not pending():
            return
        removal = objects.config_map(namespace, name, str(meta.get("uid", "")), plan_contract.REMOVED_PLAN)
        try:
            await asyncio.to_thread(self.client.apply, removal)
        except apiserver.ApiError as error:
            warning = status.Event(
                "Warning", "CleanupFailed", f"cannot tell the forwarding pods to remove their state: {error}"
            )
            await asyncio.to_thread(self._post, document, [warning])
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.cleanup_timeout
        changed = self._changed.setdefault(instance, asyncio.Event())
        try:
            while waiting := pending():
                remaining = deadline - loop.time()
                if remaining <= 0:
                    message = (
                        f"{len(waiting)} forwarding pod(s) did not confirm removing their state within "
                        f"{self.cleanup_timeout:.0f} s ({', '.join(waiting[:5])}); deleting anyway, "
                        "kernel state may remain on their nodes"
                    )
                    await asyncio.to_thread(
                        self._post, document, [status.Event("Warning", "CleanupTimedOut", message)]
                    )
                    return
                changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), min(remaining, 1.0))
        finally:
            self._changed.pop(instance, None)
        log.info("%s/%s: the forwarding pods removed their state", namespace, name)

    async def forget(self, document: Mapping[str, Any]) -> None:
        """A LoadBalancer is being deleted: run the cleanup hook, release its VIP, and wake who waits for one."""
        key = desired_state.key_of(document)
        async with self._locks.setdefault(key, asyncio.Lock()):
            await self.before_delete(document)
            self.ledger.release(key)
            self.port_ledger.release(_port_owner(document.get("metadata") or {}))
            self.queue.discard(key)
            self._written.pop(key, None)
            self._attempts.pop(key, None)
            self.metrics.forget(key)
        self._locks.pop(key, None)
        self.touch_all(self.waiting_for_vip)
        self.services.touch_waiting(self.services.waiting)

    @staticmethod
    def waiting_for_vip(body: Mapping[str, Any]) -> bool:
        """Whether a LoadBalancer waits for a VIP (or host port) that a release elsewhere may give it."""
        conditions = (body.get("status") or {}).get("conditions") or []
        return status.reason_of(conditions, status.ACCEPTED) in WAITING_FOR_VIP

    def pool_changed(self, document: Mapping[str, Any], deleted: bool) -> None:
        """A VIPPool event: LoadBalancers and waiting Services re-render when its spec changed (not on a
        status write), and its `InterfacesFound` condition is brought up to date through the queue."""
        name = str((document.get("metadata") or {}).get("name") or "")
        if pool_status.spec_changed(self._pool_specs, document, deleted):
            self.touch_all()
            self.services.touch_waiting()
        if deleted:
            self._pool_specs.pop(name, None)
            self.queue.discard(POOL_KEY + name)
            return
        meta = document.get("metadata") or {}
        self._pool_specs[name] = (str(meta.get("uid") or ""), int(meta.get("generation") or 0))
        self.queue.touch(POOL_KEY + name)

    async def sync_pool(self, name: str) -> Result:
        """Write a VIPPool's `InterfacesFound` condition when it changed (`pool_status`)."""
        document = _first(self.sources.pools, name) if self.sources else None
        if document is None:
            return Result("skipped")
        wanted = pool_status.conditions(document, self.now())
        if not pool_status.stale(document, wanted):
            return Result("unchanged")
        try:
            await asyncio.to_thread(self.client.apply_pool_status, name, pool_status.apply_body(name, wanted))
        except apiserver.ApiError as error:
            if error.status == 404:  # deleted meanwhile
                return Result("skipped")
            log.warning("could not write the status of VIPPool %s: %s", name, error)
            return Result("failed", str(error))
        return Result("written")

    async def peer_changed(self, document: Mapping[str, Any]) -> Result:
        """A BGPPeer event (a speaker's session entry among them): write its `Established` condition when it
        changed (`bgp_status`). kopf hands one object's events over one at a time, so no queue is needed."""
        name = str((document.get("metadata") or {}).get("name") or "")
        wanted = bgp_status.conditions(document, self.now())
        if not name or not bgp_status.stale(document, wanted):
            return Result("unchanged")
        try:
            await asyncio.to_thread(self.client.apply_peer_status, name, bgp_status.apply_body(name, wanted))
        except apiserver.ApiError as error:
            if error.status == 404:  # deleted meanwhile
                return Result("skipped")
            log.warning("could not write the status of BGPPeer %s: %s", name, error)
            return Result("failed", str(error))
        return Result("written")

    async def _queued(self, key: str) -> None:
        if key.startswith(vips.SERVICE_OWNER):
            work = self.services.sync_key(key)
        elif key.startswith(POOL_KEY):
            work = self.sync_pool(key.removeprefix(POOL_KEY))
        else:
            document = _first(self.sources.loadbalancers, key) if self.sources else None
            if document is None:
                return
            work = self.sync(document)
        try:
            result = await work
        except Exception as error:  # a bug must not stop the queue for every other LoadBalancer
            log.exception("reconciling %s failed", key)
            result = Result("failed", str(error))
        if result.transient:
            self._attempts[key] += 1
            self.queue.touch(key, backoff(self._attempts[key]))
        else:
            self._attempts.pop(key, None)

    async def run(self) -> None:
        """Work the debounced queue forever, at most `concurrency` LoadBalancers at a time."""
        slots = asyncio.Semaphore(self.concurrency)
        running: set[asyncio.Task[None]] = set()

        async def one(key: str) -> None:
            try:
                await self._queued(key)
            finally:
                slots.release()

        async for keys in self.queue.batches():
            for key in keys:
                await slots.acquire()
                task = asyncio.create_task(one(key))
                running.add(task)
                task.add_done_callback(running.discard)
