"""Who announces a VIP, in its owners' status: what a speaker writes, and when (pure; `kube` sends it).

- A LoadBalancer gets `status.announcement` (`api.Announcement`): `{address, node, interfaces, protocol: L2,
  since}`, by a merge patch of that one key on the status subresource (field manager `layerlb-speaker`).
  The operator's merge patches name only its own keys and it never compares this one, so neither writer
  drops or re-writes the other's fields. `kubectl get llb` shows the node (column `ANNOUNCED BY`).
- A Service (of layerlb's class, or a LoadBalancer's VIP Service) gets one condition per address family,
  `layerlb.dev/AnnouncedIPv4` and `layerlb.dev/AnnouncedIPv6` (True, reason `Announced`, message
  "192.0.2.10 from node2 on eth0"), by server-side apply on services/status. One condition per family,
  not one `Announced` for the Service: a condition is one entry of a list keyed by type, and under
  server-side apply one manager's apply is its whole intent; the two addresses of a dual-stack Service
  may be held by two nodes, which would overwrite each other's message in a shared entry (or, applying
  without the other's entry, delete it). Each entry is applied alone under a field manager of its own
  per family and node, `layerlb-speaker/IPv4/node2` (`field_manager`), with force: the new holder takes
  the entry over from the previous one, and no apply ever carries (so ever removes) another entry. The
  operator's condition types and `loadBalancer.ingress` belong to its own manager and stay.
  `lastTransitionTime` is the takeover time (`since`).

The rules (`Publisher.update`, called with the speaker's whole desired state after each recomputation):

1. Only the holder writes, when it takes a VIP over, when the interfaces it answers on change, and to
   an owner it has not written yet (an object created with an address already held: a LoadBalancer's VIP
   Service appears before the LoadBalancer's status names the VIP). Nothing is written while nothing
   changes: a speaker's own write coming back through its watch changes no holder, so there is no loop.
2. A speaker that loses a VIP writes nothing: the new holder overwrites.
3. A VIP that no live speaker announces (no eligible node, or none of them alive with its interface)
   is cleared by one speaker, the live one ranking first for the address (`announcement.rank`), as it
   reports `NoEligibleNode`: the LoadBalancer's `status.announcement` is removed (`ANNOUNCED BY` empty);
   the Service's condition turns False, reason `NotAnnounced`. Speakers clear, not the operator: only
   they know which nodes are alive. When no speaker runs at all, the last value stays, dated by `since`.
4. A VIP routed over BGP only (its pool's `spec.announce.l2: false`) has no holder: every eligible node
   advertises it. It is written by one speaker, the first live advertising node by name (so writers do
   not fight), with `protocol: BGP` and the advertising nodes (`nodes`; `node` joins them for the
   ANNOUNCED BY column; the Service's message "198.51.100.1 over BGP from node1, node2"), again only on a
   change; when no live node advertises it, it is cleared as in 3.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from layerlb_speaker import announcement
from layerlb_speaker.announcement import Address, Owner, Vip

FIELD_MANAGER = "layerlb-speaker"
CONDITION_PREFIX = "layerlb.dev/Announced"
PROTOCOL = "L2"
BGP = "BGP"
ANNOUNCED = "Announced"
NOT_ANNOUNCED = "NotAnnounced"
MAX_FIELD_MANAGER = 128  # the API server's limit


def family(address: Address) -> str:
    return f"IPv{address.version}"


def condition_type(address: Address) -> str:
    """`layerlb.dev/AnnouncedIPv4` or `layerlb.dev/AnnouncedIPv6`."""
    return CONDITION_PREFIX + family(address)


def field_manager(address: Address, node: str) -> str:
    """The server-side apply field manager of `node` for the condition of `address`'s family."""
    return f"{FIELD_MANAGER}/{family(address)}/{node}"[:MAX_FIELD_MANAGER]


@dataclass(frozen=True)
class Write:
    """One status write on one owner: `node` holds `address` on `interfaces` since `since`, or, with
    `node` None, nobody announces it (`why`)."""

    owner: Owner
    address: Address
    node: str | None
    interfaces: tuple[str, ...] = ()
    since: str = ""
    why: str = ""
    nodes: tuple[str, ...] = ()  # BGP: every advertising node (`node` is the one writing); empty: L2

    def message(self) -> str:
        if self.node is None:
            return f"{self.address} is not announced: {self.why}"
        if self.nodes:
            return f"{self.address} over BGP from {', '.join(self.nodes)}"
        return f"{self.address} from {self.node} on {', '.join(self.interfaces) or '-'}"

    def announcement(self) -> dict[str, Any] | None:
        """The LoadBalancer's `status.announcement` (None: remove it)."""
        if self.node is None:
            return None
        if self.nodes:
            return {
                "address": str(self.address),
                "node": ", ".join(self.nodes),
                "nodes": list(self.nodes),
                "interfaces": [],
                "protocol": BGP,
                "since": self.since,
            }
        return {
            "address": str(self.address),
            "node": self.node,
            "interfaces": list(self.interfaces),
            "protocol": PROTOCOL,
            "since": self.since,
        }

    def loadbalancer_patch(self) -> dict[str, Any]:
        """The merge patch of a LoadBalancer's status subresource: the one key."""
        return {"status": {"announcement": self.announcement()}}

    def condition(self) -> dict[str, Any]:
        """The Service's condition for this address's family."""
        held = self.node is not None
        return {
            "type": condition_type(self.address),
            "status": "True" if held else "False",
            "reason": ANNOUNCED if held else NOT_ANNOUNCED,
            "message": self.message(),
            "lastTransitionTime": self.since,
        }

    def service_apply(self) -> dict[str, Any]:
        """The server-side apply body of a Service's status: this one condition."""
        return {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": self.owner.name, "namespace": self.owner.namespace},
            "status": {"conditions": [self.condition()]},
        }

    def written(self, current: Mapping[str, Any] | None) -> bool:
        """Whether the stored object `current` already says this (the time aside): then no write."""
        if current is None:
            return False
        state = current.get("status") or {}
        if self.owner.kind == "LoadBalancer":
            stored = state.get("announcement")
            wanted = self.announcement()
            if stored is None or wanted is None:
                return stored is None and wanted is None
            keys = ("address", "node", "nodes", "interfaces", "protocol")
            return all(stored.get(key) == wanted.get(key) for key in keys)
        wanted = self.condition()
        for found in state.get("conditions") or []:
            if isinstance(found, Mapping) and found.get("type") == wanted["type"]:
                return all(found.get(key) == wanted[key] for key in ("status", "reason", "message"))
        return False


def not_announced_reason(vip: Vip) -> str:
    if not vip.l2:
        return (
            "its pool announces over BGP only (spec.announce.l2: false) and no live node advertises it "
            "(no eligible node, no BGPAdvertisement selecting its pool, or no BGPPeer selecting such a node)"
        )
    if not vip.eligible:
        return "no node is eligible to announce it"
    return f"no live speaker on its eligible nodes ({', '.join(sorted(vip.eligible))}) can answer for it"


@dataclass(frozen=True)
class _Published:
    owners: frozenset[Owner]
    node: str | None
    interfaces: tuple[str, ...]
    since: str
    nodes: tuple[str, ...] = ()


class Publisher:
    """One speaker's memory of what it wrote, so that it writes only on a change (see the module)."""

    def __init__(self, node: str) -> None:
        self.node = node
        self._published: dict[Address, _Published] = {}

    def update(
        self,
        vips: Iterable[Vip],
        holders: Mapping[Address, str],
        members: Mapping[str, announcement.Member],
        held_on: Mapping[Address, tuple[str, ...]],
        now: str,
        advertisers: Mapping[Address, tuple[str, ...]] | None = None,
    ) -> list[Write]:
        """The writes this speaker owes after a recomputation: `holders` is every VIP's holder, `held_on`
        the interfaces this node answers each of its VIPs on, `members` the live speakers, `advertisers`
        the live nodes advertising each VIP over BGP (by name; for the VIPs with `l2` False)."""
        writes: list[Write] = []
        current: dict[Address, _Published] = {}
        for vip in vips:
            before = self._published.get(vip.address)
            nodes: tuple[str, ...] = ()
            if not vip.l2:
                nodes = (advertisers or {}).get(vip.address, ())
                if nodes and nodes[0] == self.node:
                    node: str | None = self.node
                elif not nodes and self._clears(vip.address, members):
                    node = None
                else:
                    continue  # another node writes (the first advertising), or another speaker clears it
                interfaces: tuple[str, ...] = ()
            elif vip.address in held_on:
                node = self.node
                interfaces = tuple(sorted(held_on[vip.address]))
            elif vip.address not in holders and self._clears(vip.address, members):
                node, interfaces = None, ()
            else:
                continue  # another node holds it (it writes), or another speaker clears it
            if before is not None and (before.node, before.interfaces, before.nodes) == (
                node,
                interfaces,
                nodes,
            ):
                record = before
                owners = [owner for owner in vip.owners if owner not in before.owners]
            else:  # taken over (or cleared), answered on other interfaces, advertised by other nodes
                kept = before is not None and before.node == node and before.nodes == nodes
                since = before.since if before is not None and kept else now
                record = _Published(frozenset(), node, interfaces, since, nodes)
                owners = list(vip.owners)
            current[vip.address] = _Published(
                record.owners | frozenset(vip.owners), node, interfaces, record.since, nodes
            )
            why = "" if node is not None else not_announced_reason(vip)
            writes += [
                Write(owner, vip.address, node, interfaces, record.since, why, nodes) for owner in owners
            ]
        self._published = current
        return writes

    def _clears(self, address: Address, members: Mapping[str, announcement.Member]) -> bool:
        """Whether this speaker is the one that clears an unannounced `address`: the live one ranking first."""
        return self.node in members and announcement.rank(address, members)[0] == self.node
