"""The speaker at scale and under failover, on a network-namespace LAN (tests/kernel/speaker_lan.py).

    .venv/bin/python -m bench.announce [--vips 1000] [--trials 20]    (root)
    .venv/bin/python -m bench.announce --soak 600                      (root; the soak only)

1. Scale: one speaker with N VIPs (default 1,000) eligible on its node. A prober in the client namespace
   sends an ARP request for every VIP every 200 ms (its own framing, not the speaker's) until each is
   answered; printed: the time from the speaker's start to the last VIP answered, and the speaker's RSS
   (VmRSS and VmHWM) once it answers everything. Targets: ≤ 10 s, ≤ 100 MB.
2. Failover: three speakers and one VIP; `--trials` times the holder's speaker is SIGKILLed, and as many
   times the holder's link is cut; printed: p50/p95 of the time until the client's kernel neighbour
   cache points at the next node (moved by the gratuitous ARP), and how many of the client's pings
   (one every 20 ms, each waiting 50 ms) went unanswered during each takeover. Target: p95 ≤ 1 s.
3. Soak (`--soak SECONDS`, alone): three healthy speakers sharing 50 VIPs on a machine kept busy, with
   requests to every VIP; every move of a VIP is a false takeover (bench/announce_soak.py). Target: none.
"""

from __future__ import annotations

import argparse
import ipaddress
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from layerlb_speaker import announcement

from bench import announce_soak
from tests.kernel import speaker_lan
from tests.kernel.speaker_lan import NODES, wait_until

VIP_BASE = ipaddress.IPv4Address("10.0.52.0")


def scale_vips(count: int) -> list[str]:
    return [str(VIP_BASE + n) for n in range(1, count + 1)]


def rss(pid: int) -> tuple[float, float]:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def scale(count: int) -> None:
    vips = scale_vips(count)
    with tempfile.TemporaryDirectory() as folder, speaker_lan.lan(Path(folder), nodes=1) as network:
        network.client.ip("route", "add", "10.0.52.0/22", "dev", "eth0")  # the VIPs' subnet is on the LAN
        network.configure([{"address": vip, "nodes": ["node1"]} for vip in vips])
        prober = network.client.spawn(speaker_lan.probe_all, "eth0", vips, time.time() + 60)
        prober.wait_for_line("probing")
        started = time.time()
        speaker = network.start("node1")
        _, last_text, answered_text = prober.wait_for_line("answered", timeout=90).split()
        last, answered = float(last_text), int(answered_text)
        high = rss(speaker.pid)
        print(f"scale: {answered}/{count} VIPs answered {last - started:.2f} s after the speaker's start")
        print(f"scale: speaker RSS {high[0]:.1f} MB now, {high[1]:.1f} MB peak")


def percentiles(samples: list[float]) -> str:
    ordered = sorted(samples)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return f"p50 {statistics.median(ordered) * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms, max {ordered[-1] * 1000:.0f} ms"


def failover(trials: int) -> None:
    vip = "10.0.50.200"
    with tempfile.TemporaryDirectory() as folder, speaker_lan.lan(Path(folder), [vip]) as network:
        network.configure([{"address": vip, "nodes": list(NODES)}])
        network.start_all()
        # The VIP stays where it moved when its old holder returns (incumbency): each trial takes it from
        # whoever holds it now, to the next node by weight among the others.
        holder = announcement.rank(ipaddress.ip_address(vip), NODES)[0]
        for how in ("kill", "cut"):
            times, lost = [], []
            for _ in range(trials):
                first = holder
                second = announcement.rank(ipaddress.ip_address(vip), [n for n in NODES if n != first])[0]
                wait_until(
                    "the holder answers",
                    lambda first=first: network.ping(vip) and network.neighbour(vip) == network.macs[first],  # type: ignore[misc]
                    timeout=30,
                )
                pinger = subprocess.Popen(
                    [
                        "ip",
                        "netns",
                        "exec",
                        network.client.name or "",
                        "ping",
                        "-n",
                        "-i",
                        "0.02",
                        "-W",
                        "0.05",
                        "-w",
                        "4",
                        vip,
                    ],
                    stdout=subprocess.PIPE,
                    text=True,
                )
                time.sleep(0.3)
                moment = time.monotonic()
                if how == "kill":
                    network.kill(first)
                else:
                    network.bridge.ip("link", "set", network.bridge_port(first), "down")
                wait_until(
                    "cache moved",
                    lambda second=second: network.neighbour(vip) == network.macs[second],  # type: ignore[misc]
                    timeout=10,
                    every=0.01,
                )
                times.append(time.monotonic() - moment)
                output, _ = pinger.communicate(timeout=10)
                counts = re.search(r"(\d+) packets transmitted, (\d+) received", output)
                assert counts, output
                sent, received = int(counts.group(1)), int(counts.group(2))
                lost.append(sent - received)
                if how == "kill":
                    network.start(first).wait_for_line("joined", timeout=30)
                else:
                    network.bridge.ip("link", "set", network.bridge_port(first), "up")
                holder = second
            print(
                f"failover ({'speaker SIGKILL' if how == 'kill' else 'link cut'}, {trials} trials): {percentiles(times)}; pings lost per takeover (20 ms apart): median {statistics.median(lost):.0f}, max {max(lost)}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--vips", type=int, default=1000)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--soak", type=float, default=0, metavar="SECONDS", help="run only the soak")
    parser.add_argument("--soak-vips", type=int, default=50)
    parser.add_argument("--soak-workers", type=int, default=4, help="busy processes during the soak")
    parser.add_argument("--soak-rate", type=float, default=200, help="UDP requests per second")
    parser.add_argument(
        "--soak-speaker-args", default="", help='extra speaker options, e.g. "--dead-after 0.3"'
    )
    args = parser.parse_args()
    if args.soak:
        extra = tuple(args.soak_speaker_args.split())
        healthy = announce_soak.run(args.soak, args.soak_vips, args.soak_workers, args.soak_rate, extra)
        sys.exit(0 if healthy else 1)
    scale(args.vips)
    if args.trials:
        failover(args.trials)


if __name__ == "__main__":
    main()
