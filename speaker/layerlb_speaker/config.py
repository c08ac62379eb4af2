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

Bad entries are reported one line each (`vips[2].address: '10.0.0.300' is not an IP address`) and
skipped; the others still count. A file that cannot be read makes the view stale (`fresh` false), and the
last good inventory stays, exactly as a speaker that lost the API server keeps its last known state.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
from collections.abc import Callable
from typing import Any

import yaml

from layerlb_speaker.announcement import Owner, Vip
from layerlb_speaker.runtime import Inventory

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
    return Inventory(tuple(vips.values()), peers, True), problems


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
                last = Inventory(last.vips, last.peers, fresh=False)
                update(last)
        await asyncio.sleep(poll)
