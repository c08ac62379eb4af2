"""Health: the consecutive-result state machine, passive ejection, and the asyncio prober on real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Collection, Coroutine, Sequence
from typing import Any

import pytest
from layerlb_dataplane.control import probes
from layerlb_dataplane.core import balancing, health, state, targets

from layerlb import plan
from layerlb.api import Algorithm, Architecture, HealthProtocol, Mode, Protocol


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def check(
    protocol: HealthProtocol = HealthProtocol.HTTP,
    *,
    healthy: int = 2,
    unhealthy: int = 3,
    port: int | None = None,
    path: str = "/healthz",
) -> plan.HealthCheck:
    return plan.HealthCheck(
        protocol=protocol,
        path=path,
        port=port,
        interval_seconds=1,
        timeout_seconds=1,
        healthy_threshold=healthy,
        unhealthy_threshold=unhealthy,
    )


def record_all(state_: health.HealthState, results: str) -> list[bool]:
    """Feed probe results written as `+` (pass) and `-` (fail); the `changed` answers."""
    return [state_.record(result == "+") for result in results]


# --- active checks -----------------------------------------------------------------------------------


def test_a_new_target_with_a_check_starts_healthy() -> None:
    assert health.HealthState(check()).healthy


def test_down_after_unhealthy_threshold_consecutive_failures() -> None:
    state_ = health.HealthState(check(unhealthy=3))
    assert record_all(state_, "--+--") == [False] * 5
    assert state_.healthy
    assert record_all(state_, "-") == [True]
    assert not state_.healthy
    assert state_.state == "unhealthy"
    assert record_all(state_, "--") == [False, False]


def test_up_after_healthy_threshold_consecutive_successes() -> None:
    state_ = health.HealthState(check(healthy=2, unhealthy=1))
    record_all(state_, "-")
    assert record_all(state_, "+-+") == [False] * 3
    assert not state_.healthy
    assert record_all(state_, "+") == [True]
    assert state_.healthy


def test_without_a_check_probe_results_are_ignored() -> None:
    state_ = health.HealthState()
    assert record_all(state_, "-----") == [False] * 5
    assert state_.healthy


def test_configure_keeps_the_verdict_for_the_same_check_and_clears_it_without_one() -> None:
    state_ = health.HealthState(check(unhealthy=1))
    record_all(state_, "-")
    state_.configure(check(unhealthy=1))
    assert not state_.healthy
    state_.configure(check(unhealthy=1, healthy=1))  # changed thresholds: verdict kept, runs restart
    assert not state_.healthy
    assert record_all(state_, "+") == [True]
    record_all(state_, "-")
    state_.configure(None)
    assert state_.healthy


# --- passive ejection --------------------------------------------------------------------------------


def ejected_state(clock: FakeClock) -> health.HealthState:
    state_ = health.HealthState(clock=clock)
    for _ in range(state_.passive_threshold):
        state_.record_passive(False)
    return state_


def test_five_consecutive_passive_failures_eject_for_thirty_seconds() -> None:
    clock = FakeClock()
    state_ = health.HealthState(clock=clock)
    assert [state_.record_passive(False) for _ in range(4)] == [False] * 4
    assert state_.record_passive(True) is False  # a success restarts the count
    assert [state_.record_passive(False) for _ in range(4)] == [False] * 4
    assert state_.healthy
    assert state_.record_passive(False) is True
    assert not state_.healthy
    assert state_.state == "ejected"
    assert state_.ejected_until == clock.now + 30
    clock.now += 29.9
    assert not state_.healthy
    clock.now += 0.1
    assert state_.healthy
    assert state_.ejected_until == 0.0


def test_repeated_ejections_double_up_to_five_minutes_and_the_backoff_decays() -> None:
    clock = FakeClock()
    state_ = health.HealthState(clock=clock)
    durations = []
    for _ in range(6):
        for _ in range(5):
            state_.record_passive(False)
        durations.append(state_.ejected_until - clock.now)
        clock.now = state_.ejected_until
    assert durations == [30, 60, 120, 240, 300, 300]
    clock.now += 300  # five quiet minutes in service
    for _ in range(5):
        state_.record_passive(False)
    assert state_.ejected_until - clock.now == 30


def test_failures_during_an_ejection_do_not_extend_it() -> None:
    clock = FakeClock()
    state_ = ejected_state(clock)
    until = state_.ejected_until
    assert [state_.record_passive(False) for _ in range(10)] == [False] * 10
    assert state_.ejected_until == until


def test_ejection_and_active_checks_are_independent() -> None:
    clock = FakeClock()
    state_ = health.HealthState(check(unhealthy=1, healthy=1), clock=clock)
    for _ in range(5):
        state_.record_passive(False)
    assert state_.record(True) is False  # a passing probe does not end the ejection
    assert not state_.healthy
    assert state_.record(False) is False  # already out of service: no change to report
    clock.now = state_.ejected_until
    assert not state_.healthy  # ejection over, but the active check says down
    assert state_.record(True) is True
    assert state_.healthy


def test_the_passive_numbers_are_constructor_defaults() -> None:
    clock = FakeClock()
    state_ = health.HealthState(passive_threshold=2, ejection_seconds=1, max_ejection_seconds=3, clock=clock)
    assert [state_.record_passive(False) for _ in range(2)] == [False, True]
    assert state_.ejected_until == clock.now + 1


def test_an_ejected_target_is_unusable_and_its_pool_stops_picking_it_at_once() -> None:
    backend = plan.Backend(
        name="app",
        algorithm=Algorithm.maglev,
        endpoints=(plan.Endpoint(address="10.0.0.1", port=80, weight=1),),
    )
    target = targets.Target("app", "10.0.0.1", 80, 1)
    pool = state.BackendPool(backend, [target])
    assert pool.pick("192.0.2.1") is target
    assert [pool.record_passive(target, False) for _ in range(5)] == [False] * 4 + [True]
    assert not target.usable
    assert pool.pick("192.0.2.1") is None


class CountingBalancer:
    """A pool's balancer that counts the `update`s it is told (a rebuild after a change of usability)."""

    def __init__(self, inner: balancing.Balancer) -> None:
        self.inner = inner
        self.updates = 0

    def pick(self, key: bytes, exclude: Collection[targets.Target] = ()) -> targets.Target | None:
        return self.inner.pick(key, exclude)

    def update(self, members: Sequence[targets.Target]) -> None:
        self.updates += 1
        self.inner.update(members)


def test_passive_results_go_to_the_pool_serving_new_traffic_and_the_ejection_ends_by_the_clock() -> None:
    """`Snapshot.record_passive`, the path both proxies feed: after a reload the new pool's balancer is the
    one rebuilt, the target is avoided until `ejection_seconds` pass, then picked again."""
    clock = FakeClock()
    backend = plan.Backend(
        name="app",
        algorithm=Algorithm.round_robin,
        endpoints=tuple(plan.Endpoint(address="127.0.0.1", port=port, weight=1) for port in (9001, 9002)),
    )
    registry = state.Registry()
    old = registry.snapshot(make_plan(8000, (backend,)))
    current = registry.snapshot(make_plan(8000, (backend,)).model_copy(update={"generation": 2}))
    old_pool, pool = old.pools["app"], current.pools["app"]
    first, second = pool.targets
    assert old_pool.targets[0] is first  # one Target, and one health, across the reload
    first.health.clock = clock
    old_pool.balancer = old_counts = CountingBalancer(old_pool.balancer)
    pool.balancer = counts = CountingBalancer(pool.balancer)

    assert [current.record_passive(first, False) for _ in range(4)] == [False] * 4
    assert current.record_passive(first, True) is False  # a success restarts the count
    assert first.health.passive_failures == 0
    assert [current.record_passive(first, False) for _ in range(5)] == [False] * 4 + [True]
    assert (first.health.state, counts.updates, old_counts.updates) == ("ejected", 1, 0)
    assert {pool.pick("192.0.2.1") for _ in range(4)} == {second}

    clock.now += health.EJECTION_SECONDS - 0.1
    assert {pool.pick("192.0.2.1") for _ in range(4)} == {second}
    clock.now += 0.1
    assert {pool.pick("192.0.2.1") for _ in range(4)} == {first, second}


def test_passive_results_for_a_backend_gone_from_the_plan_are_dropped() -> None:
    """Its targets take no new traffic (they drain), so nothing is counted against them."""
    registry = state.Registry()
    before = registry.snapshot(make_plan(8000, (make_backend("old", (9001,), None),)))
    current = registry.snapshot(
        make_plan(8000, (make_backend("new", (9002,), None),)).model_copy(update={"generation": 2})
    )
    (target,) = before.pools["old"].targets
    assert target.draining
    assert [current.record_passive(target, False) for _ in range(10)] == [False] * 10
    assert target.health.passive_failures == 0 and target.health.state == "healthy"


# --- probes on real sockets --------------------------------------------------------------------------


class Backend:
    """A loopback HTTP server whose answer the test changes: a status code, or `hang` (never answers)."""

    def __init__(self) -> None:
        self.answer: int | str = 200
        self.requests: list[bytes] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port, reuse_address=True)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            self.requests.append(await reader.readuntil(b"\r\n\r\n"))
            answer = self.answer
            if answer == "hang":
                await asyncio.sleep(30)
            elif answer == "interim":
                writer.write(
                    b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n"
                )
            elif answer == "garbage":
                writer.write(b"SSH-2.0-OpenSSH\r\n")
            else:
                writer.write(f"HTTP/1.1 {answer} X\r\nContent-Length: 0\r\n\r\n".encode())
            await writer.drain()
        writer.close()


@contextlib.asynccontextmanager
async def running_backend() -> AsyncIterator[Backend]:
    backend = Backend()
    await backend.start()
    try:
        yield backend
    finally:
        await backend.stop()


def run(coroutine: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(asyncio.wait_for(coroutine(), 20))


async def eventually(condition: Callable[[], bool], within: float) -> float:
    """Wait until `condition` holds, polling; the seconds it took. Fails after `within` seconds."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < within, f"condition not met within {within} s"
        await asyncio.sleep(0.02)
    return time.monotonic() - start


@pytest.mark.parametrize(
    ("answer", "passes"), [(200, True), (204, True), (302, True), (404, False), (503, False)]
)
def test_an_http_probe_passes_on_2xx_and_3xx_only(answer: int, passes: bool) -> None:
    async def scenario() -> None:
        async with running_backend() as backend:
            backend.answer = answer
            assert await probes.probe(check(path="/ready"), "127.0.0.1", backend.port) is passes

    run(scenario)


def test_an_http_probe_sends_get_with_host_and_connection_close() -> None:
    async def scenario() -> None:
        async with running_backend() as backend:
            assert await probes.probe(check(path="/ready?full=1"), "127.0.0.1", backend.port)
            request = backend.requests[0].decode()
            assert request.startswith("GET /ready?full=1 HTTP/1.1\r\n")
            assert f"\r\nHost: 127.0.0.1:{backend.port}\r\n" in request
            assert "\r\nConnection: close\r\n" in request

    run(scenario)


def test_an_http_probe_skips_interim_responses_and_fails_on_garbage_silence_or_refusal() -> None:
    async def scenario() -> None:
        async with running_backend() as backend:
            backend.answer = "interim"
            assert await probes.probe(check(), "127.0.0.1", backend.port)
            backend.answer = "garbage"
            assert not await probes.probe(check(), "127.0.0.1", backend.port)
            backend.answer = "hang"
            started = time.monotonic()
            assert not await probes.probe(check(), "127.0.0.1", backend.port, timeout=0.2)
            assert time.monotonic() - started < 1.5
            port = backend.port
        assert not await probes.probe(check(), "127.0.0.1", port)

    run(scenario)


def test_a_tcp_probe_passes_when_the_port_accepts() -> None:
    async def scenario() -> None:
        async with running_backend() as backend:
            assert await probes.probe(check(HealthProtocol.TCP), "127.0.0.1", backend.port)
            port = backend.port
        assert not await probes.probe(check(HealthProtocol.TCP), "127.0.0.1", port)

    run(scenario)


def make_plan(port: int, backends: tuple[plan.Backend, ...]) -> plan.Plan:
    return plan.Plan(
        name="web",
        namespace="shop",
        generation=1,
        mode=Mode.L7,
        architecture=Architecture.proxy,
        engine=None,
        vip="127.0.0.1",
        listeners=(plan.Listener(name="http", port=port, protocol=Protocol.HTTP, transport="TCP"),),
        backends=backends,
        default_backend=backends[0].name,
    )


def make_backend(
    name: str, ports: tuple[int | None, ...], health_check: plan.HealthCheck | None
) -> plan.Backend:
    return plan.Backend(
        name=name,
        algorithm=Algorithm.maglev,
        endpoints=tuple(plan.Endpoint(address="127.0.0.1", port=port, weight=1) for port in ports),
        health_check=health_check,
    )


def test_the_probe_port_is_the_checks_else_the_targets_else_the_first_listeners() -> None:
    p = make_plan(8000, (make_backend("app", (9000,), check()),))
    target = targets.Target("app", "127.0.0.1", 9000, 1)
    portless = targets.Target("app", "127.0.0.1", None, 1)
    assert probes.probe_port(check(port=7000), target, p) == 7000
    assert probes.probe_port(check(), target, p) == 9000
    assert probes.probe_port(check(), portless, p) == 8000


def test_the_checker_marks_a_silent_backend_down_and_a_recovered_one_up() -> None:
    """HTTP, interval 1 s: down within interval x unhealthy_threshold (+ timeout, jitter), up after 2."""

    async def scenario() -> None:
        async with running_backend() as server:
            http = check(healthy=2, unhealthy=2)
            registry = state.Registry()
            snapshot = registry.snapshot(make_plan(server.port, (make_backend("app", (server.port,), http),)))
            pool = snapshot.pools["app"]
            target = pool.targets[0]
            changes: list[bool] = []
            checker = probes.HealthChecker(on_change=lambda t: changes.append(t.health.healthy))
            checker.follow(snapshot)
            try:
                await eventually(lambda: len(server.requests) >= 1, within=1.5)
                assert target.health.healthy
                server.answer = "hang"
                await eventually(lambda: not target.health.healthy, within=2 * 1 + 1 + 1.5)
                assert pool.pick("192.0.2.1") is None  # the pool was told
                server.answer = 200
                await eventually(lambda: target.health.healthy, within=2 * 1 + 1.5)
                assert pool.pick("192.0.2.1") is target
                assert changes == [False, True]
            finally:
                await checker.aclose()

    run(scenario)


def test_the_checker_sees_a_tcp_backend_go_away_and_come_back() -> None:
    async def scenario() -> None:
        server = Backend()
        await server.start()
        tcp = check(HealthProtocol.TCP, healthy=1, unhealthy=2)
        snapshot = state.Registry().snapshot(make_plan(1, (make_backend("app", (server.port,), tcp),)))
        target = snapshot.pools["app"].targets[0]
        checker = probes.HealthChecker()
        checker.follow(snapshot)
        try:
            await server.stop()
            await eventually(lambda: not target.health.healthy, within=2 * 1 + 1.5)
            await server.start()  # the same port again
            await eventually(lambda: target.health.healthy, within=1 + 1.5)
        finally:
            await checker.aclose()
            await server.stop()

    run(scenario)


def test_following_a_new_snapshot_keeps_the_probes_of_targets_that_stayed() -> None:
    async def scenario() -> None:
        registry = state.Registry()
        first = registry.snapshot(
            make_plan(
                8000,
                (
                    make_backend("app", (9001, 9002), check(HealthProtocol.TCP)),
                    make_backend("static", (9100,), None),
                ),
            )
        )
        checker = probes.HealthChecker()
        checker.follow(first)
        stay, leave = first.pools["app"].targets
        assert set(checker.tasks) == {stay, leave}  # the backend without a check is not probed
        kept = checker.tasks[stay]
        second = registry.snapshot(
            make_plan(8000, (make_backend("app", (9001, 9003), check(HealthProtocol.TCP)),))
        )
        checker.follow(second)
        arrived = second.pools["app"].targets[1]
        assert set(checker.tasks) == {stay, arrived}
        assert checker.tasks[stay] is kept
        third = registry.snapshot(
            make_plan(8000, (make_backend("app", (9001, 9003), check(HealthProtocol.TCP, healthy=5)),))
        )
        checker.follow(third)  # a changed check restarts its probes
        assert checker.tasks[stay] is not kept
        tasks = list(checker.tasks.values())
        await checker.aclose()
        assert checker.tasks == {}
        await asyncio.gather(kept, return_exceptions=True)
        assert all(task.cancelled() for task in [*tasks, kept])

    run(scenario)


def test_a_checker_that_does_not_probe_takes_the_verdicts_of_the_one_that_does() -> None:
    """Workers take the parent's verdicts: the same targets, the pool told, passive ejection left alone."""

    async def scenario() -> None:
        async with running_backend() as server:
            tcp = check(HealthProtocol.TCP, healthy=1, unhealthy=1)
            p = make_plan(server.port, (make_backend("app", (server.port, 1), tcp),))
            prober_snapshot = state.Registry().snapshot(p)
            prober = probes.HealthChecker()
            prober.follow(prober_snapshot)
            worker_snapshot = state.Registry().snapshot(p)
            seen: list[targets.Target] = []
            worker = probes.HealthChecker(on_change=seen.append, probing=False)
            worker.follow(worker_snapshot)
            try:
                assert worker.tasks == {}  # no probe from here
                live, dead = worker_snapshot.pools["app"].targets
                await eventually(lambda: ("app", "127.0.0.1", 1, False) in prober.verdicts(), within=3)
                assert prober.verdicts() == [
                    ("app", "127.0.0.1", 1, False),
                    ("app", "127.0.0.1", server.port, True),
                ]
                assert worker.apply(prober.verdicts()) == 1 and seen == [dead]
                assert not dead.health.healthy and live.health.healthy
                assert all(worker_snapshot.pools["app"].pick(f"10.0.0.{n}") is live for n in range(8))
                assert worker.apply(prober.verdicts()) == 0  # the same verdicts again change nothing
                for _ in range(health.PASSIVE_THRESHOLD):
                    live.health.record_passive(False)  # this worker's own ejection
                assert worker.apply([("app", "127.0.0.1", 1, True), ("app", "10.9.9.9", 5, False)]) == 1
                assert dead.health.healthy and not live.health.healthy  # unknown targets ignored
                assert live.health.up  # ejected here, up by the prober's checks
            finally:
                await prober.aclose()
                await worker.aclose()

    run(scenario)
