"""Operators run for the control-plane chaos tests: `layerlb operator` processes whose every write to the API
server is logged with its wall-clock time, so a test can say which process wrote when (a leader hand-over
where two replicas both write, a SIGKILL landing in the middle of a reconcile).

The operator is the product's own code on a real API server; the one addition is an observation shim: the
process starts through `python -c`, wraps `apiserver.Client.write` (the single path every write takes, the
one the `layerlb_operator_writes_total` metric counts) to print `WRITE <time> <kind> <method> <path>` to
its log for each write sent (its start time; `REFUSED` for one the operator's own leader check kept back),
then runs `layerlb.cli` as `python -m layerlb.cli` would. Metrics alone cannot do this: a SIGKILLed
or paused process answers no scrape.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from e2e.harness import free_port
from e2e.kube import ROOT

OBSERVED = """
import os, runpy, sys, time
from layerlb_operator import apiserver
original = apiserver.Client.write
def log(word, at, kind, method, path):
    os.write(2, f"{word} {at:.6f} {kind} {method} {path}\\n".encode())  # one write: threads do not interleave
def write(self, kind, method, path, **kwargs):
    at = time.time()
    try:
        answer = original(self, kind, method, path, **kwargs)
    except apiserver.ApiError as error:
        log("REFUSED" if error.status == 0 and "not writing" in str(error) else "WRITE", at, kind, method, path)
        raise
    log("WRITE", at, kind, method, path)
    return answer
apiserver.Client.write = write
sys.argv = ["layerlb", *sys.argv[1:]]
runpy.run_module("layerlb.cli", run_name="__main__")
"""


@dataclass(frozen=True)
class Write:
    """One write an operator process started: when (wall clock), the kind counted, the method and path."""

    at: float
    kind: str
    method: str
    path: str


class ObservedOperator:
    """One `layerlb operator` process watching `namespace`, its writes logged (see the module docstring)."""

    def __init__(self, kubeconfig: Path, log: Path, namespace: str, args: Sequence[str] = ()) -> None:
        self.port = free_port()
        self.log = log
        env = {**os.environ, "KUBECONFIG": str(kubeconfig), "LAYERLB_DEBUG": "1"}
        command = [sys.executable, "-c", OBSERVED, "operator", "--namespace", namespace]
        command += ["--metrics", f"127.0.0.1:{self.port}", *args]
        self.started = time.time()
        with log.open("ab") as out:
            self.process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)

    def metrics(self) -> dict[str, float]:
        """The metrics as `name{labels}` → value; empty while the server is not up (or the process gone)."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=2) as answer:
                text = answer.read().decode()
        except OSError:
            return {}
        samples = (line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
        return {name: float(value) for name, value in samples}

    def writes(self, word: str = "WRITE") -> list[Write]:
        """The writes sent (`REFUSED`: the ones the operator's leader check kept back)."""
        found = []
        for line in self.log.read_text(errors="replace").splitlines():
            if line.startswith(f"{word} "):
                _, at, kind, method, path = line.split(" ", 4)
                found.append(Write(float(at), kind, method, path))
        return found

    def kill(self) -> None:
        """SIGKILL: no handler runs, nothing is released (a crashed or OOM-killed pod)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> int:
        """SIGTERM, as a pod is stopped; returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=60)

    def tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-40:])
