"""Load-balancing algorithms: pick a target per new request or connection, cheaply (the hot path). Sans-IO.

Every balancer picks only `usable` targets (in the Plan, weight above 0, healthy, not ejected) that are not
in `exclude` (targets a retry already tried), and returns None when there is none (→ 503). `update` is
called when membership or usability changes and rebuilds the tables then, never per pick; a pick still
checks `usable`, so a change nobody announced only costs a fallback, never a pick of a dead target.

| algorithm          | here                                                   | IPVS        | nftables   |
|--------------------|--------------------------------------------------------|-------------|------------|
| round-robin        | nginx's smooth weighted round-robin (5,1,1: aabacaa)   | rr / wrr    | numgen inc |
| least-connections  | least active/weight; ties by smooth weighted RR        | wlc         | —          |
| random-two-choices | two weighted random draws, the lower active/weight     | wlc         | —          |
| source-hash        | hash mod the weighted usable set                       | sh          | jhash      |
| ring-hash          | consistent-hash ring, 100 points per unit of weight    | mh          | —          |
| maglev             | Maglev lookup table (prime size, default 65537)        | mh          | —          |

The kernel column is `layerlb.render.ipvs_rules.ipvs_scheduler` and the nftables renderer: IPVS has no ring, so
ring-hash maps to its Maglev (`mh`), whose remapping is as small; random-two-choices maps to `wlc`, which
it approximates; nftables renders only round-robin (`numgen inc mod` over weight ranges) and source-hash
(`jhash ... saddr` with a fixed seed), and refuses the rest. The kernel keeps its own counters, so only
the userspace proxies reproduce these sequences exactly; both honour weights and drop unusable targets
(weight 0 in IPVS, out of the map in nftables).

Hashing is deterministic (blake2b, never Python's salted `hash`), and tables are built from targets
sorted by address, so every worker and every replica sends a key to the same target.
"""

from __future__ import annotations

import array
import bisect
import hashlib
import math
import random
import time
from collections.abc import Callable, Collection, Hashable, Sequence
from typing import Any, Protocol, TypeVar

from layerlb.api import Algorithm
from layerlb_dataplane.core.targets import Target

MAGLEV_TABLE_SIZE = 65537
RING_POINTS_PER_WEIGHT = 100
RING_MAX_POINTS = 1 << 17  # beyond this the points per unit of weight shrink (at least one)
FALLBACK_WALK = 64  # table slots tried after an unusable pick before scanning all targets

_T = TypeVar("_T")


class Balancer(Protocol):
    """Chooses among a backend's targets; skips targets that are not `usable` or are in `exclude`."""

    def pick(self, key: bytes, exclude: Collection[Target] = ()) -> Target | None:
        """A usable target; `key` is the hash key (client address or header/cookie value)."""
        ...

    def update(self, targets: Sequence[Target]) -> None:
        """Membership, weight or usability changed: rebuild whatever tables depend on it."""
        ...


def hash64(data: bytes) -> int:
    """A stable 64-bit hash: the same in every process, unlike `hash()`."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def target_name(target: Target) -> bytes:
    """What hashing algorithms know a target by: its address and port, not its place in the Plan."""
    return f"{target.address}:{'' if target.port is None else target.port}".encode()


def _weight_unit(targets: Sequence[Target]) -> int:
    """The gcd of the weights, so that tables repeat each target weight/gcd times, not weight times."""
    return math.gcd(*(target.weight for target in targets)) or 1


# --- counting algorithms -----------------------------------------------------------------------------


class RoundRobin:
    """nginx's smooth weighted round-robin: each pick adds every weight to a credit and takes the richest.

    Weights 5,1,1 give a a b a c a a — the heavy target's turns are spread, never a burst of five. When
    all weights are equal this is a plain rotation, taken by a cheaper path.
    """

    def __init__(self, targets: Sequence[Target]) -> None:
        self.targets: list[Target] = []
        self._credit: list[int] = []
        self._next = 0
        self._equal = True
        self.update(targets)

    def update(self, targets: Sequence[Target]) -> None:
        credit = dict(zip(self.targets, self._credit, strict=True))
        self.targets = list(targets)
        self._credit = [credit.get(target, 0) for target in self.targets]
        self._equal = len({target.weight for target in self.targets if target.weight > 0}) <= 1
        if self._next >= len(self.targets):
            self._next = 0

    def pick(self, key: bytes, exclude: Collection[Target] = ()) -> Target | None:
        targets = self.targets
        if self._equal:
            count = len(targets)
            index = self._next
            for _ in range(count):
                target = targets[index]
                index = index + 1 if index + 1 < count else 0
                if target.usable and target not in exclude:
                    self._next = index
                    return target
            return None
        return _smooth_pick(targets, self._credit, range(len(targets)), exclude)


def _smooth_pick(
    targets: Sequence[Target], credit: list[int], indices: Sequence[int], exclude: Collection[Target]
) -> Target | None:
    """One step of smooth weighted round-robin over `indices` (the usable ones among them)."""
    best = -1
    total = 0
    for index in indices:
        target = targets[index]
        if not target.usable or target in exclude:
            continue
        weight = target.weight
        credit[index] += weight
        total += weight
        if best == -1 or credit[index] > credit[best]:
            best = index
    if best == -1:
        return None
    credit[best] -= total
    return targets[best]


class LeastConnections:
    """The target with the fewest requests in flight per unit of weight; ties go by smooth weighted RR.

    Comparing active/weight (nginx, IPVS `wlc`) lets a weight-2 target carry twice the load; breaking ties
    by weighted round-robin keeps weights honoured when the load is light and every count is 0.
    """

    def __init__(self, targets: Sequence[Target]) -> None:
        self.targets: list[Target] = []
        self._credit: list[int] = []
        self.update(targets)

    def update(self, targets: Sequence[Target]) -> None:
        credit = dict(zip(self.targets, self._credit, strict=True))
        self.targets = list(targets)
        self._credit = [credit.get(target, 0) for target in self.targets]

    def pick(self, key: bytes, exclude: Collection[Target] = ()) -> Target | None:
        tied: list[int] = []
        best_active = 0
        best_weight = 1
        for index, target in enumerate(self.targets):
            if not target.usable or target in exclude:
                continue
            active, weight = target.active, target.weight
            # active/weight < best_active/best_weight, without division
            if not tied or active * best_weight < best_active * weight:
                tied = [index]
                best_active, best_weight = active, weight
            elif active * best_weight == best_active * weight:
                tied.append(index)
        if not tied:
            return None
        if len(tied) == 1:
            return self.targets[tied[0]]
        return _smooth_pick(self.targets, self._credit, tied, exclude)


class RandomTwoChoices:
    """Two distinct targets drawn at random (by weight), the one with fewer requests in flight per weight.

    The power of two choices: nearly least-connections' balance at O(1) per pick, and no herd on the one
    idle target when many workers decide at once. Ties keep the first draw, so an idle pool splits by weight.
    """

    DRAWS = 8  # random draws tried for each choice before scanning for the usable ones

    def __init__(self, targets: Sequence[Target], rng: random.Random | None = None) -> None:
        self.rng = rng or random.Random()
        self.targets: list[Target] = []
        self._cumulative: list[int] = []
        self.update(targets)

    def update(self, targets: Sequence[Target]) -> None:
        self.targets = [target for target in targets if target.weight > 0 and not target.draining]
        self._cumulative = []
        total = 0
        for target in self.targets:
            total += target.weight
            self._cumulative.append(total)

    def _draw(self, exclude: Collection[Target], other: Target | None) -> Target | None:
        if not self.targets:
            return None
        cumulative, rng, total = self._cumulative, self.rng, self._cumulative[-1]
        for _ in range(self.DRAWS):
            target = self.targets[bisect.bisect_right(cumulative, rng.random() * total)]
            if target is not other and target.usable and target not in exclude:
                return target
        rest = [t for t in self.targets if t is not other and t.usable and t not in exclude]
        if not rest:
            return None
        return rng.choices(rest, weights=[t.weight for t in rest])[0]

    def pick(self, key: bytes, exclude: Collection[Target] = ()) -> Target | None:
        first = self._draw(exclude, None)
        if first is None:
            return None
        second = self._draw(exclude, first)
        if second is None:
            return first
        if second.active * first.weight < first.active * second.weight:
            return second
        return first


# --- hashing algorithms ------------------------------------------------------------------------------


class _HashTable:
    """A table of targets indexed by a key's hash, built from the usable targets at `update`.

    A pick whose slot holds a target that became unusable since, or is excluded, walks on to the next
    slots (deterministic, so a retry of the same key goes to the same second choice), and after
    `FALLBACK_WALK` slots takes the hash modulo the usable targets, so a mostly-dead table costs O(n), not
    O(table). An ejection that ends by the clock (`health.ejected_until`) triggers a rebuild at the next
    pick, since nobody calls `update` for it.
    """

    def __init__(self, targets: Sequence[Target], clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.targets: list[Target] = []
        self._table: list[Target] = []
        self._rebuild_at = math.inf
        self.update(targets)

    def update(self, targets: Sequence[Target]) -> None:
        self.targets = sorted(targets, key=target_name)
        members = [target for target in self.targets if target.usable]
        ejections = [
            target.health.ejected_until
            for target in self.targets
            if target.weight > 0 and not target.draining and target.health.ejected_until
        ]
        self._rebuild_at = min(ejections, default=math.inf)
        self._table = self._build(members) if members else []

    def _build(self, members: list[Target]) -> list[Target]:
        raise NotImplementedError

    def _slot(self, hashed: int) -> int:
        raise NotImplementedError

    def pick(self, key: bytes, exclude: Collection[Target] = ()) -> Target | None:
        if self._rebuild_at != math.inf and self._rebuild_at <= self.clock():
            self.update(self.targets)
        hashed = hash64(key)
        table = self._table
        if table:
            size = len(table)
            slot = self._slot(hashed)
            target = table[slot]
            if target.usable and target not in exclude:
                return target
            for step in range(1, min(size, FALLBACK_WALK)):
                target = table[(slot + step) % size]
                if target.usable and target not in exclude:
                    return target
        rest = [target for target in self.targets if target.usable and target not in exclude]
        return rest[hashed % len(rest)] if rest else None


class SourceHash(_HashTable):
    """Hash of the key modulo the weighted usable set: stable while the set is, remaps widely when not.

    IPVS `sh` and nftables `jhash` do the same; use ring-hash or maglev where a change must move few keys.
    """

    def _build(self, members: list[Target]) -> list[Target]:
        unit = _weight_unit(members)
        return [target for target in members for _ in range(target.weight // unit)]

    def _slot(self, hashed: int) -> int:
        return hashed % len(self._table)


class _TableCache:
    """The last few hashing tables by what they were built from, shared by all balancers of the process.

    A Plan reload builds new balancers over the same endpoints, and a flapping target alternates between
    two memberships; both would otherwise pay a full rebuild (tens of ms for a Maglev table) every time.
    """

    def __init__(self, entries: int) -> None:
        self.entries = entries
        self._tables: dict[Hashable, Any] = {}

    def get(self, key: Hashable, build: Callable[[], _T]) -> _T:
        table: _T = self._tables.pop(key) if key in self._tables else build()
        self._tables[key] = table  # most recently used last
        while len(self._tables) > self.entries:
            del self._tables[next(iter(self._tables))]
        return table


_TABLES = _TableCache(entries=8)
Shares = tuple[tuple[bytes, int], ...]  # (target name, weight/gcd) of each member, in name order


def _shares(targets: Sequence[Target]) -> Shares:
    unit = _weight_unit(targets)
    return tuple((target_name(target), target.weight // unit) for target in targets)


class RingHash(_HashTable):
    """A consistent-hash ring (Karger; Envoy's ring_hash): 100 points per unit of weight, key → next point.

    Removing a target moves only the keys on its arcs (about 1/N), each to the following point's target.
    The ring of every target in the Plan is built once; a health change only filters it, never re-sorts.
    """

    def __init__(self, targets: Sequence[Target], clock: Callable[[], float] = time.monotonic) -> None:
        self._hashes: Sequence[int] = ()
        super().__init__(targets, clock)

    def _build(self, members: list[Target]) -> list[Target]:
        eligible = [target for target in self.targets if target.weight > 0 and not target.draining]
        shares = _shares(eligible)
        points, owners = _TABLES.get(("ring", shares), lambda: _ring(shares))
        if len(members) == len(eligible):
            self._hashes = points
            return [eligible[owner] for owner in owners]
        usable = set(members)
        keep = {index for index, target in enumerate(eligible) if target in usable}
        chosen = [slot for slot, owner in enumerate(owners) if owner in keep]
        self._hashes = array.array("Q", (points[slot] for slot in chosen))
        return [eligible[owners[slot]] for slot in chosen]

    def _slot(self, hashed: int) -> int:
        slot = bisect.bisect_left(self._hashes, hashed)
        return slot if slot < len(self._hashes) else 0


def _ring(shares: Shares) -> tuple[array.array[int], array.array[int]]:
    """The sorted ring: point hashes and, per point, the index of its owner in `shares`."""
    units = sum(turns for _, turns in shares)
    per_unit = max(1, min(RING_POINTS_PER_WEIGHT, RING_MAX_POINTS // max(units, 1)))
    points: list[int] = []
    owners: list[int] = []
    for owner, (name, turns) in enumerate(shares):
        for point in range(per_unit * turns):
            points.append(hash64(name + b"#%d" % point))
            owners.append(owner)
    order = sorted(range(len(points)), key=points.__getitem__)  # stable: ties stay in name order
    return array.array("Q", (points[i] for i in order)), array.array("I", (owners[i] for i in order))


class Maglev(_HashTable):
    """Google's Maglev hashing (NSDI 2016): a prime-size lookup table filled by per-target permutations.

    Each target's permutation is `offset + j*skip mod M` from two hashes of its name; targets take turns
    claiming their next free slot, weight/gcd slots per turn, until the table is full. Lookups are one
    modulo; removing one of N targets remaps about 1/N of keys, and each target's share of slots is
    within a few percent of its weight.
    """

    def __init__(
        self,
        targets: Sequence[Target],
        clock: Callable[[], float] = time.monotonic,
        table_size: int = MAGLEV_TABLE_SIZE,
    ) -> None:
        if table_size < 3 or any(table_size % d == 0 for d in range(2, math.isqrt(table_size) + 1)):
            raise ValueError(f"Maglev table size {table_size} must be a prime number, such as 65537")
        self.table_size = table_size
        super().__init__(targets, clock)

    def _build(self, members: list[Target]) -> list[Target]:
        shares = _shares(members)
        size = self.table_size
        slots = _TABLES.get(("maglev", size, shares), lambda: _maglev_populate(shares, size))
        return [members[index] for index in slots]

    def _slot(self, hashed: int) -> int:
        return hashed % self.table_size


def _maglev_populate(shares: Shares, size: int) -> array.array[int]:
    """The Maglev table: slot → index into `shares`, each taking `turns` slots per round."""
    positions = []
    skips = []
    for name, _ in shares:
        digest = hashlib.blake2b(name, digest_size=16, person=b"layerlb-maglev").digest()
        positions.append(int.from_bytes(digest[:8], "little") % size)
        skips.append(int.from_bytes(digest[8:], "little") % (size - 1) + 1)
    table = [-1] * size
    filled = 0
    while True:
        for index, (_, turns) in enumerate(shares):
            position, skip = positions[index], skips[index]
            for _ in range(turns):
                while table[position] >= 0:
                    position += skip
                    if position >= size:
                        position -= size
                table[position] = index
                filled += 1
                if filled == size:
                    return array.array("I", table)
            positions[index] = position


# --- construction ------------------------------------------------------------------------------------


def create(algorithm: Algorithm, targets: Sequence[Target]) -> Balancer:
    """The balancer of `algorithm` over `targets`."""
    if algorithm is Algorithm.round_robin:
        return RoundRobin(targets)
    if algorithm is Algorithm.least_connections:
        return LeastConnections(targets)
    if algorithm is Algorithm.random_two_choices:
        return RandomTwoChoices(targets)
    if algorithm is Algorithm.source_hash:
        return SourceHash(targets)
    if algorithm is Algorithm.ring_hash:
        return RingHash(targets)
    if algorithm is Algorithm.maglev:
        return Maglev(targets)
    raise ValueError(f"unknown balancing algorithm {algorithm!r}")
