"""An asyncio event loop on simulated time.

The core waits on timers in a few places (`anyio.move_on_after` around a reopen of the users
stream, the lane deadline, backoffs). On the wall clock those make a trajectory depend on the
machine's speed: a task asleep for 0.5 s real time misses however many steps the others take
meanwhile. Here the loop's clock is the simulation's, so a timer fires after so much simulated
time, i.e. after the same steps on every run. When nothing is runnable and a timer is pending,
time jumps to it (nothing else could move it); when nothing is runnable and no timer is
pending, the simulation is deadlocked, which is reported rather than waited out.
"""

from __future__ import annotations

import asyncio
import selectors
from typing import Any

from .scheduler import Clock

REAL_WAIT = 5.0  # seconds of wall clock, only ever spent on a deadlock


class Deadlock(RuntimeError):
    """Every task waits and no timer is set: nothing can ever run again."""


class _Selector(selectors.DefaultSelector):
    def __init__(self, clock: Clock) -> None:
        super().__init__()
        self._clock = clock

    def select(self, timeout: float | None = None) -> list[Any]:
        if timeout is None:  # only a thread could wake us (an executor's): give it a while
            ready = list(super().select(REAL_WAIT))
            if not ready:
                raise Deadlock("every task waits and no timer is set")
            return ready
        if timeout > 0:
            self._clock.advance(timeout)  # idle until the next timer: jump to it
        return list(super().select(0))


class SimLoop(asyncio.SelectorEventLoop):
    def __init__(self, clock: Clock) -> None:
        super().__init__(_Selector(clock))
        self._sim_clock = clock

    def time(self) -> float:
        return self._sim_clock.monotonic()
