"""The real-node suite's platform: kind when `e2e/kind/run.sh` set LAYERLB_KIND_CLUSTER (it built the image,
created the cluster and installed the chart), else the local cluster with real nodes, started here.

Locally: the images are built from the project's files (`e2e/images/build.py`) and imported into every
node's containerd (the project's also under the name the chart's defaults run), a cluster with two nodes
comes up (`e2e/cluster`), and the chart is installed with the README's own `helm install` command, as a
user would: the operator and every forwarding pod are real pods run by a kubelet with the chart's own
securityContext. The operator pod must be Ready before any test runs; if it is not, the fixture fails
with the pod's events and logs.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from e2e.nodes import chart_operator
from e2e.nodes.platform import KIND_ENV, Kind, LocalNodes, Platform, local_nodes

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
LOCAL_NAMESPACE = "llb-nodes"
LOCAL_NODES = 2

# Only the platform-neutral suite runs on kind; the local platform's own checks need its nodes.
collect_ignore = ["test_local_nodes.py", "test_local_client_ip.py"] if os.environ.get(KIND_ENV) else []


def _local(tmp: Path) -> Iterator[LocalNodes]:
    with local_nodes(tmp / "cluster", LOCAL_NAMESPACE, LOCAL_NODES) as platform:
        chart_operator.install(platform)
        yield platform


@pytest.fixture(scope="package")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    """The cluster with the chart installed and its operator Ready."""
    if os.environ.get(KIND_ENV):
        yield Kind(
            env=dict(os.environ),
            image=os.environ.get("LAYERLB_KIND_IMAGE", "layerlb:kind-e2e"),
            namespace=os.environ.get("LAYERLB_KIND_NAMESPACE", "llb-kind"),
        )
        return
    yield from _local(tmp_path_factory.mktemp("nodes"))
