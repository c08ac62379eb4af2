"""A node's missing pool interfaces, in the VIPPool's `status.nodes` (pure; `kube` sends the writes).

A VIPPool's `spec.announce.interfaces` names interfaces every node it selects should have. Each speaker
checks its own node (`missing`: absent or down, as `membership` tells the peers) and says so where
`kubectl describe vipp` and the operator read it: one entry of `status.nodes`, `{node, missingInterfaces,
observedGeneration}`, next to the `InterfaceNotFound` Warning Event the runtime posts. The operator turns
the entries into the pool's `InterfacesFound` condition (operator/layerlb_operator/pool_status.py).

- `status.nodes` is a list keyed by `node`; each speaker server-side applies its own entry under a field
  manager of its own, `layerlb-speaker/NODE` (`field_manager`), with force, and never carries another's:
  under server-side apply one manager's apply is its whole intent, so a shared manager would delete the
  other nodes' entries. When nothing is missing any more it applies an empty status, which removes its
  entry (a manager's fields it stops applying are removed). No entry: nothing to say.
- Which pools a node checks: the valid ones whose `nodeSelector` matches its labels (`wanted`), whether or
  not an address of theirs is in use, so a typo shows before the first Service; a node excluded from
  external load balancers checks none.
- It writes only on a change, remembered per pool uid (`Publisher`); a pool it never wrote since it started
  is compared with the stored entry instead (a restart writes nothing when nothing changed).
- A Node deleted leaves its entry behind with nobody to remove it: the live speaker first by name (as for a
  pool's own notices, `runtime`) applies an empty status under that node's field manager, which removes
  exactly that entry. Only from a fresh view of the Nodes (a list not yet synced would look empty).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from layerlb_speaker.announcement import Owner

if TYPE_CHECKING:  # the runtime imports this module; it stays free of pydantic and the inventory
    from layerlb_speaker import inventory

API_VERSION = "layerlb.dev/v1alpha1"  # layerlb.api.API_VERSION (a test keeps them equal)
FIELD_MANAGER = "layerlb-speaker"
MAX_FIELD_MANAGER = 128  # the API server's limit


def field_manager(node: str) -> str:
    """The server-side apply field manager of `node`'s entry in a VIPPool's `status.nodes`."""
    return f"{FIELD_MANAGER}/{node}"[:MAX_FIELD_MANAGER]


@dataclass(frozen=True)
class Wanted:
    """A pool whose interfaces this node should have: the pool, its generation, the interfaces."""

    pool: Owner
    generation: int
    interfaces: tuple[str, ...]


@dataclass(frozen=True)
class Entry:
    """One node's entry: the pool generation it describes and the interfaces missing there."""

    generation: int
    missing: tuple[str, ...]


def wanted(pools: Iterable[inventory.Pool], labels: Mapping[str, str] | None) -> tuple[Wanted, ...]:
    """The pools this node (with `labels`; None: unknown to the Node watch) should have interfaces for."""
    from layerlb_speaker import inventory

    if labels is not None and inventory.EXCLUDE_LABEL in labels:
        return ()
    found = []
    for pool in pools:
        if pool.invalid or not pool.interfaces:
            continue
        if pool.selector is not None and (labels is None or not inventory.matches(pool.selector, labels)):
            continue
        found.append(Wanted(pool.owner, pool.generation, pool.interfaces))
    return tuple(found)


def missing(pools: Iterable[Wanted], up: Mapping[str, bool]) -> dict[Owner, Entry]:
    """Each pool with the interfaces of its that are not up (`up`: interface → up; absent: missing)."""
    return {
        each.pool: Entry(each.generation, tuple(name for name in each.interfaces if not up.get(name, False)))
        for each in pools
    }


@dataclass(frozen=True)
class Write:
    """One apply on a pool's status: `node`'s entry, or (`entry` None, or nothing missing) its removal."""

    pool: Owner
    node: str
    entry: Entry | None

    def body(self) -> dict[str, Any]:
        """The server-side apply body; the pool's uid guards against a pool re-created under the name."""
        metadata = {"name": self.pool.name, **({"uid": self.pool.uid} if self.pool.uid else {})}
        nodes = []
        if self.entry is not None and self.entry.missing:
            nodes.append(
                {
                    "node": self.node,
                    "missingInterfaces": list(self.entry.missing),
                    "observedGeneration": self.entry.generation,
                }
            )
        status = {"nodes": nodes} if nodes else {}
        return {"apiVersion": API_VERSION, "kind": "VIPPool", "metadata": metadata, "status": status}

    def field_manager(self) -> str:
        return field_manager(self.node)


def _stored(pool: Mapping[str, Any]) -> dict[str, Entry]:
    """Node → its entry, as a VIPPool object (from the watch) stores them."""
    found = {}
    for item in (pool.get("status") or {}).get("nodes") or []:
        if isinstance(item, Mapping) and item.get("node"):
            names = tuple(str(name) for name in item.get("missingInterfaces") or [])
            found[str(item["node"])] = Entry(int(item.get("observedGeneration") or 0), names)
    return found


def _normal(entry: Entry | None) -> Entry | None:
    return entry if entry is not None and entry.missing else None


class Publisher:
    """One speaker's memory of the entries it wrote, so that it writes only on a change (see the module)."""

    def __init__(self, node: str) -> None:
        self.node = node
        self._written: dict[str, Entry | None] = {}  # pool uid → the entry last applied (None: removed)
        self._cleared: set[tuple[str, str]] = set()  # (pool uid, node) whose stale entry was removed

    def forget(self, uid: str) -> None:
        """A write to pool `uid` failed: compare with what is stored next time instead of the memory."""
        self._written.pop(uid, None)

    def update(
        self,
        found: Mapping[Owner, Entry],
        pools: Iterable[Mapping[str, Any]],
        nodes: Collection[str] | None,
        clears: bool,
    ) -> list[Write]:
        """The writes owed: this node's entry on each pool (`found`: its missing interfaces per pool) and,
        when `clears` (this speaker cleans up) and the Node list `nodes` is known, the removal of the
        entries of Nodes that no longer exist. `pools` are the VIPPool objects as watched."""
        wanted = {owner.uid or owner.name: (owner, _normal(entry)) for owner, entry in found.items()}
        writes: list[Write] = []
        seen_uids: set[str] = set()
        cleared: set[tuple[str, str]] = set()
        for pool in pools:
            meta = pool.get("metadata") or {}
            name, uid = str(meta.get("name") or ""), str(meta.get("uid") or "")
            if not name:
                continue
            key = uid or name
            seen_uids.add(key)
            owner, entry = wanted.get(key, (Owner("VIPPool", "", name, uid, API_VERSION), None))
            stored = _stored(pool)
            known = self._written[key] if key in self._written else _normal(stored.get(self.node))
            if entry != known:
                writes.append(Write(owner, self.node, entry))
            self._written[key] = entry
            if not clears or nodes is None:
                continue
            for node in sorted(stored):
                if node in nodes or node == self.node:
                    continue
                cleared.add((key, node))
                if (key, node) not in self._cleared:
                    writes.append(Write(owner, node, None))
        self._written = {key: entry for key, entry in self._written.items() if key in seen_uids}
        self._cleared = cleared
        return writes
