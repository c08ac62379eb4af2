"""A node's own entry in a resource's `status.nodes`, applied only on a change (pure; `kube` sends the writes).

VIPPools (`pool_status`: the interfaces a node lacks) and BGPPeers (`bgp_status`: the node's session) carry
one entry per node in `status.nodes`, a list keyed by `node`, which the operator turns into a condition. The
rules are the same for both:

- each speaker server-side applies its own entry under a field manager of its own, `layerlb-speaker/NODE`
  (`field_manager`), with force, and never carries another's: under server-side apply one manager's apply
  is its whole intent, so a shared manager would delete the other nodes' entries. An apply carrying no
  entry removes the node's (a manager's fields it stops applying are removed);
- it writes only on a change, remembered per object uid (`Publisher`); an object it never wrote since it
  started is compared with the stored entry instead (a restart writes nothing when nothing changed); a
  failed write is forgotten (`Publisher.forget`), so the next update compares with what is stored;
- a Node deleted leaves its entry behind with nobody to remove it: the live speaker first by name applies
  an empty status under that node's field manager, which removes exactly that entry, once. Only from a
  fresh view of the Nodes (a list not yet synced would look empty).

What an entry holds, and which of them mean "nothing to say", is each resource's own.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

API_VERSION = "layerlb.dev/v1alpha1"  # layerlb.api.API_VERSION (a test keeps them equal)
FIELD_MANAGER = "layerlb-speaker"
MAX_FIELD_MANAGER = 128  # the API server's limit

E = TypeVar("E")  # what an entry holds, as the resource's module models it
W = TypeVar("W")  # the resource's write


def field_manager(node: str) -> str:
    """The server-side apply field manager of `node`'s entry in a resource's `status.nodes`."""
    return f"{FIELD_MANAGER}/{node}"[:MAX_FIELD_MANAGER]


@dataclass(frozen=True)
class Write:
    """One apply on a resource's status: `node`'s entry (its fields but `node`), or (`entry` None) its
    removal."""

    kind: str
    name: str
    uid: str
    node: str
    entry: Mapping[str, Any] | None

    def body(self) -> dict[str, Any]:
        """The server-side apply body; the uid guards against an object re-created under the name."""
        metadata = {"name": self.name, **({"uid": self.uid} if self.uid else {})}
        status = {"nodes": [{"node": self.node, **self.entry}]} if self.entry is not None else {}
        return {"apiVersion": API_VERSION, "kind": self.kind, "metadata": metadata, "status": status}

    def field_manager(self) -> str:
        return field_manager(self.node)


def _stored(obj: Mapping[str, Any], parse: Callable[[Mapping[str, Any]], E | None]) -> dict[str, E | None]:
    """Node → its entry, as an object (from the watch) stores them."""
    found = {}
    for item in (obj.get("status") or {}).get("nodes") or []:
        if isinstance(item, Mapping) and item.get("node"):
            found[str(item["node"])] = parse(item)
    return found


class Publisher(Generic[E, W]):
    """One speaker's memory of the entries it wrote, so that it writes only on a change (see the module).
    `parse` reads a stored `status.nodes[]` item (None: nothing to say); `write` makes the resource's write
    of (name, uid, node, entry; None: removal)."""

    def __init__(
        self,
        node: str,
        parse: Callable[[Mapping[str, Any]], E | None],
        write: Callable[[str, str, str, E | None], W],
    ) -> None:
        self.node = node
        self._parse = parse
        self._write = write
        self._written: dict[str, E | None] = {}  # object uid → the entry last applied (None: removed)
        self._cleared: set[tuple[str, str]] = set()  # (object uid, node) whose stale entry was removed

    def forget(self, uid: str) -> None:
        """A write to object `uid` failed: compare with what is stored next time instead of the memory."""
        self._written.pop(uid, None)

    def writes(
        self,
        wanted: Callable[[str, str], E | None],
        objects: Iterable[Mapping[str, Any]],
        nodes: Collection[str] | None,
        clears: bool,
    ) -> list[W]:
        """The writes owed: this node's entry on each object (`wanted`: (name, uid) → the entry; None: no
        entry) and, when `clears` (this speaker cleans up) and the Node list `nodes` is known, the removal
        of the entries of Nodes that no longer exist. `objects` are the resource's objects as watched."""
        writes: list[W] = []
        seen: set[str] = set()
        cleared: set[tuple[str, str]] = set()
        for obj in objects:
            meta = obj.get("metadata") or {}
            name, uid = str(meta.get("name") or ""), str(meta.get("uid") or "")
            if not name:
                continue
            key = uid or name
            seen.add(key)
            entry = wanted(name, uid)
            stored = _stored(obj, self._parse)
            known = self._written[key] if key in self._written else stored.get(self.node)
            if entry != known:
                writes.append(self._write(name, uid, self.node, entry))
            self._written[key] = entry
            if not clears or nodes is None:
                continue
            for node in sorted(stored):
                if node in nodes or node == self.node:
                    continue
                cleared.add((key, node))
                if (key, node) not in self._cleared:
                    writes.append(self._write(name, uid, node, None))
        self._written = {key: entry for key, entry in self._written.items() if key in seen}
        self._cleared = cleared
        return writes
