"""The debounced queue hands a burst of triggers out once, and a stream of triggers cannot starve a key."""

from __future__ import annotations

import asyncio
from typing import Any

from layerlb_operator.debounce import Debouncer

from tests.clock import Clock


def test_a_burst_of_touches_is_handed_out_once_after_the_delay() -> None:
    clock = Clock(100.0)
    queue: Debouncer[str] = Debouncer(0.5, clock)
    for _ in range(10):
        queue.touch("shop/web")
        clock.now += 0.01
    assert queue.pop_due() == []
    clock.now += 0.5
    assert queue.pop_due() == ["shop/web"]
    assert queue.pop_due() == []


def test_touches_do_not_postpone_a_key_already_waiting() -> None:
    clock = Clock(100.0)
    queue: Debouncer[str] = Debouncer(0.5, clock)
    queue.touch("a")
    clock.now += 0.4
    queue.touch("a")
    clock.now += 0.1
    assert queue.pop_due() == ["a"]


def test_a_retry_later_does_not_delay_an_earlier_trigger_and_keys_come_out_in_due_order() -> None:
    clock = Clock(100.0)
    queue: Debouncer[str] = Debouncer(0.5, clock)
    queue.touch("b", delay=30)
    queue.touch("a")
    clock.now += 0.2
    queue.touch("b")
    assert queue.next_due() == 100.5
    clock.now = 100.5
    assert queue.pop_due() == ["a"]
    clock.now = 100.7
    assert queue.pop_due() == ["b"]


def test_a_discarded_key_is_not_handed_out() -> None:
    clock = Clock(100.0)
    queue: Debouncer[str] = Debouncer(0.5, clock)
    queue.touch("gone")
    queue.discard("gone")
    clock.now += 1
    assert queue.pop_due() == []
    assert len(queue) == 0


def test_batches_wake_up_for_a_touch_made_while_waiting() -> None:
    async def scenario() -> list[str]:
        queue: Debouncer[str] = Debouncer(0.05)
        batches = queue.batches()
        waiter = asyncio.ensure_future(anext(batches))
        await asyncio.sleep(0.01)
        queue.touch("x")
        return await asyncio.wait_for(waiter, 5)

    assert asyncio.run(scenario()) == ["x"]


def test_waiting_for_a_later_key_spawns_no_task_that_kopfs_shutdown_would_cancel() -> None:
    """kopf's shutdown cancels every task created after it started; a wait in a task of its own ended the
    queue with it, and the operator exited 1 on a plain SIGTERM."""

    async def scenario() -> set[asyncio.Task[Any]]:
        queue: Debouncer[str] = Debouncer(0.05)
        batches = queue.batches()
        waiter = asyncio.ensure_future(anext(batches))
        queue.touch("later", 30)
        await asyncio.sleep(0.05)
        others = asyncio.all_tasks() - {waiter, asyncio.current_task()}
        waiter.cancel()
        return others

    assert asyncio.run(scenario()) == set()
