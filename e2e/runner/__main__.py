"""`python -m e2e.runner`: the pod runner in the foreground, for the demo and for trying things by hand.

    python -m e2e.runner --kubeconfig KUBECONFIG --namespace demo [--backends] [--workdir DIR]

Prints `client <netns>` and `ready` once the lab's network and the API relay are up; then runs the
namespaces' forwarding pods until SIGINT/SIGTERM, when it stops them and removes its namespaces.
`--backends` also starts the examples' backends (`examples/backends.py`) in the lab.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import tempfile
import threading
from pathlib import Path

from e2e.runner.runner import PodRunner


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m e2e.runner", description=__doc__.splitlines()[0])
    parser.add_argument("--kubeconfig", type=Path, required=True, help="an admin kubeconfig")
    parser.add_argument("--namespace", action="append", required=True, help="whose forwarding pods to run")
    parser.add_argument(
        "--workdir", type=Path, help="tokens and container logs (default: a temporary folder)"
    )
    parser.add_argument("--backends", action="store_true", help="start the examples' backends in the lab")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="runner: %(message)s", stream=sys.stderr)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="layerlb-runner-"))
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with PodRunner(args.kubeconfig, args.namespace, workdir) as runner:
        if args.backends:
            from e2e.runner.lab import start_backends

            for host, _ in start_backends(runner.lab):
                print(f"backend {host.namespace.short} {host.address}", flush=True)
        print(f"client {runner.lab.client.name}", flush=True)
        print(f"logs {workdir / 'logs'}", flush=True)
        print("ready", flush=True)
        stop.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
