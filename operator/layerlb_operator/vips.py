"""VIP allocation from VIPPools, so that no address serves two LoadBalancers and a restart rebuilds it all.

Rules, in the order they are applied:

- A requested `spec.vip` is honoured when no other LoadBalancer holds it. When VIPPools cover the address,
  at least one of them must serve the LoadBalancer's namespace (and be `spec.vipPool` when that is
  given); otherwise the request is a `VIPConflict`. An address that no pool covers depends on
  `outside_pools` (`layerlb operator --vips-outside-pools`): `refuse` (the chart's default) makes it a
  `VIPConflict` too, because the speakers answer ARP/NDP and advertise over BGP for every VIP: whoever may
  create a LoadBalancer could otherwise take over any address of the nodes' LAN (the gateway's, a
  server's); the cluster admin grants addresses by writing VIPPools, as MetalLB and Cilium LB-IPAM do.
  `allow` (the bare binary's default, for API-server-only tests and setups without speakers) honours
  it as written. Services of type LoadBalancer never get an address outside their pools
  (`service_frontend.assign`: `AddressNotInPool`), whatever this says.
- Without `spec.vip`, the address already in `status.vip` is kept while it stays eligible, so a VIP
  never moves under running traffic; otherwise the first free address of `spec.vipPool`, or of the
  `autoAssign` pools serving the namespace (by pool name), is taken. None free: `NoVIPAvailable`.

Who holds what is derived from the statuses (the only storage) plus the `Ledger` of claims this process
made since, which are not in any status yet. LoadBalancers and Services of type LoadBalancer share the one
ledger: a LoadBalancer's owner is `namespace/name` (its `status.vip`), a Service's is
`Service namespace/name` (the `ip`s of its `status.loadBalancer.ingress`, one per family; see
`service_frontend`), so an address held by either is never handed to the other, and a restart rebuilds
both from their statuses.

One address has two holders on purpose: a Service asking for a layerlb architecture and the LoadBalancer
derived from it (`service_loadbalancer`: named after the Service, controlled by it through its owner
reference), whose VIP is the Service's address. Each ignores the other's claim (`shared`): the Service
keeps its address while its LoadBalancer holds it, the LoadBalancer may take it as its `spec.vip`, and
after a restart both statuses rebuild the same two claims. Anyone else still finds the address taken.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from layerlb import api, validation
from layerlb.resolve import Unresolvable
from layerlb.validation import Problem

Address = ipaddress.IPv4Address | ipaddress.IPv6Address

# `--vips-outside-pools`: what a requested `spec.vip` that no VIPPool covers gets.
ALLOW = "allow"
REFUSE = "refuse"
OUTSIDE_POOLS = (ALLOW, REFUSE)


@dataclass(frozen=True)
class Block:
    """A run of consecutive addresses of one family: a CIDR or an inclusive range."""

    first: Address
    size: int

    def __contains__(self, address: object) -> bool:
        if not isinstance(address, ipaddress.IPv4Address | ipaddress.IPv6Address):
            return False
        return address.version == self.first.version and 0 <= int(address) - int(self.first) < self.size

    def at(self, offset: int) -> Address:
        """The address `offset` places after the first."""
        return ipaddress.ip_address(int(self.first) + offset)


@dataclass(frozen=True)
class Pool:
    """A parsed, valid VIPPool."""

    name: str
    blocks: tuple[Block, ...]
    namespaces: frozenset[str] | None = None
    auto_assign: bool = True

    def __contains__(self, address: object) -> bool:
        return any(address in block for block in self.blocks)

    def serves(self, namespace: str) -> bool:
        """Whether LoadBalancers of `namespace` may draw from this pool."""
        return self.namespaces is None or namespace in self.namespaces

    @property
    def size(self) -> int:
        """How many addresses the pool holds (blocks may overlap; this counts them once per block)."""
        return sum(block.size for block in self.blocks)

    def describe(self) -> str:
        """`public (192.0.2.0-192.0.2.15)`: the pool and its addresses, for messages."""
        blocks = ", ".join(f"{block.first}-{block.at(block.size - 1)}" for block in self.blocks)
        return f"{self.name} ({blocks})"

    def versions(self) -> frozenset[int]:
        """The IP versions (4, 6) the pool has addresses of."""
        return frozenset(block.first.version for block in self.blocks)

    def size_of(self, version: int) -> int:
        """How many addresses of IP `version` the pool holds (counted as `size` counts)."""
        return sum(block.size for block in self.blocks if block.first.version == version)


def pool_from(document: Mapping[str, object]) -> Pool:
    """A Pool from a VIPPool resource; raises `validation.Invalid` with the same problems as the CLI."""
    resource = validation.validate(
        {key: document.get(key) for key in ("apiVersion", "kind", "metadata", "spec")}
    )
    assert isinstance(resource, api.VIPPool)
    blocks = tuple(Block(*api.address_block(text)) for text in resource.spec.addresses)
    namespaces = frozenset(resource.spec.namespaces) if resource.spec.namespaces is not None else None
    return Pool(resource.metadata.name, blocks, namespaces, resource.spec.autoAssign)


@dataclass
class Ledger:
    """Claims made by this process that the LoadBalancers' statuses may not show yet.

    A claim overrides what that owner's status says; a release hides the owner's status until the
    owner claims again (its status still names the VIP while it is being deleted).
    """

    claims: dict[str, str | tuple[str, ...]] = field(default_factory=dict)
    released: set[str] = field(default_factory=set)

    def claim(self, owner: str, address: str | tuple[str, ...] | None) -> None:
        """Record that `owner` holds `address` now (a tuple: one per family; None or (): it holds nothing)."""
        self.released.discard(owner)
        if address is None or address == ():
            self.claims.pop(owner, None)
            self.released.add(owner)
        else:
            self.claims[owner] = address

    def release(self, owner: str) -> None:
        """Forget `owner`'s address: it is being deleted."""
        self.claims.pop(owner, None)
        self.released.add(owner)

    def holders(self, statuses: Mapping[str, str | tuple[str, ...]]) -> dict[str, str]:
        """Address → owner, from `statuses` (owner → its address or addresses) overlaid with this ledger."""
        merged = {o: a for o, a in statuses.items() if o not in self.released and o not in self.claims}
        merged.update(self.claims)
        holders: dict[str, str] = {}
        for owner in sorted(merged):  # deterministic when two statuses ever name one address
            held = merged[owner]
            for address in (held,) if isinstance(held, str) else held:
                holders.setdefault(_normal(address), owner)
        return holders


SERVICE_OWNER = "Service "


def shared(holders: Mapping[str, str], partner: str | None) -> dict[str, str]:
    """`holders` without the addresses that `partner` holds: a Service and its derived LoadBalancer share
    the Service's address, so neither counts the other's claim (None: nothing is shared)."""
    return {address: owner for address, owner in holders.items() if partner is None or owner != partner}


def describe_holder(owner: str) -> str:
    """An owner as a message names it: `LoadBalancer shop/web` or `Service shop/web`."""
    return owner if owner.startswith(SERVICE_OWNER) else f"LoadBalancer {owner}"


def _parse(text: str) -> Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _normal(address: str) -> str:
    try:
        return str(ipaddress.ip_address(address))
    except ValueError:
        return address


def _problem(path: str, message: str) -> list[Problem]:
    return [Problem(path, message)]


def allocate(
    *,
    owner: str,
    namespace: str,
    requested: str | None,
    pool_name: str | None,
    current: str | None,
    pools: Iterable[Pool],
    holders: Mapping[str, str],
    broken_pools: Mapping[str, str] | None = None,
    outside_pools: str = ALLOW,
) -> str:
    """The VIP for `owner` (`namespace/name`); raise `Unresolvable` (VIPConflict, NoVIPAvailable) when none.

    `holders` maps addresses to the LoadBalancers holding them (this owner's entry is ignored);
    `broken_pools` names invalid VIPPools and why, so a request for one says so; `outside_pools`
    (ALLOW, REFUSE) says whether a requested address that no pool covers is honoured.
    """
    pools = sorted(pools, key=lambda pool: pool.name)
    taken = {address for address, holder in holders.items() if holder != owner}
    broken = broken_pools or {}
    if requested is not None:
        return _requested(owner, namespace, requested, pool_name, pools, holders, taken, outside_pools)
    if pool_name is not None:
        named = [pool for pool in pools if pool.name == pool_name]
        if not named:
            why = f" ({broken[pool_name]})" if pool_name in broken else ""
            raise Unresolvable(
                "NoVIPAvailable", _problem("spec.vipPool", f"VIPPool {pool_name} not found{why}")
            )
        if not named[0].serves(namespace):
            raise Unresolvable(
                "NoVIPAvailable",
                _problem("spec.vipPool", f"VIPPool {pool_name} does not serve namespace {namespace}"),
            )
        candidates = named
    else:
        candidates = [pool for pool in pools if pool.auto_assign and pool.serves(namespace)]
        if not candidates:
            raise Unresolvable(
                "NoVIPAvailable",
                _problem(
                    "spec.vip",
                    f"no VIPPool with autoAssign serves namespace {namespace}; "
                    "create one, name one in spec.vipPool, or give spec.vip",
                ),
            )
    if current is not None:
        kept = _parse(current)
        if kept is not None and str(kept) not in taken and any(kept in pool for pool in candidates):
            return str(kept)
    for pool in candidates:
        free = first_free(pool, taken)
        if free is not None:
            return free
    names = ", ".join(pool.name for pool in candidates)
    total = sum(pool.size for pool in candidates)
    raise Unresolvable(
        "NoVIPAvailable",
        _problem("spec.vip", f"no free address in VIPPool(s) {names}: all {total} are in use"),
    )


def _requested(
    owner: str,
    namespace: str,
    requested: str,
    pool_name: str | None,
    pools: list[Pool],
    holders: Mapping[str, str],
    taken: set[str],
    outside_pools: str,
) -> str:
    address = ipaddress.ip_address(requested)
    text = str(address)
    if text in taken:
        raise Unresolvable(
            "VIPConflict",
            _problem("spec.vip", f"{text} is already the VIP of {describe_holder(holders[text])}"),
        )
    covering = [pool for pool in pools if address in pool]
    if not covering and outside_pools == REFUSE:
        raise Unresolvable("VIPConflict", _problem("spec.vip", _outside_pools(text, namespace, pools)))
    if pool_name is not None and not any(pool.name == pool_name for pool in covering):
        raise Unresolvable("VIPConflict", _problem("spec.vip", f"{text} is not in spec.vipPool {pool_name}"))
    if covering and not any(pool.serves(namespace) for pool in covering):
        names = ", ".join(pool.name for pool in covering)
        raise Unresolvable(
            "VIPConflict",
            _problem(
                "spec.vip", f"{text} belongs to VIPPool(s) {names}, which do not serve namespace {namespace}"
            ),
        )
    return text


def _outside_pools(text: str, namespace: str, pools: list[Pool]) -> str:
    """Why `text` is refused and what would be valid: the pools this namespace may use, or none."""
    serving = [pool for pool in pools if pool.serves(namespace)]
    usable = "; ".join(pool.describe() for pool in serving)
    return (
        f"{text} is in no VIPPool, and this operator refuses addresses outside the VIPPools "
        f"(--vips-outside-pools=refuse); create a VIPPool covering it that serves namespace {namespace}, "
        f"ask for an address of a VIPPool serving namespace {namespace} ({usable or 'there are none'}), "
        "or leave spec.vip out to get a free one"
    )


def first_free(pool: Pool, taken: set[str], version: int | None = None) -> str | None:
    """The lowest free address of `pool` (of IP `version` 4 or 6 when given), looking at no more than
    len(taken) + 1 addresses per block.

    A /64 has 2**64 addresses: walking them is not an option, but the first free one is always among
    the first (number of taken addresses in the block + 1).
    """
    for block in pool.blocks:
        if version is not None and block.first.version != version:
            continue
        inside = sum(1 for text in taken if _parse(text) in block)
        for offset in range(min(block.size, inside + 1)):
            candidate = str(block.at(offset))
            if candidate not in taken:
                return candidate
    return None
