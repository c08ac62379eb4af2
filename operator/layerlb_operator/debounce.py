"""A debounced work queue, so a burst of endpoint changes re-renders each LoadBalancer once, not once per change.

A key touched several times before it is due is handed out once, at the earliest due time asked for:
a steady stream of changes cannot postpone a key forever (unlike a trailing debounce). The bookkeeping
(`touch`, `pop_due`, `next_due`) is plain and clock-driven, testable without an event loop; `batches`
is the asyncio layer.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Hashable
from typing import Generic, TypeVar

Key = TypeVar("Key", bound=Hashable)


class Debouncer(Generic[Key]):
    """Keys to work on, each due `delay` seconds after it was first touched."""

    def __init__(self, delay: float = 0.5, clock: Callable[[], float] = time.monotonic) -> None:
        self.delay = delay
        self.clock = clock
        self._due: dict[Key, float] = {}
        self._wakeup: asyncio.Event | None = None

    def __len__(self) -> int:
        return len(self._due)

    def __contains__(self, key: object) -> bool:
        return key in self._due

    def touch(self, key: Key, delay: float | None = None) -> None:
        """Ask for `key` to be handed out after `delay` (default: the debounce delay), or earlier if already asked."""
        due = self.clock() + (self.delay if delay is None else delay)
        self._due[key] = min(due, self._due.get(key, due))
        if self._wakeup is not None:
            self._wakeup.set()

    def discard(self, key: Key) -> None:
        """Forget `key` (its object is gone)."""
        self._due.pop(key, None)

    def next_due(self) -> float | None:
        """The clock time the next key is due, or None when nothing waits."""
        return min(self._due.values(), default=None)

    def pop_due(self) -> list[Key]:
        """The keys due now, removed from the queue, earliest first."""
        now = self.clock()
        ready = sorted((due, index, key) for index, (key, due) in enumerate(self._due.items()) if due <= now)
        for _, _, key in ready:
            del self._due[key]
        return [key for _, _, key in ready]

    async def batches(self) -> AsyncIterator[list[Key]]:
        """Forever: wait until keys are due, then yield them together."""
        self._wakeup = asyncio.Event()
        while True:
            keys = self.pop_due()
            if keys:
                yield keys
                continue
            due = self.next_due()
            self._wakeup.clear()
            timeout = None if due is None else max(0.0, due - self.clock())
            # asyncio.timeout, not wait_for: wait_for runs the wait in a task of its own, which kopf's
            # shutdown takes for one of its hung tasks and cancels, ending this queue with it (the
            # operator then exited 1 on a plain SIGTERM whenever a key was due later).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wakeup.wait()
