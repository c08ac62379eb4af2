"""Helpers for a pytest session fixture that needs a Kubernetes API server.

In a conftest.py::

    import pytest
    from e2e.cluster.fixture import cluster_session   # or: from cluster.fixture import ...
    from e2e.cluster.cluster import Cluster

    @pytest.fixture(scope="session")
    def k8s(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
        yield from cluster_session(tmp_path_factory.mktemp("k8s"))

Set ``LAYERLB_E2E_CLUSTER`` to a state folder of a cluster started with
``python e2e/cluster/cluster.py up --state-dir DIR`` to reuse it (it is then left running).
Set ``LAYERLB_E2E_NO_BUILD=1`` to fail fast instead of building missing binaries (minutes).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from .cluster import Cluster, ClusterError, binaries_present, default_bin_dir, down, up

REUSE_ENV = "LAYERLB_E2E_CLUSTER"
NO_BUILD_ENV = "LAYERLB_E2E_NO_BUILD"


def running_cluster(tmp_root: Path) -> Cluster:
    """A running control plane: the one named by ``$LAYERLB_E2E_CLUSTER``, else one started (or
    reused, when already up) in ``tmp_root / "cluster"``. Builds the binaries first if missing."""
    reuse = os.environ.get(REUSE_ENV)
    state_dir = Path(reuse) if reuse else tmp_root / "cluster"
    build = os.environ.get(NO_BUILD_ENV, "") in ("", "0")
    if not build and not binaries_present():
        raise ClusterError(f"control-plane binaries missing in {default_bin_dir()} and {NO_BUILD_ENV} is set")
    return up(state_dir, build=build)


def cluster_session(tmp_root: Path) -> Iterator[Cluster]:
    """Generator for a session fixture: yields the cluster, then stops it (unless it was reused)."""
    cluster = running_cluster(tmp_root)
    try:
        yield cluster
    finally:
        if not os.environ.get(REUSE_ENV):
            down(cluster.state_dir)
