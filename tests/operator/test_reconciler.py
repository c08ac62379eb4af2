"""The reconciler writes once per change, debounces endpoint bursts, and frees VIPs for who waits on delete."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar, cast

from layerlb_operator import apiserver, cluster_view, objects, reconciler, status, sync_result
from layerlb_operator.metrics import Metrics

from tests.clock import Clock

T = TypeVar("T")


class FakeClient(apiserver.Client):
    """Records writes instead of sending them; the status patch updates the stored LoadBalancer."""

    def __init__(self, store: dict[str, list[dict[str, Any]]]) -> None:
        super().__init__(api_client=None)
        self.store = store
        self.applied: list[dict[str, Any]] = []
        self.patched: list[tuple[str, dict[str, Any]]] = []
        self.events: list[dict[str, Any]] = []
        self.requests: list[tuple[str, str, Any]] = []  # other writes: (method, path, body)

    def apply(self, obj: dict[str, Any], *, force: bool = True) -> dict[str, Any]:
        self.applied.append(obj)
        return obj

    def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> dict[str, Any]:
        key = f"{namespace}/{name}"
        self.patched.append((key, status))
        body = self.store[key][0]
        self.store[key] = [{**body, "status": {k: v for k, v in status.items() if v is not None}}]
        return {}

    def post_event(self, involved: dict[str, Any], event: dict[str, Any]) -> None:
        self.events.append(event)

    def write(self, kind: str, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        self.requests.append((method, path, kwargs.get("body")))
        return {}


def _lb(name: str, vip: str | None = None, service: str | None = None) -> dict[str, Any]:
    backend: dict[str, Any] = {"name": "app"}
    if service:
        backend["service"] = {"name": service, "port": 80}
    else:
        backend["endpoints"] = [{"address": "10.1.0.1", "port": 80}]
    spec: dict[str, Any] = {
        "mode": "L4",
        "architecture": "proxy",
        "listeners": [{"name": "tcp", "port": 80, "protocol": "TCP"}],
        "backends": [backend],
    }
    if vip:
        spec["vip"] = vip
    return {
        "apiVersion": "layerlb.dev/v1alpha1",
        "kind": "LoadBalancer",
        "metadata": {"name": name, "namespace": "shop", "generation": 1, "uid": f"uid-{name}"},
        "spec": spec,
    }


def _setup(
    *documents: dict[str, Any], pool: str = "192.0.2.0/31"
) -> tuple[reconciler.Reconciler, FakeClient, dict[str, list[dict[str, Any]]]]:
    store = {f"shop/{d['metadata']['name']}": [d] for d in documents}
    client = FakeClient(store)
    worker = reconciler.Reconciler(
        client, objects.Settings(), Metrics(), debounce=0.01, now=lambda: "2026-01-01T00:00:00Z"
    )
    references: dict[Any, list[str]] = {}
    for document in documents:
        for backend in document["spec"]["backends"]:
            if "service" in backend:
                references.setdefault(("service", "shop", backend["service"]["name"]), []).append(
                    f"shop/{document['metadata']['name']}"
                )
    pool_body = {
        "apiVersion": "layerlb.dev/v1alpha1",
        "kind": "VIPPool",
        "metadata": {"name": "p", "resourceVersion": "1"},
        "spec": {"addresses": [pool]},
        "status": None,  # as a watched object may carry it
    }
    sources = cluster_view.Sources(
        loadbalancers=store, references=references, services={}, slices={}, secrets={},
        pools={"p": [pool_body]}, deployments={}, pods={}, serving={},
    )  # fmt: skip
    worker.bind(sources)
    return worker, client, store


def _run(coroutine: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coroutine)


async def _until(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Yield to the loop until `condition()` holds (the code under test reached a state), or fail."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, f"{what}: not within {timeout} s"
        await asyncio.sleep(0.005)


def test_an_unchanged_load_balancer_synced_twice_patches_its_status_once() -> None:
    worker, client, store = _setup(_lb("a"))
    first = _run(worker.sync(store["shop/a"][0]))
    second = _run(worker.sync(store["shop/a"][0]))
    assert (first.verdict, second.verdict) == ("accepted", "accepted")
    assert len(client.patched) == 1
    assert len(client.applied) == 14  # server-side apply is idempotent: the second round changes nothing
    assert client.applied[:7] == client.applied[7:]
    # The VIP Service's status (its ingress, the VIP) goes to its status subresource, each round.
    statuses = [(m, p) for m, p, _ in client.requests if p.endswith("/services/a-dataplane/status")]
    assert [m for m, _ in statuses] == ["PATCH", "PATCH"], client.requests
    assert [e["reason"] for e in client.events] == ["Valid", "Programmed", "Pending"]


def test_vips_are_allocated_without_repeats_and_exhaustion_is_reported() -> None:
    worker, client, store = _setup(_lb("a"), _lb("b"), _lb("c"))

    async def all_three() -> list[sync_result.Result]:
        return list(await asyncio.gather(*(worker.sync(store[f"shop/{n}"][0]) for n in "abc")))

    results = _run(all_three())
    vips = {key: status.get("vip") for key, status in client.patched}
    assert sorted(v for v in vips.values() if v) == ["192.0.2.0", "192.0.2.1"]
    assert sorted(r.verdict for r in results) == ["accepted", "accepted", "unresolvable"]
    assert worker.metrics.vips() == 2


def test_the_reconciler_refuses_a_vip_outside_every_pool_only_when_told_to() -> None:
    """`--vips-outside-pools` reaches the allocation: refused, the LoadBalancer has no VIP to announce."""
    for setting, verdict, vip in (("refuse", "unresolvable", None), ("allow", "accepted", "203.0.113.9")):
        worker, client, store = _setup(_lb("a", vip="203.0.113.9"))
        worker.vips_outside_pools = setting
        result = _run(worker.sync(store["shop/a"][0]))
        assert result.verdict == verdict, (setting, result)
        [(_, written)] = client.patched
        assert written.get("vip") == vip, setting
        if vip is None:
            assert "spec.vip: 203.0.113.9 is in no VIPPool" in result.message
            assert client.events[0]["reason"] == "VIPConflict", client.events


def test_deleting_a_load_balancer_frees_its_vip_for_one_that_waits() -> None:
    worker, client, store = _setup(_lb("a"), _lb("b"), pool="192.0.2.0/32")

    async def scenario() -> sync_result.Result:
        await worker.sync(store["shop/a"][0])
        waiting = await worker.sync(store["shop/b"][0])
        assert waiting.verdict == "unresolvable"
        gone = store.pop("shop/a")[0]
        await worker.forget(gone)
        assert "shop/b" in worker.queue
        return await worker.sync(store["shop/b"][0])

    assert _run(scenario()).verdict == "accepted"
    assert client.patched[-1][1]["vip"] == "192.0.2.0"


def test_a_burst_of_endpoint_changes_re_renders_the_affected_load_balancer_once() -> None:
    worker, client, _ = _setup(_lb("a", service="app"), _lb("b"))
    clock = worker.queue.clock = Clock()  # the queue's time moves only when the test says
    renders: list[str] = []
    sync = worker.sync

    async def counted(document: Any) -> sync_result.Result:
        renders.append(f"{document['metadata']['namespace']}/{document['metadata']['name']}")
        return await sync(document)

    worker.sync = counted  # type: ignore[method-assign]

    async def scenario() -> None:
        runner = asyncio.create_task(worker.run())
        for _ in range(20):  # a burst, the runner free to take work between the changes
            worker.touch(("service", "shop", "app"))
            for _ in range(5):
                await asyncio.sleep(0)
        worker.touch(("service", "shop", "unrelated"))
        assert renders == [] and len(worker.queue) == 1  # nothing due while the debounce runs
        clock.now += worker.queue.delay
        # Idle: the render ran and queued its retry; with the clock still, nothing else can come due.
        await _until(lambda: bool(client.patched) and "shop/a" in worker.queue, "rendered and requeued")
        assert worker.queue.pop_due() == []
        assert worker.queue.next_due() == clock.now + reconciler.backoff(1)  # transient: retried with backoff
        runner.cancel()

    _run(scenario())
    assert renders == ["shop/a"]
    assert [key for key, _ in client.patched] == ["shop/a"]
    assert client.patched[0][1]["conditions"][0]["reason"] == "BackendNotFound"


def test_a_load_balancer_being_deleted_is_not_reconciled() -> None:
    document = _lb("a")
    document["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    worker, client, _ = _setup(document)
    assert _run(worker.sync(document)).verdict == "skipped"
    assert client.applied == []
    assert client.patched == []


def test_backoff_doubles_up_to_a_minute() -> None:
    assert [reconciler.backoff(n) for n in (1, 2, 3, 4, 7, 20)] == [1, 2, 4, 8, 60, 60]


def _pods(worker: reconciler.Reconciler, *pods: tuple[str, bool], serving: dict[str, str]) -> None:
    """Forwarding pods of LoadBalancer a as the indexes hold them: (name, ready), and their reports."""
    assert worker.sources is not None
    states = [(name, status.PodState(running=True, ready=ready)) for name, ready in pods]
    cast(dict[Any, Any], worker.sources.pods)[("shop", "a")] = states
    cast(dict[Any, Any], worker.sources.serving)[("shop", "a")] = [serving]
    ready = sum(ready for _, ready in pods)
    cast(dict[Any, Any], worker.sources.deployments)[("shop", "a")] = [{"readyReplicas": ready}]


def test_ready_comes_from_the_serving_configmap_of_live_ready_pods() -> None:
    worker, client, store = _setup(_lb("a"))
    _pods(worker, ("a-1", True), ("a-2", False), serving={"a-1": "0", "a-2": "1", "old-pod": "1"})
    _run(worker.sync(store["shop/a"][0]))
    ready = next(c for c in client.patched[-1][1]["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["message"]) == ("False", "0/1 forwarding pods serve generation 1")
    _pods(worker, ("a-1", True), ("a-2", False), serving={"a-1": "1", "a-2": "1"})
    _run(worker.sync(store["shop/a"][0]))
    ready = next(c for c in client.patched[-1][1]["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["message"]) == ("True", "1/1 forwarding pods serve generation 1")


def test_deletion_writes_the_empty_plan_and_waits_until_every_running_pod_removed_its_state() -> None:
    worker, client, store = _setup(_lb("a"))
    _pods(worker, ("a-1", True), ("a-2", False), serving={"a-1": "1"})

    instance = ("instance", "shop", "a")

    def waiting_again() -> bool:
        """The deletion looked at the pods' latest reports and waits on its change event once more."""
        changed = worker._changed.get(instance)
        return changed is not None and not changed.is_set()

    async def scenario() -> list[str]:
        deleting = asyncio.create_task(worker.forget(store["shop/a"][0]))
        seen = []
        for report in ({"a-1": "removed"}, {"a-1": "removed", "a-2": "removed"}):
            await _until(lambda: deleting.done() or waiting_again(), "the deletion settled")
            seen.append("done" if deleting.done() else "waiting")
            _pods(worker, ("a-1", True), ("a-2", False), serving=report)
            worker.touch(("instance", "shop", "a"))
        await asyncio.wait_for(deleting, 5)
        return seen

    assert _run(scenario()) == ["waiting", "waiting"]
    [removal] = client.applied
    assert (removal["metadata"]["name"], removal["data"]) == ("a-plan", {"plan.json": "[]"})
    assert client.events == []


def test_deletion_gives_up_after_the_timeout_with_a_warning_event() -> None:
    worker, client, store = _setup(_lb("a"))
    worker.cleanup_timeout = 0.2
    _pods(worker, ("a-1", True), serving={"a-1": "1"})
    _run(asyncio.wait_for(worker.forget(store["shop/a"][0]), 5))
    [event] = client.events
    assert (event["type"], event["reason"]) == ("Warning", "CleanupTimedOut")
    assert "1 forwarding pod(s) did not confirm" in event["message"] and "a-1" in event["message"]


def test_deletion_without_running_pods_writes_nothing_and_does_not_wait() -> None:
    worker, client, store = _setup(_lb("a"))
    assert worker.sources is not None
    cast(dict[Any, Any], worker.sources.pods)[("shop", "a")] = [("a-1", status.PodState(False, False))]
    _run(asyncio.wait_for(worker.forget(store["shop/a"][0]), 1))
    assert client.applied == [] and client.events == []


def test_a_deleted_pods_report_is_dropped_from_the_serving_configmap() -> None:
    worker, client, _ = _setup(_lb("a"))
    assert worker.sources is not None
    cast(dict[Any, Any], worker.sources.references)[("instance", "shop", "a")] = ["shop/a"]
    _pods(worker, ("a-2", True), serving={"a-1": "1", "a-2": "1"})

    async def scenario() -> None:
        worker.pod_gone(("instance", "shop", "a"), "a-1")
        worker.pod_gone(("instance", "shop", "a"), "never-reported")
        await asyncio.gather(*worker._pruning)

    _run(scenario())
    assert client.requests == [
        (
            "PATCH",
            "/api/v1/namespaces/shop/configmaps/a-serving",
            {"data": {"a-1": None, "a-1.warnings": None}},
        )
    ]


def test_a_pods_change_moves_ready_at_once_while_endpoint_changes_wait_for_the_debounce() -> None:
    worker, client, _ = _setup(_lb("a"))
    worker.queue.delay = 30.0  # an endpoint change would wait half a minute here
    assert worker.sources is not None
    references = cast(dict[Any, Any], worker.sources.references)
    references[("instance", "shop", "a")] = references[("service", "shop", "app")] = ["shop/a"]
    _pods(worker, ("a-1", True), serving={"a-1": "1"})

    clock = worker.queue.clock = Clock()
    start = clock.now

    async def scenario() -> None:
        worker.touch(("service", "shop", "app"))
        assert worker.queue.next_due() == start + 30.0, "the endpoint change waits for the debounce"
        worker.touch(("instance", "shop", "a"))  # the pod became Ready, or reported what it serves
        assert worker.queue.next_due() == start + worker.status_delay  # the same key, due much sooner
        clock.now = start + worker.status_delay
        runner = asyncio.create_task(worker.run())
        await _until(lambda: bool(client.patched), "the status written")
        assert len(worker.queue) == 0  # handed out once: the endpoint change's entry went with it
        runner.cancel()

    _run(scenario())
    [(key, patched)] = client.patched
    ready = next(c for c in patched["conditions"] if c["type"] == "Ready")
    assert key == "shop/a" and ready["status"] == "True", patched


def test_the_speakers_announcement_is_never_written_compared_or_dropped_by_the_operator() -> None:
    worker, client, store = _setup(_lb("a"))
    _run(worker.sync(store["shop/a"][0]))
    assert len(client.patched) == 1
    # The speaker holding the VIP merge-patches `status.announcement` (the watch brings it back).
    announced = {"address": "192.0.2.0", "node": "node2", "interfaces": ["eth0"], "protocol": "L2"}
    body = store["shop/a"][0]
    store["shop/a"] = [{**body, "status": {**body["status"], "announcement": announced}}]
    _run(worker.sync(store["shop/a"][0]))
    assert len(client.patched) == 1  # nothing of the operator's changed: no write, no loop

    # A restarted operator (nothing remembered) compares the stored status without the speaker's field.
    restarted, again, _ = _setup(store["shop/a"][0])
    _run(restarted.sync(store["shop/a"][0]))
    assert again.patched == []

    # A change of its own is written as a merge patch of its keys only: `announcement` stays.
    changed = store["shop/a"][0]
    store["shop/a"] = [{**changed, "metadata": {**changed["metadata"], "generation": 2}}]
    _run(worker.sync(store["shop/a"][0]))
    assert len(client.patched) == 2
    written = client.patched[-1][1]
    assert "announcement" not in written and written["observedGeneration"] == 2
    assert status.SPEAKER_FIELDS == ("announcement",)


def test_with_speakers_ready_waits_for_the_announcement_and_a_speakers_write_recomputes_it() -> None:
    worker, client, store = _setup(_lb("a"))
    worker.ready_needs_announcement = True
    _pods(worker, ("a-1", True), serving={"a-1": "1"})
    _run(worker.sync(store["shop/a"][0]))
    ready = next(c for c in client.patched[-1][1]["conditions"] if c["type"] == "Ready")
    vip = client.patched[-1][1]["vip"]
    assert (ready["status"], ready["reason"]) == ("False", "NotAnnounced")
    document = store["shop/a"][0]
    document["status"] = {**client.patched[-1][1], "announcement": {"address": vip, "node": "n2"}}

    worker.announcement_changed(document)  # the speaker's status write, as the LB's watch event
    assert "shop/a" in worker.queue
    worker.queue.discard("shop/a")
    _run(worker.sync(document))
    worker.announcement_changed(document)  # the operator's own write: nothing new to recompute
    assert "shop/a" not in worker.queue
    ready = next(c for c in client.patched[-1][1]["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["message"]) == (
        "True",
        f"1/1 forwarding pods serve generation 1; {vip} announced",
    )
