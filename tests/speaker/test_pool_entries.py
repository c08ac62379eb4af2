"""A node's missing pool interfaces in the VIPPool's status.nodes: which pools a node checks, what it
applies and when, and who removes the entry of a Node that is gone."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from layerlb_speaker import announcement, inventory, pool_status
from layerlb_speaker.announcement import Owner
from layerlb_speaker.membership import Timing
from layerlb_speaker.pool_status import Entry, Wanted, Write
from layerlb_speaker.runtime import Inventory, Settings, Speaker

from layerlb import api

EDGE = inventory.pool_owner("edge", "uid-edge")


def _pool_doc(
    name: str = "edge",
    interfaces: list[str] | None = None,
    selector: dict[str, Any] | None = None,
    generation: int = 1,
    nodes: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    announce: dict[str, Any] = {"interfaces": interfaces or ["eth1"]}
    if selector is not None:
        announce["nodeSelector"] = selector
    return {
        "apiVersion": "layerlb.dev/v1alpha1",
        "kind": "VIPPool",
        "metadata": {"name": name, "uid": f"uid-{name}", "generation": generation},
        "spec": {"addresses": ["192.0.2.0/28"], "announce": announce},
        "status": {"nodes": nodes or []},
    }


def test_a_node_checks_the_valid_pools_that_select_it_and_only_those() -> None:
    pools = inventory.pools(
        [
            _pool_doc("edge", ["eth1"], generation=4),
            _pool_doc("zone-b", ["eth2"], {"matchLabels": {"zone": "b"}}),
            _pool_doc("zone-a", ["eth3", "eth4"], {"matchLabels": {"zone": "a"}}),
            {**_pool_doc("broken"), "spec": {"addresses": ["not-an-address"]}},
            {
                **_pool_doc("plain"),
                "spec": {"addresses": ["192.0.2.64/28"]},
            },  # no interfaces: nothing to check
        ]
    )
    assert pool_status.wanted(pools, {"zone": "a"}) == (
        Wanted(inventory.pool_owner("edge", "uid-edge"), 4, ("eth1",)),
        Wanted(inventory.pool_owner("zone-a", "uid-zone-a"), 1, ("eth3", "eth4")),
    )
    # A node the Node watch does not know matches no selector; an excluded one checks nothing.
    assert [w.pool.name for w in pool_status.wanted(pools, None)] == ["edge"]
    assert pool_status.wanted(pools, {"zone": "a", inventory.EXCLUDE_LABEL: ""}) == ()


def test_an_interface_absent_or_down_is_missing() -> None:
    wanted = [Wanted(EDGE, 2, ("eth1", "eth2", "eth3"))]
    assert pool_status.missing(wanted, {"eth1": True, "eth2": False}) == {EDGE: Entry(2, ("eth2", "eth3"))}


def test_the_entry_is_applied_under_the_nodes_own_manager_and_an_empty_status_removes_it() -> None:
    write = Write(EDGE, "node-a", Entry(3, ("eth9",)))
    assert write.field_manager() == "layerlb-speaker/node-a"
    assert write.body() == {
        "apiVersion": "layerlb.dev/v1alpha1",
        "kind": "VIPPool",
        "metadata": {"name": "edge", "uid": "uid-edge"},  # a pool re-created under the name is not written
        "status": {"nodes": [{"node": "node-a", "missingInterfaces": ["eth9"], "observedGeneration": 3}]},
    }
    for gone in (Write(EDGE, "node-a", None), Write(EDGE, "node-a", Entry(3, ()))):
        assert gone.body()["status"] == {}
    assert pool_status.API_VERSION == api.API_VERSION


def test_a_speaker_writes_its_entry_on_a_change_only_and_removes_it_when_fixed() -> None:
    publisher = pool_status.Publisher("node-a")
    pools = [_pool_doc()]
    [first] = publisher.update({EDGE: Entry(1, ("eth1",))}, pools, None, False)
    assert first == Write(EDGE, "node-a", Entry(1, ("eth1",)))
    assert publisher.update({EDGE: Entry(1, ("eth1",))}, pools, None, False) == []  # the watch lags: memory
    [respecified] = publisher.update({EDGE: Entry(2, ("eth1",))}, pools, None, False)
    assert respecified.entry == Entry(2, ("eth1",))
    [fixed] = publisher.update({EDGE: Entry(2, ())}, pools, None, False)
    assert fixed == Write(EDGE, "node-a", None)
    assert publisher.update({EDGE: Entry(2, ())}, pools, None, False) == []


def test_after_a_restart_the_stored_entry_is_compared_instead() -> None:
    stored = [_pool_doc(nodes=[{"node": "node-a", "missingInterfaces": ["eth1"], "observedGeneration": 1}])]
    assert pool_status.Publisher("node-a").update({EDGE: Entry(1, ("eth1",))}, stored, None, False) == []
    # Fixed while it was down, or the pool no longer selects this node: the old entry goes.
    assert pool_status.Publisher("node-a").update({}, stored, None, False) == [Write(EDGE, "node-a", None)]
    # Nothing stored and nothing missing: nothing to write.
    assert pool_status.Publisher("node-a").update({EDGE: Entry(1, ())}, [_pool_doc()], None, False) == []


def test_the_cleaning_speaker_removes_the_entries_of_deleted_nodes_once() -> None:
    stored = [
        _pool_doc(
            nodes=[
                {"node": "node-a", "missingInterfaces": ["eth1"], "observedGeneration": 1},
                {"node": "gone", "missingInterfaces": ["eth1"], "observedGeneration": 1},
            ]
        )
    ]
    found = {EDGE: Entry(1, ("eth1",))}
    assert pool_status.Publisher("node-a").update(found, stored, {"node-a"}, clears=False) == []
    assert pool_status.Publisher("node-a").update(found, stored, None, clears=True) == []  # Nodes unknown
    publisher = pool_status.Publisher("node-a")
    assert publisher.update(found, stored, {"node-a"}, clears=True) == [Write(EDGE, "gone", None)]
    assert publisher.update(found, stored, {"node-a"}, clears=True) == []  # the watch has not caught up
    assert Write(EDGE, "gone", None).field_manager() == "layerlb-speaker/gone"


class PoolRecorder:
    def __init__(self) -> None:
        self.published: list[dict[Owner, Entry]] = []

    def publish(self, missing: Mapping[Owner, Entry], members: Mapping[str, announcement.Member]) -> None:
        self.published.append(dict(missing))


def test_the_speaker_publishes_and_warns_of_what_its_node_lacks_and_again_when_it_changes() -> None:
    """An interface a VIP asks for counts by its responder; any other by the link itself ("lo" is up in
    every network namespace; "llbnope9" exists in none)."""

    warnings: list[tuple[str, str, str]] = []

    class Warnings:
        def announcing(self, *_: Any) -> None: ...
        def problem(self, *_: Any) -> None: ...
        def pool_problem(self, pool: Owner, reason: str, message: str) -> None:
            warnings.append((pool.name, reason, message))

    speaker = Speaker(Settings(node="n1", interfaces=("lan0",), timing=Timing(0.1, 0.5, 0.0)), Warnings())
    recorder = PoolRecorder()
    speaker.pool_status = recorder
    speaker.update(Inventory(pool_interfaces=(Wanted(EDGE, 1, ("lan0", "lo", "llbnope9")),)))

    async def go(states: dict[str, bool]) -> bool:
        speaker._dirty = False
        speaker._check_pool_interfaces(states, {"lan0"})
        changed = speaker._dirty  # a change recomputes at this tick, which publishes
        speaker.reconcile()
        return changed

    assert asyncio.run(go({"lan0": True}))
    assert recorder.published[-1] == {EDGE: Entry(1, ("llbnope9",))}
    assert not asyncio.run(go({"lan0": True}))  # nothing changed: no recomputation for it
    assert asyncio.run(go({"lan0": False}))  # lan0 went down
    assert recorder.published[-1] == {EDGE: Entry(1, ("lan0", "llbnope9"))}
    # The pool has no address in use (no VIP), yet its Warning is posted, once per interface.
    assert warnings == [
        (
            "edge",
            "InterfaceNotFound",
            "spec.announce.interfaces: interface " + name + " not found on node n1; "
            "the pool's addresses are not announced on it there",
        )
        for name in ("llbnope9", "lan0")
    ]
