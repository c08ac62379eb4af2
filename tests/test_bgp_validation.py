"""BGPPeer, BGPAdvertisement and VIPPool's `announce.l2`: each rule accepts what it should and refuses the
rest with its exact message (the API server gives the same ones: e2e/test_api_server_validation.py)."""

from __future__ import annotations

from typing import Any

import pytest

from layerlb import api, validation

COMMUNITY = (
    "is not a community: ASN:VALUE with each part 0-65535, or no-export, no-advertise, local-as, blackhole"
)
LARGE = "is not a large community: ASN:VALUE:VALUE with each part 0-4294967295"


def _peer(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "layerlb.dev/v1alpha1",
        "kind": "BGPPeer",
        "metadata": {"name": "tor"},
        "spec": {"peerAddress": "192.0.2.1", "peerASN": 64512, "localASN": 64513, **spec},
    }


def _advertisement(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "layerlb.dev/v1alpha1",
        "kind": "BGPAdvertisement",
        "metadata": {"name": "public"},
        "spec": spec,
    }


def _pool(**announce: Any) -> dict[str, Any]:
    return {
        "apiVersion": "layerlb.dev/v1alpha1",
        "kind": "VIPPool",
        "metadata": {"name": "pool"},
        "spec": {"addresses": ["192.0.2.0/28"], "announce": announce},
    }


def _problems(document: Any) -> list[str]:
    with pytest.raises(validation.Invalid) as caught:
        validation.validate(document)
    return [str(problem) for problem in caught.value.problems]


def _accepted_peer(**spec: Any) -> api.BGPPeerSpec:
    resource = validation.validate(_peer(**spec))
    assert isinstance(resource, api.BGPPeer)
    return resource.spec


def _accepted_advertisement(**spec: Any) -> api.BGPAdvertisementSpec:
    resource = validation.validate(_advertisement(**spec))
    assert isinstance(resource, api.BGPAdvertisement)
    return resource.spec


# --- BGPPeer: defaults --------------------------------------------------------------------------------


def test_a_minimal_peer_gets_port_179_hold_time_90_keepalive_30_and_no_bfd_or_password() -> None:
    spec = _accepted_peer()
    assert (spec.peerPort, spec.holdTime, spec.keepaliveTime, spec.keepalive) == (179, 90, None, 30)
    assert (spec.bfd, spec.passwordSecret, spec.ebgpMultiHop, spec.nodeSelector) == (None, None, False, None)


def test_an_empty_bfd_turns_bfd_on_with_300_ms_and_multiplier_3() -> None:
    assert _accepted_peer(bfd={}).bfd == api.BFD(
        receiveInterval=300, transmitInterval=300, detectMultiplier=3
    )


def test_a_password_secret_key_defaults_to_password() -> None:
    secret = _accepted_peer(passwordSecret={"name": "tor-bgp", "namespace": "layerlb-system"}).passwordSecret
    assert secret == api.SecretKeyRef(name="tor-bgp", namespace="layerlb-system", key="password")


def test_a_plaintext_password_is_an_unknown_field() -> None:
    (problem,) = _problems(_peer(password="s3cret"))
    assert problem.startswith("spec.password: unknown field; valid fields: peerAddress, peerPort, ")


def test_a_password_secret_needs_its_namespace() -> None:
    assert _problems(_peer(passwordSecret={"name": "tor-bgp"})) == ["spec.passwordSecret.namespace: required"]


def test_a_four_octet_asn_is_accepted_and_one_beyond_is_out_of_range() -> None:
    assert _accepted_peer(localASN=4294967295).localASN == 4294967295
    assert _problems(_peer(localASN=4294967296)) == [
        "spec.localASN: 4294967296 is out of range; must be <= 4294967295"
    ]
    assert _problems(_peer(peerASN=0)) == ["spec.peerASN: 0 is out of range; must be >= 1"]


@pytest.mark.parametrize(
    ("bfd", "problem"),
    [
        ({"transmitInterval": 9}, "spec.bfd.transmitInterval: 9 is out of range; must be >= 10"),
        ({"receiveInterval": 60001}, "spec.bfd.receiveInterval: 60001 is out of range; must be <= 60000"),
        ({"detectMultiplier": 1}, "spec.bfd.detectMultiplier: 1 is out of range; must be >= 2"),
    ],
)
def test_bfd_intervals_and_multiplier_have_ranges(bfd: dict[str, int], problem: str) -> None:
    assert _problems(_peer(bfd=bfd)) == [problem]


# --- BGPPeer: addresses and router ID -----------------------------------------------------------------


def test_an_ipv6_peer_with_an_ipv6_source_address_is_accepted() -> None:
    assert (
        _accepted_peer(peerAddress="2001:db8::1", sourceAddress="2001:db8::10").sourceAddress
        == "2001:db8::10"
    )


def test_a_peer_address_that_is_not_an_ip_is_refused() -> None:
    assert _problems(_peer(peerAddress="tor-a.example.com")) == [
        "spec.peerAddress: 'tor-a.example.com' is not an IPv4 or IPv6 address"
    ]


def test_a_source_address_that_is_not_an_ip_is_refused_and_not_compared_by_family() -> None:
    assert _problems(_peer(sourceAddress="eth0")) == [
        "spec.sourceAddress: 'eth0' is not an IPv4 or IPv6 address"
    ]


def test_a_source_address_of_the_other_family_is_refused() -> None:
    assert _problems(_peer(sourceAddress="2001:db8::10")) == [
        "spec.sourceAddress: sourceAddress 2001:db8::10 and peerAddress 192.0.2.1 are of different families; "
        "a session runs over IPv4 or IPv6"
    ]


@pytest.mark.parametrize("router_id", ["2001:db8::1", "0.0.0.0", "router-1"])
def test_a_router_id_must_be_a_non_zero_ipv4_address(router_id: str) -> None:
    assert _problems(_peer(routerID=router_id)) == [
        f"spec.routerID: '{router_id}' is not a router ID: a non-zero IPv4 address"
    ]


def test_a_router_id_on_an_ipv6_session_is_ipv4() -> None:
    assert _accepted_peer(peerAddress="2001:db8::1", routerID="10.0.0.1").routerID == "10.0.0.1"


# --- BGPPeer: timers ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("hold", "keepalive"), [(0, 0), (3, 1), (9, 3), (65535, None), (0, None)])
def test_hold_time_0_or_3_and_above_with_a_shorter_keepalive_is_accepted(
    hold: int, keepalive: int | None
) -> None:
    spec = _accepted_peer(holdTime=hold, keepaliveTime=keepalive)
    assert spec.keepalive == (hold // 3 if keepalive is None else keepalive)


@pytest.mark.parametrize("hold", [1, 2])
def test_a_hold_time_of_1_or_2_seconds_is_refused(hold: int) -> None:
    assert _problems(_peer(holdTime=hold)) == [
        f"spec.holdTime: holdTime must be 0 (no keepalives) or 3-65535 seconds, not {hold}"
    ]


def test_a_keepalive_not_below_the_hold_time_is_refused_with_both() -> None:
    assert _problems(_peer(holdTime=9, keepaliveTime=9)) == [
        "spec.keepaliveTime: keepaliveTime (9) must be below holdTime (9)"
    ]


def test_a_keepalive_with_hold_time_0_is_refused() -> None:
    assert _problems(_peer(holdTime=0, keepaliveTime=30)) == [
        "spec.keepaliveTime: keepaliveTime must be 0 when holdTime is 0 (no keepalives), not 30"
    ]


def test_keepalive_0_needs_hold_time_0() -> None:
    assert _problems(_peer(keepaliveTime=0)) == [
        "spec.keepaliveTime: keepaliveTime 0 (no keepalives) needs holdTime 0"
    ]


# --- BGPPeer: multihop and node selector --------------------------------------------------------------


def test_ebgp_multihop_is_accepted_on_an_ebgp_session() -> None:
    assert _accepted_peer(ebgpMultiHop=True).ebgpMultiHop is True


def test_ebgp_multihop_on_an_ibgp_session_is_refused() -> None:
    assert _problems(_peer(localASN=64512, ebgpMultiHop=True)) == [
        "spec.ebgpMultiHop: ebgpMultiHop applies only to eBGP (localASN other than peerASN); both are 64512"
    ]


def test_ibgp_without_multihop_is_accepted() -> None:
    assert _accepted_peer(localASN=64512).localASN == 64512


def test_a_peers_node_selector_is_a_label_selector_with_its_rules() -> None:
    selector = {
        "matchLabels": {"node-role.kubernetes.io/edge": ""},
        "matchExpressions": [{"key": "a", "operator": "Exists"}],
    }
    assert _accepted_peer(nodeSelector=selector).nodeSelector is not None
    assert _problems(_peer(nodeSelector={"matchExpressions": [{"key": "a", "operator": "NotIn"}]})) == [
        "spec.nodeSelector.matchExpressions[0].values: operator NotIn needs at least one value"
    ]


# --- BGPAdvertisement ---------------------------------------------------------------------------------


def test_an_empty_advertisement_advertises_every_pool_to_every_peer_as_host_routes() -> None:
    spec = _accepted_advertisement()
    assert (spec.vipPools, spec.peers, spec.nodeSelector) == (None, None, None)
    assert (spec.aggregationLength, spec.aggregationLengthV6, spec.localPreference) == (32, 128, None)


def test_well_known_standard_and_large_communities_are_accepted() -> None:
    communities = ["0:0", "65535:65535", "64512:100", "no-export", "no-advertise", "local-as", "blackhole"]
    large = ["0:0:0", "4294967295:4294967295:4294967295", "4200000000:1:2"]
    spec = _accepted_advertisement(
        communities=communities, largeCommunities=large, localPreference=4294967295
    )
    assert (spec.communities, spec.largeCommunities) == (communities, large)


@pytest.mark.parametrize(
    "community", ["65536:1", "1:65536", "64512", "64512:1:2", "NO_EXPORT", "-1:5", " 1:2"]
)
def test_a_community_out_of_range_or_not_asn_value_is_refused(community: str) -> None:
    assert _problems(_advertisement(communities=["64512:1", community])) == [
        f"spec.communities[1]: '{community}' {COMMUNITY}"
    ]


@pytest.mark.parametrize("large", ["4294967296:1:2", "1:2", "1:2:3:4", "a:b:c", "no-export"])
def test_a_large_community_out_of_range_or_not_three_numbers_is_refused(large: str) -> None:
    assert _problems(_advertisement(largeCommunities=[large])) == [
        f"spec.largeCommunities[0]: '{large}' {LARGE}"
    ]


@pytest.mark.parametrize(
    ("field", "values", "problem"),
    [
        ("vipPools", ["edge", "edge"], "spec.vipPools: VIPPool names must be unique; repeated: edge"),
        ("peers", ["tor-a", "tor-b", "tor-a"], "spec.peers: BGPPeer names must be unique; repeated: tor-a"),
        (
            "communities",
            ["64512:1", "64512:1"],
            "spec.communities: communities must be unique; repeated: 64512:1",
        ),
        (
            "largeCommunities",
            ["1:2:3", "1:2:3"],
            "spec.largeCommunities: large communities must be unique; repeated: 1:2:3",
        ),
    ],
)
def test_names_and_communities_are_unique(field: str, values: list[str], problem: str) -> None:
    assert _problems(_advertisement(**{field: values})) == [problem]


def test_an_advertisements_node_selector_is_a_label_selector_with_its_rules() -> None:
    selector = {"matchExpressions": [{"key": "a", "operator": "DoesNotExist", "values": ["x"]}]}
    assert _problems(_advertisement(nodeSelector=selector)) == [
        "spec.nodeSelector.matchExpressions[0].values: operator DoesNotExist takes no values; remove them"
    ]


@pytest.mark.parametrize(
    ("field", "value", "problem"),
    [
        ("aggregationLength", 33, "spec.aggregationLength: 33 is out of range; must be <= 32"),
        ("aggregationLengthV6", 129, "spec.aggregationLengthV6: 129 is out of range; must be <= 128"),
        ("localPreference", -1, "spec.localPreference: -1 is out of range; must be >= 0"),
        (
            "localPreference",
            4294967296,
            "spec.localPreference: 4294967296 is out of range; must be <= 4294967295",
        ),
    ],
)
def test_aggregation_lengths_and_local_preference_have_ranges(field: str, value: int, problem: str) -> None:
    assert _problems(_advertisement(**{field: value})) == [problem]


def test_a_pool_or_peer_name_is_a_dns_name() -> None:
    (problem,) = _problems(_advertisement(peers=["Tor_A"]))
    assert problem.startswith("spec.peers[0]: 'Tor_A' is not a DNS name")


# --- VIPPool: L2 beside BGP ---------------------------------------------------------------------------


def test_a_pool_is_announced_over_l2_unless_it_says_l2_false() -> None:
    resource = validation.validate(_pool())
    assert isinstance(resource, api.VIPPool) and resource.spec.announce is not None
    assert resource.spec.announce.l2 is True
    resource = validation.validate(_pool(l2=False))
    assert isinstance(resource, api.VIPPool) and resource.spec.announce is not None
    assert resource.spec.announce.l2 is False


@pytest.mark.parametrize(
    "announce", [{"interfaces": ["eth1"]}, {"nodeSelector": {}}, {"interfaces": ["eth1"], "nodeSelector": {}}]
)
def test_l2_false_with_interfaces_or_a_node_selector_is_refused(announce: dict[str, Any]) -> None:
    assert _problems(_pool(l2=False, **announce)) == [
        "spec.announce: interfaces and nodeSelector choose where ARP/NDP is answered; with l2 false remove them, "
        "or set l2 true"
    ]


def test_l2_false_with_an_empty_interface_list_is_accepted() -> None:
    assert isinstance(validation.validate(_pool(l2=False, interfaces=[])), api.VIPPool)


def test_l2_is_a_boolean_not_a_string() -> None:
    assert _problems(_pool(l2="false")) == ["spec.announce.l2: expected true or false, got 'false'"]
