"""A VIPPool's `InterfacesFound` condition, from what the speakers report in `status.nodes` (pure).

Each node's speaker owns one entry of `status.nodes` (server-side apply under its own field manager,
speaker/layerlb_speaker/pool_status.py): the interfaces of `spec.announce.interfaces` that node lacks or
has down, or no entry at all when it has them all. The speakers see interfaces; the operator owns what a
pool means, so it turns the entries into one condition that `kubectl get vipp` and `kubectl wait` read:

- False, reason `InterfaceNotFound`, message naming the field, each missing interface and its nodes
  ("spec.announce.interfaces: eth9 not found or down on node-a, node-b"), when any entry lists an
  interface the current spec still names (an entry written for an older spec never accuses an interface
  the user has since removed);
- True otherwise, reason `InterfacesFound`.

Entries of Nodes that no longer exist are removed by the speakers (the live one ranking first), which
watch Nodes; the operator does not.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from layerlb_operator import node_entries, status

INTERFACES_FOUND = "InterfacesFound"
INTERFACE_NOT_FOUND = "InterfaceNotFound"
FIELD = "spec.announce.interfaces"


def _interfaces(pool: Mapping[str, Any]) -> list[str]:
    announce = (pool.get("spec") or {}).get("announce") or {}
    names = announce.get("interfaces") or []
    return [str(name) for name in names] if isinstance(names, list) else []


def missing(pool: Mapping[str, Any]) -> dict[str, list[str]]:
    """Interface → the nodes reporting it missing, for the interfaces the pool's spec names now."""
    wanted = _interfaces(pool)
    found: dict[str, set[str]] = {}
    for entry in node_entries.entries(pool):
        for name in entry.get("missingInterfaces") or []:
            if name in wanted:
                found.setdefault(str(name), set()).add(str(entry["node"]))
    return {name: sorted(found[name]) for name in wanted if name in found}


def interfaces_found(pool: Mapping[str, Any]) -> dict[str, Any]:
    """The pool's `InterfacesFound` condition (without its transition time: `status.merge` adds it)."""
    generation = node_entries.generation(pool)
    wanted = _interfaces(pool)
    absent = missing(pool)
    if absent:
        where = "; ".join(f"{name} not found or down on {', '.join(nodes)}" for name, nodes in absent.items())
        return status.condition(INTERFACES_FOUND, False, INTERFACE_NOT_FOUND, f"{FIELD}: {where}", generation)
    if wanted:
        message = f"{FIELD}: no speaker reports {', '.join(wanted)} missing or down on its node"
    else:
        message = f"{FIELD} is not set: each node answers on the interface holding its InternalIP"
    return status.condition(INTERFACES_FOUND, True, INTERFACES_FOUND, message, generation)


# The pool's condition as the reconciler writes it: computed, its transition time kept, compared, applied.
CONDITION = node_entries.Condition("VIPPool", INTERFACES_FOUND, interfaces_found)
conditions = CONDITION.conditions
stale = CONDITION.stale
apply_body = CONDITION.apply_body


def spec_changed(seen: Mapping[str, tuple[str, int]], pool: Mapping[str, Any], deleted: bool) -> bool:
    """Whether a VIPPool event changes what the allocator reads (`seen`: name → (uid, generation) last
    handled): a new, deleted or re-specified pool does; a status write (a speaker's, the operator's own)
    does not, so that it never re-renders every LoadBalancer."""
    meta = pool.get("metadata") or {}
    current = (str(meta.get("uid") or ""), int(meta.get("generation") or 0))
    return deleted or seen.get(str(meta.get("name") or "")) != current
