"""Real nodes leave the host as they found it: after `down`, and after the session that started them was
killed (the next session's `remove_stale` tears its cluster down).

Each test starts a cluster with one node in a child process that owns it, runs a pod on the node (so there
are containers, a pod network namespace, volume mounts and pod cgroups to clean), then stops the cluster
one way or the other and compares the host's state with the state before: network namespaces, cgroups,
mounts, the sysctls the kubelet sets, the CNI cache, container log links and processes. The comparison is
of the whole host, so no other cluster with nodes may start or stop meanwhile (in `make test` none does:
the real-node suites run after this folder, one at a time).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
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


def host_state(state_dir: Path) -> dict[str, object]:
    """What a node may change on the host, read independently of nodes.py's own bookkeeping."""
    cgroups = sorted(str(p) for p in Path("/sys/fs/cgroup").glob("*/llbk-*"))
    mounts = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]
    return {
        "netns": sorted(p.name for p in Path("/run/netns").glob("*")) if Path("/run/netns").exists() else [],
        "cgroups": cgroups,
        "mounts": sorted(
            m for m in mounts if m.startswith(str(state_dir)) or m.startswith("/run/netns/cni-")
        ),
        "sysctls": {k: (Path("/proc/sys") / k).read_text().strip() for k in node_kit.KUBELET_SYSCTLS},
        "cni_cache": sorted(p.name for p in node_kit.CNI_CACHE.glob("*"))
        if node_kit.CNI_CACHE.exists()
        else [],
        "log_links": sorted(p.name for p in node_kit.CONTAINER_LOGS.glob("*"))
        if node_kit.CONTAINER_LOGS.exists()
        else [],
        "processes": sorted(node_kit._pids_with_arg(str(state_dir))),
    }


@pytest.fixture
def owned_cluster(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], Path, dict[str, object]]]:
    """A child process that started a one-node cluster (and owns it), with a pod Running on the node; and the
    host's state from before it started."""
    cluster.ensure_binaries(with_nodes=True)  # first: the pause image compiles from the module it downloads
    pause = build.build_all(only=["pause"])["pause"].path
    state_dir = tmp_path / "cluster"
    before = host_state(state_dir)
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
        yield owner, state_dir, before
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()
        cluster.down(state_dir)  # whatever the test left


def test_down_leaves_the_host_as_it_was(
    owned_cluster: tuple[subprocess.Popen[str], Path, dict[str, object]],
) -> None:
    _, state_dir, before = owned_cluster
    assert host_state(state_dir) != before  # the node changed the host (else this test proves nothing)
    cluster.down(state_dir)
    assert host_state(state_dir) == before


def test_a_killed_sessions_cluster_is_removed_by_the_next_session(
    owned_cluster: tuple[subprocess.Popen[str], Path, dict[str, object]],
) -> None:
    owner, state_dir, before = owned_cluster
    owner.send_signal(signal.SIGKILL)  # as a killed test run: no teardown runs in it
    owner.wait()
    wait_for("the owner to be gone", lambda: not node_kit._alive(owner.pid))
    assert host_state(state_dir) != before  # its cluster outlived it
    assert str(state_dir.resolve()) in cluster.remove_stale()
    assert host_state(state_dir) == before
