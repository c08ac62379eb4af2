"""The live state a Plan becomes: targets kept across Plans, departed ones draining until idle, pools that
pick by the hash key and tell their balancer about health changes (sans-IO)."""

from __future__ import annotations

from layerlb_dataplane.core import state

from layerlb import plan
from layerlb.api import Algorithm, Architecture, Mode, Protocol


def backend(name: str, ports: tuple[int, ...], algorithm: Algorithm = Algorithm.round_robin) -> plan.Backend:
    return plan.Backend(
        name=name,
        algorithm=algorithm,
        endpoints=tuple(plan.Endpoint(address="10.0.0.7", port=port, weight=1) for port in ports),
    )


def make_plan(*backends: plan.Backend, generation: int = 1) -> plan.Plan:
    return plan.Plan(
        name="web",
        namespace="shop",
        generation=generation,
        mode=Mode.L7,
        architecture=Architecture.proxy,
        engine=None,
        vip="127.0.0.1",
        listeners=(plan.Listener(name="http", port=8080, protocol=Protocol.HTTP, transport="TCP"),),
        backends=backends,
        default_backend=backends[0].name,
    )


def test_targets_that_stay_are_the_same_objects_with_the_new_weight() -> None:
    registry = state.Registry()
    first = registry.snapshot(make_plan(backend("app", (80, 81))))
    kept = first.pools["app"].targets[0]
    kept.active = 2
    weighted = backend("app", (80, 81)).model_copy(
        update={"endpoints": (plan.Endpoint(address="10.0.0.7", port=80, weight=5),)}
    )
    second = registry.snapshot(make_plan(weighted, generation=2))
    (again,) = second.pools["app"].targets
    assert again is kept and again.weight == 5 and again.active == 2
    assert second.generation == 2 and first.generation == 1


def test_a_departed_target_drains_while_busy_and_is_forgotten_when_idle() -> None:
    registry = state.Registry()
    first = registry.snapshot(make_plan(backend("app", (80, 81, 82))))
    busy, idle = first.pools["app"].targets[1:]
    busy.active = 1
    registry.snapshot(make_plan(backend("app", (80,)), generation=2))
    assert busy.draining and idle.draining
    assert list(registry.draining()) == [busy]  # the idle one is gone at once
    assert set(registry.targets) == {("app", "10.0.0.7", 80), ("app", "10.0.0.7", 81)}
    registry.forget_drained()
    assert list(registry.draining()) == [busy]  # still busy: kept
    busy.active = 0
    registry.forget_drained()
    assert list(registry.draining()) == [] and set(registry.targets) == {("app", "10.0.0.7", 80)}


def test_a_target_that_returns_before_it_drained_serves_again() -> None:
    registry = state.Registry()
    first = registry.snapshot(make_plan(backend("app", (80, 81))))
    returning = first.pools["app"].targets[1]
    returning.active = 1
    registry.snapshot(make_plan(backend("app", (80,)), generation=2))
    assert returning.draining
    third = registry.snapshot(make_plan(backend("app", (80, 81)), generation=3))
    assert third.pools["app"].targets[1] is returning and not returning.draining and returning.usable


def test_a_target_of_another_backend_at_the_same_address_is_its_own() -> None:
    registry = state.Registry()
    snapshot = registry.snapshot(make_plan(backend("app", (80,)), backend("api", (80,))))
    (app,), (api,) = snapshot.pools["app"].targets, snapshot.pools["api"].targets
    assert app is not api and (app.backend, api.backend) == ("app", "api")


def test_a_pool_hashes_its_key_and_falls_back_to_the_client_address() -> None:
    pool = (
        state.Registry().snapshot(make_plan(backend("app", (80, 81, 82), Algorithm.ring_hash))).pools["app"]
    )
    by_key = {pool.pick("192.0.2.1", b"user-%d" % n) for n in range(60)}
    assert len(by_key) == 3  # one client, keys spread
    by_client = {pool.pick("192.0.2.1", None) for _ in range(5)}
    assert len(by_client) == 1
    assert pool.pick("192.0.2.1", None) is pool.pick("203.0.113.9", b"192.0.2.1")  # the key is what is hashed


def test_a_pool_skips_excluded_targets_and_counts_the_ready_ones() -> None:
    pool = state.Registry().snapshot(make_plan(backend("app", (80, 81)))).pools["app"]
    first, second = pool.targets
    assert pool.pick("192.0.2.1", exclude=[first]) is second
    assert pool.pick("192.0.2.1", exclude=[first, second]) is None
    assert pool.ready_count() == 2
    second.weight = 0
    assert pool.ready_count() == 1
    assert pool.name == "app"


def test_passive_failures_eject_through_the_serving_snapshot_and_say_when_it_changed() -> None:
    registry = state.Registry()
    snapshot = registry.snapshot(make_plan(backend("app", (80, 81), Algorithm.maglev)))
    target = snapshot.pools["app"].targets[0]
    threshold = target.health.passive_threshold
    changes = [snapshot.record_passive(target, False) for _ in range(threshold)]
    assert changes == [False] * (threshold - 1) + [True]
    assert not target.usable
    assert {snapshot.pools["app"].pick(f"192.0.2.{n}") for n in range(50)} == {
        snapshot.pools["app"].targets[1]
    }


def test_passive_results_for_a_backend_no_longer_in_the_plan_change_nothing() -> None:
    registry = state.Registry()
    old = registry.snapshot(make_plan(backend("old", (80,)), backend("app", (81,))))
    target = old.pools["old"].targets[0]
    new = registry.snapshot(make_plan(backend("app", (81,)), generation=2))
    assert [new.record_passive(target, False) for _ in range(10)] == [False] * 10
    assert target.health.passive_failures == 0


def test_the_snapshot_routes_and_finds_pools_by_name() -> None:
    snapshot = state.Registry().snapshot(make_plan(backend("app", (80,))))
    assert snapshot.pool("app") is snapshot.pools["app"]
    assert snapshot.pool(None) is None and snapshot.pool("nope") is None
    assert snapshot.router.match("GET", "h", "/", lambda name: None) == "app"
