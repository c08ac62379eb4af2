"""Real nodes leave the host as they found it: after `down`, and after the session that started them was
killed (the next session's `remove_stale` tears its cluster down).

Each test starts a cluster with one node in a child process that owns it, runs a pod on the node (so there
are containers, a pod network namespace, volume mounts and pod cgroups to clean), then stops the cluster
one way or the other and compares the host's state with the state before: network namespaces, cgroups,
mounts, the sysctls the kubelet sets, the CNI cache, container log links and processes. Other clusters with
nodes may run meanwhile (test sessions side by side on one machine): what is compared is this cluster's
share of the host, named by its tag (`llbk-TAG-*` namespaces and cgroups, the CNI network `llbk-TAG`, log
links into its node folders), its pod network namespaces and sandboxes (noted while it runs) and the
processes naming its state folder. The kubelet's sysctls are host-wide, so they are compared only when no
other cluster was registered before or after.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from e2e.cluster import cluster
from e2e.cluster import nodes as node_kit
from e2e.harness import wait_for
from e2e.images import build

ROOT = Path(__file__).resolve().parents[2]
OWNER = """
import os, sys, time
from pathlib import Path
from e2e.cluster import cluster
c = cluster.up(Path(sys.argv[1]), nodes=1, images=[Path(sys.argv[2])], owner=os.getpid())
print(c.kubeconfig, flush=True)
time.sleep(900)
"""


@dataclass
class Ours:
    """What of the host is this cluster's: its tag, and the pod network namespaces and sandboxes it made
    (noted while it runs: their names carry no tag)."""

    state_dir: Path
    tag: str
    pod_netns: set[str] = field(default_factory=set)
    sandboxes: set[str] = field(default_factory=set)

    def note_pods(self) -> None:
        inodes = {
            os.stat(f"/proc/{pid}/ns/net").st_ino
            for node in node_kit.node_layout(self.tag, 1)
            for pid in node_kit._pids_in_cgroup(node)
            if Path(f"/proc/{pid}/ns/net").exists()
        }
        self.pod_netns = {p.name for p in node_kit.NETNS_DIR.glob("cni-*") if p.stat().st_ino in inodes}
        self.sandboxes = {
            p.name
            for node in node_kit.node_layout(self.tag, 1)
            for p in (node.folder / "containerd/root/io.containerd.grpc.v1.cri/sandboxes").glob("*")
        }


@dataclass(frozen=True)
class Owned:
    """The child process owning the cluster, the cluster's share of the host, and that share before."""

    owner: subprocess.Popen[str]
    ours: Ours
    before: dict[str, object]
    others_before: bool


def others_registered(tag: str) -> bool:
    return any(p.stem != tag for p in cluster.REGISTRY.glob("*.json"))


def host_state(ours: Ours) -> dict[str, object]:
    """This cluster's share of the host, read independently of nodes.py's own bookkeeping."""
    tag, state_dir = ours.tag, str(ours.state_dir)
    mounts = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]
    netns = sorted(p.name for p in node_kit.NETNS_DIR.glob("*")) if node_kit.NETNS_DIR.exists() else []
    cni_cache = sorted(p.name for p in node_kit.CNI_CACHE.glob("*")) if node_kit.CNI_CACHE.exists() else []
    links = list(node_kit.CONTAINER_LOGS.glob("*")) if node_kit.CONTAINER_LOGS.exists() else []
    return {
        "netns": [n for n in netns if n.startswith(f"llbk-{tag}-") or n in ours.pod_netns],
        "cgroups": sorted(str(p) for p in Path("/sys/fs/cgroup").glob(f"*/llbk-{tag}-*")),
        "mounts": sorted(
            m
            for m in mounts
            if m.startswith(state_dir)
            or m.startswith(f"{node_kit.NODE_ROOT / tag}/")
            or m.removeprefix(f"{node_kit.NETNS_DIR}/") in ours.pod_netns
        ),
        "sysctls": {k: (Path("/proc/sys") / k).read_text().strip() for k in node_kit.KUBELET_SYSCTLS},
        "cni_cache": [
            name
            for name in cni_cache
            if name.startswith(f"llbk-{tag}-") or any(f"-{s}-" in name for s in ours.sandboxes)
        ],
        "log_links": sorted(
            link.name
            for link in links
            if link.is_symlink() and os.readlink(link).startswith(f"{node_kit.NODE_ROOT / tag}/")
        ),
        "processes": sorted(node_kit._pids_with_arg(state_dir)),
    }


def assert_as_before(ours: Ours, before: dict[str, object], others_before: bool) -> None:
    after = host_state(ours)
    if others_before or others_registered(ours.tag):  # another cluster's kubelet may have set them
        before, after = ({k: v for k, v in state.items() if k != "sysctls"} for state in (before, after))
    assert after == before


@pytest.fixture
def owned_cluster(tmp_path: Path) -> Iterator[Owned]:
    """A child process that started a one-node cluster (and owns it), with a pod Running on the node; and the
    host's state from before it started."""
    cluster.ensure_binaries(with_nodes=True)  # first: the pause image compiles from the module it downloads
    pause = build.build_all(only=["pause"])["pause"].path
    state_dir = tmp_path.resolve() / "cluster"
    ours = Ours(state_dir, cluster.tag_of(state_dir))
    before = host_state(ours)
    others_before = others_registered(ours.tag)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'operator'}:{ROOT / 'dataplane'}"}
    owner = subprocess.Popen(
        [sys.executable, "-c", OWNER, str(state_dir), str(pause)],
        stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT,
    )  # fmt: skip
    try:
        assert owner.stdout is not None
        kubeconfig = owner.stdout.readline().strip()
        assert kubeconfig, f"the cluster did not come up (exit {owner.poll()})"
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "p", "namespace": "default"},
            "spec": {
                "containers": [{"name": "p", "image": "localhost/pause:3.10", "imagePullPolicy": "Never"}]
            },
        }
        kube = {**os.environ, "KUBECONFIG": kubeconfig}
        subprocess.run(
            ["kubectl", "apply", "-f", "-"], input=json.dumps(pod), env=kube, check=True, text=True
        )
        subprocess.run(
            ["kubectl", "wait", "--for=condition=Ready", "--timeout=120s", "pod/p"], env=kube, check=True
        )
        ours.note_pods()
        assert ours.pod_netns and ours.sandboxes, "the pod's network namespace and sandbox were not found"
        yield Owned(owner, ours, before, others_before)
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()
        cluster.down(state_dir)  # whatever the test left


def test_down_leaves_the_host_as_it_was(owned_cluster: Owned) -> None:
    ours = owned_cluster.ours
    assert host_state(ours) != owned_cluster.before  # the node changed the host (else this proves nothing)
    cluster.down(ours.state_dir)
    assert_as_before(ours, owned_cluster.before, owned_cluster.others_before)


def test_a_killed_sessions_cluster_is_removed_by_the_next_session(owned_cluster: Owned) -> None:
    owner, ours = owned_cluster.owner, owned_cluster.ours
    owner.send_signal(signal.SIGKILL)  # as a killed test run: no teardown runs in it
    owner.wait()
    wait_for("the owner to be gone", lambda: not node_kit._alive(owner.pid))
    assert host_state(ours) != owned_cluster.before  # its cluster outlived it
    assert str(ours.state_dir) in cluster.remove_stale()
    assert_as_before(ours, owned_cluster.before, owned_cluster.others_before)
