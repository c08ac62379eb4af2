"""Session affinity's sans-IO rules that its mutation run showed untested: tokens and rendezvous choices
pinned to known values (replicas of two versions agree during a rollout, and cookies survive an upgrade),
weights honoured, the per-LoadBalancer caches, and the ClientIP table's expiry at its boundary."""

from __future__ import annotations

from collections import Counter

from layerlb_dataplane.core import affinity
from layerlb_dataplane.core.state import BackendPool
from layerlb_dataplane.core.targets import Target

from layerlb import plan
from layerlb.api import Algorithm

BACKEND = plan.Backend(name="app", algorithm=Algorithm.round_robin, endpoints=())


def pool(*targets: Target) -> BackendPool:
    return BackendPool(BACKEND, list(targets))


def three() -> list[Target]:
    return [Target("app", f"10.0.0.{n}", 80, 1) for n in (1, 2, 3)]


def test_a_cookie_token_is_pinned_so_cookies_survive_upgrades_and_long_keys_are_cut_at_64_bytes() -> None:
    target = Target("app", "10.0.0.7", 8080, 1)
    assert affinity.token("shop/web", target) == b"7e55f9ee93521430"
    assert affinity.token("x" * 100, target) == b"71df65c51b66a259"  # blake2b takes at most a 64-byte key
    assert affinity.token("x" * 64, target) == affinity.token("x" * 100, target)


def test_rendezvous_choices_are_pinned_so_replicas_of_two_versions_agree() -> None:
    choices = [affinity.rendezvous(pool(*three()), f"192.0.2.{n}") for n in range(1, 9)]
    assert [c.address if c else None for c in choices] == [
        *("10.0.0.1", "10.0.0.1", "10.0.0.1", "10.0.0.1"),
        *("10.0.0.2", "10.0.0.1", "10.0.0.3", "10.0.0.2"),
    ]


def test_rendezvous_always_finds_a_usable_target_and_follows_weights() -> None:
    light, heavy = Target("app", "10.0.0.1", 80, 1), Target("app", "10.0.0.2", 80, 3)
    weighted = pool(light, heavy)
    picks = Counter(affinity.rendezvous(weighted, f"198.51.{n // 256}.{n % 256}") for n in range(4000))
    assert None not in picks
    assert 0.70 <= picks[heavy] / 4000 <= 0.80, picks  # weight 3 of 4
    plain = pool(*three())
    assert all(affinity.rendezvous(plain, f"203.0.113.{n}") is not None for n in range(256))


def test_cookie_tokens_and_lookups_follow_the_load_balancer_key() -> None:
    table = affinity.Affinity()
    first, second = three()[:2]
    members = pool(first, second)
    old = table.cookie_token("shop/web", first)
    new = table.cookie_token("shop/other", first)
    assert new != old and new == affinity.token("shop/other", first)
    assert table.cookie_token("shop/web", first) == old
    assert table.by_cookie("shop/web", members, old) is first
    assert table.by_cookie("shop/other", members, old) is None  # another LoadBalancer's cookie names nothing
    assert table.by_cookie("shop/other", members, new) is first
    assert table.by_cookie("shop/web", members, affinity.token("shop/web", second)) is second


def test_a_client_ip_entry_lasts_its_timeout_and_expires_exactly_then() -> None:
    table = affinity.Affinity()
    first, *others = [Target("app", f"10.0.0.{n}", 80, 1) for n in range(1, 12)]
    assert table.by_client(pool(first), "192.0.2.1", now=0.0, timeout=10) is first
    grown = pool(first, *others)
    fresh = affinity.rendezvous(grown, "192.0.2.1")
    assert fresh is not first
    assert table.by_client(grown, "192.0.2.1", now=9.5, timeout=10) is first  # renewed until 19.5
    assert table.by_client(grown, "192.0.2.1", now=19.5, timeout=10) is fresh  # expired at 19.5: chosen anew
    table.expire(now=29.0)
    assert ("app", "192.0.2.1") in table.clients  # until 29.5
    table.expire(now=29.5)
    assert table.clients == {}


def test_rendezvous_skips_unusable_and_excluded_targets_even_when_they_score_highest() -> None:
    members = three()
    chosen = pool(*members)
    top = affinity.rendezvous(chosen, "192.0.2.5")
    assert top is not None
    top.draining = True
    second = affinity.rendezvous(chosen, "192.0.2.5")
    assert second is not None and second is not top
    top.draining = False
    assert affinity.rendezvous(chosen, "192.0.2.5", exclude=[top]) is second


def test_a_remembered_client_that_a_retry_excludes_moves_to_another_target() -> None:
    table = affinity.Affinity()
    members = pool(*three())
    home = table.by_client(members, "192.0.2.1", now=0.0, timeout=10)
    assert home is not None
    moved = table.by_client(members, "192.0.2.1", now=1.0, timeout=10, exclude=[home])
    assert moved is not None and moved is not home
    assert table.by_client(members, "192.0.2.1", now=2.0, timeout=10) is moved  # pinned where the retry went


def test_tokens_are_worked_out_once_per_load_balancer_key() -> None:
    table = affinity.Affinity()
    first, second = three()[:2]
    members = pool(first, second)
    token = table.cookie_token("shop/web", first)
    assert table.cookie_token("shop/web", first) is token  # the cached bytes, not a new computation
    table.by_cookie("shop/web", members, token)
    lookups = table._tokens[members]
    table.by_cookie("shop/web", members, token)
    assert table._tokens[members] is lookups
