"""Where the real-node suite runs: the local cluster's nodes (network namespaces on this machine) or kind.

Both give the suite the same three things: `kubectl` against the cluster, a command run in a node's
network namespace (`node_exec`), and one run in a pod's network namespace (`pod_exec`). On kind these are
`docker exec` into the node container and `nsenter` into the sandbox `crictl` names; locally, `nsenter`
into the node's namespace and into the `cni-*` namespace that holds the pod's address. Locally the VIPs
come from the nodes' LAN (`nodes.LAN_VIPS`), where its client finds them by ARP.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from e2e.cluster import cluster as local_cluster
from e2e.cluster import nodes as node_kit
from e2e.cluster.cluster import Cluster

# Set by `e2e/kind/run.sh`: the suite runs against that kind cluster instead of the local nodes.
KIND_ENV = "LAYERLB_KIND_CLUSTER"


def chart_default_image() -> str:
    """The image the chart runs with its default values (`image.repository`, the chart's appVersion)."""
    import yaml

    chart = Path(__file__).resolve().parents[2] / "charts" / "layerlb"
    values = yaml.safe_load((chart / "values.yaml").read_text())
    version = values["image"]["tag"] or yaml.safe_load((chart / "Chart.yaml").read_text())["appVersion"]
    return f"{values['image']['repository']}:{version}"


class PlatformError(RuntimeError):
    """A node or pod command failed."""


def _run(argv: list[str], timeout: float = 60) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise PlatformError(f"{' '.join(argv)}: {done.stderr.strip()}")
    return done.stdout


class Platform(Protocol):
    name: str
    env: dict[str, str]  # KUBECONFIG (and PATH for helm) for kubectl and helm
    image: str  # the project's image, as the nodes know it
    namespace: str  # where the suite's LoadBalancers, backends and client live
    vips: str  # the suite's VIPPool range: clear of node, pod and Service addresses

    def node_exec(self, node: str, *argv: str) -> str: ...

    def pod_exec(self, pod: dict[str, Any], *argv: str) -> str: ...


@dataclass
class LocalNodes:
    """The local cluster's nodes: network namespaces on this machine (`e2e/cluster/nodes.py`)."""

    cluster: Cluster
    image: str
    namespace: str
    name: str = "local"
    vips: str = node_kit.LAN_VIPS
    env: dict[str, str] = field(init=False)

    def __post_init__(self) -> None:
        self.env = self.cluster.env()

    def netns(self, node: str) -> str:
        [found] = [n.netns for n in self.cluster.node_list() if n.name == node]
        return found

    def node_exec(self, node: str, *argv: str) -> str:
        return _run(["nsenter", f"--net=/run/netns/{self.netns(node)}", *argv])

    def client_exec(self, *argv: str) -> str:
        """In the client namespace on the nodes' LAN, outside the cluster (`nodes.CLIENT_IP`)."""
        return _run(["nsenter", f"--net=/run/netns/{node_kit.client_netns(self.cluster.tag)}", *argv])

    def pod_exec(self, pod: dict[str, Any], *argv: str) -> str:
        """In the pod's sandbox namespace: the `cni-*` one (containerd's) that holds the pod's address."""
        pod_ip = (pod.get("status") or {}).get("podIP")
        if not pod_ip:
            raise PlatformError(f"pod {pod['metadata']['name']} has no address yet")
        for entry in sorted(Path("/run/netns").glob("cni-*")):
            done = subprocess.run(
                ["ip", "-n", entry.name, "-j", "-4", "addr", "show"],
                capture_output=True,
                text=True,
                timeout=30,
            )
            if done.returncode == 0 and any(
                info.get("local") == pod_ip
                for link in json.loads(done.stdout or "[]")
                for info in link.get("addr_info", [])
            ):
                return _run(["nsenter", f"--net={entry}", *argv])
        raise PlatformError(f"no network namespace holds pod {pod['metadata']['name']}'s address {pod_ip}")


@dataclass
class Kind:
    """A kind cluster (`e2e/kind/run.sh`): nodes are Docker containers, sandboxes found with crictl."""

    env: dict[str, str]
    image: str
    namespace: str
    name: str = "kind"
    vips: str = "198.18.10.10-198.18.10.250"

    def node_exec(self, node: str, *argv: str) -> str:
        return _run(["docker", "exec", node, *argv])

    def pod_exec(self, pod: dict[str, Any], *argv: str) -> str:
        node, name = pod["spec"]["nodeName"], pod["metadata"]["name"]
        namespace = pod["metadata"]["namespace"]
        sandbox = self.node_exec(
            node, "crictl", "pods", "--name", name, "--namespace", namespace, "-q"
        ).split()
        if not sandbox:
            raise PlatformError(f"no sandbox for pod {name} on {node} yet")
        info = json.loads(self.node_exec(node, "crictl", "inspectp", sandbox[0]))
        namespaces = info["info"]["runtimeSpec"]["linux"]["namespaces"]
        path = next(n["path"] for n in namespaces if n["type"] == "network")
        return self.node_exec(node, "nsenter", f"--net={path}", *argv)


@contextlib.contextmanager
def local_nodes(
    state_dir: Path, namespace: str, nodes: int = 2, tags: Sequence[str] = ()
) -> Iterator[LocalNodes]:
    """A local cluster with `nodes` real nodes owned by this process (a killed run's is removed by the
    next), the project's images built and imported: the layerlb image also under the name the chart's
    defaults run and under `tags`, so charts and tests pull nothing. Torn down on exit."""
    from e2e.images import build

    local_cluster.remove_stale()
    # The binaries first: the pause image is compiled from the Kubernetes module their build downloads.
    local_cluster.ensure_binaries(with_nodes=True)
    images = build.build_all()
    cluster = local_cluster.up(
        state_dir, nodes=nodes, images=[archive.path for archive in images.values()], owner=os.getpid()
    )
    try:
        for node in cluster.node_list():
            for tag in (chart_default_image(), *tags):
                node_kit.tag_image(node, images["layerlb"].reference, tag)
        yield LocalNodes(cluster, image=images["layerlb"].reference, namespace=namespace)
    finally:
        local_cluster.down(cluster.state_dir)
