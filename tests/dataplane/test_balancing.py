"""Balancing: each algorithm's promise (sequence, load, spread, remapping) and the rules all share."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Sequence

import pytest
from layerlb_dataplane.core import balancing
from layerlb_dataplane.core.targets import Target

from layerlb.api import Algorithm


def targets(*weights: int) -> list[Target]:
    """Targets 10.0.0.1.. with the given weights, all healthy."""
    return [Target("app", f"10.0.0.{i + 1}", 8080, weight) for i, weight in enumerate(weights)]


def keys(count: int) -> list[bytes]:
    return [f"192.0.2.{i % 250}:{i}".encode() for i in range(count)]


def picks(balancer: balancing.Balancer, count: int, key: bytes = b"k") -> list[Target]:
    chosen = [balancer.pick(key) for _ in range(count)]
    assert all(target is not None for target in chosen)
    return [target for target in chosen if target is not None]


def mapping(balancer: balancing.Balancer, all_keys: Sequence[bytes]) -> dict[bytes, Target | None]:
    return {key: balancer.pick(key) for key in all_keys}


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


ALL = list(Algorithm)
HASHING = [Algorithm.source_hash, Algorithm.ring_hash, Algorithm.maglev]


# --- rules every algorithm keeps ---------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ALL)
def test_weight_zero_draining_and_unhealthy_targets_are_never_picked(algorithm: Algorithm) -> None:
    pool = targets(1, 0, 1, 1, 1)
    pool[2].draining = True
    pool[3].health.healthy = False
    balancer = balancing.create(algorithm, pool)
    chosen = {balancer.pick(key) for key in keys(2000)}
    assert chosen == {pool[0], pool[4]}


@pytest.mark.parametrize("algorithm", ALL)
def test_excluded_targets_are_skipped(algorithm: Algorithm) -> None:
    pool = targets(1, 1, 1)
    balancer = balancing.create(algorithm, pool)
    for key in keys(300):
        chosen = balancer.pick(key, exclude=(pool[0], pool[1]))
        assert chosen is pool[2]
    assert balancer.pick(b"k", exclude=pool) is None


@pytest.mark.parametrize("algorithm", ALL)
def test_no_usable_target_gives_none(algorithm: Algorithm) -> None:
    pool = targets(1, 1)
    for target in pool:
        target.health.healthy = False
    assert balancing.create(algorithm, pool).pick(b"k") is None
    assert balancing.create(algorithm, []).pick(b"k") is None


@pytest.mark.parametrize("algorithm", ALL)
def test_a_target_that_fails_without_update_is_avoided_at_pick_time(algorithm: Algorithm) -> None:
    pool = targets(1, 1, 1, 1)
    balancer = balancing.create(algorithm, pool)
    pool[1].health.healthy = False  # nobody calls update
    assert pool[1] not in {balancer.pick(key) for key in keys(2000)}


@pytest.mark.parametrize("algorithm", ALL)
def test_update_brings_a_recovered_target_back(algorithm: Algorithm) -> None:
    pool = targets(1, 1, 1)
    pool[0].health.healthy = False
    balancer = balancing.create(algorithm, pool)
    assert pool[0] not in {balancer.pick(key) for key in keys(600)}
    pool[0].health.healthy = True
    balancer.update(pool)
    assert pool[0] in {balancer.pick(key) for key in keys(600)}


# --- round-robin -------------------------------------------------------------------------------------


def test_round_robin_spreads_weights_smoothly_like_nginx() -> None:
    a, b, c = targets(5, 1, 1)
    balancer = balancing.RoundRobin([a, b, c])
    assert picks(balancer, 14) == [a, a, b, a, c, a, a] * 2


def test_round_robin_with_equal_weights_rotates() -> None:
    a, b, c = targets(2, 2, 2)
    balancer = balancing.RoundRobin([a, b, c])
    assert picks(balancer, 6) == [a, b, c, a, b, c]
    b.health.healthy = False
    assert picks(balancer, 4) == [a, c, a, c]


def test_round_robin_keeps_its_place_across_update() -> None:
    a, b, c = targets(5, 1, 1)
    balancer = balancing.RoundRobin([a, b, c])
    first = picks(balancer, 3)
    balancer.update([a, b, c])
    assert first + picks(balancer, 4) == [a, a, b, a, c, a, a]


# --- least-connections -------------------------------------------------------------------------------


def test_least_connections_picks_the_fewest_active_per_weight() -> None:
    a, b, c = targets(1, 2, 1)
    a.active, b.active, c.active = 2, 3, 4  # per weight: 2, 1.5, 4
    balancer = balancing.LeastConnections([a, b, c])
    assert balancer.pick(b"k") is b
    b.active = 5  # 2.5
    assert balancer.pick(b"k") is a


def test_least_connections_simulated_load_follows_the_choice() -> None:
    pool = targets(1, 1, 1)
    balancer = balancing.LeastConnections(pool)
    for _ in range(9):  # nothing finishes: each pick must go where the load is least
        chosen = balancer.pick(b"k")
        assert chosen is not None
        chosen.active += 1
    assert [target.active for target in pool] == [3, 3, 3]


def test_least_connections_breaks_ties_by_weighted_round_robin() -> None:
    a, b = targets(2, 1)
    balancer = balancing.LeastConnections([a, b])
    assert Counter(picks(balancer, 300)) == {a: 200, b: 100}
    assert picks(balancer, 3) == [a, b, a]


# --- random-two-choices ------------------------------------------------------------------------------


def test_random_two_choices_prefers_the_less_loaded() -> None:
    pool = targets(*[1] * 10)
    for load, target in enumerate(pool):
        target.active = load
    balancer = balancing.RandomTwoChoices(pool, rng=random.Random(7))
    counts = Counter(picks(balancer, 20000))
    assert counts[pool[9]] == 0  # always loses to the other draw
    assert 0.17 < counts[pool[0]] / 20000 < 0.23  # wins whenever drawn: 1 - 9/10 * 8/9 = 0.2
    assert counts[pool[0]] > counts[pool[4]] > counts[pool[8]]


def test_random_two_choices_splits_an_idle_pool_by_weight() -> None:
    a, b = targets(3, 1)
    balancer = balancing.RandomTwoChoices([a, b], rng=random.Random(1))
    share = Counter(picks(balancer, 20000))[a] / 20000
    assert 0.72 < share < 0.78


# --- hashing -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", HASHING)
def test_hashing_sends_a_key_to_the_same_target_in_every_balancer(algorithm: Algorithm) -> None:
    one = balancing.create(algorithm, targets(1, 2, 3))
    other = balancing.create(algorithm, list(reversed(targets(1, 2, 3))))  # another worker, another order
    for key in keys(500):
        first, second = one.pick(key), other.pick(key)
        assert first is not None and second is not None
        assert first.key == second.key
        assert one.pick(key) is first


@pytest.mark.parametrize(
    ("algorithm", "low", "high"),
    [(Algorithm.ring_hash, 0.05, 0.2), (Algorithm.maglev, 0.05, 0.2), (Algorithm.source_hash, 0.05, 1.0)],
)
def test_removing_one_of_ten_targets_remaps_about_a_tenth_of_keys(
    algorithm: Algorithm, low: float, high: float
) -> None:
    pool = targets(*[1] * 10)
    balancer = balancing.create(algorithm, pool)
    all_keys = keys(10000)
    before = mapping(balancer, all_keys)
    pool[3].health.healthy = False
    balancer.update(pool)
    after = mapping(balancer, all_keys)
    moved = sum(1 for key in all_keys if before[key] is not after[key]) / len(all_keys)
    assert low < moved < high
    assert all(target is not pool[3] for target in after.values())


@pytest.mark.parametrize("algorithm", [Algorithm.ring_hash, Algorithm.maglev])
def test_consistent_hashing_moves_few_keys_that_were_not_on_the_removed_target(algorithm: Algorithm) -> None:
    pool = targets(*[1] * 10)
    balancer = balancing.create(algorithm, pool)
    all_keys = keys(10000)
    before = mapping(balancer, all_keys)
    balancer.update(pool[:-1])
    after = mapping(balancer, all_keys)
    bystanders = [key for key in all_keys if before[key] is not pool[-1]]
    moved = sum(1 for key in bystanders if before[key] is not after[key]) / len(bystanders)
    assert moved < 0.03


def test_source_hash_is_stable_while_the_set_is() -> None:
    pool = targets(1, 1, 1, 1)
    balancer = balancing.SourceHash(pool)
    all_keys = keys(1000)
    before = mapping(balancer, all_keys)
    balancer.update(pool)
    assert mapping(balancer, all_keys) == before


def shares(chosen: Sequence[Target | None], pool: Sequence[Target]) -> list[float]:
    counts = Counter(chosen)
    return [counts[target] / len(chosen) for target in pool]


def test_maglev_table_spreads_within_a_few_percent_of_weights() -> None:
    pool = targets(1, 2, 3, 4, 1, 1, 2, 2, 3, 1)
    balancer = balancing.Maglev(pool)
    total = sum(target.weight for target in pool)
    table = balancer._table
    assert len(table) == balancing.MAGLEV_TABLE_SIZE
    for target, share in zip(pool, shares(table, pool), strict=True):
        assert share == pytest.approx(target.weight / total, rel=0.03)
    for target, share in zip(pool, shares([balancer.pick(k) for k in keys(60000)], pool), strict=True):
        assert share == pytest.approx(target.weight / total, rel=0.1)


@pytest.mark.parametrize("make", [balancing.RingHash, balancing.SourceHash], ids=["ring-hash", "source-hash"])
def test_hash_spread_follows_weights(make: Callable[[list[Target]], balancing.Balancer]) -> None:
    pool = targets(1, 2, 3, 2)
    balancer = make(pool)
    total = sum(target.weight for target in pool)
    for target, share in zip(pool, shares([balancer.pick(k) for k in keys(40000)], pool), strict=True):
        assert share == pytest.approx(target.weight / total, rel=0.25)


def test_maglev_refuses_a_table_size_that_is_not_prime() -> None:
    with pytest.raises(ValueError, match="prime"):
        balancing.Maglev(targets(1), table_size=65536)


@pytest.mark.parametrize("algorithm", HASHING)
def test_hashing_falls_back_deterministically(algorithm: Algorithm) -> None:
    pool = targets(*[1] * 5)
    balancer = balancing.create(algorithm, pool)
    key = b"198.51.100.7"
    first = balancer.pick(key)
    assert first is not None
    retry = balancer.pick(key, exclude=(first,))
    assert retry is not None and retry is not first
    assert balancer.pick(key, exclude=(first,)) is retry
    first.health.healthy = False  # no update: the pick walks on, to the same place
    assert balancer.pick(key) is retry


def test_ring_hash_without_update_sends_a_failed_targets_keys_where_a_rebuild_would() -> None:
    pool = targets(*[1] * 6)
    stale = balancing.RingHash(pool)
    pool[2].health.healthy = False
    fresh = balancing.RingHash(pool)
    all_keys = keys(3000)
    assert mapping(stale, all_keys) == mapping(fresh, all_keys)


@pytest.mark.parametrize("algorithm", HASHING)
def test_hash_tables_rebuild_when_an_ejection_ends(algorithm: Algorithm) -> None:
    clock = FakeClock()
    pool = targets(*[1] * 4)
    for target in pool:
        target.health.clock = clock
    ejected = pool[1]
    for _ in range(ejected.health.passive_threshold):
        ejected.health.record_passive(False)
    balancer = balancing.create(algorithm, pool)
    assert isinstance(balancer, balancing._HashTable)
    balancer.clock = clock
    all_keys = keys(2000)
    assert ejected not in set(mapping(balancer, all_keys).values())
    clock.now += ejected.health.ejection_seconds
    assert ejected in set(mapping(balancer, all_keys).values())  # nobody called update


def test_create_knows_every_algorithm() -> None:
    expected = {
        Algorithm.round_robin: balancing.RoundRobin,
        Algorithm.least_connections: balancing.LeastConnections,
        Algorithm.random_two_choices: balancing.RandomTwoChoices,
        Algorithm.source_hash: balancing.SourceHash,
        Algorithm.ring_hash: balancing.RingHash,
        Algorithm.maglev: balancing.Maglev,
    }
    for algorithm, kind in expected.items():
        assert type(balancing.create(algorithm, targets(1))) is kind
