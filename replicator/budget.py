"""Per-account write budgets, as the PDS announces them, so one busy user cannot starve others.

A PDS that limits repo writes (5000 points an hour and 35000 a day per account; a create costs
3, an update 2, a delete 1) says where an account stands in the `RateLimit-*` headers of every
write. We keep that per repo and charge each write before sending it: an account whose budget
cannot cover the next write is not sent anything until its window resets; its work is parked
and the stream moves on, instead of the whole pipeline waiting on one account's 429s.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from .model import Write

COSTS = {"create": 3, "update": 2, "delete": 1}


def cost(writes: list[Write] | tuple[Write, ...]) -> int:
    total = 0
    for w in writes:
        if w.action == "delete":
            total += COSTS["delete"]
        else:
            total += COSTS["update"] if w.exists else COSTS["create"]
    return total


@dataclass
class Budget:
    remaining: float
    reset_at: float  # epoch seconds


def _reset_at(value: str, now: float) -> float | None:
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if seconds > 1e9 else now + seconds  # an epoch time or a delta


class Budgets:
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._by_repo: dict[str, Budget] = {}

    def observe(self, repo: str, headers: Mapping[str, str]) -> None:
        remaining, reset = headers.get("ratelimit-remaining"), headers.get("ratelimit-reset")
        if remaining is None or reset is None:
            return
        reset_at = _reset_at(reset, self._clock())
        try:
            left = float(remaining)
        except ValueError:
            return
        if reset_at is not None:
            self._by_repo[repo] = Budget(left, reset_at)

    def remaining(self, repo: str) -> float | None:
        """The points the PDS last said the account has left (None: it said nothing)."""
        budget = self._by_repo.get(repo)
        return budget.remaining if budget is not None else None

    def forget(self, repo: str) -> None:
        self._by_repo.pop(repo, None)

    def reserve(self, repo: str, points: int) -> float:
        """Seconds until `points` can be spent on `repo` (0: now, and they are charged)."""
        budget = self._by_repo.get(repo)
        if budget is None:
            return 0.0
        now = self._clock()
        if now >= budget.reset_at:
            del self._by_repo[repo]  # a new window: the next answer tells the new budget
            return 0.0
        if budget.remaining >= points:
            budget.remaining -= points
            return 0.0
        return budget.reset_at - now
