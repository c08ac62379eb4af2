"""`layerlb speaker`: its options, and the process around `runtime.Speaker` (signals, sources, logging).

A subcommand of the `layerlb` command rather than `python -m layerlb_speaker`, because the image's entry
point is `layerlb` (the chart's DaemonSet passes arguments only, like the operator's Deployment) and one
command keeps one place for options and exit codes. Importing it costs what `layerlb` costs (measured:
0.25 s and 39 MB RSS for the parser), inside the 100 MB budget. Only the standard library is imported
here until `main` runs, so building the `layerlb` parser stays cheap.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from layerlb_speaker import runtime

EXIT_INVALID = 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The speaker's options on `parser`."""
    from layerlb_speaker import heartbeat

    parser.add_argument(
        "--node", default=os.environ.get("NODE_NAME"), help="this node's name (default: $NODE_NAME)"
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="peers and VIPs from this YAML file (reread on change) instead of the Kubernetes API",
    )
    parser.add_argument(
        "--interface",
        action="append",
        default=[],
        metavar="NAME",
        help="answer on this interface (repeat for more; default: the one holding the node's address)",
    )
    parser.add_argument(
        "--port", type=int, default=heartbeat.DEFAULT_PORT, help="heartbeat UDP port (all speakers)"
    )
    parser.add_argument("--heartbeat-interval", type=float, default=0.1, metavar="SECONDS")
    parser.add_argument(
        "--dead-after",
        type=float,
        default=0.5,
        metavar="SECONDS",
        help="a silent peer is dead after this long",
    )
    parser.add_argument(
        "--max-dead-after",
        type=float,
        metavar="SECONDS",
        help="at most this long for a peer that reports its rounds running late "
        "(dead after --dead-after plus twice its lateness; default: 2 s, or --dead-after if longer)",
    )
    parser.add_argument(
        "--join",
        type=float,
        metavar="SECONDS",
        help="listen this long before announcing (default: --dead-after)",
    )
    parser.add_argument("--announce-count", type=int, default=3, help="gratuitous ARP/NA per takeover")
    parser.add_argument("--announce-spacing", type=float, default=0.25, metavar="SECONDS")
    parser.add_argument(
        "--stale-after",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="the API view counts as stale after its watches failed this long",
    )
    parser.add_argument(
        "--classless-services",
        action="store_true",
        help="also announce Services of type LoadBalancer without a loadBalancerClass",
    )
    parser.add_argument(
        "--bgp-dir",
        default="/run/layerlb-speaker/bgp",
        metavar="DIR",
        help="where BIRD's configuration, control socket and pid file and the BGP sessions' status.json go",
    )
    parser.add_argument(
        "--bgp",
        action="store_true",
        help="Kubernetes mode: also advertise over BGP, as the BGPPeers and BGPAdvertisements say "
        "(BIRD starts once a BGPPeer selects this node); a static --config's bgp: section needs no flag",
    )
    parser.add_argument(
        "--namespace",
        default=os.environ.get("POD_NAMESPACE"),
        help="the speaker's namespace, the only one it reads BGP password Secrets from (default: $POD_NAMESPACE)",
    )
    parser.add_argument(
        "--verbose", action="store_true", help="log every peer and interface event at debug level"
    )


def main(args: argparse.Namespace) -> int:
    """Runs the speaker until SIGTERM or SIGINT; returns the exit code."""
    from layerlb_speaker import config, membership, runtime

    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s layerlb-speaker: %(message)s",
        stream=sys.stderr,
    )
    if not args.node:
        print("layerlb speaker: --node or NODE_NAME is required", file=sys.stderr)
        return EXIT_INVALID
    try:
        timing = membership.Timing(
            args.heartbeat_interval,
            args.dead_after,
            args.dead_after if args.join is None else args.join,
            max(2.0, args.dead_after) if args.max_dead_after is None else args.max_dead_after,
        )
    except ValueError as error:
        print(f"layerlb speaker: {error}", file=sys.stderr)
        return EXIT_INVALID
    if args.announce_count < 1 or args.announce_spacing < 0:
        print(
            "layerlb speaker: --announce-count must be 1 or more, --announce-spacing not negative",
            file=sys.stderr,
        )
        return EXIT_INVALID
    settings = runtime.Settings(
        node=args.node,
        interfaces=tuple(args.interface),
        port=args.port,
        timing=timing,
        announce_count=args.announce_count,
        announce_spacing=args.announce_spacing,
    )
    if args.config:
        try:
            config.load(args.config)
        except Exception as error:
            print(f"layerlb speaker: {args.config}: {error}", file=sys.stderr)
            return EXIT_INVALID
    return asyncio.run(_run(settings, args))


async def _run(settings: runtime.Settings, args: argparse.Namespace) -> int:
    from layerlb_speaker import config, runtime

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    routing: asyncio.Task[None] | None = None
    if args.config:
        from layerlb_speaker import bgp_announcer

        speaker = runtime.Speaker(settings, runtime.LogReporter())
        # BGP from the file's `bgp:` section; BIRD starts with the first session.
        speaker.bgp = bgp_announcer.BgpAnnouncer(settings.node, args.bgp_dir)
        routing = asyncio.create_task(speaker.bgp.run(stop))
        inventory, _ = config.load(args.config)
        speaker.update(inventory)
        source = asyncio.create_task(config.watch(args.config, speaker.update))
    else:
        from layerlb_speaker import kube  # the kubernetes client loads only here

        try:
            cluster = kube.Cluster.connect(
                settings.node, args.stale_after, args.classless_services, args.bgp, args.namespace
            )
        except Exception as error:
            print(f"layerlb speaker: Kubernetes API: {error}", file=sys.stderr)
            return 1
        speaker = runtime.Speaker(settings, cluster.reporter())
        speaker.publisher = cluster.publisher()
        speaker.pool_status = cluster.pool_publisher()
        update: Callable[[runtime.Inventory], None] = speaker.update
        if args.bgp:
            from layerlb_speaker import bgp_announcer

            # BGP from the BGPPeer and BGPAdvertisement watches; BIRD starts with the first session, and
            # this node's sessions go into the peers' status.nodes.
            sessions = cluster.bgp_publisher()
            speaker.bgp = bgp_announcer.BgpAnnouncer(
                settings.node, args.bgp_dir, on_status=sessions.on_status
            )
            routing = asyncio.create_task(speaker.bgp.run(stop))

            def with_sessions(snapshot: runtime.Inventory) -> None:
                speaker.update(snapshot)
                sessions.on_intent(snapshot, speaker.membership.members())

            update = with_sessions

        source = asyncio.create_task(cluster.watch(update))
        await cluster.synced(timeout=30.0)
    try:
        await speaker.run(stop)
    finally:
        source.cancel()
        if routing is not None:
            await routing  # withdraws every route, then stops BIRD (stop is set)
    return 0
