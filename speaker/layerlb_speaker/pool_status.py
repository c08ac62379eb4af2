"""A node's missing pool interfaces, in the VIPPool's `status.nodes` (pure; `kube` sends the writes).

A VIPPool's `spec.announce.interfaces` names interfaces every node it selects should have. Each speaker
checks its own node (`missing`: absent or down, as `membership` tells the peers) and says so where
`kubectl describe vipp` and the operator read it: one entry of `status.nodes`, `{node, missingInterfaces,
observedGeneration}`, next to the `InterfaceNotFound` Warning Event the runtime posts. The operator turns
the entries into the pool's `InterfacesFound` condition (operator/layerlb_operator/pool_status.py).

- `status.nodes` is a list keyed by `node`; each speaker server-side applies its own entry under its own
  field manager, only on a change, and the live speaker first by name removes a deleted Node's entry
  (`node_entries`' rules, shared with `bgp_status`). When nothing is missing any more it applies an empty
  status, which removes its entry. No entry: nothing to say.
- Which pools a node checks: the valid ones whose `nodeSelector` matches its labels (`wanted`), whether or
  not an address of theirs is in use, so a typo shows before the first Service; a node excluded from
  external load balancers checks none.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from layerlb_speaker import node_entries
from layerlb_speaker.announcement import Owner

if TYPE_CHECKING:  # the runtime imports this module; it stays free of pydantic and the inventory
    from layerlb_speaker import inventory

API_VERSION = node_entries.API_VERSION


def field_manager(node: str) -> str:
    """The server-side apply field manager of `node`'s entry in a VIPPool's `status.nodes`."""
    return node_entries.field_manager(node)


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
        return self.applied().body()

    def applied(self) -> node_entries.Write:
        """This write as `kube` sends it: the entry's API fields, None when there is nothing to say."""
        fields = None
        if self.entry is not None and self.entry.missing:
            fields = {
                "missingInterfaces": list(self.entry.missing),
                "observedGeneration": self.entry.generation,
            }
        return node_entries.Write("VIPPool", self.pool.name, self.pool.uid, self.node, fields)

    def field_manager(self) -> str:
        return field_manager(self.node)


def _parse(item: Mapping[str, Any]) -> Entry | None:
    names = tuple(str(name) for name in item.get("missingInterfaces") or [])
    return _normal(Entry(int(item.get("observedGeneration") or 0), names))


def _normal(entry: Entry | None) -> Entry | None:
    return entry if entry is not None and entry.missing else None


def _write(name: str, uid: str, node: str, entry: Entry | None) -> Write:
    return Write(Owner("VIPPool", "", name, uid, API_VERSION), node, entry)


class Publisher(node_entries.Publisher[Entry, Write]):
    """One speaker's memory of the entries it wrote on the VIPPools (`node_entries.Publisher`)."""

    def __init__(self, node: str) -> None:
        super().__init__(node, _parse, _write)

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
        wanted = {owner.uid or owner.name: _normal(entry) for owner, entry in found.items()}
        return self.writes(lambda name, uid: wanted.get(uid or name), pools, nodes, clears)
