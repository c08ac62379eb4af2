"""A node's BGP sessions, in the BGPPeers' `status.nodes` (pure; `kube` sends the writes).

Each speaker owns one entry of `status.nodes` on every BGPPeer that selects its node: `{node, state, since,
lastError, prefixesAdvertised, bfd, observedGeneration}`, the shape `bird.SessionState.as_status` gives,
from BIRD's own view (`BgpAnnouncer.on_status`). A peer that opens no session because it cannot be
configured (its password Secret unreadable: `bgp.Peer.problem`) gets `state: Idle` and the problem as
`lastError`. The operator turns the entries into the BGPPeer's `Established` condition
(operator/layerlb_operator/bgp_status.py).

The entry is applied under the node's own field manager, only on a change, and a deleted Node's entry is
removed by the live speaker first by name: `node_entries`' rules, as for `pool_status`. A peer no longer
selecting the node, or BGP off, gets an apply without the entry, which removes it.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from typing import Any

from layerlb_speaker import bgp, bird, node_entries

Entry = Mapping[str, Any]  # one `status.nodes[]` entry, API field names, without `node`


def entries(
    intent: bgp.Intent, node: str, states: Mapping[str, bird.SessionState], generations: Mapping[str, int]
) -> dict[str, dict[str, Any]]:
    """Peer name → this node's entry, for every peer selecting the node (`states`: BIRD's, by peer name;
    `generations`: each BGPPeer's metadata.generation)."""
    found: dict[str, dict[str, Any]] = {}
    for peer in bgp.selected(intent, node):
        if peer.problem:
            entry: dict[str, Any] = {"state": "Idle", "lastError": peer.problem}
        else:
            entry = _entry(states.get(peer.name))
        if peer.name in generations:
            entry["observedGeneration"] = generations[peer.name]
        found[peer.name] = entry
    return found


def _entry(state: bird.SessionState | None) -> dict[str, Any]:
    """BIRD's view of a session as an entry; Idle while BIRD has not shown it yet (starting, reloading)."""
    entry = (state or bird.SessionState("Idle")).as_status("")
    del entry["node"]
    return entry


def _write(peer: str, uid: str, node: str, entry: Entry | None) -> node_entries.Write:
    return node_entries.Write("BGPPeer", peer, uid, node, entry)


def _parse(item: Mapping[str, Any]) -> Entry:
    return {key: value for key, value in item.items() if key != "node"}


class Publisher(node_entries.Publisher[Entry, node_entries.Write]):
    """One speaker's memory of the entries it wrote on the BGPPeers (`node_entries.Publisher`)."""

    def __init__(self, node: str) -> None:
        super().__init__(node, _parse, _write)

    def update(
        self,
        wanted: Mapping[str, Entry],
        peers: Iterable[Mapping[str, Any]],
        nodes: Collection[str] | None,
        clears: bool,
    ) -> list[node_entries.Write]:
        """The writes owed: this node's entry on each peer (`wanted`, by peer name; a peer absent from it
        gets no entry) and, when `clears` and the Node list `nodes` is known, the removal of the entries
        of Nodes that no longer exist. `peers` are the BGPPeer objects as watched."""
        return self.writes(lambda name, _uid: wanted.get(name), peers, nodes, clears)


def generations(peers: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """BGPPeer name → its metadata.generation."""
    found = {}
    for peer in peers:
        meta = peer.get("metadata") or {}
        if meta.get("name"):
            found[str(meta["name"])] = int(meta.get("generation") or 0)
    return found
