"""`kubectl` for the end-to-end tests, against the test cluster's kubeconfig, and for the command-line
measurements (`bench/operator_*.py`) that drive a cluster of their own."""

from __future__ import annotations

import subprocess
from pathlib import Path

from e2e.cluster.cluster import Cluster

ROOT = Path(__file__).resolve().parent.parent


class Kubectl:
    """`kubectl` against the test cluster; returns the completed process, never raises on failure."""

    def __init__(self, cluster: Cluster | dict[str, str]) -> None:
        """`cluster`: the local cluster, or the environment (KUBECONFIG) of another, such as kind."""
        self.env = cluster.env() if isinstance(cluster, Cluster) else dict(cluster)

    def __call__(
        self, *args: str, stdin: str | None = None, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["kubectl", *args], input=stdin, env=self.env, capture_output=True, text=True, timeout=timeout
        )

    def ok(self, *args: str, stdin: str | None = None) -> str:
        """Run and insist on success; the failure message carries kubectl's stderr."""
        done = self(*args, stdin=stdin)
        assert done.returncode == 0, f"kubectl {' '.join(args)} failed: {done.stderr}"
        return done.stdout


def kubectl_or_exit(env: dict[str, str], *args: str, stdin: str | None = None, timeout: float = 600) -> str:
    """`kubectl` with `env` (its KUBECONFIG): the output, or SystemExit with kubectl's stderr, so a
    measurement script stops with kubectl's own message instead of a traceback."""
    done = subprocess.run(
        ["kubectl", *args], input=stdin, env=env, capture_output=True, text=True, timeout=timeout
    )
    if done.returncode != 0:
        raise SystemExit(f"kubectl {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout
