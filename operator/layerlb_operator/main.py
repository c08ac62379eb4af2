"""`layerlb operator`: the entry point that starts leader election, the metrics server, the queue and kopf.

Without `--standalone`, replicas elect a leader on a Lease (see `lease`): the standbys serve `/healthz`
and `/metrics` and wait; the leader runs kopf and the reconciler. A leader that loses its Lease exits
with status 1 (its pod restarts as a standby) rather than risk acting beside a new leader.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from kopf._core.engines.peering import Identity

DEFAULT_LEASE = "layerlb-operator"
# Services of type LoadBalancer: layerlb's class, and the switch for Services with none (service_frontend).
CLASS = "layerlb.dev/loadbalancer"
CLASSLESS_ENV = "LAYERLB_SERVE_CLASSLESS_SERVICES"
SA_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `layerlb operator` (the CLI builds the subcommand; kopf is imported only to run)."""
    parser.add_argument(
        "--namespace",
        "-n",
        action="append",
        metavar="NS",
        help="watch LoadBalancers in NS only (repeatable); default: all namespaces",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--peering",
        metavar="[NAMESPACE/]NAME",
        default=DEFAULT_LEASE,
        help="the Lease on which replicas elect the one that acts (default: %(default)s in the "
        "operator's namespace)",
    )
    mode.add_argument(
        "--standalone", action="store_true", help="act without leader election (a single replica only)"
    )
    parser.add_argument(
        "--metrics", metavar="HOST:PORT", default="0.0.0.0:8080", help="serve /metrics and /healthz here"
    )
    parser.add_argument(
        "--serve-classless-services",
        action="store_true",
        default=os.environ.get(CLASSLESS_ENV, "").lower() in ("1", "true", "yes"),
        help="also serve Services of type LoadBalancer without spec.loadBalancerClass (default: only those "
        f"of class {CLASS}; env {CLASSLESS_ENV}=true)",
    )
    parser.add_argument(
        "--ready-needs-announcement",
        action="store_true",
        help="a LoadBalancer is Ready only once a speaker announces its VIP (status.announcement); the "
        "chart sets it when it runs the speakers",
    )
    parser.add_argument(
        "--vips-outside-pools",
        choices=("allow", "refuse"),
        default="allow",
        help="a LoadBalancer's spec.vip that no VIPPool covers: honour it (allow, the default) or refuse it "
        "as a VIPConflict (refuse: the chart's default, since the speakers announce every VIP on the "
        "nodes' network)",
    )
    parser.add_argument("--verbose", "-v", action="store_true", help="log kopf's own messages too")


def _own_namespace() -> str:
    if os.environ.get("POD_NAMESPACE"):
        return os.environ["POD_NAMESPACE"]
    with contextlib.suppress(OSError):
        return SA_NAMESPACE.read_text(encoding="utf-8").strip()
    return "default"


def identity(environ: Mapping[str, str] | None = None) -> str:
    """This process's name, as the Lease's holder and for kopf: the pod's name, a per-process suffix.

    The pod's name comes from the downward API (`POD_NAME`, set by the chart), so `kubectl get lease`
    shows which pod leads; without it (a dev box), the hostname, which is also a pod's default hostname.
    The suffix (pid, random) keeps two processes on one host, or a restarted container, apart.

    Never from the user: kopf's own default (`getpass.getuser()` in `peering.detect_own_id`) raises
    KeyError (OSError on Python 3.13) when the uid has no passwd entry and USER/LOGNAME are unset,
    which is how the chart runs the image (uid 65532); hence `run` always hands kopf this identity.
    """
    env = os.environ if environ is None else environ
    base = env.get("POD_NAME") or socket.gethostname() or "layerlb-operator"
    return f"{base}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def lease_location(peering: str) -> tuple[str, str]:
    """(namespace, name) of the Lease from `--peering`."""
    namespace, _, name = peering.rpartition("/")
    return namespace or _own_namespace(), name


async def run(args: argparse.Namespace) -> int:
    """Run until SIGTERM/SIGINT (0) or until leadership is lost (1)."""
    import kopf

    from layerlb_operator import apiserver, handlers, lease, login, metrics, objects, reconciler

    log = logging.getLogger("layerlb.operator")
    host, port = metrics.parse_address(args.metrics)
    settings = objects.Settings.from_environment()  # before any connection: a bad setting exits 2
    client = apiserver.Client(apiserver.load_configuration())
    counters = metrics.Metrics()
    client.writes = counters.writes  # one counter: the metrics show every write the client makes
    worker = reconciler.Reconciler(
        client,
        settings,
        counters,
        serve_classless=args.serve_classless_services,
        ready_needs_announcement=args.ready_needs_announcement,
        vips_outside_pools=args.vips_outside_pools,
    )
    log.info(
        "serving Services of type LoadBalancer of class %s%s",
        CLASS,
        " and without a class" if args.serve_classless_services else "",
    )
    log.info("a spec.vip outside every VIPPool: %s (--vips-outside-pools)", args.vips_outside_pools)
    handlers.install(worker)
    login.install(args.namespace or [])
    essential: list[asyncio.Task[Any]] = []  # healthy while none of these has ended
    server = await metrics.serve(counters, host, port, healthy=lambda: not any(t.done() for t in essential))
    log.info("metrics on http://%s:%d/metrics", host, server.sockets[0].getsockname()[1])

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    own_identity = identity()
    elector = None
    if not args.standalone:
        namespace, name = lease_location(args.peering)
        elector = lease.Elector(client, namespace, name, own_identity, pod=os.environ.get("POD_NAME") or None)
        client.may_write = elector.leading
        acquiring = asyncio.create_task(elector.acquire())
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({acquiring, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if stop.is_set():
            acquiring.cancel()
            server.close()
            return 0
        stopping.cancel()

    counters.leader = True
    namespaces = args.namespace or []
    # kopf takes SIGTERM/SIGINT over from here on; it ends `operator`, or `stop` ends it. The identity is
    # passed so that kopf never computes its default one (see `identity`); standalone, it only names us.
    operator = asyncio.create_task(
        kopf.operator(
            clusterwide=not namespaces,
            namespaces=namespaces,
            standalone=True,
            identity=cast("Identity", own_identity),
            stop_flag=stop,
        )
    )
    queue = asyncio.create_task(worker.run())
    holding = asyncio.create_task(elector.hold() if elector else stop.wait())
    essential += [operator, queue]
    await asyncio.wait({operator, queue, holding}, return_when=asyncio.FIRST_COMPLETED)
    lost = elector is not None and holding.done()
    failed = queue.done() or (operator.done() and operator.exception() is not None)
    stop.set()
    with contextlib.suppress(Exception):
        await operator
    for task in (queue, holding):
        task.cancel()
    counters.leader = False
    if elector is not None and not lost:
        await asyncio.to_thread(elector.release)
    server.close()
    if failed:
        log.error(
            "the operator stopped unexpectedly: %s",
            operator.exception() if operator.done() else "queue ended",
        )
    return 1 if lost or failed else 0


def main(args: argparse.Namespace) -> int:
    """`layerlb operator`: logs to stderr; returns the exit code."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr
    )
    if not args.verbose:
        logging.getLogger("kopf").setLevel(logging.WARNING)
    try:
        return asyncio.run(run(args))
    except ValueError as error:  # a bad --metrics address or LAYERLB_HOST_ADMIN_PORTS
        print(f"layerlb operator: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # the metrics port is taken, or the kubeconfig cannot be read
        print(f"layerlb operator: {error}", file=sys.stderr)
        return 1
