"""A VIPPool's InterfacesFound condition: built from the speakers' node entries, written once per change,
and a status write never re-renders the LoadBalancers."""

from __future__ import annotations

import asyncio
from typing import Any

from layerlb_operator import pool_status, reconciler

from tests.operator.test_reconciler import FakeClient, _lb, _setup


def _pool(
    interfaces: list[str] | None = None,
    nodes: list[dict[str, Any]] | None = None,
    generation: int = 1,
    conditions: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    spec: dict[str, Any] = {"addresses": ["192.0.2.0/31"]}
    if interfaces is not None:
        spec["announce"] = {"interfaces": interfaces}
    return {
        "apiVersion": "layerlb.dev/v1alpha1",
        "kind": "VIPPool",
        "metadata": {"name": "p", "uid": "uid-p", "generation": generation, "resourceVersion": "7"},
        "spec": spec,
        "status": {"nodes": nodes or [], "conditions": conditions or []},
    }


def test_a_missing_interface_makes_the_condition_false_naming_the_field_the_interface_and_the_nodes() -> None:
    pool = _pool(
        ["eth1", "eth9"],
        [
            {"node": "node-b", "missingInterfaces": ["eth9"], "observedGeneration": 1},
            {"node": "node-a", "missingInterfaces": ["eth9", "eth1"], "observedGeneration": 1},
        ],
        generation=3,
    )
    condition = pool_status.interfaces_found(pool)
    assert condition == {
        "type": "InterfacesFound",
        "status": "False",
        "reason": "InterfaceNotFound",
        "message": "spec.announce.interfaces: eth1 not found or down on node-a; "
        "eth9 not found or down on node-a, node-b",
        "observedGeneration": 3,
    }


def test_without_reports_or_interfaces_the_condition_is_true() -> None:
    found = pool_status.interfaces_found(_pool(["eth1"]))
    assert (found["status"], found["reason"]) == ("True", "InterfacesFound")
    assert "eth1" in found["message"]
    unset = pool_status.interfaces_found(_pool())
    assert (unset["status"], unset["reason"]) == ("True", "InterfacesFound")
    assert unset["message"].startswith("spec.announce.interfaces is not set")


def test_an_entry_naming_an_interface_the_spec_no_longer_names_accuses_nothing() -> None:
    """The user removed eth9; the speakers' entries (written for generation 1) lag: the condition does not."""
    pool = _pool(["eth1"], [{"node": "node-a", "missingInterfaces": ["eth9"], "observedGeneration": 1}], 2)
    assert pool_status.interfaces_found(pool)["status"] == "True"


def test_the_transition_time_moves_only_when_the_status_flips() -> None:
    missing = [{"node": "node-a", "missingInterfaces": ["eth9"]}]
    first = pool_status.conditions(_pool(["eth9"], missing), "T1")
    again = pool_status.conditions(_pool(["eth9"], missing, conditions=first), "T2")
    assert again[0]["lastTransitionTime"] == "T1"
    assert not pool_status.stale(_pool(["eth9"], missing, conditions=first), again)
    fixed = pool_status.conditions(_pool(["eth9"], [], conditions=first), "T3")
    assert (fixed[0]["status"], fixed[0]["lastTransitionTime"]) == ("True", "T3")
    assert pool_status.stale(_pool(["eth9"], [], conditions=first), fixed)


def test_the_apply_body_carries_the_operators_conditions_only() -> None:
    body = pool_status.apply_body("p", [{"type": "InterfacesFound"}])
    assert body == {
        "apiVersion": "layerlb.dev/v1alpha1",
        "kind": "VIPPool",
        "metadata": {"name": "p"},
        "status": {"conditions": [{"type": "InterfacesFound"}]},
    }


def _with_pool(pool: dict[str, Any]) -> tuple[reconciler.Reconciler, FakeClient]:
    worker, client, _ = _setup(_lb("a"))
    assert worker.sources is not None
    worker.sources.pools["p"] = [pool]  # type: ignore[index]
    return worker, client


def test_the_condition_is_applied_to_the_status_subresource_once_per_change() -> None:
    pool = _pool(["eth9"], [{"node": "node-a", "missingInterfaces": ["eth9"], "observedGeneration": 1}])
    worker, client = _with_pool(pool)
    result = asyncio.run(worker.sync_pool("p"))
    assert result.verdict == "written"
    [(method, path, body)] = client.requests
    assert (method, path) == ("PATCH", "/apis/layerlb.dev/v1alpha1/vippools/p/status")
    [condition] = body["status"]["conditions"]
    assert (condition["status"], condition["reason"]) == ("False", "InterfaceNotFound")
    assert set(body["status"]) == {"conditions"}  # the speakers' nodes entries are never applied

    pool["status"]["conditions"] = body["status"]["conditions"]  # the write comes back through the watch
    assert asyncio.run(worker.sync_pool("p")).verdict == "unchanged"
    assert len(client.requests) == 1


def test_a_status_write_on_a_pool_re_renders_no_loadbalancer_but_a_spec_change_does() -> None:
    pool = _pool(["eth9"])
    worker, _ = _with_pool(pool)
    worker.pool_changed(pool, deleted=False)  # first sight: a new pool for the allocator
    assert "shop/a" in worker.queue and reconciler.POOL_KEY + "p" in worker.queue
    worker.queue.discard("shop/a")
    worker.queue.discard(reconciler.POOL_KEY + "p")

    speaker_wrote = {**pool, "status": {"nodes": [{"node": "node-a", "missingInterfaces": ["eth9"]}]}}
    speaker_wrote["metadata"] = {**pool["metadata"], "resourceVersion": "8"}
    worker.pool_changed(speaker_wrote, deleted=False)
    assert "shop/a" not in worker.queue
    assert reconciler.POOL_KEY + "p" in worker.queue  # but its condition is looked at again

    respecified = {**speaker_wrote, "metadata": {**speaker_wrote["metadata"], "generation": 2}}
    worker.pool_changed(respecified, deleted=False)
    assert "shop/a" in worker.queue

    worker.queue.discard("shop/a")
    worker.pool_changed(respecified, deleted=True)
    assert "shop/a" in worker.queue and reconciler.POOL_KEY + "p" not in worker.queue
