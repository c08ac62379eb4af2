"""The ConfigMap Plan source: first valid Plan, watch events, 410 Gone, API errors, bad Plans, reports.

Only the three API requests are faked (`FakeApi`, a scripted watch fed from the test); the watch thread,
the hand-over to the event loop, parsing and reporting are the real ones. The e2e test
`e2e/test_dataplane_configmap.py` runs the same source against a real API server and RBAC.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import queue
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Coroutine, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import pytest
from layerlb_dataplane.control import config, kube_source, runtime, workers

from layerlb import plan_contract
from tests.dataplane.helpers_runtime import free_port, l4_plan

T = TypeVar("T")
End = None


VIP = "127.0.0.31"


def plan_json(generation: int, port: int = 8080) -> str:
    return l4_plan(VIP, [("tcp", port, "TCP")], [9000], name="web", generation=generation).model_dump_json()


def configmap(text: str | None, target: str | None = "web-serving", version: str = "5") -> dict[str, Any]:
    annotations = {plan_contract.SERVING_ANNOTATION: target} if target else {}
    return {
        "metadata": {"name": "web-plan", "resourceVersion": version, "annotations": annotations},
        "data": {} if text is None else {"plan.json": text},
    }


class FakeApi:
    """The API server as the source sees it: `list` answers `current`, `watch` streams what tests put."""

    def __init__(self, current: dict[str, Any] | None) -> None:
        self.current = current
        self.lists: list[str] = []  # namespace/name of each list
        self.watches: list[str] = []  # the resourceVersion each watch started from
        self.events: queue.Queue[tuple[str, dict[str, Any]] | Exception | None] = queue.Queue()
        self.list_failures: list[Exception] = []
        self.patches: queue.Queue[tuple[str, dict[str, Any]]] = queue.Queue()
        self.patch_failures: list[Exception] = []
        self.secrets: dict[str, dict[str, Any]] = {}
        self.secret_reads = 0  # every get_secret, so a test can wait for the source to have looked again
        self.read = threading.Condition()

    def list(self, namespace: str, name: str) -> tuple[dict[str, Any] | None, str]:
        self.lists.append(f"{namespace}/{name}")
        if self.list_failures:
            raise self.list_failures.pop(0)
        return self.current, "5"

    def watch(
        self, namespace: str, name: str, version: str, seconds: int
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        self.watches.append(version)
        while True:
            item = self.events.get(timeout=30)
            if item is None:
                return
            if isinstance(item, Exception):
                raise item
            yield item

    def get_secret(self, namespace: str, name: str) -> dict[str, Any] | None:
        with self.read:
            self.secret_reads += 1
            self.read.notify_all()
        return self.secrets.get(name)

    async def secret_read_again(self, times: int = 2) -> None:
        """Return once the source has read Secrets `times` more times: then it has acted on at least one
        read that began after this call (it reads, decides, waits `secret_poll`, reads again)."""
        with self.read:
            wanted = self.secret_reads + times

        def wait() -> bool:
            with self.read:
                return self.read.wait_for(lambda: self.secret_reads >= wanted, 10)

        assert await asyncio.to_thread(wait), "the source did not read the Secret again"

    def patch(self, namespace: str, name: str, body: dict[str, Any]) -> None:
        if self.patch_failures:
            raise self.patch_failures.pop(0)
        self.patches.put((f"{namespace}/{name}", body))


def run(scenario: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(scenario, 20))


async def stopped(source: kube_source.ConfigMapSource, api: FakeApi) -> None:
    source.close()
    api.events.put(End)


async def next_patch(api: FakeApi) -> tuple[str, dict[str, Any]]:
    return await asyncio.to_thread(api.patches.get, True, 10)


@pytest.fixture(autouse=True)
def quick_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kube_source, "BACKOFF_FIRST", 0.01)


def test_start_waits_for_the_first_valid_plan_and_load_gives_it() -> None:
    api = FakeApi(configmap("{not json"))

    async def scenario() -> list[int]:
        source = kube_source.ConfigMapSource("shop", "web-plan", api, "web-1")
        starting = asyncio.create_task(source.start())
        await asyncio.sleep(0)
        api.events.put(("MODIFIED", configmap(plan_json(3))))
        await starting
        plans = source.load()
        await stopped(source, api)
        return [p.generation for p in plans]

    assert run(scenario()) == [3]
    assert api.lists == ["shop/web-plan"] and api.watches[0] == "5"


def test_a_watched_change_wakes_changed_and_an_unrelated_edit_does_not() -> None:
    api = FakeApi(configmap(plan_json(1)))

    async def scenario() -> tuple[bool, int]:
        source = kube_source.ConfigMapSource("shop", "web-plan", api, "web-1")
        await source.start()
        source.load()
        relabelled = configmap(plan_json(1), version="6")
        relabelled["metadata"]["labels"] = {"x": "y"}
        api.events.put(("MODIFIED", relabelled))
        woke_early = True
        try:
            await asyncio.wait_for(source.changed(), 0.3)
        except TimeoutError:
            woke_early = False
        api.events.put(("MODIFIED", configmap(plan_json(2), version="7")))
        await source.changed()
        generation = source.load()[0].generation
        await stopped(source, api)
        return woke_early, generation

    assert run(scenario()) == (False, 2)


def refusal(broken: dict[str, Any]) -> tuple[list[str], set[str]]:
    """What `load()` refuses once a valid Plan is followed by `broken`, and the Secrets then wanted."""
    api = FakeApi(configmap(plan_json(1)))

    async def scenario() -> tuple[list[str], set[str]]:
        source = kube_source.ConfigMapSource("shop", "web-plan", api, None)
        await source.start()
        source.load()
        api.events.put(("MODIFIED", configmap(json.dumps(broken))))
        await source.changed()
        with pytest.raises(config.InvalidConfig) as refused:
            source.load()
        await stopped(source, api)
        return refused.value.lines, source.wanted

    return run(scenario())


def test_an_invalid_plan_is_refused_with_the_configmap_and_field_named() -> None:
    broken = json.loads(plan_json(2))
    broken["listeners"][0]["port"] = "many"
    [line], _ = refusal(broken)
    assert line.startswith("ConfigMap shop/web-plan: plan.json: Plan/test/web: listeners.0.port:")


def test_a_plan_naming_a_malformed_secret_is_refused_and_no_secret_is_read() -> None:
    broken = json.loads(keyless_plan_json(2))
    broken["listeners"][0]["certificates"][0]["source"] = "Secret/web/tls"
    [line], wanted = refusal(broken)
    assert line.startswith(
        "ConfigMap shop/web-plan: plan.json: Plan/test/web: certificate source 'Secret/web/tls'"
    )
    assert wanted == set()


def test_an_expired_watch_lists_again_and_errors_retry_without_losing_the_plan(
    caplog: pytest.LogCaptureFixture,
) -> None:
    api = FakeApi(configmap(plan_json(1)))

    async def scenario() -> int:
        source = kube_source.ConfigMapSource("shop", "web-plan", api, None)
        await source.start()
        source.load()
        api.current = configmap(plan_json(2), version="9")  # changed while the watch was gone
        api.list_failures.append(kube_source.ApiFailure(0, "connection refused"))
        api.events.put(kube_source.ApiFailure(410, "too old resource version"))
        await source.changed()
        generation = source.load()[0].generation
        api.events.put(kube_source.ApiFailure(403, "forbidden"))
        api.events.put(("DELETED", configmap(plan_json(2))))
        api.events.put(End)  # a watch that ends normally resumes from the last resourceVersion
        while len(api.watches) < 4:
            await asyncio.sleep(0.01)  # (bounded by run()'s timeout)
        await stopped(source, api)
        return generation

    with caplog.at_level(logging.INFO, logger="layerlb.source"):
        assert run(scenario()) == 2
    assert api.lists == ["shop/web-plan"] * 3  # start, the refused one after 410, the good one
    assert "watch expired (410 Gone), listing again" in caplog.text
    assert "the API server cannot be reached" in caplog.text
    assert "the API server refused the ServiceAccount" in caplog.text
    assert "does not exist (yet); the current Plans keep serving" in caplog.text


def test_reports_follow_what_is_applied_and_retry_when_the_patch_fails() -> None:
    api = FakeApi(configmap(plan_json(4)))
    api.patch_failures.append(kube_source.ApiFailure(503, "unavailable"))

    async def scenario() -> list[tuple[str, dict[str, Any]]]:
        source = kube_source.ConfigMapSource("shop", "web-plan", api, "web-1")
        await source.start()
        [p] = source.load()
        source.applied({})  # not applied (yet): nothing to report
        source.applied({p.key: 4})
        first = await next_patch(api)
        api.events.put(("MODIFIED", configmap("[]")))
        await source.changed()
        assert source.load() == []
        source.applied({})  # the LoadBalancer left: kernel state removed
        second = await next_patch(api)
        await stopped(source, api)
        return [first, second]

    assert run(scenario()) == [
        # The first report also clears warnings a previous container of this pod may have left.
        ("shop/web-serving", {"data": {"web-1": "4", "web-1.warnings": None}}),
        ("shop/web-serving", {"data": {"web-1": "removed"}}),
    ]


def test_warnings_are_reported_beside_the_generation_and_cleared_when_they_go() -> None:
    api = FakeApi(configmap(plan_json(4)))

    async def scenario() -> list[tuple[str, dict[str, Any]]]:
        source = kube_source.ConfigMapSource("shop", "web-plan", api, "web-1")
        await source.start()
        [p] = source.load()
        source.applied({p.key: 4}, ["strict ARP: eth0 answers"])
        first = await next_patch(api)
        source.applied({p.key: 4}, ["strict ARP: eth0 answers"])  # the same: nothing new to write
        source.applied({p.key: 4}, [])  # the administrator fixed the node
        second = await next_patch(api)
        await stopped(source, api)
        return [first, second]

    assert run(scenario()) == [
        ("shop/web-serving", {"data": {"web-1": "4", "web-1.warnings": "strict ARP: eth0 answers"}}),
        ("shop/web-serving", {"data": {"web-1": "4", "web-1.warnings": None}}),
    ]


def test_the_runtime_reports_a_generation_only_once_it_is_fully_applied() -> None:
    port, taken = free_port(VIP), free_port(VIP)
    api = FakeApi(configmap(plan_json(1, port)))

    async def scenario() -> list[str]:
        source = kube_source.ConfigMapSource("shop", "web-plan", api, "web-1")
        await source.start()
        dataplane = runtime.Dataplane(source, signals=())
        assert await dataplane.apply(source.load(), initial=True) is None
        reported = [(await next_patch(api))[1]["data"]["web-1"]]
        with socket.create_server((VIP, taken)):  # generation 2 cannot bind: generation 1 keeps serving
            api.events.put(("MODIFIED", configmap(plan_json(2, taken))))
            await source.changed()
            await dataplane.reload()
            assert dataplane.serving() == {} and dataplane.plans()[0].generation == 1
        api.events.put(("MODIFIED", configmap(plan_json(3, port))))
        await source.changed()
        await dataplane.reload()
        reported.append((await next_patch(api))[1]["data"]["web-1"])
        await dataplane.stop(0)
        await stopped(source, api)
        return reported

    assert run(scenario()) == ["1", "3"]
    assert api.patches.empty()  # generation 2 was never reported


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("web-plan", "is not NAMESPACE/NAME"),
        ("a/b/c", "is not NAMESPACE/NAME"),
        ("Shop/x", "is not a namespace name"),
        ("shop/-x", "is not a ConfigMap name"),
    ],
)
def test_the_reference_must_be_namespace_slash_name(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        kube_source.parse_reference(text)
    assert kube_source.parse_reference("shop/web-plan") == ("shop", "web-plan")


def test_the_admin_server_answers_while_the_first_plan_is_awaited_and_a_stop_ends_the_wait() -> None:
    api = FakeApi(None)  # the ConfigMap does not exist yet
    port = free_port("127.0.0.1")

    def get(path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as answer:
                return answer.status, answer.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()

    async def scenario() -> tuple[tuple[int, str], tuple[int, str], int]:
        source = kube_source.ConfigMapSource("shop", "web-plan", api, "web-1")
        dataplane = runtime.Dataplane(source, signals=(), admin_address=("127.0.0.1", port))
        running = asyncio.create_task(dataplane.run())
        while dataplane.admin is None:
            await asyncio.sleep(0.01)
        health, readiness = await asyncio.to_thread(get, "/healthz"), await asyncio.to_thread(get, "/readyz")
        dataplane.request_stop()
        code = await running
        await stopped(source, api)
        return health, readiness, code

    health, readiness, code = run(scenario())
    assert health[0] == 200 and code == 0
    assert readiness == (503, "no LoadBalancer to serve (yet) from ConfigMap shop/web-plan\n")


def test_with_workers_the_parent_reports_once_every_worker_applied_the_plans() -> None:
    served = l4_plan(VIP, [("tcp", free_port(VIP), "TCP")], [9000], name="web", generation=6)

    class Recording(config.StaticSource):
        def __init__(self) -> None:
            super().__init__([served])
            self.reports: asyncio.Queue[dict[str, int]] = asyncio.Queue()

        def applied(self, serving: Mapping[str, int], warnings: Sequence[str] = ()) -> None:
            self.reports.put_nowait(dict(serving))

    async def scenario() -> tuple[dict[str, int], int]:
        source = Recording()
        supervisor = workers.Supervisor(source, 2, drain_timeout=1)
        running = asyncio.create_task(supervisor.run())
        report = await asyncio.wait_for(source.reports.get(), 15)
        assert all(w.applied_seq == supervisor.seq for w in supervisor.workers.values())
        supervisor.stopping.set()
        return report, await running

    assert run(scenario()) == ({"test/web": 6}, 0)


def keyless_plan_json(generation: int) -> str:
    """A Plan as the operator stores it: the certificate's key left out, its Secret named in `source`."""
    document = json.loads(plan_json(generation))
    document["listeners"][0]["certificates"] = [
        {"source": "Secret/web-tls", "cert_pem": "public chain", "key_pem": "", "names": ["web.example"]}
    ]
    return json.dumps(document)


def tls_secret(label: str) -> dict[str, Any]:
    cert = f"-----BEGIN CERTIFICATE-----\n{label}\n-----END CERTIFICATE-----\n"
    key = f"-----BEGIN PRIVATE KEY-----\n{label}\n-----END PRIVATE KEY-----\n"
    data = {
        field: base64.b64encode(text.encode()).decode()
        for field, text in (("tls.crt", cert), ("tls.key", key))
    }
    return {"metadata": {"name": "web-tls"}, "data": data}


def test_keys_come_from_the_named_secret_and_a_renewed_one_is_loaded_without_a_new_plan() -> None:
    api = FakeApi(configmap(keyless_plan_json(1)))

    async def scenario() -> tuple[bool, str, str, str, str]:
        source = kube_source.ConfigMapSource("shop", "web-plan", api, "web-1", secret_poll=0.05)
        starting = asyncio.create_task(source.start())
        await api.secret_read_again()  # it looked for the Secret, found none, and looks again
        waited = not starting.done()  # no key yet: not a valid Plan to serve
        api.secrets["web-tls"] = tls_secret("first")
        await starting
        first = source.load()[0].listeners[0].certificates[0]
        api.secrets["web-tls"] = tls_secret("renewed")
        await source.changed()
        renewed = source.load()[0].listeners[0].certificates[0]
        del api.secrets["web-tls"]  # gone: the last good pair keeps serving
        await api.secret_read_again()  # a read after the deletion was acted on
        kept = source.load()[0].listeners[0].certificates[0]
        await stopped(source, api)
        return waited, first.key_pem, renewed.cert_pem, renewed.key_pem, kept.key_pem

    waited, first_key, renewed_cert, renewed_key, kept_key = run(scenario())
    assert waited
    assert "first" in first_key and "PRIVATE KEY" in first_key
    assert "renewed" in renewed_cert and "renewed" in renewed_key
    assert kept_key == renewed_key
