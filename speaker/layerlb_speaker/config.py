"""The static form of the speaker's inventory: a YAML (or JSON) file of peers and VIPs.

It is what a speaker runs from without Kubernetes (the network-namespace tests, a lab), and it has the
same shape as what `inventory` derives from the API:

    peers:                       # node name → the address its speaker heartbeats from
      node-1: 10.0.0.1
      node-2: 10.0.0.2
    vips:
      - address: 10.0.0.100
        nodes: [node-1, node-2]  # eligible nodes
        interfaces: [eth0]       # optional; default: the speaker's interfaces
        owner: LoadBalancer shop/web   # optional, for logs
        pool: edge               # optional: the pool this VIP's owner names (as a LoadBalancer's vipPool)
    labels:                      # optional: node name → its labels, for pools' nodeSelector
      node-1: {topology.kubernetes.io/zone: a}
    pools:                       # optional: VIPPools by name and spec, validated as the API server does
      - name: edge
        addresses: [10.0.0.96/29]
        announce:
          interfaces: [eth1]
          nodeSelector: {matchLabels: {topology.kubernetes.io/zone: a}}

    bgp:                         # optional: BGP peers and advertisements (`bgp`), as the BGPPeer and
      peers: [...]               # BGPAdvertisement resources' specs, with `password`/`passwordFile`
      advertisements: [...]      # instead of a Secret

A VIP inside a pool's addresses is narrowed by that pool exactly as `inventory` narrows a cluster's VIPs
(`inventory.restricted`): its nodes to those whose labels match, its interfaces to the pool's when the
pool names any (they replace its own). Notices (`NoEligibleNode`, `InvalidVIPPool`) go to the log.

Bad entries are reported one line each (`vips[2].address: '10.0.0.300' is not an IP address`) and
skipped; the others still count. A file that cannot be read makes the view stale (`fresh` false), and the
last good inventory stays, exactly as a speaker that lost the API server keeps its last known state.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import yaml

from layerlb_speaker.announcement import Owner, Vip
from layerlb_speaker.runtime import Inventory

if TYPE_CHECKING:
    from layerlb_speaker import bgp, inventory

log = logging.getLogger("layerlb.speaker")


def _owner(text: object) -> Owner:
    kind, _, rest = str(text).partition(" ")
    namespace, _, name = rest.rpartition("/")
    return Owner(kind, namespace, name)


def _names(value: object, where: str, problems: list[str]) -> tuple[str, ...] | None:
    if not isinstance(value, list) or not all(isinstance(item, str) and item for item in value):
        problems.append(f"{where}: {value!r} is not a list of names")
        return None
    return tuple(value)


def parse(document: Any) -> tuple[Inventory, list[str]]:
    """The inventory in a loaded document and one problem line per entry left out."""
    problems: list[str] = []
    if not isinstance(document, dict):
        return Inventory(), [f"the file holds {type(document).__name__}, not a mapping with peers and vips"]
    peers: dict[str, str] = {}
    raw_peers = document.get("peers") or {}
    if not isinstance(raw_peers, dict):
        problems.append(f"peers: {raw_peers!r} is not a mapping of node name to address")
        raw_peers = {}
    for node, address in raw_peers.items():
        try:
            peers[str(node)] = str(ipaddress.ip_address(str(address)))
        except ValueError:
            problems.append(f"peers.{node}: {address!r} is not an IP address")
    vips: dict[ipaddress.IPv4Address | ipaddress.IPv6Address, Vip] = {}
    named: dict[ipaddress.IPv4Address | ipaddress.IPv6Address, str] = {}
    raw_vips = document.get("vips") or []
    if not isinstance(raw_vips, list):
        problems.append(f"vips: {type(raw_vips).__name__} is not a list")
        raw_vips = []
    for index, entry in enumerate(raw_vips):
        where = f"vips[{index}]"
        if not isinstance(entry, dict):
            problems.append(f"{where}: {entry!r} is not a mapping with address and nodes")
            continue
        try:
            address = ipaddress.ip_address(str(entry.get("address")))
        except ValueError:
            problems.append(f"{where}.address: {entry.get('address')!r} is not an IP address")
            continue
        nodes = _names(entry.get("nodes", []), f"{where}.nodes", problems)
        interfaces = _names(entry.get("interfaces", []), f"{where}.interfaces", problems)
        if nodes is None or interfaces is None:
            continue
        if address in vips:
            problems.append(f"{where}.address: {address} is listed twice; the first entry counts")
            continue
        owners = (_owner(entry["owner"]),) if entry.get("owner") else ()
        vips[address] = Vip(address, frozenset(nodes), owners, interfaces)
        if entry.get("pool"):
            named[address] = str(entry["pool"])
    routing = _bgp(document, problems) if "bgp" in document else None
    if "pools" not in document and "labels" not in document:
        return Inventory(tuple(vips.values()), peers, True, bgp=routing), problems
    restricted, notices = _restrict(document, tuple(vips.values()), named, problems)
    return Inventory(restricted, peers, True, notices, bgp=routing), problems


def _bgp(document: dict[Any, Any], problems: list[str]) -> bgp.Intent:
    from layerlb_speaker import bgp  # pydantic and the API models load only for BGP

    return bgp.parse(document["bgp"], _labels(document, []), problems)


def _labels(document: dict[Any, Any], problems: list[str]) -> dict[str, dict[str, str]]:
    known = document.get("peers") if isinstance(document.get("peers"), dict) else {}
    labels: dict[str, dict[str, str]] = {str(node): {} for node in known or {}}
    raw_labels = document.get("labels") or {}
    if not isinstance(raw_labels, dict):
        problems.append(f"labels: {raw_labels!r} is not a mapping of node name to labels")
        raw_labels = {}
    for node, node_labels in raw_labels.items():
        if not isinstance(node_labels, dict):
            problems.append(f"labels.{node}: {node_labels!r} is not a mapping of label to value")
            continue
        labels[str(node)] = {str(key): str(value) for key, value in node_labels.items()}
    return labels


def _restrict(
    document: dict[Any, Any],
    vips: tuple[Vip, ...],
    named: dict[ipaddress.IPv4Address | ipaddress.IPv6Address, str],
    problems: list[str],
) -> tuple[tuple[Vip, ...], tuple[inventory.Notice, ...]]:
    from layerlb_speaker import inventory  # pydantic and the API models load only for pools

    labels = _labels(document, problems)
    pools = []
    raw_pools = document.get("pools") or []
    if not isinstance(raw_pools, list):
        problems.append(f"pools: {type(raw_pools).__name__} is not a list")
        raw_pools = []
    for index, entry in enumerate(raw_pools):
        if not isinstance(entry, dict) or not entry.get("name"):
            problems.append(f"pools[{index}]: {entry!r} is not a mapping with name and addresses")
            continue
        spec = {key: value for key, value in entry.items() if key != "name"}
        parsed = inventory.pool({"metadata": {"name": str(entry["name"])}, "spec": spec})
        if parsed is None:
            continue
        if parsed.invalid:
            problems.append(f"pools[{index}]: {parsed.invalid}; its addresses are not announced")
        pools.append(parsed)
    return inventory.restricted(vips, pools, labels, named)


def load(path: str) -> tuple[Inventory, list[str]]:
    """Reads and parses `path`; OSError or yaml.YAMLError when it cannot be read as YAML at all."""
    with open(path, encoding="utf-8") as file:
        return parse(yaml.safe_load(file))


async def watch(path: str, update: Callable[[Inventory], None], poll: float = 0.5) -> None:
    """Feeds `update` with the file's inventory now and whenever it changes; stale while unreadable."""
    seen: tuple[float, int] | None = None
    last = Inventory(fresh=False)
    failing = False
    while True:
        try:
            stat = os.stat(path)
            key = (stat.st_mtime, stat.st_size)
            if key != seen:
                inventory, problems = load(path)
                for problem in problems:
                    log.error("%s: %s", path, problem)
                seen, last, failing = key, inventory, False
                update(inventory)
        except (OSError, yaml.YAMLError) as error:
            seen = None
            if not failing:
                failing = True
                log.error("%s: %s; keeping the last known VIPs, view stale", path, error)
                last = dataclasses.replace(last, fresh=False)
                update(last)
        await asyncio.sleep(poll)
