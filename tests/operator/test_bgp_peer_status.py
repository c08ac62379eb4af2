"""A BGPPeer's Established condition: counted from the speakers' node entries (SESSIONS column), the nodes
not Established named with their error, written once per change and never carrying the speakers' entries."""

from __future__ import annotations

import asyncio
from typing import Any

from layerlb_operator import bgp_status, objects, reconciler
from layerlb_operator.metrics import Metrics

from tests.operator.test_reconciler import FakeClient


def _peer(nodes: list[dict[str, Any]], conditions: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "layerlb.dev/v1alpha1",
        "kind": "BGPPeer",
        "metadata": {"name": "tor", "uid": "uid-tor", "generation": 2},
        "spec": {"peerAddress": "10.0.60.254", "peerASN": 64512, "localASN": 64513},
        "status": {"nodes": nodes, "conditions": conditions or []},
    }


UP = {"state": "Established", "prefixesAdvertised": 1}


def test_every_node_established_makes_it_true_with_the_count() -> None:
    condition = bgp_status.established(_peer([{"node": "a", **UP}, {"node": "b", **UP}]))
    assert condition == {
        "type": "Established",
        "status": "True",
        "reason": "Established",
        "message": "2/2 nodes Established",
        "observedGeneration": 2,
    }


def test_a_node_not_established_is_named_with_its_state_and_last_error() -> None:
    peer = _peer(
        [
            {"node": "c", "state": "Idle", "lastError": "passwordSecret: Secret x/y not found"},
            {"node": "a", **UP},
            {"node": "b", "state": "Active"},
        ]
    )
    condition = bgp_status.established(peer)
    assert (condition["status"], condition["reason"]) == ("False", "NotEstablished")
    assert condition["message"] == (
        "1/3 nodes Established; b: Active; c: Idle (passwordSecret: Secret x/y not found)"
    )


def test_no_session_reported_says_why_it_may_be() -> None:
    condition = bgp_status.established(_peer([]))
    assert (condition["status"], condition["reason"]) == ("False", "NoSessions")
    assert condition["message"].startswith("0/0 nodes Established: no speaker reports a session")


def test_the_condition_is_applied_to_the_status_subresource_once_per_change() -> None:
    client = FakeClient({})
    worker = reconciler.Reconciler(
        client, objects.Settings(), Metrics(), debounce=0.01, now=lambda: "2026-01-01T00:00:00Z"
    )
    peer = _peer([{"node": "a", **UP}])
    assert asyncio.run(worker.peer_changed(peer)).verdict == "written"
    [(method, path, body)] = client.requests
    assert (method, path) == ("PATCH", "/apis/layerlb.dev/v1alpha1/bgppeers/tor/status")
    assert set(body["status"]) == {"conditions"}  # the speakers' entries are never applied
    peer["status"]["conditions"] = body["status"]["conditions"]  # back through the watch
    assert asyncio.run(worker.peer_changed(peer)).verdict == "unchanged"
    peer["status"]["nodes"].append({"node": "b", "state": "Connect"})
    assert asyncio.run(worker.peer_changed(peer)).verdict == "written"
    assert client.requests[-1][2]["status"]["conditions"][0]["message"] == "1/2 nodes Established; b: Connect"
