"""The VIP guard for the IPVS engine and `transparent`: a VIP on the node reaches its listeners, nothing else.

Both put the VIP on the node's `lo`, so the node accepts packets to it on *any* port: without a guard a
client of the VIP reaches every socket bound to the node's wildcard address - sshd, the kubelet, the
host-network forwarding pods' admin ports (issue #18; kube-proxy's IPVS mode had the same hole,
kubernetes/kubernetes#72236, closed by its KUBE-IPVS-FILTER chain). The nftables engine carries the same
rules in its own table (`nftables_ruleset.nft_guard_rules`); these engines have no table, so the guard is
one of its own per LoadBalancer, `layerlb_guard_<namespace>_<name>`, loaded as one transaction that
replaces it and nothing else. Its input chain runs before IPVS sees packets at LOCAL_IN. A VIP that
is an address the node had of its own (`addresses.is_foreign`) is not guarded: its other ports are the
node's (sshd on it, the replies to the node's own connections).

Idempotence as in the nftables engine: the table's comment carries the digest of its rules, and a sync
lists the table only when the kernel's nftables generation moved since it was last verified.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from layerlb import plan as plan_model
from layerlb.render import nftables_ruleset, shared
from layerlb_dataplane.kernel import addresses, nftables

log = logging.getLogger("layerlb.kernel.guard")

FAMILIES = ("ip", "ip6")
Shape = tuple[str, str, tuple[tuple[str, int], ...]]  # table, VIP, the listeners' (transport, port)


@dataclass(frozen=True)
class Guarded:
    """What one `ensure` did: kernel writes (0 or 1), and why the guard is missing when it could not load."""

    changes: int
    warning: str | None = None


class VipGuard:
    """Keeps each LoadBalancer's guard table loaded; `nft` is for tests (default: libnftables, else `nft`)."""

    def __init__(self, nft: nftables.Nft | None = None) -> None:
        self._nft = nft
        self._verified: dict[str, tuple[str, str, int | None]] = {}  # table -> (family, digest, generation)
        self._foreign: dict[str, bool] = {}  # VIP -> the node had it of its own (decided once)
        self._digests: dict[str, tuple[Shape, str]] = {}  # table -> what its rules follow from, their digest

    @property
    def nft(self) -> nftables.Nft:
        """Made at first use, so in the network namespace of the thread that first syncs (as the engines)."""
        if self._nft is None:
            self._nft = nftables.default_nft()
        return self._nft

    def ensure(self, p: plan_model.Plan) -> Guarded:
        """Loads `p`'s guard unless the kernel already holds it. A node whose nftables refuses it keeps
        forwarding: the guard is reported missing (the VIP's node ports stay reachable) rather than the
        LoadBalancer failing."""
        if p.vip not in self._foreign:
            self._foreign[p.vip] = addresses.is_foreign(p.vip)
            if self._foreign[p.vip]:
                log.warning(
                    "%s: VIP %s is this node's own address: its other ports are not guarded", p.key, p.vip
                )
        if self._foreign[p.vip]:
            return Guarded(0)
        table = nftables_ruleset.nft_guard_table_name(p)
        family = "ip6" if shared.is_ipv6(p.vip) else "ip"
        # The rules follow from the VIP and the listeners' ports alone: a re-sync renders nothing (a Plan of
        # 1,000 listeners took 7 ms per no-op sync to render and hash, 0.1 ms with this).
        shape: Shape = (table, p.vip, tuple((listener.transport, listener.port) for listener in p.listeners))
        if table not in self._digests or self._digests[table][0] != shape:
            self._digests[table] = (shape, nftables.ruleset_digest(nftables_ruleset.nft_guard_ruleset(p)))
        digest = self._digests[table][1]
        generation = nftables.ruleset_generation()
        if generation is not None and self._verified.get(table) == (family, digest, generation):
            return Guarded(0)
        try:
            listing = self._list(family, table)
            if listing is not None and f'"{nftables.COMMENT_PREFIX}{digest}"' in listing:
                self._verified[table] = (family, digest, generation)
                return Guarded(0)
            stale = "".join(
                f"delete table {other} {table}\n"
                for other in FAMILIES
                if other != family and self._list(other, table) is not None
            )
            self.nft.run(stale + nftables_ruleset.nft_guard_ruleset(p, nftables.COMMENT_PREFIX + digest))
        except (nftables.NftError, OSError) as error:
            self._verified.pop(table, None)
            warning = f"{p.key}: the VIP guard is not loaded, so the VIP reaches every node port: {error}"
            log.warning("%s", warning)
            return Guarded(0, warning)
        self._verified[table] = (family, digest, nftables.ruleset_generation())
        log.info("loaded the VIP guard %s %s", family, table)
        return Guarded(1)

    def remove(self, p: plan_model.Plan) -> None:
        """Deletes `p`'s guard table (in whichever family), because its VIP leaves this node."""
        table = nftables_ruleset.nft_guard_table_name(p)
        self._verified.pop(table, None)
        try:
            families = [family for family in FAMILIES if self._list(family, table) is not None]
            if families:
                self.nft.run("".join(f"delete table {family} {table}\n" for family in families))
        except (nftables.NftError, OSError) as error:
            log.warning("%s: could not delete the VIP guard %s: %s", p.key, table, error)

    def _list(self, family: str, table: str) -> str | None:
        try:
            return self.nft.run(f"list table {family} {table}")
        except nftables.NftError as error:
            if "No such file or directory" in str(error):
                return None
            raise
