"""The static configuration: bad entries are named and skipped, the good ones still count."""

from __future__ import annotations

import ipaddress

import yaml
from layerlb_speaker import config
from layerlb_speaker.announcement import Owner, Vip

GOOD = """
peers: {node-1: 10.0.0.1, node-2: "fd00::2"}
vips:
  - {address: 10.0.0.100, nodes: [node-1, node-2], owner: LoadBalancer shop/web}
  - {address: "fd00::100", nodes: [node-2], interfaces: [eth1]}
"""


def test_a_good_file_gives_peers_and_vips() -> None:
    inventory, problems = config.parse(yaml.safe_load(GOOD))
    assert problems == []
    assert inventory.peers == {"node-1": "10.0.0.1", "node-2": "fd00::2"}
    assert inventory.vips == (
        Vip(
            ipaddress.ip_address("10.0.0.100"),
            frozenset({"node-1", "node-2"}),
            (Owner("LoadBalancer", "shop", "web"),),
        ),
        Vip(ipaddress.ip_address("fd00::100"), frozenset({"node-2"}), (), ("eth1",)),
    )
    assert inventory.fresh


def test_each_bad_entry_is_named_with_its_value_and_the_rest_still_counts() -> None:
    document = yaml.safe_load(GOOD)
    document["peers"]["node-3"] = "not-an-ip"
    document["vips"] += [
        {"address": "10.0.0.300", "nodes": ["node-1"]},
        {"address": "10.0.0.101", "nodes": "node-1"},
        {"address": "10.0.0.100", "nodes": ["node-1"]},
        "10.0.0.102",
    ]
    inventory, problems = config.parse(document)
    assert problems == [
        "peers.node-3: 'not-an-ip' is not an IP address",
        "vips[2].address: '10.0.0.300' is not an IP address",
        "vips[3].nodes: 'node-1' is not a list of names",
        "vips[4].address: 10.0.0.100 is listed twice; the first entry counts",
        "vips[5]: '10.0.0.102' is not a mapping with address and nodes",
    ]
    assert [str(vip.address) for vip in inventory.vips] == ["10.0.0.100", "fd00::100"]


def test_a_file_that_is_not_a_mapping_is_one_problem() -> None:
    inventory, problems = config.parse(["a", "list"])
    assert inventory.vips == () and problems == ["the file holds list, not a mapping with peers and vips"]


POOLS = """
peers: {node-1: 10.0.0.1, node-2: 10.0.0.2, node-3: 10.0.0.3}
labels:
  node-1: {zone: a}
  node-2: {zone: b}
pools:
  - name: zone-a
    addresses: [10.0.0.96/29]
    announce:
      interfaces: [eth1]
      nodeSelector: {matchLabels: {zone: a}}
  - name: nowhere
    addresses: [10.0.0.200-10.0.0.210]
    announce:
      nodeSelector: {matchExpressions: [{key: zone, operator: In, values: [c]}]}
vips:
  - {address: 10.0.0.100, nodes: [node-1, node-2, node-3], interfaces: [eth7]}
  - {address: 10.0.0.200, nodes: [node-1, node-2], owner: LoadBalancer shop/web}
  - {address: 10.0.0.50, nodes: [node-2, node-3], interfaces: [eth3]}
"""


def test_pools_and_labels_narrow_static_vips_as_they_narrow_the_clusters() -> None:
    inventory, problems = config.parse(yaml.safe_load(POOLS))
    assert problems == []
    by_address = {str(vip.address): vip for vip in inventory.vips}
    in_pool = by_address["10.0.0.100"]
    assert in_pool.eligible == {"node-1"} and in_pool.interfaces == ("eth1",)  # the pool's interfaces win
    assert in_pool.pool is not None and in_pool.pool.name == "zone-a"
    assert by_address["10.0.0.200"].eligible == frozenset()
    outside = by_address["10.0.0.50"]
    assert (
        outside.eligible == {"node-2", "node-3"} and outside.interfaces == ("eth3",) and outside.pool is None
    )
    (notice,) = inventory.notices
    assert notice.reason == "NoEligibleNode" and "10.0.0.200" in notice.message
    assert notice.vip is not None and notice.vip.owners == (Owner("LoadBalancer", "shop", "web"),)


def test_a_static_vip_may_name_its_pool_among_overlapping_ones() -> None:
    document = yaml.safe_load(POOLS)
    document["pools"].append(
        {
            "name": "a-first",
            "addresses": ["10.0.0.0/24"],
            "announce": {"nodeSelector": {"matchLabels": {"zone": "b"}}},
        }
    )
    inventory, _ = config.parse(document)
    assert {str(vip.address): vip.pool.name for vip in inventory.vips if vip.pool} == {
        "10.0.0.100": "a-first",
        "10.0.0.200": "a-first",
        "10.0.0.50": "a-first",
    }
    document["vips"][0]["pool"] = "zone-a"
    inventory, _ = config.parse(document)
    assert inventory.vips[0].pool is not None and inventory.vips[0].pool.name == "zone-a"


def test_a_bad_pool_is_named_with_the_api_servers_words_and_announces_nothing() -> None:
    document = yaml.safe_load(POOLS)
    document["pools"][0]["announce"]["interfaces"] = ["eth1", "eth1"]
    document["pools"].append("not a pool")
    document["labels"]["node-3"] = "zone=c"
    inventory, problems = config.parse(document)
    assert problems == [
        "labels.node-3: 'zone=c' is not a mapping of label to value",
        "pools[0]: spec.announce.interfaces: interface names must be unique; repeated: eth1; "
        "its addresses are not announced",
        "pools[2]: 'not a pool' is not a mapping with name and addresses",
    ]
    assert inventory.vips[0].eligible == frozenset()
