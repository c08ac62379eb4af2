"""A node's BGP sessions, in the BGPPeers' `status.nodes` (pure; `kube` sends the writes).

Each speaker owns one entry of `status.nodes` on every BGPPeer that selects its node: `{node, state, since,
lastError, prefixesAdvertised, bfd, observedGeneration}`, the shape `bird.SessionState.as_status` gives,
from BIRD's own view (`BgpAnnouncer.on_status`). A peer that opens no session because it cannot be
configured (its password Secret unreadable: `bgp.Peer.problem`) gets `state: Idle` and the problem as
`lastError`. The operator turns the entries into the BGPPeer's `Established` condition
(operator/layerlb_operator/bgp_status.py).

The rules are `pool_status`'s, for the same reasons:
- the entry is server-side applied alone under the node's own field manager, `layerlb-speaker/NODE`
  (`field_manager`), with force; an apply carrying no entry removes the node's (a peer no longer selecting
  the node, or BGP off);
- only on a change, remembered per peer uid; a peer not written since the start is compared with its
  stored entry instead (a restart writes nothing when nothing changed);
- a Node deleted leaves its entry behind: the live speaker first by name removes it (under that node's
  field manager), from a fresh view of the Nodes only.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from layerlb_speaker import bgp, bird, pool_status

API_VERSION = pool_status.API_VERSION

Entry = Mapping[str, Any]  # one `status.nodes[]` entry, API field names, without `node`


def field_manager(node: str) -> str:
    """The server-side apply field manager of `node`'s entry in a BGPPeer's `status.nodes`."""
    return pool_status.field_manager(node)


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


@dataclass(frozen=True)
class Write:
    """One apply on a BGPPeer's status: `node`'s entry, or (`entry` None) its removal."""

    peer: str
    uid: str
    node: str
    entry: Entry | None

    def body(self) -> dict[str, Any]:
        """The server-side apply body; the peer's uid guards against a peer re-created under the name."""
        metadata = {"name": self.peer, **({"uid": self.uid} if self.uid else {})}
        status = {"nodes": [{"node": self.node, **self.entry}]} if self.entry is not None else {}
        return {"apiVersion": API_VERSION, "kind": "BGPPeer", "metadata": metadata, "status": status}

    def field_manager(self) -> str:
        return field_manager(self.node)


def _stored(peer: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Node → its entry (without `node`), as a BGPPeer object (from the watch) stores them."""
    found = {}
    for item in (peer.get("status") or {}).get("nodes") or []:
        if isinstance(item, Mapping) and item.get("node"):
            found[str(item["node"])] = {key: value for key, value in item.items() if key != "node"}
    return found


class Publisher:
    """One speaker's memory of the entries it wrote, so that it writes only on a change (see the module)."""

    def __init__(self, node: str) -> None:
        self.node = node
        self._written: dict[str, Entry | None] = {}  # peer uid → the entry last applied (None: removed)
        self._cleared: set[tuple[str, str]] = set()  # (peer uid, node) whose stale entry was removed

    def forget(self, uid: str) -> None:
        """A write to peer `uid` failed: compare with what is stored next time instead of the memory."""
        self._written.pop(uid, None)

    def update(
        self,
        wanted: Mapping[str, Entry],
        peers: Iterable[Mapping[str, Any]],
        nodes: Collection[str] | None,
        clears: bool,
    ) -> list[Write]:
        """The writes owed: this node's entry on each peer (`wanted`, by peer name; a peer absent from it
        gets no entry) and, when `clears` and the Node list `nodes` is known, the removal of the entries
        of Nodes that no longer exist. `peers` are the BGPPeer objects as watched."""
        writes: list[Write] = []
        seen: set[str] = set()
        cleared: set[tuple[str, str]] = set()
        for peer in peers:
            meta = peer.get("metadata") or {}
            name, uid = str(meta.get("name") or ""), str(meta.get("uid") or "")
            if not name:
                continue
            key = uid or name
            seen.add(key)
            entry = wanted.get(name)
            stored = _stored(peer)
            known = self._written[key] if key in self._written else stored.get(self.node)
            if entry != known:
                writes.append(Write(name, uid, self.node, entry))
            self._written[key] = entry
            if not clears or nodes is None:
                continue
            for node in sorted(stored):
                if node in nodes or node == self.node:
                    continue
                cleared.add((key, node))
                if (key, node) not in self._cleared:
                    writes.append(Write(name, uid, node, None))
        self._written = {key: entry for key, entry in self._written.items() if key in seen}
        self._cleared = cleared
        return writes


def generations(peers: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """BGPPeer name → its metadata.generation."""
    found = {}
    for peer in peers:
        meta = peer.get("metadata") or {}
        if meta.get("name"):
            found[str(meta["name"])] = int(meta.get("generation") or 0)
    return found
