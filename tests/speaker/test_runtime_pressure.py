"""A speaker tells its peers how late its own rounds ran lately (`membership.Pressure`), on a fake clock.

The lateness is the longest loop stall (a round starting later than one interval after the previous one)
within the last `pressure_window` seconds; it is sent with every heartbeat, so the peers wait longer for a
starved speaker and not for one that was starved a while ago.
"""

from __future__ import annotations

from typing import Any

from layerlb_speaker import membership
from layerlb_speaker.runtime import Settings, Speaker

from tests.clock import Clock

TIMING = membership.Timing(interval=0.1, dead_after=0.5, join=0.0, pressure_window=10.0)


class Wire:
    """The heartbeat socket's stand-in: what the speaker sends, nothing received."""

    def __init__(self) -> None:
        self.sent: list[Any] = []

    def drain(self) -> None:
        pass

    def send(self, message: Any, me: str) -> None:
        self.sent.append(message)

    def pressure(self) -> int:
        return next(m.late_ms for m in reversed(self.sent) if isinstance(m, membership.Pressure))


def test_the_longest_recent_stall_is_sent_and_forgotten_after_the_window() -> None:
    clock, wire = Clock(0.0), Wire()
    speaker = Speaker(Settings("n1", timing=TIMING), reporter=None, clock=clock)  # type: ignore[arg-type]
    speaker._socket = wire  # type: ignore[assignment]
    steps = [0.1] * 5 + [0.4] + [0.1] * 5 + [0.25] + [0.1] * 5  # a 300 ms stall, then a 150 ms one
    for step in steps:
        clock.now += step
        speaker.tick()
    assert wire.pressure() == 300
    clock.now += 9.0  # 9 s on, the 300 ms stall is still within the window (but late by 8.9 s itself)
    speaker.tick()
    assert wire.pressure() == 8900
    for _ in range(105):  # 10.5 s of punctual rounds: every stall has left the window
        clock.now += 0.1
        speaker.tick()
    assert wire.pressure() == 0
    heartbeats = [m for m in wire.sent if isinstance(m, membership.Heartbeat)]
    assert len(heartbeats) == len(steps) + 1 + 105  # one Pressure next to every heartbeat
