"""A condition from the speakers' per-node entries in a resource's `status.nodes`, and its apply (pure).

VIPPools (`pool_status`: `InterfacesFound`) and BGPPeers (`bgp_status`: `Established`) carry one entry per
node in `status.nodes`, each server-side applied by that node's speaker under its own field manager
(speaker/layerlb_speaker/node_entries.py). The operator turns them into one condition of the resource and
applies it on the status subresource alone, once per change: what each condition says is its module's; the
reading of the entries, the transition time kept while the status holds, the comparison that decides a
write and the apply body are the same for both, and here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from layerlb import api
from layerlb_operator import status


def entries(obj: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The entries of `status.nodes` that name a node, by node name."""
    found = (obj.get("status") or {}).get("nodes") or []
    items = [entry for entry in found if isinstance(entry, Mapping) and entry.get("node")]
    return sorted(items, key=lambda entry: str(entry["node"]))


def generation(obj: Mapping[str, Any]) -> int:
    """The object's metadata.generation, which its condition observes."""
    return int((obj.get("metadata") or {}).get("generation") or 0)


@dataclass(frozen=True)
class Condition:
    """The operator's condition `type` of a resource `kind`, computed by `compute` from an object (without
    its transition time): what the reconciler writes and when."""

    kind: str
    type: str
    compute: Callable[[Mapping[str, Any]], dict[str, Any]]

    def conditions(self, obj: Mapping[str, Any], now: str) -> list[dict[str, Any]]:
        """The operator's conditions of `obj`, each `lastTransitionTime` kept while its status holds."""
        return status.merge(_ours(obj, self.type), [self.compute(obj)], now)

    def stale(self, obj: Mapping[str, Any], wanted: Sequence[Mapping[str, Any]]) -> bool:
        """Whether the stored conditions differ from `wanted` (the transition time aside): then a write."""
        return _comparable(_ours(obj, self.type)) != _comparable(wanted)

    def apply_body(self, name: str, wanted: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """The server-side apply body of the object's status: the operator's conditions, nothing else (the
        speakers' `nodes` entries are theirs and stay)."""
        return {
            "apiVersion": api.API_VERSION,
            "kind": self.kind,
            "metadata": {"name": name},
            "status": {"conditions": list(wanted)},
        }


def _ours(obj: Mapping[str, Any], condition_type: str) -> list[Mapping[str, Any]]:
    found = (obj.get("status") or {}).get("conditions") or []
    return [c for c in found if isinstance(c, Mapping) and c.get("type") == condition_type]


def _comparable(items: Sequence[Mapping[str, Any]]) -> list[tuple[Any, ...]]:
    keys = ("type", "status", "reason", "message", "observedGeneration")
    return sorted(tuple(item.get(key) for key in keys) for item in items)
