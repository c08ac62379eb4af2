"""The speaker's watch layer at scale (bench/announce_kube.py): cached objects without managedFields, watch
events kept as dicts, and no recomputation for a change the inventory does not show."""

from __future__ import annotations

import asyncio
import ipaddress
from typing import Any

from kubernetes import client as k8s
from kubernetes import watch as watch_module
from layerlb_speaker import kube
from layerlb_speaker.announcement import Vip
from layerlb_speaker.runtime import Inventory


def test_cached_objects_drop_managed_fields() -> None:
    service = {"metadata": {"name": "web", "uid": "u1", "managedFields": [{"manager": "x"}]}, "spec": {}}
    assert kube._slim(service) == {"metadata": {"name": "web", "uid": "u1"}, "spec": {}}
    assert kube._slim({"spec": {}}) == {"spec": {}}


def test_watch_events_are_not_turned_into_models() -> None:
    cluster = kube.Cluster(k8s.ApiClient(), "node1", 30.0, False)
    watches: Any = watch_module  # untyped in the kubernetes package
    watch = watches.Watch()
    for each in cluster.watches.values():
        assert not watch.get_return_type(each._raw), each.kind
    # The guard: the core listers themselves would be deserialized into models per event.
    assert watch.get_return_type(cluster.watches["services"].lister)


def test_an_unchanged_inventory_is_not_fed_again() -> None:
    cluster = kube.Cluster(k8s.ApiClient(), "node1", 30.0, False)
    for each in cluster.watches.values():
        each.start = lambda: None  # type: ignore[method-assign]
    vip = Vip(ipaddress.ip_address("192.0.2.10"), frozenset({"node1"}))
    inventories = [Inventory((vip,)), Inventory((vip,)), Inventory((vip,)), Inventory()]
    cluster.snapshot = lambda: inventories.pop(0)  # type: ignore[method-assign]
    fed: list[Inventory] = []

    async def scenario() -> None:
        task = asyncio.create_task(cluster.watch(fed.append))
        for _ in range(4):  # e.g. the speaker's own status writes coming back, then a VIP gone
            await asyncio.sleep(0.01)
            cluster._poke()
            await asyncio.sleep(0.1)
        task.cancel()

    asyncio.run(scenario())
    assert fed == [Inventory((vip,)), Inventory()]
