"""The speaker's view of Kubernetes: list+watch of the six kinds it reads, and Events on takeover.

Thin on purpose: every watch keeps a cache of raw objects (camelCase, as the API sends them) and pokes
the loop; the loop turns the caches into an `Inventory` with the pure `inventory.vips`. The `kubernetes`
client is synchronous, so each watch runs in a thread of its own.

Freshness: the view is fresh once every kind has been listed and while no watch has been failing for
longer than `stale_after` (default 30 s, so a watch timeout or an API server restart does not count).
A stale view keeps its last known state; `announcement.holder` prefers fresh speakers.

Events: a Normal `Announcing` Event on the LoadBalancer or Service ("announcing 192.0.2.10 from node-2
on eth0") when this node takes a VIP over, and Warnings for a per-VIP problem (a missing interface, no
node matching the pool's nodeSelector) on the VIP's owners and, for a pool's problem, on the VIPPool
(cluster-scoped: its Events go to the `default` namespace, where `kubectl describe vippool` finds them),
sent from one worker thread so a slow API server never stalls the answers.

Status: the holder of a VIP shows itself in its owners' status (`statuses`: a LoadBalancer's
`status.announcement` by merge patch, a Service's `layerlb.dev/AnnouncedIPv4|6` condition by server-side
apply), written from a worker thread of its own (retried a few times), so Events and answers never wait
for it. A node's missing pool interfaces go into the VIPPools' `status.nodes` the same way (`pool_status`:
its own entry by server-side apply). RBAC: `patch` on `loadbalancers/status`, `services/status` and
`vippools/status`, nothing more.

BGP (`--bgp`): two more watches, BGPPeers and BGPAdvertisements, turned into `Inventory.bgp` by the pure
`bgp_resources.intent`, with each peer's password read from its Secret (`get` on Secrets in the speaker's
own namespace only, a namespaced Role; each Secret re-read at most every `SECRET_TTL` seconds, so a rotated
password is picked up). This node's sessions go into the BGPPeers' `status.nodes` (`bgp_status`: its own
entry by server-side apply, `patch` on `bgppeers/status`), from BIRD's view after every change of it.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import datetime
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from layerlb_speaker import (
    announcement,
    bgp,
    bgp_resources,
    bgp_status,
    bird,
    inventory,
    node_entries,
    pool_status,
    statuses,
)
from layerlb_speaker.announcement import Address, Owner, Vip
from layerlb_speaker.runtime import Inventory

log = logging.getLogger("layerlb.speaker")

DATAPLANE_PODS = "app.kubernetes.io/name=layerlb,app.kubernetes.io/component=dataplane"
MAX_PENDING_EVENTS = 2000
MAX_PENDING_STATUSES = 5000
STATUS_RETRIES = (0.5, 1.0, 2.0, 4.0)  # seconds before each retry of a failed status write
SECRET_TTL = 30.0  # seconds a password Secret (or its absence) is believed before it is read again


def _slim(obj: dict[str, Any]) -> dict[str, Any]:
    """`obj` without `metadata.managedFields`, which the speaker never reads and which is most of a cached
    Service's size (every writer of a status, the speakers too, adds an entry)."""
    (obj.get("metadata") or {}).pop("managedFields", None)
    return obj


class _Watch(threading.Thread):
    """List, then watch from that resourceVersion; relist on any error. `objects` is the cache by uid."""

    def __init__(self, kind: str, lister: Callable[..., Any], changed: Callable[[], None], **query: Any):
        super().__init__(name=f"watch-{kind}", daemon=True)
        self.kind = kind
        self.lister = lister
        self.query = query
        self.changed = changed
        self.objects: dict[str, dict[str, Any]] = {}
        self.synced = False
        self.failing_since: float | None = None

    def _raw(self, **kwargs: Any) -> Any:
        """The lister without a return type, which the client's `Watch` would otherwise turn every event's
        object into (a tree of model objects per event, thrown away here): events stay plain dicts."""
        return self.lister(**kwargs)

    def run(self) -> None:
        from kubernetes import watch as watches

        streams: Any = watches  # untyped in the kubernetes package
        while True:
            try:
                response = self.lister(_preload_content=False, **self.query)
                listing = json.loads(response.data)
                del response
                self.objects = {o["metadata"]["uid"]: _slim(o) for o in listing.get("items") or []}
                self.synced, self.failing_since = True, None
                self.changed()
                version = listing["metadata"]["resourceVersion"]
                for event in streams.Watch().stream(
                    self._raw, resource_version=version, timeout_seconds=300, **self.query
                ):
                    raw = event.get("raw_object") or {}
                    if event["type"] == "ERROR":
                        break  # 410 Gone and friends: relist
                    uid = (raw.get("metadata") or {}).get("uid")
                    if not uid:
                        continue
                    if event["type"] == "DELETED":
                        self.objects.pop(uid, None)
                    else:
                        self.objects[uid] = _slim(raw)
                    self.changed()
            except Exception as error:
                if self.failing_since is None:
                    self.failing_since = time.monotonic()
                    log.warning("watch %s: %s; retrying", self.kind, error)
                self.changed()
                time.sleep(1.0)


class Cluster:
    """The API client, the watches, and the Event sender of one node's speaker."""

    def __init__(
        self,
        client: Any,
        node: str,
        stale_after: float,
        classless: bool,
        bgp: bool = False,
        namespace: str | None = None,
    ) -> None:
        from kubernetes import client as k8s

        self.client = client
        self.node = node
        self.stale_after = stale_after
        self.classless = classless
        self.bgp = bgp
        self.namespace = namespace  # where password Secrets may be read (None: anywhere RBAC allows)
        self._secrets: dict[tuple[str, str], tuple[float, dict[str, str] | str]] = {}
        self._invalid_logged: set[str] = set()
        self.core = k8s.CoreV1Api(client)
        self._poke: Callable[[], None] = lambda: None
        self._events = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="events")
        self._pending = 0
        self._statuses = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="statuses")
        self._pending_statuses = 0
        self._status_written: set[tuple[str, str]] = set()  # (owner uid, family) this process wrote
        discovery = k8s.DiscoveryV1Api(client)
        custom = k8s.CustomObjectsApi(client)
        self.custom = custom

        def loadbalancers(**kwargs: Any) -> Any:
            return custom.list_cluster_custom_object("layerlb.dev", "v1alpha1", "loadbalancers", **kwargs)

        def vippools(**kwargs: Any) -> Any:
            return custom.list_cluster_custom_object("layerlb.dev", "v1alpha1", "vippools", **kwargs)

        changed = self._changed
        self.watches = {
            "nodes": _Watch("nodes", self.core.list_node, changed),
            "pods": _Watch(
                "pods", self.core.list_pod_for_all_namespaces, changed, label_selector=DATAPLANE_PODS
            ),
            "services": _Watch("services", self.core.list_service_for_all_namespaces, changed),
            "endpointslices": _Watch(
                "endpointslices", discovery.list_endpoint_slice_for_all_namespaces, changed
            ),
            "loadbalancers": _Watch("loadbalancers", loadbalancers, changed),
            "vippools": _Watch("vippools", vippools, changed),
        }
        if bgp:

            def bgppeers(**kwargs: Any) -> Any:
                return custom.list_cluster_custom_object("layerlb.dev", "v1alpha1", "bgppeers", **kwargs)

            def bgpadvertisements(**kwargs: Any) -> Any:
                return custom.list_cluster_custom_object(
                    "layerlb.dev", "v1alpha1", "bgpadvertisements", **kwargs
                )

            self.watches["bgppeers"] = _Watch("bgppeers", bgppeers, changed)
            self.watches["bgpadvertisements"] = _Watch("bgpadvertisements", bgpadvertisements, changed)

    @classmethod
    def connect(
        cls, node: str, stale_after: float, classless: bool, bgp: bool = False, namespace: str | None = None
    ) -> Cluster:
        """The data plane's client: the ServiceAccount in a pod (its token re-read as it rotates), else the
        kubeconfig; OSError with one readable line when neither loads."""
        from layerlb_dataplane.control import kube_source

        return cls(kube_source.api_client(), node, stale_after, classless, bgp, namespace)

    def _changed(self) -> None:
        self._poke()

    def fresh(self) -> bool:
        """Every kind listed, and none failing for longer than `stale_after`."""
        now = time.monotonic()
        return all(
            w.synced and (w.failing_since is None or now - w.failing_since < self.stale_after)
            for w in self.watches.values()
        )

    def snapshot(self) -> Inventory:
        """The inventory the caches hold now."""
        w = {kind: list(each.objects.values()) for kind, each in self.watches.items()}
        vips, notices = inventory.announced(
            w["nodes"],
            w["loadbalancers"],
            w["pods"],
            w["services"],
            w["endpointslices"],
            w["vippools"],
            self.classless,
        )
        labels = inventory.node_labels(w["nodes"])
        wanted = pool_status.wanted(inventory.pools(w["vippools"]), labels.get(self.node))
        routing = None
        if self.bgp:
            routing, invalid = bgp_resources.intent(
                w["bgppeers"], w["bgpadvertisements"], labels, self.read_secret, self.namespace
            )
            for line in invalid:
                if line not in self._invalid_logged:
                    log.error("%s; left out (it opens no session)", line)
            self._invalid_logged = set(invalid)
        return Inventory(
            vips, inventory.peers(w["nodes"]), self.fresh(), notices, wanted, frozenset(labels), routing
        )

    def read_secret(self, namespace: str, name: str, key: str) -> str:
        """One key of a Secret, read at most every SECRET_TTL seconds; `bgp_resources.SecretProblem` says why
        not (missing, forbidden, no such key)."""
        now = time.monotonic()
        cached = self._secrets.get((namespace, name))
        if cached is None or now - cached[0] >= SECRET_TTL:
            cached = (now, self._fetch_secret(namespace, name))
            self._secrets[(namespace, name)] = cached
        data = cached[1]
        if isinstance(data, str):
            raise bgp_resources.SecretProblem(data)
        if key not in data:
            keys = ", ".join(sorted(data)) or "none"
            raise bgp_resources.SecretProblem(
                f"passwordSecret: Secret {namespace}/{name} has no key {key!r} (its keys: {keys})"
            )
        return data[key]

    def _fetch_secret(self, namespace: str, name: str) -> dict[str, str] | str:
        where = f"passwordSecret: Secret {namespace}/{name}"
        try:
            response: Any = self.core.read_namespaced_secret(name, namespace, _preload_content=False)
            data = json.loads(response.data).get("data") or {}
            return {str(k): base64.b64decode(v).decode("utf-8", "replace").strip() for k, v in data.items()}
        except Exception as error:
            status = getattr(error, "status", None)
            if status == 404:
                return f"{where} not found"
            if status == 403:
                return f"{where}: forbidden (the speaker may read Secrets in its own namespace only)"
            return f"{where} could not be read: {getattr(error, 'reason', None) or error}"

    def _secrets_due(self) -> bool:
        now = time.monotonic()
        return any(now - when >= SECRET_TTL for when, _ in self._secrets.values())

    async def synced(self, timeout: float) -> None:
        """Waits until every kind was listed once (or `timeout`: then the speaker starts stale)."""
        deadline = time.monotonic() + timeout
        while not all(w.synced for w in self.watches.values()) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    async def watch(self, update: Callable[[Inventory], None]) -> None:
        """Starts the watches and feeds `update` with a new inventory after each burst of changes."""
        loop = asyncio.get_running_loop()
        poked = asyncio.Event()

        def poke() -> None:
            loop.call_soon_threadsafe(poked.set)

        self._poke = poke
        for each in self.watches.values():
            each.start()
        fresh = None
        last: Inventory | None = None
        while True:
            try:
                await asyncio.wait_for(poked.wait(), 5.0)  # also re-judges freshness while nothing changes
            except TimeoutError:
                if self.fresh() == fresh and not self._secrets_due():
                    continue
            poked.clear()
            await asyncio.sleep(0.05)  # one inventory per burst (a relist pokes once per object)
            poked.clear()
            # In a thread: reading a password Secret is a blocking API call.
            snapshot = await asyncio.to_thread(self.snapshot) if self.bgp else self.snapshot()
            fresh = snapshot.fresh
            # A change the inventory does not show (a status written, the speakers' own writes among them)
            # recomputes nothing: at a start over 1,000 Services, each write coming back would otherwise.
            if snapshot != last:
                last = snapshot
                update(snapshot)

    def reporter(self) -> EventReporter:
        return EventReporter(self)

    def send_event(self, owner: Owner, kind: str, reason: str, message: str) -> None:
        """Queues one Event on `owner`; dropped (logged) when the API server is too far behind."""
        if not owner.name or self._pending >= MAX_PENDING_EVENTS:
            return
        self._pending += 1
        self._events.submit(self._create_event, owner, kind, reason, message)

    def _create_event(self, owner: Owner, kind: str, reason: str, message: str) -> None:
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        namespace = owner.namespace or "default"  # a cluster-scoped object's Events live in default
        body: Any = {
            "metadata": {"generateName": f"{owner.name}.", "namespace": namespace},
            "involvedObject": {
                "kind": owner.kind,
                "namespace": owner.namespace,
                "name": owner.name,
                "uid": owner.uid,
                "apiVersion": owner.api_version,
            },
            "reason": reason,
            "message": message,
            "type": kind,
            "count": 1,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "source": {"component": "layerlb-speaker", "host": self.node},
            "reportingComponent": "layerlb.dev/speaker",
            "reportingInstance": self.node,
        }
        try:
            self.core.create_namespaced_event(namespace, body)
        except Exception as error:
            log.warning("event on %s: %s", owner, error)
        finally:
            self._pending -= 1

    def publisher(self) -> StatusPublisher:
        return StatusPublisher(self)

    def send_status(self, write: statuses.Write) -> None:
        """Queues one status write; dropped (logged) when the API server is too far behind."""
        if not write.owner.name or self._pending_statuses >= MAX_PENDING_STATUSES:
            log.warning("status of %s not written: too many pending", write.owner)
            return
        self._pending_statuses += 1
        self._statuses.submit(self._write_status, write)

    def _write_status(self, write: statuses.Write) -> None:
        try:
            key = (write.owner.uid, statuses.family(write.address))
            kind = "loadbalancers" if write.owner.kind == "LoadBalancer" else "services"
            # An object this process never wrote that already says so needs no write (a restart, a
            # second clear). After a write of ours the watch may lag, so it is not trusted then.
            if key not in self._status_written and write.written(
                self.watches[kind].objects.get(write.owner.uid)
            ):
                return
            for delay in (*STATUS_RETRIES, None):
                try:
                    self._send_status(write)
                except Exception as error:
                    if getattr(error, "status", None) == 404 or delay is None:
                        log.warning("status of %s: %s", write.owner, error)
                        return
                    time.sleep(delay)
                else:
                    self._status_written.add(key)
                    return
        finally:
            self._pending_statuses -= 1

    def pool_publisher(self) -> PoolStatusPublisher:
        return PoolStatusPublisher(self)

    def entry_cleaning(self, members: Mapping[str, announcement.Member]) -> tuple[set[str] | None, bool]:
        """For `node_entries.Publisher`: the Nodes that exist (None unless the view is fresh) and whether this
        speaker removes the entries of the others (the live one first by name, from a fresh view only)."""
        fresh = self.fresh()
        # list() copies in one step: the watch threads change the caches meanwhile.
        nodes = inventory.node_labels(list(self.watches["nodes"].objects.values()))
        clears = fresh and bool(members) and min(members) == self.node
        return (set(nodes) if fresh else None), clears

    def send_node_entry(
        self, resource: str, write: node_entries.Write, state: node_entries.Publisher[Any, Any]
    ) -> None:
        """Queues one apply of a node's entry in the status of a `resource` (vippools, bgppeers) object,
        after the other status writes."""
        if self._pending_statuses >= MAX_PENDING_STATUSES:
            log.warning("status of %s %s not written: too many pending", write.kind, write.name)
            state.forget(write.uid or write.name)
            return
        self._pending_statuses += 1
        self._statuses.submit(self._write_node_entry, resource, write, state)

    def _write_node_entry(
        self, resource: str, write: node_entries.Write, state: node_entries.Publisher[Any, Any]
    ) -> None:
        try:
            for delay in (*STATUS_RETRIES, None):
                try:
                    self.custom.patch_cluster_custom_object_status(
                        "layerlb.dev", "v1alpha1", resource, write.name, write.body(),
                        field_manager=write.field_manager(), force=True,
                        _content_type="application/apply-patch+yaml",
                    )  # fmt: skip
                except Exception as error:
                    # 404: deleted; 409: re-created under the name (the uid precondition); nothing to write.
                    if getattr(error, "status", None) in (404, 409) or delay is None:
                        log.warning("status of %s %s: %s", write.kind, write.name, error)
                        if write.node == self.node:
                            state.forget(write.uid or write.name)
                        return
                    time.sleep(delay)
                else:
                    return
        finally:
            self._pending_statuses -= 1

    def bgp_publisher(self) -> BgpStatusPublisher:
        return BgpStatusPublisher(self)

    def _send_status(self, write: statuses.Write) -> None:
        owner = write.owner
        if owner.kind == "LoadBalancer":
            self.custom.patch_namespaced_custom_object_status(
                "layerlb.dev", "v1alpha1", owner.namespace, "loadbalancers", owner.name,
                write.loadbalancer_patch(), field_manager=statuses.FIELD_MANAGER,
                _content_type="application/merge-patch+json",
            )  # fmt: skip
        elif owner.kind == "Service":
            self.core.patch_namespaced_service_status(
                owner.name, owner.namespace, write.service_apply(),
                field_manager=statuses.field_manager(write.address, self.node), force=True,
                _content_type="application/apply-patch+yaml",
            )  # fmt: skip


class StatusPublisher:
    """`runtime.Publisher` in a cluster: `statuses.Publisher` decides, `Cluster.send_status` writes."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.state = statuses.Publisher(cluster.node)

    def publish(
        self,
        vips: tuple[Vip, ...],
        holders: Mapping[Address, str],
        members: Mapping[str, announcement.Member],
        held_on: Mapping[Address, tuple[str, ...]],
        advertisers: Mapping[Address, tuple[str, ...]],
    ) -> None:
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        for write in self.state.update(vips, holders, members, held_on, now, advertisers):
            self.cluster.send_status(write)


class PoolStatusPublisher:
    """`runtime.PoolStatus` in a cluster: `pool_status.Publisher` decides, `Cluster.send_node_entry` writes.
    The live speaker first by name removes the entries of Nodes that are gone, from a fresh view only."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.state = pool_status.Publisher(cluster.node)

    def publish(
        self, missing: Mapping[Owner, pool_status.Entry], members: Mapping[str, announcement.Member]
    ) -> None:
        pools = list(self.cluster.watches["vippools"].objects.values())
        nodes, clears = self.cluster.entry_cleaning(members)
        for write in self.state.update(missing, pools, nodes, clears):
            self.cluster.send_node_entry("vippools", write.applied(), self.state)


class BgpStatusPublisher:
    """This node's sessions into the BGPPeers' `status.nodes`: `bgp_status` decides, `Cluster` writes. Fed by
    the announcer (`on_status`: BIRD's view changed) and by each inventory (`on_intent`: the peers selecting
    the node, their problems, generations, Nodes gone); both run in the event loop."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.state = bgp_status.Publisher(cluster.node)
        self.states: Mapping[str, bird.SessionState] = {}
        self.intent: bgp.Intent | None = None
        self.members: Mapping[str, announcement.Member] = {}

    def on_status(self, states: Mapping[str, bird.SessionState]) -> None:
        self.states = dict(states)
        self.publish()

    def on_intent(self, snapshot: Inventory, members: Mapping[str, announcement.Member]) -> None:
        self.intent, self.members = snapshot.bgp, members
        self.publish()

    def publish(self) -> None:
        if self.intent is None or "bgppeers" not in self.cluster.watches:
            return
        peers = list(self.cluster.watches["bgppeers"].objects.values())
        wanted = bgp_status.entries(
            self.intent, self.cluster.node, self.states, bgp_status.generations(peers)
        )
        nodes, clears = self.cluster.entry_cleaning(self.members)
        for write in self.state.update(wanted, peers, nodes, clears):
            self.cluster.send_node_entry("bgppeers", write, self.state)


class EventReporter:
    """Log lines plus Events on the VIP's owners."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster

    def announcing(self, vip: Vip, node: str, interface: str) -> None:
        message = f"announcing {vip.address} from {node} on {interface}"
        log.info("%s (%s)", message, ", ".join(map(str, vip.owners)))
        for owner in vip.owners:
            self.cluster.send_event(owner, "Normal", "Announcing", message)

    def problem(self, vip: Vip, reason: str, message: str) -> None:
        log.error("%s: %s (%s)", reason, message, ", ".join(map(str, vip.owners)))
        for owner in vip.owners:
            self.cluster.send_event(owner, "Warning", reason, message)

    def pool_problem(self, pool: Owner, reason: str, message: str) -> None:
        log.error("%s: VIPPool %s: %s", reason, pool.name, message)
        self.cluster.send_event(pool, "Warning", reason, message)
