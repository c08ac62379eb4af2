"""The network's part on kind: each VIP onto its forwarding pods' loopback and routed to them at every node.

layerlb binds a proxy's listeners on the VIP and leaves getting the VIP's packets to the pods to the
network (BGP, an L2 announcer, a cloud route); locally the pod runner plays that network
(`e2e/runner/runner.py`). On kind, this module does it from outside, through `docker exec` on the
node containers: the VIP is added to the loopback of the pod's network namespace (found with
`crictl inspectp`), and every node gets a route for the VIP: through the host-side veth of each local
pod that serves it, else through the nodes that hold such pods (node addresses share kind's Docker
network, so they are on-link). Host-network pods (kernel and transparent architectures) put the VIP on
their node themselves and are left alone.

`routes` is pure (checked by `test_kind_files.py` on machines without Docker); `Plumber` runs it.
"""

from __future__ import annotations

import json
import subprocess
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

DATAPLANE: Final = "app.kubernetes.io/name=layerlb,app.kubernetes.io/component=dataplane"
LB_LABEL: Final = "layerlb.dev/loadbalancer"


@dataclass(frozen=True)
class Serving:
    """One forwarding pod that needs the network: where it runs and which VIP it serves."""

    vip: str
    node: str
    pod_ip: str


def routes(
    serving: Sequence[Serving], nodes: Mapping[str, str], veths: Mapping[str, str]
) -> dict[str, list[list[str]]]:
    """`ip route` argument lists per node: VIP → local pods' veths (ECMP), else → the nodes with pods.

    `nodes`: node name → its address; `veths`: pod IP → the host-side interface on its node.
    """
    by_vip: dict[str, list[Serving]] = {}
    for entry in serving:
        by_vip.setdefault(entry.vip, []).append(entry)
    commands: dict[str, list[list[str]]] = {node: [] for node in nodes}
    for vip, entries in sorted(by_vip.items()):
        for node in nodes:
            local = sorted(veths[e.pod_ip] for e in entries if e.node == node and e.pod_ip in veths)
            if local:
                hops = [["dev", veth] for veth in local]
            else:
                hops = [["via", nodes[n]] for n in sorted({e.node for e in entries}) if n in nodes]
            if not hops:
                continue
            command = ["route", "replace", f"{vip}/32"]
            if len(hops) == 1:
                command += hops[0]
            else:
                for hop in hops:
                    command += ["nexthop", *hop]
            commands[node].append(command)
    return commands


def docker_exec(node: str, *argv: str) -> str:
    done = subprocess.run(["docker", "exec", node, *argv], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"docker exec {node} {' '.join(argv)}: {done.stderr.strip()}")
    return done.stdout


def kubectl_json(*args: str) -> Any:
    done = subprocess.run(["kubectl", *args, "-o", "json"], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"kubectl {' '.join(args)}: {done.stderr.strip()}")
    return json.loads(done.stdout)


class Plumber:
    """Keeps the VIPs of `namespace`'s forwarding pods on their loopback and routed, every second."""

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self.done: set[str] = set()  # pod uids whose namespace holds the VIP
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="kind-plumber", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self.stop.wait(1.0):
            try:
                self.once()
            except Exception as error:  # a pod going away mid-pass: the next pass sees the new state
                self.errors = [*self.errors[-9:], str(error)]

    def once(self) -> None:
        lbs = kubectl_json("get", "llb", "-n", self.namespace)["items"]
        vips = {lb["metadata"]["name"]: (lb.get("status") or {}).get("vip") for lb in lbs}
        pods = kubectl_json("get", "pods", "-n", self.namespace, "-l", DATAPLANE)["items"]
        node_list = kubectl_json("get", "nodes")["items"]
        nodes = {
            n["metadata"]["name"]: next(
                a["address"] for a in n["status"]["addresses"] if a["type"] == "InternalIP"
            )
            for n in node_list
        }
        serving = []
        for pod in pods:
            spec, status = pod["spec"], pod.get("status") or {}
            vip = vips.get(pod["metadata"]["labels"].get(LB_LABEL, ""))
            if (
                spec.get("hostNetwork")
                or not vip
                or not status.get("podIP")
                or pod["metadata"].get("deletionTimestamp")
            ):
                continue
            entry = Serving(vip, spec["nodeName"], status["podIP"])
            if pod["metadata"]["uid"] not in self.done:
                self._vip_on_loopback(pod, vip)
                self.done.add(pod["metadata"]["uid"])
            serving.append(entry)
        veths = {}
        for entry in serving:
            found = json.loads(docker_exec(entry.node, "ip", "-j", "route", "get", entry.pod_ip))
            veths[entry.pod_ip] = found[0]["dev"]
        for node, commands in routes(serving, nodes, veths).items():
            for command in commands:
                docker_exec(node, "ip", *command)

    def _vip_on_loopback(self, pod: dict[str, Any], vip: str) -> None:
        node, name = pod["spec"]["nodeName"], pod["metadata"]["name"]
        sandbox = docker_exec(
            node, "crictl", "pods", "--name", name, "--namespace", self.namespace, "-q"
        ).split()
        if not sandbox:
            raise RuntimeError(f"no sandbox for pod {name} on {node} yet")
        info = json.loads(docker_exec(node, "crictl", "inspectp", sandbox[0]))
        namespaces = info["info"]["runtimeSpec"]["linux"]["namespaces"]
        path = next(n["path"] for n in namespaces if n["type"] == "network")
        docker_exec(node, "nsenter", f"--net={path}", "ip", "addr", "replace", f"{vip}/32", "dev", "lo")

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)
