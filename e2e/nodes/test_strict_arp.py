"""One MAC per VIP on the LAN, also when a host-network LoadBalancer runs a replica on every node.

A `nat` forwarding pod puts its VIP on its node's loopback. With Linux's default `arp_ignore=0` every
node holding such a pod would answer ARP for the VIP itself, next to the speaker that was elected to:
the LAN client would see two MACs and flip between them. The forwarding pods make their nodes strict
(`layerlb_dataplane.kernel.strict_arp`, as kube-proxy's IPVS `strictARP`) — here through rtnetlink,
since the container runtime mounts /proc/sys read-only in the (non-privileged) pods — so only the node
named by the speaker's `status.announcement` answers, and the VIP carries traffic from the client.

The local nodes start with every ARP default (`arp_ignore=0`, `arp_announce=0`): nothing in the suite
sets them for this test. Local platform only (the LAN client namespace).
"""

from __future__ import annotations

import json
from typing import Any

from e2e import harness
from e2e.cluster.nodes import CLIENT_IP
from e2e.nodes import pods
from e2e.nodes.suite import deploy, kubectl
from e2e.nodes.test_announcement import Lan, lan

__all__ = ["lan"]  # the LAN fixture (backends, the nodes' MACs, speakers Ready), shared


def _announced(lan: Lan, name: str, vip: str) -> str:
    """The node the speaker says announces `vip` (status.announcement), waiting for it."""

    def node() -> str | None:
        found: dict[str, Any] = json.loads(
            kubectl(lan.local, "get", "llb", name, "-n", lan.namespace, "-o", "json")
        )
        announcement = found.get("status", {}).get("announcement") or {}
        return announcement.get("node") if announcement.get("address") == vip else None

    return str(harness.wait_for(f"status.announcement of {name}", node, 60))


def test_a_host_network_nat_with_a_replica_on_each_node_is_answered_by_the_announcing_node_alone(
    lan: Lan,
) -> None:
    local, namespace = lan.local, lan.namespace
    nodes = {n.name: n.ip for n in local.cluster.node_list()}
    knob = "net.ipv4.conf.eth0.arp_ignore"
    # A fresh node answers ARP for any of its addresses on any interface. Earlier kernel LoadBalancers of
    # this session made these nodes strict (the setting outlives them, as on a real node): make them lax again.
    for node in nodes:
        for scope in ("all", "eth0"):
            local.node_exec(node, "sysctl", "-q", "-w", f"net.ipv4.conf.{scope}.arp_ignore=0")
            local.node_exec(node, "sysctl", "-q", "-w", f"net.ipv4.conf.{scope}.arp_announce=0")
    assert {local.node_exec(n, "sysctl", "-n", knob).strip() for n in nodes} == {"0"}, "the nodes start lax"
    lb = deploy(local, "l4-nat-nftables.yaml", lan.addresses, name="strict", replicas=len(nodes))
    name, vip = lb["metadata"]["name"], lb["status"]["vip"]
    placed = pods.wait_ready(local.env, namespace, f"layerlb.dev/loadbalancer={name}", count=len(nodes))
    assert {p["spec"]["nodeName"] for p in placed} == set(nodes), "one replica on each node"
    for node in nodes:  # every node holds the VIP: each kernel could answer for it
        assert vip in local.node_exec(node, "ip", "-br", "addr", "show", "dev", "lo")
    holder = _announced(lan, name, vip)
    # Several rounds: a lax node answers every request, so one round would already show its MAC.
    rounds = [lan.answering(vip) for _ in range(3)]
    assert rounds == [{holder}] * 3, (holder, rounds)
    others = [n for n in nodes if n != holder]
    for node in others:  # without masquerade the backends' replies must return through the holder
        local.node_exec(node, "ip", "route", "replace", f"{CLIENT_IP}/32", "via", nodes[holder])
    try:
        answer = lan.answer(vip, 53)
        assert answer.endswith(f"from={CLIENT_IP}"), answer
        assert lan.answering(vip) == {holder}
    finally:
        for node in others:
            local.node_exec(node, "ip", "route", "del", f"{CLIENT_IP}/32")
    kubectl(local, "wait", "--for=condition=StrictARP", "--timeout=60s", "-n", namespace, f"llb/{name}")
    for node in nodes:
        assert local.node_exec(node, "sysctl", "-n", knob).strip() == "1", node
    kubectl(local, "delete", "llb", name, "-n", namespace, "--wait=true", "--timeout=120s")
