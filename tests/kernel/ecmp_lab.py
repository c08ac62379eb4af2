"""An ECMP lab, so that "a flow the router moves to another node keeps its backend" is measured with real
packets: a router spreads a VIP over nodes with a Linux multipath route (hashing the 5-tuple), long-lived
TCP connections run through it, and nodes join and leave the route while they run.

    client 10.0.7.2 ── router 10.0.7.1 | 10.0.8.1 ── sw/br0 ─┬─ n1..n4 10.0.8.21-24 (the LB nodes)
                       VIP via n1, n2, n3 (then n4 too, ...)  └─ be1..be3 10.0.8.11-13 (VIP on lo)

The multipath route stands in for the routes a router learns from the nodes over BGP (the speaker's lab
produces those); here it is set directly, `ip route replace VIP nexthop via ... nexthop via ...`, hashing
the 5-tuple (`ROUTER_SYSCTLS`). Backends own the VIP on lo (arp_ignore=1, arp_announce=2) and
answer each line with their name, directly to the client (dsr) or back through a node (nat, masqueraded).

The pieces are plain functions, used by the host test (nftables engine, `test_ecmp_netns.py`), by the
guest scenario (IPVS, `guest_scenarios.scenario_ecmp`) and by `bench/ecmp.py`:
`hold_flows` keeps `count` connections busy (a line every `interval`) and reports for each whether it
broke or was answered by another backend, and in which phase; `route_lines`/`nexthops_of` set and read
the router's view, so a run also reports how many flows the router really moved.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import signal
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

VIP = "10.0.8.100"
PORT = 80
CLIENT, ROUTER_FRONT, ROUTER_LAN = "10.0.7.2", "10.0.7.1", "10.0.8.1"
NODES = {"n1": "10.0.8.21", "n2": "10.0.8.22", "n3": "10.0.8.23", "n4": "10.0.8.24"}
BACKENDS = {"be1": "10.0.8.11", "be2": "10.0.8.12", "be3": "10.0.8.13"}
# The phases of a run: the nodes in the route. A 4th node joins, then one of the first three leaves.
PHASES: tuple[tuple[str, ...], ...] = (("n1", "n2", "n3"), ("n1", "n2", "n3", "n4"), ("n1", "n3", "n4"))
PHASE_NAMES = ("start", "node added", "node removed")
ANSWER_TIMEOUT = 3.0  # seconds without an answer: the connection counts as broken (stalled)
BACKEND_SYSCTLS = {
    "net.ipv4.conf.all.arp_ignore": "1",
    "net.ipv4.conf.all.arp_announce": "2",
    "net.ipv4.conf.eth0.arp_ignore": "1",
    "net.ipv4.conf.eth0.arp_announce": "2",
}
# The multipath hash of the 5-tuple read from the headers (policy 3, fields: addresses, protocol, ports).
# Policy 1 would hash the same 5-tuple but first takes a hash the packet already carries: a veth keeps
# the one the client's socket gave it, which Linux draws anew when a segment is retransmitted, so flows
# would change node on their own — unlike a router receiving packets from a wire.
ROUTER_SYSCTLS = {
    "net.ipv4.ip_forward": "1",
    "net.ipv4.fib_multipath_hash_policy": "3",
    "net.ipv4.fib_multipath_hash_fields": "0x0037",
}


# --- the router -----------------------------------------------------------------------------------------


def route_lines(vip: str, nodes: Sequence[str]) -> list[str]:
    """`ip -batch` lines that make the router spread `vip` over `nodes` (names of `NODES`) by ECMP."""
    hops = " ".join(f"nexthop via {NODES[name]}" for name in nodes)
    return [f"route replace {vip}/32 {hops}"]


def nexthop_queries(vip: str, client: str, ports: Sequence[int], dport: int = PORT) -> list[str]:
    """`ip -batch` lines asking the router which node each of the client's flows goes to (the input path,
    with the L4 fields the multipath hash uses)."""
    return [
        f"route get {vip} from {client} iif eth0 ipproto tcp sport {port} dport {dport}" for port in ports
    ]


def nexthops_of(output: str) -> list[str | None]:
    """The `via` address of each answer of `nexthop_queries`, in order."""
    found: list[str | None] = []
    for line in output.splitlines():
        if not line or line[0].isspace():
            continue  # the continuation lines of an answer
        words = line.split()
        found.append(words[words.index("via") + 1] if "via" in words else None)
    return found


# --- backends and clients ---------------------------------------------------------------------------------


async def serve_names(name: str, port: int, ready: Callable[[], None] | None = None) -> None:
    """A TCP server answering every line with `name`, until cancelled."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while line := await reader.readline():
                del line
                writer.write(name.encode() + b"\n")
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "0.0.0.0", port, backlog=1024, reuse_address=True)
    if ready is not None:
        ready()
    async with server:
        await server.serve_forever()


def name_server(name: str, port: int) -> None:
    """`serve_names` as a process (spawned in a backend namespace); prints `ready`."""
    asyncio.run(serve_names(name, port, lambda: print("ready", flush=True)))


@dataclass
class Flow:
    """One long-lived connection: its source port, the backend that first answered it, and the phase in
    which it broke (reset, closed, or no answer within `ANSWER_TIMEOUT`) or was first answered by another
    backend (None: it did not)."""

    port: int
    backend: str
    answers: int = 0
    broken: int | None = None
    error: str | None = None
    moved: int | None = None


async def hold_flows(
    vip: str,
    port: int,
    count: int,
    interval: float,
    phase: Callable[[], int],
    stop: asyncio.Event,
    ready: Callable[[list[int]], None],
    timeout: float = ANSWER_TIMEOUT,
) -> list[Flow]:
    """Opens `count` connections to `vip`, then sends a line on each every `interval` (jittered) and checks
    the answer until `stop` is set; `ready` gets the source ports once every connection was answered. A
    connection without an answer for `timeout` seconds is broken."""
    streams: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    flows: list[Flow] = []
    for _ in range(count):
        reader, writer = await asyncio.wait_for(asyncio.open_connection(vip, port), timeout)
        writer.write(b"hello\n")
        answer = await asyncio.wait_for(reader.readline(), timeout)
        flows.append(Flow(writer.get_extra_info("sockname")[1], answer.decode().strip()))
        streams.append((reader, writer))

    async def keep(flow: Flow, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(random.uniform(0, interval))
        while not stop.is_set():
            try:
                writer.write(b"hello\n")
                await writer.drain()
                line = await asyncio.wait_for(reader.readline(), timeout)
                if not line:
                    raise ConnectionResetError("closed by the peer")
            except (OSError, TimeoutError) as error:
                flow.broken, flow.error = phase(), type(error).__name__
                return
            flow.answers += 1
            if line.decode().strip() != flow.backend and flow.moved is None:
                flow.moved = phase()
            await asyncio.sleep(interval * random.uniform(0.8, 1.2))

    ready([flow.port for flow in flows])
    await asyncio.gather(*(keep(flow, *stream) for flow, stream in zip(flows, streams, strict=True)))
    for _, writer in streams:
        writer.close()
    return flows


def long_lived_clients(vip: str, port: int, count: int, interval: float) -> None:
    """`hold_flows` as a process (spawned in the client namespace): prints `ready PORTS` (JSON), takes the
    next phase on each SIGUSR1, and on SIGTERM prints `result FLOWS` (JSON) and exits."""

    async def main() -> list[Flow]:
        loop = asyncio.get_running_loop()
        current = 0
        stop = asyncio.Event()

        def advance() -> None:
            nonlocal current
            current += 1

        loop.add_signal_handler(signal.SIGUSR1, advance)
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        return await hold_flows(
            vip,
            port,
            count,
            interval,
            lambda: current,
            stop,
            lambda ports: print("ready " + json.dumps(ports), flush=True),
        )

    flows = asyncio.run(main())
    print("result " + json.dumps([asdict(flow) for flow in flows]), flush=True)


# --- what a run found ---------------------------------------------------------------------------------------


def summary(flows: Sequence[Mapping[str, Any]], paths: Sequence[Sequence[str | None]]) -> dict[str, Any]:
    """Per phase after the first: flows the router moved to another node, flows broken (and of those, the
    ones the router had not moved), flows answered by another backend, and the share of all flows
    disturbed (broken or moved to another backend) in %. `paths` is each phase's node per flow."""
    total = len(flows)
    phases: dict[str, Any] = {}
    for index in range(1, len(paths)):
        changed = [a != b for a, b in zip(paths[index - 1], paths[index], strict=True)]
        broken = sum(1 for flow in flows if flow["broken"] == index)
        other_backend = sum(1 for flow in flows if flow["moved"] == index and flow["broken"] != index)
        phases[PHASE_NAMES[index]] = {
            "moved_by_router": sum(changed),
            "broken": broken,
            "broken_unmoved": sum(
                1 for flow, moved in zip(flows, changed, strict=True) if flow["broken"] == index and not moved
            ),
            "other_backend": other_backend,
            "disturbed_percent": round(100.0 * (broken + other_backend) / max(total, 1), 1),
        }
    return {
        "flows": total,
        "broken_before": sum(1 for flow in flows if flow["broken"] == 0),
        "phases": phases,
        "errors": sorted({str(flow["error"]) for flow in flows if flow["error"]}),
        "answers": sum(int(flow["answers"]) for flow in flows),
    }


def table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """The figures of several runs (architecture → `summary`) as a text table."""
    lines = [
        f"{'run':<24} {'phase':<13} {'moved by router':>15} {'reset':>6} {'(unmoved)':>9} {'other backend':>13} "
        f"{'disturbed':>9}"
    ]
    for run, found in results.items():
        for phase, figures in found["phases"].items():
            lines.append(
                f"{run:<24} {phase:<13} {figures['moved_by_router']:>11}/{found['flows']:<3} "
                f"{figures['broken']:>6} {figures['broken_unmoved']:>9} {figures['other_backend']:>13} "
                f"{figures['disturbed_percent']:>8}%"
            )
    return "\n".join(lines)
