"""VIPPools narrow where their VIPs are announced: the label selector, the pool of each VIP, the notices."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from layerlb_operator import service_frontend
from layerlb_speaker import inventory
from layerlb_speaker.announcement import Owner, Vip

from layerlb import api
from tests.speaker.test_inventory import loadbalancer, node, pod, service


def selector(**fields: Any) -> api.LabelSelector:
    return api.LabelSelector.model_validate(fields)


def vippool(name: str, addresses: list[str], announce: dict[str, Any] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"addresses": addresses}
    if announce is not None:
        spec["announce"] = announce
    return {
        "apiVersion": api.API_VERSION,
        "kind": "VIPPool",
        "metadata": {"name": name, "uid": f"uid-{name}"},
        "spec": spec,
    }


def ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


LABELS = {"zone": "a", "role": "edge", "rack": "r1"}


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({}, True),  # an empty selector matches every node, as in Kubernetes
        ({"matchLabels": {"zone": "a"}}, True),
        ({"matchLabels": {"zone": "a", "role": "edge"}}, True),
        ({"matchLabels": {"zone": "b"}}, False),
        ({"matchLabels": {"missing": ""}}, False),  # a value "" still needs the label
        ({"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a", "b"]}]}, True),
        ({"matchExpressions": [{"key": "zone", "operator": "In", "values": ["b"]}]}, False),
        ({"matchExpressions": [{"key": "missing", "operator": "In", "values": ["a"]}]}, False),
        ({"matchExpressions": [{"key": "zone", "operator": "NotIn", "values": ["b"]}]}, True),
        ({"matchExpressions": [{"key": "zone", "operator": "NotIn", "values": ["a"]}]}, False),
        ({"matchExpressions": [{"key": "missing", "operator": "NotIn", "values": ["a"]}]}, True),
        ({"matchExpressions": [{"key": "rack", "operator": "Exists"}]}, True),
        ({"matchExpressions": [{"key": "missing", "operator": "Exists"}]}, False),
        ({"matchExpressions": [{"key": "missing", "operator": "DoesNotExist"}]}, True),
        ({"matchExpressions": [{"key": "rack", "operator": "DoesNotExist"}]}, False),
        (  # every part must hold: labels and expressions together
            {
                "matchLabels": {"role": "edge"},
                "matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}],
            },
            True,
        ),
        (
            {
                "matchLabels": {"role": "edge"},
                "matchExpressions": [{"key": "zone", "operator": "NotIn", "values": ["a"]}],
            },
            False,
        ),
    ],
)
def test_label_selectors_match_as_kubernetes_matches_them(fields: dict[str, Any], expected: bool) -> None:
    assert inventory.matches(selector(**fields), LABELS) is expected


def test_no_selector_matches_every_node_even_without_labels() -> None:
    assert inventory.matches(None, {})


def test_a_pool_reads_its_addresses_interfaces_and_selector() -> None:
    parsed = inventory.pool(
        vippool(
            "edge",
            ["192.0.2.0/28", "192.0.2.100-192.0.2.110"],
            {"interfaces": ["eth1"], "nodeSelector": {"matchLabels": {"zone": "a"}}},
        )
    )
    assert parsed is not None and not parsed.invalid
    assert parsed.owner == Owner("VIPPool", "", "edge", "uid-edge", api.API_VERSION)
    assert parsed.interfaces == ("eth1",)
    assert parsed.selector == selector(matchLabels={"zone": "a"})
    assert ip("192.0.2.15") in parsed and ip("192.0.2.105") in parsed
    assert ip("192.0.2.16") not in parsed and ip("2001:db8::1") not in parsed


def test_a_pool_that_does_not_validate_keeps_its_addresses_and_its_problems() -> None:
    parsed = inventory.pool(vippool("bad", ["192.0.2.0/28", "nonsense"], {"interfaces": ["eth0", "eth0"]}))
    assert parsed is not None
    assert "spec.addresses[1]" in parsed.invalid
    assert ip("192.0.2.1") in parsed


def test_the_service_pool_annotation_is_the_operators() -> None:
    assert inventory.POOL_ANNOTATION == service_frontend.POOL_ANNOTATION


NODES = [
    node("n1", ip="10.0.0.1", labels={"zone": "a"}),
    node("n2", ip="10.0.0.2", labels={"zone": "b"}),
    node("n3", ip="10.0.0.3", labels={"zone": "b", "edge": ""}),
]


def _web_everywhere() -> list[dict[str, Any]]:
    return [pod("web", "n1"), pod("web", "n2"), pod("web", "n3")]


def test_a_vip_is_eligible_only_on_nodes_matching_its_pools_selector_and_answered_on_its_interfaces() -> None:
    pools = [
        vippool(
            "zone-b",
            ["192.0.2.0/28"],
            {"interfaces": ["eth1"], "nodeSelector": {"matchLabels": {"zone": "b"}}},
        )
    ]
    vips, notices = inventory.announced(
        NODES, [loadbalancer("web", "192.0.2.10")], _web_everywhere(), [], [], pools
    )
    (vip,) = vips
    assert vip.eligible == {"n2", "n3"}
    assert vip.interfaces == ("eth1",)
    assert vip.pool is not None and vip.pool.name == "zone-b" and vip.pool.kind == "VIPPool"
    assert notices == ()


def test_a_service_ip_is_narrowed_the_same_way_and_an_address_outside_every_pool_is_untouched() -> None:
    pools = [
        vippool(
            "edge",
            ["192.0.2.0/28"],
            {"nodeSelector": {"matchExpressions": [{"key": "edge", "operator": "Exists"}]}},
        )
    ]
    vips, _ = inventory.announced(NODES, [], [], [service("web", ["192.0.2.5", "198.51.100.5"])], [], pools)
    by_address = {str(vip.address): vip for vip in vips}
    assert by_address["192.0.2.5"].eligible == {"n3"}
    assert by_address["198.51.100.5"].eligible == {"n1", "n2", "n3"}
    assert by_address["198.51.100.5"].pool is None and by_address["198.51.100.5"].interfaces == ()


def test_a_pool_without_announce_changes_nothing_but_is_named() -> None:
    vips, _ = inventory.announced(
        NODES,
        [loadbalancer("web", "192.0.2.10")],
        _web_everywhere(),
        [],
        [],
        [vippool("plain", ["192.0.2.0/24"])],
    )
    (vip,) = vips
    assert vip.eligible == {"n1", "n2", "n3"} and vip.interfaces == ()
    assert vip.pool is not None and vip.pool.name == "plain"


def test_overlapping_pools_the_one_named_by_the_owner_wins_else_the_first_by_name() -> None:
    pools = [
        vippool("b-wide", ["192.0.2.0/24"], {"nodeSelector": {"matchLabels": {"zone": "b"}}}),
        vippool("a-wide", ["192.0.2.0/24"], {"nodeSelector": {"matchLabels": {"zone": "a"}}}),
    ]
    named = loadbalancer("named", "192.0.2.10")
    named["spec"] = {"vipPool": "b-wide"}
    annotated = service("svc", ["192.0.2.11"])
    annotated["metadata"]["annotations"] = {inventory.POOL_ANNOTATION: "b-wide"}
    vips, _ = inventory.announced(
        NODES,
        [named, loadbalancer("plain", "192.0.2.12")],
        [*_web_everywhere(), pod("named", "n1"), pod("named", "n2"), pod("plain", "n1"), pod("plain", "n2")],
        [annotated],
        [],
        pools,
    )
    pool_of = {str(vip.address): (vip.pool.name if vip.pool else None, set(vip.eligible)) for vip in vips}
    assert pool_of["192.0.2.10"] == ("b-wide", {"n2"})
    assert pool_of["192.0.2.11"] == ("b-wide", {"n2", "n3"})
    assert pool_of["192.0.2.12"] == ("a-wide", {"n1"})


def test_no_node_matching_the_selector_leaves_the_vip_unannounced_with_a_notice() -> None:
    pools = [vippool("nowhere", ["192.0.2.0/28"], {"nodeSelector": {"matchLabels": {"zone": "c"}}})]
    vips, notices = inventory.announced(
        NODES, [loadbalancer("web", "192.0.2.10")], _web_everywhere(), [], [], pools
    )
    assert vips[0].eligible == frozenset()
    (notice,) = notices
    assert notice.reason == "NoEligibleNode"
    assert notice.vip == vips[0] and notice.pool is not None and notice.pool.name == "nowhere"
    assert "192.0.2.10" in notice.message and "spec.announce.nodeSelector" in notice.message
    assert '"zone":"c"' in notice.message and "n1, n2, n3" in notice.message


def test_a_vip_without_any_serving_node_is_not_the_selectors_fault() -> None:
    pools = [vippool("zone-a", ["192.0.2.0/28"], {"nodeSelector": {"matchLabels": {"zone": "a"}}})]
    vips, notices = inventory.announced(NODES, [loadbalancer("web", "192.0.2.10")], [], [], [], pools)
    assert vips[0].eligible == frozenset() and notices == ()


def test_a_node_unknown_to_the_node_watch_matches_no_selector() -> None:
    vip = Vip(ip("192.0.2.1"), frozenset({"n1", "ghost"}))
    pool = inventory.pool(
        vippool(
            "p",
            ["192.0.2.0/28"],
            {"nodeSelector": {"matchExpressions": [{"key": "x", "operator": "DoesNotExist"}]}},
        )
    )
    assert pool is not None
    (narrowed,), _ = inventory.restricted([vip], [pool], {"n1": {}})
    assert narrowed.eligible == {"n1"}


def test_an_invalid_pools_addresses_are_announced_nowhere_with_one_notice() -> None:
    bad = vippool(
        "bad", ["192.0.2.0/28"], {"nodeSelector": {"matchExpressions": [{"key": "zone", "operator": "In"}]}}
    )
    vips, notices = inventory.announced(
        NODES, [], [], [service("web", ["192.0.2.1", "192.0.2.2"])], [], [bad]
    )
    assert all(vip.eligible == frozenset() for vip in vips)
    (notice,) = notices
    assert notice.reason == "InvalidVIPPool" and notice.vip is None
    assert "operator In needs at least one value" in notice.message


def test_shared_addresses_keep_their_pool_when_merged() -> None:
    owner = Owner("VIPPool", "", "p")
    merged = inventory.merged(
        [Vip(ip("192.0.2.1"), frozenset({"n1"}), pool=owner), Vip(ip("192.0.2.1"), frozenset({"n2"}))]
    )
    assert merged[0].pool == owner and merged[0].eligible == {"n1", "n2"}
