"""The data plane's entry point: serve a Plan source on uvloop, in this process or under worker processes.

`layerlb serve` and `layerlb dataplane` end here; one worker runs a `runtime.Dataplane` in this process,
more run under a `workers.Supervisor`.
"""

from __future__ import annotations

import asyncio

from layerlb_dataplane.control import config, runtime
from layerlb_dataplane.control.workers import Supervisor
from layerlb_dataplane.kernel import driver


def run(
    source: config.PlanSource,
    *,
    workers: int = 1,
    admin_address: tuple[str, int] | None = None,
    drain_timeout: float = runtime.DRAIN_SECONDS,
) -> int:
    """Serve `source` on uvloop until stopped: in this process, or with `workers` worker processes."""
    import uvloop

    async def main() -> int:
        if workers > 1:
            supervisor = Supervisor(source, workers, admin_address=admin_address, drain_timeout=drain_timeout)
            return await supervisor.run()
        dataplane = runtime.Dataplane(
            source, engines=driver.default_engines(), admin_address=admin_address, drain_timeout=drain_timeout
        )
        return await dataplane.run()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main())
