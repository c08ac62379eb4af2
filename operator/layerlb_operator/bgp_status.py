"""A BGPPeer's `Established` condition, from the sessions the speakers report in `status.nodes` (pure).

Each node whose speaker peers with the router owns one entry of `status.nodes` (server-side apply under its
own field manager, speaker/layerlb_speaker/bgp_status.py): its session's state, since when, the last error.
The operator turns them into one condition that `kubectl get bgppeer` (columns ESTABLISHED and, with `-o
wide`, SESSIONS) and `kubectl wait --for=condition=Established` read, as it does a VIPPool's
`InterfacesFound` (pool_status):

- True, reason `Established`, when every entry is Established: "3/3 nodes Established";
- False, reason `NotEstablished`, when some are not, naming them with their state and last error:
  "2/3 nodes Established; node-c: Active (Error: Hold timer expired)";
- False, reason `NoSessions`, when no speaker reports a session (no node selected, speakers without BGP).

The count is of the nodes that report: the speakers know which nodes a peer selects (their labels), the
operator does not watch Nodes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from layerlb import api
from layerlb_operator import status

ESTABLISHED = "Established"
NOT_ESTABLISHED = "NotEstablished"
NO_SESSIONS = "NoSessions"
MAX_NAMED = 5  # nodes named in the message; the rest are counted


def _entries(peer: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    found = (peer.get("status") or {}).get("nodes") or []
    entries = [entry for entry in found if isinstance(entry, Mapping) and entry.get("node")]
    return sorted(entries, key=lambda entry: str(entry["node"]))


def established(peer: Mapping[str, Any]) -> dict[str, Any]:
    """The peer's `Established` condition (without its transition time: `status.merge` adds it)."""
    generation = int((peer.get("metadata") or {}).get("generation") or 0)
    entries = _entries(peer)
    if not entries:
        return status.condition(
            ESTABLISHED, False, NO_SESSIONS,
            "0/0 nodes Established: no speaker reports a session with this router (no node matches "
            "spec.nodeSelector, or the speakers run without BGP: chart value speaker.bgp.enabled)",
            generation,
        )  # fmt: skip
    down = [entry for entry in entries if entry.get("state") != ESTABLISHED]
    count = f"{len(entries) - len(down)}/{len(entries)} nodes Established"
    if not down:
        return status.condition(ESTABLISHED, True, ESTABLISHED, count, generation)
    named = []
    for entry in down[:MAX_NAMED]:
        error = f" ({entry['lastError']})" if entry.get("lastError") else ""
        named.append(f"{entry['node']}: {entry.get('state') or 'unknown'}{error}")
    more = f"; {len(down) - MAX_NAMED} more" if len(down) > MAX_NAMED else ""
    return status.condition(
        ESTABLISHED, False, NOT_ESTABLISHED, f"{count}; {'; '.join(named)}{more}", generation
    )


def conditions(peer: Mapping[str, Any], now: str) -> list[dict[str, Any]]:
    """The operator's conditions of `peer`, each `lastTransitionTime` kept while its status holds."""
    return status.merge(_ours(peer), [established(peer)], now)


def _ours(peer: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    found = (peer.get("status") or {}).get("conditions") or []
    return [c for c in found if isinstance(c, Mapping) and c.get("type") == ESTABLISHED]


def _comparable(items: Sequence[Mapping[str, Any]]) -> list[tuple[Any, ...]]:
    keys = ("type", "status", "reason", "message", "observedGeneration")
    return sorted(tuple(item.get(key) for key in keys) for item in items)


def stale(peer: Mapping[str, Any], wanted: Sequence[Mapping[str, Any]]) -> bool:
    """Whether the stored condition differs from `wanted` (the transition time aside): then a write."""
    return _comparable(_ours(peer)) != _comparable(wanted)


def apply_body(name: str, wanted: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The server-side apply body of the peer's status: the operator's condition, nothing else (the
    speakers' `nodes` entries are theirs and stay)."""
    return {
        "apiVersion": api.API_VERSION,
        "kind": "BGPPeer",
        "metadata": {"name": name},
        "status": {"conditions": list(wanted)},
    }
