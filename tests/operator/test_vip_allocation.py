"""VIPs come from VIPPools, are never given twice, honour requests, and say why when none can be had."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from layerlb_operator import vips

from layerlb import validation
from layerlb.resolve import Unresolvable


def _pool(name: str, *addresses: str, namespaces: list[str] | None = None, auto: bool = True) -> vips.Pool:
    spec: dict[str, Any] = {"addresses": list(addresses), "autoAssign": auto}
    if namespaces is not None:
        spec["namespaces"] = namespaces
    return vips.pool_from(
        {"apiVersion": "layerlb.dev/v1alpha1", "kind": "VIPPool", "metadata": {"name": name}, "spec": spec}
    )


def _allocate(
    pools: list[vips.Pool],
    *,
    owner: str = "demo/web",
    requested: str | None = None,
    pool_name: str | None = None,
    current: str | None = None,
    holders: dict[str, str] | None = None,
    outside_pools: str = vips.ALLOW,
) -> str:
    return vips.allocate(
        owner=owner,
        namespace=owner.split("/")[0],
        requested=requested,
        pool_name=pool_name,
        current=current,
        pools=pools,
        holders=holders or {},
        outside_pools=outside_pools,
    )


def _refused(reason: str, **kwargs: Any) -> str:
    with pytest.raises(Unresolvable) as caught:
        _allocate(**kwargs)
    assert caught.value.reason == reason
    return str(caught.value)


def test_the_first_free_address_of_an_auto_assign_pool_is_allocated() -> None:
    pool = _pool("public", "192.0.2.64/30")
    assert _allocate([pool]) == "192.0.2.64"
    assert _allocate([pool], holders={"192.0.2.64": "demo/other"}) == "192.0.2.65"


def test_no_address_is_given_twice_across_load_balancers() -> None:
    pool = _pool("public", "192.0.2.10-192.0.2.13")
    ledger = vips.Ledger()
    given = []
    for index in range(4):
        owner = f"demo/lb{index}"
        address = _allocate([pool], owner=owner, holders=ledger.holders({}))
        ledger.claim(owner, address)
        given.append(address)
    assert given == ["192.0.2.10", "192.0.2.11", "192.0.2.12", "192.0.2.13"]
    message = _refused("NoVIPAvailable", pools=[pool], owner="demo/lb4", holders=ledger.holders({}))
    assert "no free address in VIPPool(s) public: all 4 are in use" in message


def test_a_requested_free_address_inside_a_pool_is_honoured() -> None:
    assert _allocate([_pool("public", "192.0.2.0/24")], requested="192.0.2.77") == "192.0.2.77"


def test_a_requested_address_outside_every_pool_is_honoured_as_written() -> None:
    assert _allocate([_pool("public", "192.0.2.0/24")], requested="127.0.0.10") == "127.0.0.10"
    assert _allocate([], requested="2001:db8::0010") == "2001:db8::10"


def test_a_requested_address_outside_every_pool_is_refused_when_the_operator_refuses_them() -> None:
    """The chart's default: the speakers would announce any address on the nodes' LAN (the gateway's)."""
    pools = [
        _pool("public", "192.0.2.64/30", "2001:db8:1::/126"),
        _pool("shop-only", "198.51.100.0/28", namespaces=["shop"]),
    ]
    for address, written in (("192.0.2.1", "192.0.2.1"), ("2001:db8::0010", "2001:db8::10")):
        message = _refused("VIPConflict", pools=pools, requested=address, outside_pools=vips.REFUSE)
        assert message.startswith(f"spec.vip: {written} is in no VIPPool"), message
        assert "create a VIPPool covering it that serves namespace demo" in message
        assert "public (192.0.2.64-192.0.2.67, 2001:db8:1::-2001:db8:1::3)" in message  # what would do
        assert "shop-only" not in message  # a pool the namespace may not use is no advice
        assert "leave spec.vip out" in message
    message = _refused("VIPConflict", pools=[], requested="10.0.0.1", outside_pools=vips.REFUSE)
    assert "serving namespace demo (there are none)" in message


def test_refusing_addresses_outside_pools_leaves_the_other_rules_as_they_were() -> None:
    pools = [_pool("public", "192.0.2.64/30"), _pool("shop-only", "198.51.100.0/28", namespaces=["shop"])]
    refuse = vips.REFUSE
    assert _allocate(pools, requested="192.0.2.65", outside_pools=refuse) == "192.0.2.65"  # inside: honoured
    assert _allocate(pools, outside_pools=refuse) == "192.0.2.64"  # none asked for: allocated as before
    assert (
        _allocate(pools, owner="shop/web", requested="198.51.100.3", outside_pools=refuse) == "198.51.100.3"
    )
    assert "which do not serve namespace demo" in _refused(
        "VIPConflict", pools=pools, requested="198.51.100.3", outside_pools=refuse
    )
    assert "already the VIP of LoadBalancer shop/front" in _refused(
        "VIPConflict",
        pools=pools,
        requested="192.0.2.66",
        holders={"192.0.2.66": "shop/front"},
        outside_pools=refuse,
    )


def test_a_requested_address_held_by_another_load_balancer_is_a_conflict_naming_the_holder() -> None:
    message = _refused("VIPConflict", pools=[], requested="10.0.0.1", holders={"10.0.0.1": "shop/front"})
    assert "spec.vip: 10.0.0.1 is already the VIP of LoadBalancer shop/front" in message


def test_an_address_a_load_balancer_already_holds_is_not_a_conflict_with_itself() -> None:
    assert _allocate([], requested="10.0.0.1", holders={"10.0.0.1": "demo/web"}) == "10.0.0.1"


def test_a_requested_address_in_a_pool_of_other_namespaces_is_a_conflict() -> None:
    pool = _pool("shop-only", "192.0.2.0/28", namespaces=["shop"])
    message = _refused("VIPConflict", pools=[pool], requested="192.0.2.3")
    assert "belongs to VIPPool(s) shop-only, which do not serve namespace demo" in message


def test_a_requested_address_outside_the_named_pool_is_a_conflict() -> None:
    pools = [_pool("a", "192.0.2.0/28"), _pool("b", "198.51.100.0/28")]
    assert "192.0.2.3 is not in spec.vipPool b" in _refused(
        "VIPConflict", pools=pools, requested="192.0.2.3", pool_name="b"
    )


def test_no_pool_at_all_means_no_vip_available() -> None:
    assert "no VIPPool with autoAssign serves namespace demo" in _refused("NoVIPAvailable", pools=[])


def test_pools_of_other_namespaces_and_pools_without_auto_assign_are_not_drawn_from() -> None:
    pools = [
        _pool("shop", "192.0.2.0/28", namespaces=["shop"]),
        _pool("manual", "198.51.100.0/28", auto=False),
    ]
    _refused("NoVIPAvailable", pools=pools)
    assert _allocate(pools, owner="shop/web") == "192.0.2.0"
    assert _allocate(pools, pool_name="manual") == "198.51.100.0"


def test_a_named_pool_must_exist_and_serve_the_namespace() -> None:
    pools = [_pool("shop", "192.0.2.0/28", namespaces=["shop"])]
    assert "VIPPool nope not found" in _refused("NoVIPAvailable", pools=pools, pool_name="nope")
    assert "VIPPool shop does not serve namespace demo" in _refused(
        "NoVIPAvailable", pools=pools, pool_name="shop"
    )


def test_a_broken_pool_asked_for_by_name_says_why() -> None:
    with pytest.raises(Unresolvable, match="VIPPool bad not found \\(invalid: reversed\\)"):
        vips.allocate(
            owner="demo/web", namespace="demo", requested=None, pool_name="bad", current=None,
            pools=[], holders={}, broken_pools={"bad": "invalid: reversed"},
        )  # fmt: skip


def test_the_current_address_is_kept_while_it_stays_eligible() -> None:
    pool = _pool("public", "192.0.2.0/28")
    assert _allocate([pool], current="192.0.2.9") == "192.0.2.9"
    assert _allocate([pool], current="203.0.113.9") == "192.0.2.0"  # no longer in an eligible pool
    assert _allocate([pool], current="192.0.2.9", holders={"192.0.2.9": "demo/thief"}) == "192.0.2.0"


def test_pools_are_drawn_from_in_name_order() -> None:
    pools = [_pool("zeta", "198.51.100.0/30"), _pool("alpha", "192.0.2.0/30")]
    assert _allocate(pools) == "192.0.2.0"


def test_ipv6_pools_hand_out_their_lowest_free_address() -> None:
    pool = _pool("v6", "2001:db8:1::/64")  # 2**64 addresses: only the first len(taken) + 1 are looked at
    holders = {str(ipaddress.ip_address("2001:db8:1::") + i): f"demo/lb{i}" for i in range(200)}
    assert _allocate([pool], holders=holders) == "2001:db8:1::c8"
    assert (
        _allocate([_pool("r", "2001:db8::fffe-2001:db8::1:1")], holders={"2001:db8::fffe": "x/y"})
        == "2001:db8::ffff"
    )


def test_the_ledger_overrides_statuses_and_hides_released_owners() -> None:
    ledger = vips.Ledger()
    statuses = {"demo/a": "192.0.2.1", "demo/b": "192.0.2.2"}
    ledger.claim("demo/a", "192.0.2.5")
    ledger.release("demo/b")
    assert ledger.holders(statuses) == {"192.0.2.5": "demo/a"}
    ledger.claim("demo/b", None)
    assert "192.0.2.2" not in ledger.holders(statuses)
    ledger.claim("demo/b", "192.0.2.2")
    assert ledger.holders(statuses)["192.0.2.2"] == "demo/b"


def test_addresses_are_compared_in_canonical_form() -> None:
    ledger = vips.Ledger()
    holders = ledger.holders({"demo/a": "2001:DB8::0001"})
    assert _refused("VIPConflict", pools=[], requested="2001:db8::1", holders=holders)


def test_an_invalid_pool_is_refused_with_the_validation_message() -> None:
    with pytest.raises(validation.Invalid, match="ends before it starts"):
        _pool("bad", "192.0.2.20-192.0.2.10")
