"""The speaker's soak: no VIP may move while every speaker is alive and healthy, on a loaded machine.

    .venv/bin/python -m bench.announce --soak 600 [--soak-vips 50] [--soak-workers 4] [--soak-rate 200]

Three speakers on the network-namespace LAN (tests/kernel/speaker_lan.py) share `--soak-vips` VIPs, each
eligible on every node and on every node's loopback. For `--soak` seconds, while nothing is done to them:

- load: `--soak-workers` processes spinning at normal priority (round robin over the node namespaces, so
  each shares the node's CPU with its speaker), each ending by itself at the soak's deadline;
- traffic: the client sends `--soak-rate` UDP requests a second, round robin over every VIP; a UDP echo
  server in each node namespace answers with its node's name, so every answer says which node the
  client's kernel sent the VIP's packets to. A request unanswered within 1 s is lost.

A move is any change of the node behind a VIP; all of them are false takeovers, since no speaker stops.
They are counted four independent ways: the answering node per VIP (the echo), the client kernel's
neighbour cache (`ip neigh`, read every second), every ARP frame the client sees with a VIP as sender
(`watch_arp`: replies and gratuitous ARP, the MAC per VIP), and the speakers' own logs (`announcing`,
`withdrawing`, peers declared dead). Printed with the duration, the load average, the lost requests and
the longest heartbeat gap and event-loop stall each speaker logged.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import selectors
import socket
import struct
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from layerlb_speaker import announcement

from tests.kernel import speaker_lan
from tests.kernel.speaker_lan import NODES, wait_until

SOAK_BASE = ipaddress.IPv4Address("10.0.50.109")  # .110 onwards: on the LAN's /24, clear of the tests' VIPs
ECHO_PORT = 9000
LOST_AFTER = 1.0
_REQUEST = struct.Struct("!QI")  # sequence number, VIP index


def soak_vips(count: int) -> list[str]:
    return [str(SOAK_BASE + n) for n in range(1, count + 1)]


def spin(deadline: float) -> None:
    """Runs in a node: one core's worth of busy work at normal priority until `deadline` (wall clock)."""
    print("spinning", flush=True)
    count = 0
    while time.time() < deadline:
        for _ in range(10_000):
            count += 1


def echo(node: str, port: int, deadline: float) -> None:
    """Runs in a node: answers each UDP datagram on `port` with the node's name after it, until `deadline`."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", port))
    sock.settimeout(0.5)
    name = node.encode()
    print("echoing", flush=True)
    while time.time() < deadline:
        try:
            data, source = sock.recvfrom(2048)
        except TimeoutError:
            continue
        sock.sendto(data[: _REQUEST.size] + name, source)


def requests(vips: list[str], port: int, rate: float, seconds: float, out: str) -> None:
    """Runs in the client: `rate` UDP requests a second round robin over `vips` for `seconds`, then waits
    `LOST_AFTER` for the last answers. Writes to `out` (JSON): sent, answered, lost, late, the slowest
    answer, and every change of the node answering a VIP (time, VIP, from, to). Prints "requesting" at
    the start and "done" at the end."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    selector = selectors.DefaultSelector()
    selector.register(sock, selectors.EVENT_READ)
    pending: dict[int, float] = {}
    answered = late = 0
    slowest = 0.0
    holder: dict[str, str] = {}
    moves: list[tuple[float, str, str, str]] = []
    print("requesting", flush=True)
    start = time.monotonic()
    end = start + seconds
    sequence = 0
    step = 1.0 / rate
    while True:
        now = time.monotonic()
        if now >= end + LOST_AFTER:
            break
        if now < end and start + sequence * step <= now:
            index = sequence % len(vips)
            try:
                sock.sendto(_REQUEST.pack(sequence, index), (vips[index], port))
                pending[sequence] = now
            except BlockingIOError:
                pass  # counted as lost: never answered
            sequence += 1
            continue
        wait = min(start + sequence * step, end + LOST_AFTER) - now
        for _ in selector.select(max(0.0, wait)):
            while True:
                try:
                    data = sock.recv(2048)
                except BlockingIOError:
                    break
                if len(data) <= _REQUEST.size:
                    continue
                number, index = _REQUEST.unpack_from(data)
                node = data[_REQUEST.size :].decode()
                sent = pending.pop(number, None)
                received = time.monotonic()
                if sent is None:
                    continue
                if received - sent > LOST_AFTER:
                    late += 1
                    continue
                answered += 1
                slowest = max(slowest, received - sent)
                vip = vips[index]
                if holder.get(vip, node) != node:
                    moves.append((time.time(), vip, holder[vip], node))
                holder[vip] = node
    result = {
        "sent": sequence,
        "answered": answered,
        "lost": sequence - answered - late,
        "late": late,
        "slowest": slowest,
        "holders": holder,
        "moves": moves,
    }
    Path(out).write_text(json.dumps(result), encoding="utf-8")
    print("done", flush=True)


@dataclass
class Figures:
    """What a soak measured; `moves` per source of evidence."""

    seconds: float
    load: list[float] = field(default_factory=list)  # the 1-minute load average, sampled every second
    busy: float = 0.0  # share of both cores busy over the soak (/proc/stat)
    moves: dict[str, int] = field(default_factory=dict)
    details: list[str] = field(default_factory=list)
    sent: int = 0
    lost: int = 0
    late: int = 0
    slowest: float = 0.0
    gaps: dict[str, float] = field(default_factory=dict)  # speaker → longest heartbeat gap it logged
    stalls: dict[str, float] = field(default_factory=dict)  # speaker → longest event-loop stall it logged
    wrong: list[str] = field(default_factory=list)  # VIPs answered by a node other than their holder


def _cpu() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs."""
    values = [int(each) for each in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def _neighbours(network: speaker_lan.Lan) -> dict[str, str]:
    output = network.client.ip("-j", "neigh", "show", "dev", "eth0")
    return {entry["dst"]: entry["lladdr"] for entry in json.loads(output or "[]") if "lladdr" in entry}


def _count_changes(sequence: Iterable[tuple[str, str]]) -> list[tuple[str, str, str]]:
    """(key, value) pairs in order → each (key, before, after) where a key's value changed."""
    last: dict[str, str] = {}
    changes = []
    for key, value in sequence:
        if key in last and last[key] != value:
            changes.append((key, last[key], value))
        last[key] = value
    return changes


_GAP = re.compile(r"heartbeat gap: (\S+) ([\d.]+) s")
_STALL = re.compile(r"loop stalled ([\d.]+) s")


def speaker_log_figures(log: str, since: float) -> tuple[dict[str, int], float, float, list[str]]:
    """From one speaker's log lines stamped at or after `since` (wall clock; start-up claims come before):
    counts of takeovers, withdrawals and peers declared dead or left; the longest heartbeat gap and loop
    stall it logged; the lines counted."""
    counts = {"announcing": 0, "withdrawing": 0, "peer dead or left": 0}
    counted = []
    for line in log.splitlines():
        try:
            stamp = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
        except ValueError:
            continue
        if stamp < since:
            continue
        for word, key in (
            ("announcing ", "announcing"),
            ("withdrawing ", "withdrawing"),
            (" left", "peer dead or left"),
            ("s without a heartbeat", "peer dead or left"),
        ):
            if word in line:
                counts[key] += 1
                counted.append(line)
    gaps = [float(match.group(2)) for match in _GAP.finditer(log)]
    stalls = [float(match.group(1)) for match in _STALL.finditer(log)]
    return counts, max(gaps, default=0.0), max(stalls, default=0.0), counted


def soak(
    seconds: float, count: int = 50, workers: int = 4, rate: float = 200.0, speaker_args: tuple[str, ...] = ()
) -> Figures:
    vips = soak_vips(count)
    nodes = list(NODES)
    expected = {vip: announcement.rank(ipaddress.ip_address(vip), nodes)[0] for vip in vips}
    with tempfile.TemporaryDirectory() as folder, speaker_lan.lan(Path(folder), vips) as network:
        network.configure([{"address": vip, "nodes": nodes} for vip in vips])
        network.start_all(*speaker_args)
        macs = network.macs
        wait_until(
            "every VIP answered by its holder",
            lambda: all(network.arping(vip, 1) == {macs[expected[vip]]} for vip in vips[:3]),
            timeout=30,
        )
        arp_log = str(Path(folder) / "arp.jsonl")
        watcher = network.client.spawn(speaker_lan.watch_arp, arp_log, "eth0")
        watcher.wait_for_line("watching")
        deadline = time.time() + seconds + 5
        for node in nodes:
            network.nodes[node].spawn(echo, node, ECHO_PORT, deadline + LOST_AFTER + 5).wait_for_line(
                "echoing"
            )
        spinners = [
            network.nodes[nodes[n % len(nodes)]].spawn(spin, time.time() + seconds) for n in range(workers)
        ]
        for each in spinners:
            each.wait_for_line("spinning")
        out = str(Path(folder) / "requests.json")
        client = network.client.spawn(requests, vips, ECHO_PORT, rate, seconds, out)
        client.wait_for_line("requesting")
        figures = Figures(seconds)
        since = time.time()
        cpu_before = _cpu()
        samples: list[tuple[str, str]] = []
        started = time.monotonic()
        while time.monotonic() - started < seconds:
            time.sleep(1.0)
            figures.load.append(os.getloadavg()[0])
            samples.extend(sorted((vip, mac) for vip, mac in _neighbours(network).items() if vip in expected))
            for node, speaker in network.speakers.items():
                if speaker.process.poll() is not None:
                    raise AssertionError(f"speaker {node} exited during the soak: {speaker.stderr()}")
        cpu_after = _cpu()
        figures.busy = (cpu_after[0] - cpu_before[0]) / max(1, cpu_after[1] - cpu_before[1])
        client.wait_for_line("done", timeout=30)
        result: dict[str, Any] = json.loads(Path(out).read_text(encoding="utf-8"))
        for each in spinners:
            each.process.wait(30)
        logs = {node: speaker.stderr() for node, speaker in network.speakers.items()}
        arp_frames = [json.loads(line) for line in Path(arp_log).read_text(encoding="utf-8").splitlines()]

    figures.sent, figures.lost, figures.late = result["sent"], result["lost"], result["late"]
    figures.slowest = result["slowest"]
    figures.moves["answering node"] = len(result["moves"])
    figures.details += [f"answer: {vip} {a} -> {b} at {t:.3f}" for t, vip, a, b in result["moves"]]
    by_mac = {mac: node for node, mac in macs.items()}
    figures.wrong = sorted(vip for vip, node in result["holders"].items() if node != expected[vip])
    cache_changes = _count_changes(samples)
    figures.moves["neighbour cache"] = len(cache_changes)
    figures.details += [f"cache: {vip} {by_mac.get(a)} -> {by_mac.get(b)}" for vip, a, b in cache_changes]
    arp_changes = _count_changes(
        (frame["ip"], frame["mac"]) for frame in arp_frames if frame["ip"] in expected
    )
    figures.moves["ARP seen by the client"] = len(arp_changes)
    figures.details += [f"arp: {vip} {by_mac.get(a)} -> {by_mac.get(b)}" for vip, a, b in arp_changes]
    strangers = {f["ip"] for f in arp_frames if f["ip"] in expected and f["mac"] != macs[expected[f["ip"]]]}
    figures.wrong = sorted(set(figures.wrong) | strangers)
    totals = {"announcing": 0, "withdrawing": 0, "peer dead or left": 0}
    for node, log in logs.items():
        counts, gap, stall, lines = speaker_log_figures(log, since)
        for key, value in counts.items():
            totals[key] += value
        figures.gaps[node], figures.stalls[node] = gap, stall
        figures.details += [f"{node}: {line}" for line in lines]
    figures.moves["speakers' logs (takeovers)"] = totals["announcing"]
    figures.moves["speakers' logs (withdrawals)"] = totals["withdrawing"]
    figures.moves["speakers' logs (peers declared dead)"] = totals["peer dead or left"]
    return figures


def report(figures: Figures, count: int, workers: int, rate: float) -> None:
    load = figures.load or [0.0]
    print(
        f"soak: {figures.seconds:.0f} s, 3 speakers, {count} VIPs, {workers} spinning workers, "
        f"{rate:.0f} UDP requests/s; load average (1 min) mean {sum(load) / len(load):.2f}, "
        f"max {max(load):.2f}; both cores {figures.busy * 100:.0f} % busy"
    )
    print("soak: moves while healthy: " + ", ".join(f"{key} {value}" for key, value in figures.moves.items()))
    print(
        f"soak: requests {figures.sent}, lost {figures.lost}, late (>{LOST_AFTER:.0f} s) {figures.late}, "
        f"slowest answer {figures.slowest * 1000:.0f} ms; VIPs on an unexpected node: {len(figures.wrong)}"
    )
    print(
        "soak: longest heartbeat gap logged: "
        + ", ".join(f"{node} {gap * 1000:.0f} ms" for node, gap in figures.gaps.items())
        + "; longest event-loop stall logged: "
        + ", ".join(f"{node} {stall * 1000:.0f} ms" for node, stall in figures.stalls.items())
    )
    for line in figures.details[:40]:
        print("soak:   " + line)


def run(seconds: float, count: int, workers: int, rate: float, speaker_args: tuple[str, ...] = ()) -> bool:
    """Runs the soak and prints its figures; True when nothing moved and nothing was lost."""
    figures = soak(seconds, count, workers, rate, speaker_args)
    report(figures, count, workers, rate)
    return not any(figures.moves.values()) and figures.lost == 0 and not figures.wrong
