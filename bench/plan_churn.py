"""The long Plan churn (#18, point 2): `tests/chaos/test_plan_churn.py`'s scenario for 10,000 updates.

The same data plane process, Plan, backends and wrk clients as the test (endpoints, a route and the HTTPS
certificate change on every update, confirmed by the served generation before the next); the RSS is read
every `--every` updates, so a slow leak that 1,000 updates hide shows as a slope. Prints a table and the
failed-request counts; exits 1 when a request failed or the RSS grew more than `--max-growth` MiB from the
first checkpoint to the last.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from layerlb import plan
from tests.chaos.dataplane_process import DataplaneProcess, Wrk
from tests.chaos.test_plan_churn import VIP, churned_plan
from tests.dataplane.conftest import Backend, LoopThread
from tests.dataplane.helpers_runtime import free_port, make_certificate

MIB = 1024 * 1024


def run(updates: int, every: int, max_growth: float) -> int:
    """Churn `updates` Plans under load; 0 when nothing failed and memory stayed within `max_growth` MiB."""
    loop_thread = LoopThread()
    with tempfile.TemporaryDirectory(prefix="plan-churn-") as folder:
        tmp = Path(folder)
        backends = [Backend(loop_thread, f"b{index}") for index in range(4)]
        ports = [backend.port for backend in backends]
        certificates = [make_certificate(tmp, f"cert{index}", []) for index in range(3)]
        http_port, https_port = free_port(VIP), free_port(VIP)

        def plans(generation: int) -> list[plan.Plan]:
            return [churned_plan(generation, http_port, https_port, ports, certificates)]

        dataplane = DataplaneProcess(tmp, plans(1))
        fresh = Wrk(tmp, f"http://{VIP}:{http_port}/", connections=2, delay_ms=20, close=True)
        kept_tls = Wrk(tmp, f"https://{VIP}:{https_port}/api/items", connections=4, delay_ms=20)
        began = time.monotonic()
        rows: list[tuple[int, float, float]] = []
        for generation in range(2, updates + 2):
            dataplane.reload(plans(generation), generation)
            if (generation - 1) % every == 0:
                rows.append((generation - 1, time.monotonic() - began, dataplane.rss() / MIB))
                print(
                    f"{rows[-1][0]:>7} updates {rows[-1][1]:>7.1f} s  RSS {rows[-1][2]:6.1f} MiB", flush=True
                )
        served, encrypted = fresh.finish(), kept_tls.finish()
        code = dataplane.stop()
        for backend in backends:
            backend.close()
    loop_thread.stop()
    took = rows[-1][1] if rows else time.monotonic() - began
    growth = rows[-1][2] - rows[0][2] if rows else 0.0
    print(
        f"{updates} updates in {took:.0f} s ({updates / took:.0f}/s); HTTP new connections {served.requests} "
        f"requests, {served.failed} failed {served.errors}; HTTPS kept alive {encrypted.requests} requests, "
        f"{encrypted.failed} failed {encrypted.errors}; RSS {rows[0][2]:.1f} -> {rows[-1][2]:.1f} MiB "
        f"({growth:+.2f} MiB from update {rows[0][0]} to {rows[-1][0]}); exit {code}"
    )
    return 0 if served.failed == encrypted.failed == code == 0 and growth <= max_growth else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--updates", type=int, default=10_000)
    parser.add_argument("--every", type=int, default=1_000, help="read the RSS every N updates")
    parser.add_argument("--max-growth", type=float, default=6.0, help="MiB, first checkpoint to last")
    args = parser.parse_args()
    return run(args.updates, args.every, args.max_growth)


if __name__ == "__main__":
    sys.exit(main())
