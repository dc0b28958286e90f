"""Test-only crash points: `REPLICATOR_CRASH_AT=<point>[:<occurrence>]` makes the process
SIGKILL itself the n-th time (default: the first) it passes that point.

Random kills rarely land in the windows that matter (between a PDS write and its ledger entry,
say); these land there every time. Inactive unless the variable is set: `hit` is then one
dictionary lookup. The points, in the order a batch passes them:

| point        | right after                                                        |
|--------------|--------------------------------------------------------------------|
| `intent`     | the batch's write-ahead intents are in the ledger                  |
| `pds_call`   | a write call to the PDS returned (the n-th since start)            |
| `write_back` | the rkeys are written back to `moods` (the intents still pending)  |
| `ledger`     | the batch's outcome is in the ledger                               |
| `checkpoint` | a resume token is saved                                            |
| `sweep`      | a purge sweep's PDS write (a user left with no live mood)          |
| `recovery`   | a user reconciled during history-loss (or reset-position) recovery |
| `forget`     | an erased user's records confirmed gone, before they are forgotten |
"""

from __future__ import annotations

import os
import signal

ENV = "REPLICATOR_CRASH_AT"
POINTS = ("intent", "pds_call", "write_back", "ledger", "checkpoint", "sweep", "recovery", "forget")


def _parse(spec: str | None) -> tuple[str, int] | None:
    if not spec:
        return None
    point, _, nth = spec.partition(":")
    if point not in POINTS:
        raise ValueError(f"{ENV}={spec!r}: unknown point (one of {', '.join(POINTS)})")
    return point, int(nth or 1)


_target = _parse(os.environ.get(ENV))
_seen: dict[str, int] = {}


def hit(point: str) -> None:
    if _target is None or _target[0] != point:
        return
    _seen[point] = _seen.get(point, 0) + 1
    if _seen[point] == _target[1]:
        os.kill(os.getpid(), signal.SIGKILL)
