"""The network's part, played by the suite: each VIP onto its forwarding pods' loopback and routed to them
at every node, and from the clients' side to the nodes.

layerlb binds a proxy's listeners on the VIP and leaves getting the VIP's packets to the pods to the
network (BGP, an L2 announcer, a cloud route): nothing in layerlb announces a VIP yet. Until it does, this
module does it from outside, through the platform (`platform.py`): the VIP is added to the loopback of
the pod's network namespace, and every node gets a route for the VIP: through each local pod that
serves it (its address as the next hop), else through the nodes that hold such pods. Host-network pods
(kernel and transparent architectures) put the VIP on their node themselves; they get the node routes.

`routes` is pure (checked by `e2e/kind/test_kind_files.py`); `Plumber` runs it.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from e2e.nodes import pods
from e2e.nodes.platform import Platform

DATAPLANE: Final = "app.kubernetes.io/name=layerlb,app.kubernetes.io/component=dataplane"
LB_LABEL: Final = "layerlb.dev/loadbalancer"


@dataclass(frozen=True)
class Serving:
    """One ready-to-be forwarding pod: where it runs, its address (the node's, on the host network), its VIP."""

    vip: str
    node: str
    pod_ip: str
    host_network: bool = False


def routes(serving: Sequence[Serving], nodes: Mapping[str, str]) -> dict[str, list[list[str]]]:
    """`ip route` argument lists per node: VIP → its local pods (ECMP), else → the nodes with pods.

    `nodes`: node name → its address. A node whose own (host-network) pod serves the VIP needs no route.
    """
    by_vip: dict[str, list[Serving]] = {}
    for entry in serving:
        by_vip.setdefault(entry.vip, []).append(entry)
    commands: dict[str, list[list[str]]] = {node: [] for node in nodes}
    for vip, entries in sorted(by_vip.items()):
        for node in nodes:
            if any(e.node == node and e.host_network for e in entries):
                continue
            local = sorted(e.pod_ip for e in entries if e.node == node)
            if local:
                hops = [["via", address] for address in local]
            else:
                hops = [["via", nodes[n]] for n in sorted({e.node for e in entries}) if n in nodes]
            if not hops:
                continue
            commands[node].append(_route(vip, hops))
    return commands


def client_routes(serving: Sequence[Serving], nodes: Mapping[str, str]) -> list[list[str]]:
    """Routes for a client network next to the nodes: each VIP → the nodes that hold its pods (ECMP)."""
    by_vip: dict[str, set[str]] = {}
    for entry in serving:
        by_vip.setdefault(entry.vip, set()).add(entry.node)
    return [
        _route(vip, [["via", nodes[n]] for n in sorted(held) if n in nodes])
        for vip, held in sorted(by_vip.items())
    ]


def _route(vip: str, hops: list[list[str]]) -> list[str]:
    command = ["route", "replace", f"{vip}/32"]
    if len(hops) == 1:
        return command + hops[0]
    for hop in hops:
        command += ["nexthop", *hop]
    return command


class Plumber:
    """Keeps the VIPs of the platform's namespace on their pods' loopback and routed, every second.

    `client`: runs `ip ARGS` where the suite's clients outside the cluster are (None: clients are pods).
    """

    def __init__(self, platform: Platform, client: Callable[..., str] | None = None) -> None:
        self.platform = platform
        self.client = client
        self.done: set[str] = set()  # pod uids whose namespace holds the VIP
        self.errors: list[str] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="plumber", daemon=True)
        self.thread.start()

    def _kubectl_json(self, *args: str) -> Any:
        return json.loads(pods.kubectl(self.platform.env, *args, "-o", "json", timeout=60))

    def _loop(self) -> None:
        while not self.stop.wait(1.0):
            try:
                self.once()
            except Exception as error:  # a pod going away mid-pass: the next pass sees the new state
                self.errors = [*self.errors[-9:], str(error)]

    def once(self) -> None:
        """One pass: every ready-to-be forwarding pod's VIP placed and routed. Callable from a test too (a
        LoadBalancer just turned Ready is served only once a pass has seen its pods)."""
        with self.lock:
            self._once()

    def _once(self) -> None:
        namespace = self.platform.namespace
        lbs = self._kubectl_json("get", "llb", "-n", namespace)["items"]
        vips = {lb["metadata"]["name"]: (lb.get("status") or {}).get("vip") for lb in lbs}
        pods = self._kubectl_json("get", "pods", "-n", namespace, "-l", DATAPLANE)["items"]
        nodes = {
            n["metadata"]["name"]: next(
                a["address"] for a in n["status"]["addresses"] if a["type"] == "InternalIP"
            )
            for n in self._kubectl_json("get", "nodes")["items"]
        }
        serving = []
        for pod in pods:
            spec, status = pod["spec"], pod.get("status") or {}
            vip = vips.get(pod["metadata"]["labels"].get(LB_LABEL, ""))
            if not vip or not status.get("podIP") or pod["metadata"].get("deletionTimestamp"):
                continue
            host_network = bool(spec.get("hostNetwork"))
            if not host_network and pod["metadata"]["uid"] not in self.done:
                self.platform.pod_exec(pod, "ip", "addr", "replace", f"{vip}/32", "dev", "lo")
                self.done.add(pod["metadata"]["uid"])
            serving.append(Serving(vip, spec["nodeName"], status["podIP"], host_network))
        for node, commands in routes(serving, nodes).items():
            for command in commands:
                self.platform.node_exec(node, "ip", *command)
        if self.client is not None:
            for command in client_routes(serving, nodes):
                self.client(*command)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)
