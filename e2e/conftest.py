"""Fixtures of the end-to-end tests: a real control plane (etcd, kube-apiserver, kube-controller-manager)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from e2e.cluster.cluster import Cluster
from e2e.cluster.fixture import cluster_session
from e2e.kube import ROOT, Kubectl


@pytest.fixture(scope="session")
def k8s(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """One control plane for the whole session (built from Go modules on first use)."""
    yield from cluster_session(tmp_path_factory.mktemp("k8s"))


@pytest.fixture(scope="session")
def kubectl(k8s: Cluster) -> Kubectl:
    return Kubectl(k8s)


@pytest.fixture(scope="session")
def crds_installed(kubectl: Kubectl) -> None:
    """layerlb's CRDs applied from `crds/` and Established."""
    kubectl.ok("apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds"))
    kubectl.ok(
        "wait", "--for=condition=Established", "--timeout=120s",
        "crd/loadbalancers.layerlb.dev", "crd/vippools.layerlb.dev",
        "crd/bgppeers.layerlb.dev", "crd/bgpadvertisements.layerlb.dev",
    )  # fmt: skip
    for namespace in ("demo", "shop"):
        manifest = f"apiVersion: v1\nkind: Namespace\nmetadata: {{name: {namespace}}}\n"
        kubectl.ok("apply", "-f", "-", stdin=manifest)
