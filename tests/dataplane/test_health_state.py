"""HealthState edges its mutation run showed untested: a machine up for less than five minutes (monotonic
clock near 0), the verdict read without the ejection being looked at first, counting runs restarted by a
forced verdict or a new check (and not by an equal one), and what each call reports as a change."""

from __future__ import annotations

from layerlb_dataplane.core import health

from layerlb import plan
from layerlb.api import HealthProtocol
from tests.clock import Clock


def check(healthy: int = 2, unhealthy: int = 3, path: str = "/healthz") -> plan.HealthCheck:
    return plan.HealthCheck(
        protocol=HealthProtocol.HTTP,
        path=path,
        port=None,
        interval_seconds=1,
        timeout_seconds=1,
        healthy_threshold=healthy,
        unhealthy_threshold=unhealthy,
    )


def eject(state: health.HealthState) -> None:
    for _ in range(state.passive_threshold):
        state.record_passive(False)


def test_just_after_boot_a_target_is_healthy_and_its_first_ejection_lasts_thirty_seconds() -> None:
    clock = Clock(now=0.0)  # time.monotonic() of a machine that has just booted
    state = health.HealthState(clock=clock)
    assert state.healthy and state.state == "healthy"
    eject(state)
    assert state.ejected_until == 30.0


def test_the_verdict_comes_back_when_the_ejection_ends_even_if_nothing_looked_at_it() -> None:
    clock = Clock()
    state = health.HealthState(clock=clock)
    eject(state)
    clock.now += 31
    assert state.healthy  # read first: no earlier `ejected_until` or `state` has cleared the ejection


def test_it_takes_the_full_threshold_again_after_an_ejection() -> None:
    clock = Clock()
    state = health.HealthState(clock=clock)
    eject(state)
    clock.now = state.ejected_until
    assert state.healthy
    changes = [state.record_passive(False) for _ in range(state.passive_threshold)]
    assert changes == [False] * (state.passive_threshold - 1) + [True]


def test_the_backoff_decays_after_more_than_five_quiet_minutes_too() -> None:
    clock = Clock()
    state = health.HealthState(clock=clock)
    eject(state)
    clock.now = state.ejected_until
    eject(state)  # the second: 60 s
    clock.now = state.ejected_until + 400.5
    eject(state)
    assert state.ejected_until - clock.now == 30


def test_an_ejection_of_a_target_the_checks_already_took_down_changes_nothing() -> None:
    clock = Clock()
    state = health.HealthState(check(unhealthy=1), clock=clock)
    assert state.record(False) is True
    changes = [state.record_passive(False) for _ in range(state.passive_threshold)]
    assert changes == [False] * state.passive_threshold


def test_a_forced_verdict_restarts_the_counting_runs() -> None:
    state = health.HealthState(check(healthy=2, unhealthy=3))
    state.healthy = False
    assert not state.up
    assert [state.record(True) for _ in range(2)] == [False, True]
    assert state.up
    state.record(False)
    state.record(False)
    state.healthy = True  # two failures forgotten
    assert [state.record(False) for _ in range(3)] == [False, False, True]


def test_a_new_check_restarts_the_runs_and_an_equal_one_does_not() -> None:
    state = health.HealthState(check(unhealthy=3))
    state.record(False)
    state.record(False)
    state.configure(check(unhealthy=3))  # equal, though another object (every reload builds one)
    assert state.record(False) is True  # the third failure in a row
    fresh = health.HealthState(check(unhealthy=3))
    fresh.record(False)
    fresh.record(False)
    fresh.configure(check(unhealthy=3, path="/ready"))  # a changed check: the run starts over
    assert [fresh.record(False) for _ in range(3)] == [False, False, True]


def test_without_a_check_a_result_changes_nothing() -> None:
    state = health.HealthState()
    assert state.record(False) is False and state.record(True) is False
    assert state.healthy and state.up is True


def test_the_repr_says_the_state_and_whether_a_check_is_configured() -> None:
    assert repr(health.HealthState()) == "HealthState(healthy, check=no)"
    assert repr(health.HealthState(check())) == "HealthState(healthy, check=yes)"


def test_the_backoff_decays_on_a_clock_that_started_near_zero() -> None:
    clock = Clock(now=100.0)
    state = health.HealthState(clock=clock)
    eject(state)
    clock.now = state.ejected_until  # 130
    assert state.healthy
    clock.now = 500.0  # 370 s in service: more than five minutes
    eject(state)
    assert state.ejected_until - clock.now == 30
