"""Steps, simulated time and crashes: the one place that decides when a process dies.

Every await of the core on a fake (a Mongo method, a getMore, a PDS or PLC request) is one
*step*, and goes through `Scheduler.io`. A step yields to the event loop first (so concurrent
lanes interleave as they would on a network), then lets the world act (the application writes
to Mongo, the oplog is pruned, ...), then either performs the operation or kills the process:

- `before`: the operation never happens (the request was never sent);
- `after`: the operation happens and the process dies before it sees the answer (a PDS write
  that was committed but whose response never arrived).

A dead process raises `Crash` from every later step, finally-blocks included, like kill -9:
nothing it does after its death reaches the fakes. `Crash` is a `BaseException`, so no
`except Exception` in the core can swallow it.

Time is simulated: it moves only when steps happen (and when a getMore waits on an empty
oplog), never with the wall clock, so a seed replays exactly.
"""

from __future__ import annotations

import contextlib
import heapq
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, TypeVar

import anyio
import anyio.lowlevel

T = TypeVar("T")
Mode = Literal["before", "after"]
EPOCH = 1_767_225_600.0  # 2026-01-01T00:00:00Z: ObjectIds and `when` dates start here
STEP_SECONDS = 0.002  # what one round trip costs in simulated time


class Crash(BaseException):
    """The process was killed (kill -9) at a step."""


@dataclass
class Process:
    """One incarnation of `replicator run`: its fakes refuse to serve it once it is dead."""

    number: int
    crashable: bool = True
    dead: bool = False
    calls: dict[str, int] = field(default_factory=dict)  # per site, since it started

    def check(self) -> None:
        if self.dead:
            raise Crash(f"process {self.number} is dead")


@dataclass(frozen=True)
class Trigger:
    """When to kill: at a global step number, or at the n-th call of a site by a process."""

    mode: Mode
    step: int | None = None
    site: str | None = None
    nth: int = 1

    def matches(self, step: int, site: str, proc: Process) -> bool:
        if self.step is not None:
            return step >= self.step
        return site == self.site and proc.calls.get(site, 0) == self.nth


class Clock:
    """Simulated epoch seconds, and sleepers woken when time passes them."""

    def __init__(self, start: float = EPOCH) -> None:
        self.now = start
        self._sleepers: list[tuple[float, int, anyio.Event]] = []
        self._seq = 0

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.now - EPOCH

    def advance(self, seconds: float) -> None:
        self.now += seconds
        while self._sleepers and self._sleepers[0][0] <= self.now:
            heapq.heappop(self._sleepers)[2].set()

    async def sleep_until(self, when: float) -> None:
        """Wait in simulated time: woken by whichever step moves the clock past `when`."""
        if when <= self.now:
            await anyio.lowlevel.checkpoint()
            return
        event = anyio.Event()
        self._seq += 1
        heapq.heappush(self._sleepers, (when, self._seq, event))
        await event.wait()


class Scheduler:
    """Counts steps, keeps the step log, fires crash triggers and the world's step hook."""

    def __init__(
        self,
        clock: Clock,
        triggers: list[Trigger],
        on_step: Callable[[int, str], None] = lambda step, site: None,
    ) -> None:
        self.clock = clock
        self.triggers = list(triggers)
        self.step = 0
        self.log: list[str] = []
        self.crashed_at: list[tuple[str, Mode]] = []  # (site, mode) of every crash fired
        self.sites_called: set[str] = set()
        self.on_step = on_step

    def note(self, line: str) -> None:
        self.log.append(f"{self.step} {line}")

    def _trigger(self, site: str, proc: Process) -> Trigger | None:
        if not proc.crashable:
            return None
        for trigger in self.triggers:
            if trigger.matches(self.step, site, proc):
                self.triggers.remove(trigger)
                return trigger
        return None

    def kill(self, proc: Process, site: str, mode: Mode) -> Crash:
        proc.dead = True
        self.crashed_at.append((site, mode))
        self.note(f"CRASH p{proc.number} {site} {mode}")
        return Crash(f"process {proc.number} killed at step {self.step} ({site}, {mode})")

    async def io(self, proc: Process, site: str, op: Callable[[], T]) -> T:
        """One await on a fake: yield, let the world act, then crash or perform `op`."""
        proc.check()
        await anyio.lowlevel.checkpoint()
        proc.check()
        self.step += 1
        self.clock.advance(STEP_SECONDS)
        proc.calls[site] = proc.calls.get(site, 0) + 1
        self.sites_called.add(site)
        self.note(f"p{proc.number} {site}")
        self.on_step(self.step, site)
        proc.check()  # the world may have aborted the run
        trigger = self._trigger(site, proc)
        if trigger is not None and trigger.mode == "before":
            raise self.kill(proc, site, "before")
        if trigger is None:
            return op()
        with contextlib.suppress(Exception):  # the process dies whatever the answer was
            op()
        raise self.kill(proc, site, "after")
