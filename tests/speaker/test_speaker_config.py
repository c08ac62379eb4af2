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
