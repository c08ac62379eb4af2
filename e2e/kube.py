"""`kubectl` for the end-to-end tests, against the test cluster's kubeconfig."""

from __future__ import annotations

import subprocess
from pathlib import Path

from e2e.cluster.cluster import Cluster

ROOT = Path(__file__).resolve().parent.parent


class Kubectl:
    """`kubectl` against the test cluster; returns the completed process, never raises on failure."""

    def __init__(self, cluster: Cluster) -> None:
        self.env = cluster.env()

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
