"""1,000 VIPs over BGP: how long from the speakers' start until the router (FRR) holds all of them in its
RIB and FIB, and the speaker's and its BIRD's RSS then (issue 17's target: ≤ 10 s).

    .venv/bin/python -m bench.bgp [--runs 3] [--vips 1000] [--speakers 1]    (root; make bench-bgp)

The lab is `tests/kernel/bgp_lab.py`: FRR's zebra, bgpd and bfdd in a router namespace, the real `layerlb
speaker` (static config, BIRD 2 under it, BFD on) in node namespaces. Each run builds a fresh lab, writes
the nodes' config with `--vips` VIPs eligible on the first `--speakers` nodes, starts those speakers and
polls `vtysh -c 'show ip route summary json'` every 50 ms until zebra has every prefix from bgpd in the FIB
and bgpd has received every prefix from each speaker (`show bgp ipv4 unicast summary json`, pfxRcd).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.kernel.bgp_lab import NODE_ASN, NODES, PASSWORD, ROUTER, ROUTER_ASN, BgpLab, bgp_lab

TARGET_SECONDS = 10.0


def addresses(count: int) -> list[str]:
    """`count` distinct IPv4 VIPs (10.100.0.1 onwards, 250 per /24)."""
    return [f"10.100.{index // 250}.{index % 250 + 1}" for index in range(count)]


def bgp_routes(lab: BgpLab) -> tuple[int, int]:
    """The router's BGP routes (RIB, FIB) from zebra's `show ip route summary json`."""
    routes = [route for route in lab.vtysh("show ip route summary json").get("routes", [])]
    bgp = [route for route in routes if route.get("type") in ("ebgp", "ibgp", "bgp")]
    return sum(int(route.get("rib", 0)) for route in bgp), sum(int(route.get("fib", 0)) for route in bgp)


def received(lab: BgpLab) -> dict[str, int]:
    """Prefixes bgpd has received from each node (`show bgp ipv4 unicast summary json`, pfxRcd)."""
    peers = lab.vtysh("show bgp ipv4 unicast summary json").get("peers", {})
    return {address: int(peer.get("pfxRcd", 0)) for address, peer in peers.items()}


def rss_mb(pid: int) -> tuple[float, float]:
    """The RSS of the speaker `pid` and of its children (BIRD), in MB."""

    def one(process: int) -> float:
        for line in Path(f"/proc/{process}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return round(one(pid), 1), round(sum(one(int(child)) for child in children), 1)


def learn(lab: BgpLab, count: int, speakers: int, timeout: float = 60.0) -> dict[str, Any]:
    """Starts `speakers` speakers advertising `count` VIPs; the seconds until the router's FIB holds them all
    and bgpd has each from every speaker (`learned`), the RIB's count then, and each speaker's RSS and its BIRD's (MB)."""
    nodes = list(NODES)[:speakers]
    vips = dict.fromkeys(addresses(count), nodes)
    peer = {"name": "tor", "peerAddress": ROUTER, "peerASN": ROUTER_ASN, "localASN": NODE_ASN}
    peer |= {"holdTime": 3, "password": PASSWORD, "bfd": {}}  # as the lab's tests: BFD 300 ms x 3
    lab.configure(
        {
            "vips": [{"address": address, "nodes": eligible} for address, eligible in vips.items()],
            "bgp": {"peers": [peer], "advertisements": [{"name": "all"}]},
        }
    )
    started = time.monotonic()
    for node in nodes:
        lab.start(node)
    rib = fib = 0
    from_each: dict[str, int] = {}
    while time.monotonic() - started < timeout:
        rib, fib = bgp_routes(lab)
        if fib >= count:
            from_each = received(lab)
            if all(from_each.get(NODES[node], 0) >= count for node in nodes):
                break
        time.sleep(0.05)
    learned = time.monotonic() - started
    if fib < count or any(from_each.get(NODES[node], 0) < count for node in nodes):
        raise AssertionError(
            f"after {learned:.1f} s the router's FIB has {fib} of {count}, from each {from_each}"
        )
    rss = {node: rss_mb(lab.speakers[node].pid) for node in nodes}
    return {"learned": round(learned, 2), "rib": rib, "fib": fib, "rss_mb": rss}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--vips", type=int, default=1000)
    parser.add_argument("--speakers", type=int, default=1, choices=range(1, len(NODES) + 1))
    options = parser.parse_args(argv)
    results = []
    for index in range(options.runs):
        with tempfile.TemporaryDirectory(prefix="bench-bgp-") as folder, bgp_lab(Path(folder)) as lab:
            found = learn(lab, options.vips, options.speakers)
        results.append(found)
        print(f"run {index + 1}: {found}", flush=True)
    times = [found["learned"] for found in results]
    speaker = [pair[0] for found in results for pair in found["rss_mb"].values()]
    bird = [pair[1] for found in results for pair in found["rss_mb"].values()]
    print(
        f"{options.vips} VIPs from {options.speakers} speaker(s) in the router's FIB: p50 "
        f"{statistics.median(times):.2f} s, max {max(times):.2f} s (target ≤ {TARGET_SECONDS:.0f} s); "
        f"RSS max: speaker {max(speaker):.1f} MB, its BIRD {max(bird):.1f} MB"
    )
    return 0 if max(times) <= TARGET_SECONDS else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
