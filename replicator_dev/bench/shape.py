"""The commit shape a scenario produced, from the replicator's own PDS calls (`probe`).

A shape is what the PDS was asked to do: how many records each write call (one commit each)
carried, which calls they were (`applyWrites`, or `putRecord`/`deleteRecord` for a single
write), and how many repos had a write in flight at once. (a) replays a shape against the PDS
alone (`pds_capacity.at_shape`), which is the real limit for a scenario that writes that way.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

APPLY_WRITES = "com.atproto.repo.applyWrites"


@dataclass(frozen=True)
class Call:
    nsid: str
    repo: str | None
    writes: int
    ok: bool
    start: float
    end: float


def read_calls(path: Path) -> list[Call]:
    """The probe's lines; a torn last line (a killed process) is skipped."""
    calls: list[Call] = []
    try:
        raw = path.read_bytes()
    except OSError:
        return calls
    for line in raw.splitlines():
        try:
            nsid, repo, writes, ok, start, end = orjson.loads(line)
        except (orjson.JSONDecodeError, ValueError, TypeError):
            continue
        calls.append(Call(str(nsid), repo, int(writes), bool(ok), float(start), float(end)))
    return calls


def short(nsid: str) -> str:
    return nsid.rsplit(".", 1)[-1]


def summarize(calls: Sequence[Call], *, since: float | None = None) -> dict[str, Any]:
    """The shape of the calls that started at `since` or later (all when None).

    `commits`: write calls the PDS accepted (each is one commit); `commit_sizes`: how many
    commits of each (call, records) kind, e.g. `{"applyWrites 50": 20, "putRecord 1": 3}`;
    `repos_in_flight`: the most repos with a write call in flight at once (`max`), and the
    average over the time from the first write's start to the last write's end (`mean`;
    `busy_share`: the part of that time with at least one in flight)."""
    window = [c for c in calls if since is None or c.start >= since]
    writes = [c for c in window if c.writes > 0]
    ok = [c for c in writes if c.ok]
    records = sum(c.writes for c in ok)
    sizes: Counter[str] = Counter(f"{short(c.nsid)} {c.writes}" for c in ok)
    per_commit = sorted(c.writes for c in ok)
    batched = [c.writes for c in ok if c.nsid == APPLY_WRITES]
    return {
        "calls": dict(sorted(Counter(short(c.nsid) for c in window).items())),
        "failed_write_calls": len(writes) - len(ok),
        "commits": len(ok),
        "records": records,
        "records_per_commit": round(records / len(ok), 2) if ok else None,
        "records_per_commit_p50": _nearest_rank(per_commit, 50),
        "records_per_commit_max": per_commit[-1] if per_commit else None,
        "records_per_apply_writes": round(sum(batched) / len(batched), 2) if batched else None,
        "single_write_commits": len(ok) - len(batched),
        "commit_sizes": dict(sizes.most_common()),
        "repos": len({c.repo for c in ok}),
        "repos_in_flight": in_flight(writes),
    }


def in_flight(calls: Sequence[Call]) -> dict[str, float | int | None]:
    """Distinct repos with a call in flight: the peak, and the time-weighted mean."""
    if not calls:
        return {"max": None, "mean": None, "busy_share": None, "seconds": None}
    # At a tie, a call that ends goes before one that starts.
    events = sorted([(c.start, 1, c.repo) for c in calls] + [(c.end, -1, c.repo) for c in calls],
                    key=lambda e: (e[0], e[1]))  # fmt: skip
    open_by_repo: Counter[str | None] = Counter()
    level = peak = 0
    weighted = busy = 0.0
    last = events[0][0]
    for at, step, repo in events:
        weighted += level * (at - last)
        busy += (at - last) if level else 0.0
        last = at
        open_by_repo[repo] += step
        if open_by_repo[repo] <= 0:
            del open_by_repo[repo]
        level = len(open_by_repo)
        peak = max(peak, level)
    span = events[-1][0] - events[0][0]
    return {
        "max": peak,
        "mean": round(weighted / span, 2) if span > 0 else float(peak),
        "busy_share": round(busy / span, 3) if span > 0 else 1.0,
        "seconds": round(span, 3),
    }


def _nearest_rank(ordered: Sequence[int], q: float) -> int | None:
    if not ordered:
        return None
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def describe(shape: dict[str, Any] | None) -> str:
    """One line for the table: `50.0 records/commit (20 applyWrites, 3 putRecord), 8 repos in
    flight at most (mean 5.2)`."""
    if not shape or not shape.get("commits"):
        return "no commits seen"
    kinds: Counter[str] = Counter()
    for key, count in shape.get("commit_sizes", {}).items():
        kinds[key.split(" ", 1)[0]] += count
    mix = ", ".join(f"{n:,} {kind}" for kind, n in kinds.most_common())
    flight = shape.get("repos_in_flight") or {}
    return (f"{shape['records_per_commit']:.1f} records/commit ({mix}), "
            f"{flight.get('max')} repos in flight at most (mean {flight.get('mean')})")  # fmt: skip
