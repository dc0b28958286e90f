"""Backfill: bring every existing mood to its desired state, user by user, resumably.

It is the stream's apply path with the PDS listing as the truth (`Applier.reconcile_user`), so
it adopts what the old inline writer made (by `ref` or legacy `mongoId`), keeps permalinks,
and finds duplicates and orphans. Users go in groups (one read and one write of each kind a
group), and finished users are recorded in Mongo (as `sha256(sub)`), so a rerun after Ctrl-C
or kill -9 skips them, and re-applying a user that was cut short is harmless (idempotent
writes, fixed rkeys).

Running next to `replicator run` is safe: a user's documents are fingerprinted before and after
its reconcile, and a user whose moods changed meanwhile is reconciled again until it is stable,
so a backfill write based on a stale read never outlives the read.
"""

from __future__ import annotations

import hashlib
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
import orjson

from .apply import Applier
from .desired import valid_user
from .model import State
from .outcome import Counts, Outcome
from .store import Store, sub_hash
from .tasks import task_group

MAX_PASSES = 5
GROUPS_IN_FLIGHT = 4
RUN_ID = "backfill"


@dataclass
class Progress:
    total_users: int
    done_users: int = 0
    started: float = field(default_factory=time.monotonic)
    counts: Counts = field(default_factory=Counts)

    @property
    def moods(self) -> int:
        """Documents (of every type) done so far."""
        return self.counts.total

    @property
    def written(self) -> int:
        return self.counts.sent.put + self.counts.would.put

    @property
    def eta_seconds(self) -> float | None:
        if not self.done_users:
            return None
        rate = self.done_users / max(1e-6, time.monotonic() - self.started)
        return (self.total_users - self.done_users) / rate


@dataclass
class Report:
    users: int = 0
    skipped_users_done_before: int = 0
    outcome: Outcome = field(default_factory=Outcome)
    seconds: float = 0.0
    dry_run: bool = False
    interrupted: bool = False

    def summary(self) -> dict[str, Any]:
        c = self.outcome.counts
        reasons: dict[str, Counter[str]] = {"skipped": Counter(), "invalid": Counter(),
                                            "failed": Counter()}  # fmt: skip
        kinds: Counter[str] = Counter()
        for f in self.outcome.findings:
            kinds[f.kind] += 1
            if f.kind == "skipped":
                reasons["skipped"][f.detail or "?"] += 1
            elif f.kind == "invalid":
                reasons["invalid"][f.detail or "?"] += 1
            elif f.kind == "parked":
                reasons["failed"][f.detail or "?"] += 1
        writes = c.would if self.dry_run else c.sent
        return {
            "dry_run": self.dry_run,
            "interrupted": self.interrupted,
            "users": self.users,
            "users_already_done": self.skipped_users_done_before,
            "moods": c.total,
            **({"by_type": dict(c.documents)} if len(c.documents) > 1 else {}),
            "written": writes.put,
            "deleted": writes.deleted,
            "adopted": c.adopted,
            "unchanged": c.unchanged[State.PRESENT],
            "no_account": sum(reasons["skipped"].values()),
            "no_account_reasons": dict(reasons["skipped"]),
            "invalid": sum(reasons["invalid"].values()),
            "invalid_reasons": dict(reasons["invalid"]),
            "failed": sum(reasons["failed"].values()),
            "failed_reasons": dict(reasons["failed"]),
            "erased_users": c.erasures,
            "duplicates": kinds["duplicate"],
            "orphans": kinds["orphan"],
            "records_listed": c.records_listed,
            "seconds": round(self.seconds, 3),
            "moods_per_second": round(c.total / self.seconds, 1) if self.seconds else None,
        }


async def users_in_scope(
    store: Store, explicit: Sequence[str] = (), sample: int | None = None
) -> list[str]:
    """`--user` (a sub or `@handle`), else every user with a mood, a ledger entry or an
    ATProto account (a purged user's records are still to be found)."""
    if explicit:
        subs = []
        for who in explicit:
            sub = await store.resolve_user(who)
            if sub is None:
                raise LookupError(f"unknown user {who!r} (no such handle)")
            subs.append(sub)
        return list(dict.fromkeys(subs))
    users = [u for u in await store.users_in_scope() if valid_user(u)]
    if sample is not None and sample < len(users):
        users = sorted(random.sample(users, sample))
    return users


async def reconcile_until_stable(applier: Applier, subs: Sequence[str], *, fix: bool) -> Outcome:
    """Reconcile, then check that the users' documents are still what the reconcile read;
    those a concurrent change touched in between are reconciled again (a stale write never
    outlives its read). A user reconciled again is counted once: a later pass adds only its
    writes."""
    outcome = Outcome()
    todo = list(subs)
    for n in range(MAX_PASSES):
        done = await applier.reconcile_users(todo, fix=fix)
        outcome.merge(done if n == 0 else Outcome(counts=done.counts.writes()))
        if applier.dry_run:
            break
        now = await applier.fingerprints(todo)
        todo = [s for s in todo if now[s] != done.snapshots.get(s)]
        if not todo:
            break
    return outcome


class Backfill:
    def __init__(
        self,
        applier: Applier,
        *,
        fix: bool = False,
        concurrency: int = 4,
        on_progress: Callable[[Progress], None] | None = None,
        name: str = RUN_ID,
    ) -> None:
        """`name` keys the run's progress (the stream's recoveries use their own)."""
        self.applier = applier
        self.store = applier.store
        self.fix = fix
        self.concurrency = concurrency
        self.on_progress = on_progress
        self.name = name

    async def _resume_point(self, scope: str, restart: bool) -> tuple[str, set[str]]:
        """The unfinished run over the same scope, and the users it finished."""
        run = await self.store.load_run(self.name)
        if run and not restart and not run.get("finished") and run.get("scope") == scope:
            return str(run["run"]), await self.store.users_done(str(run["run"]))
        run_id = f"{time.time():.6f}"
        if not self.applier.dry_run:
            await self.store.start_run(self.name, run_id, scope)
        return run_id, set()

    async def run(
        self,
        users: Sequence[str],
        *,
        limit: int | None = None,
        restart: bool = False,
        scope: str | None = None,
    ) -> Report:
        """`scope` names what a resumed run must match (default: exactly these users)."""
        started = time.monotonic()
        scope = scope or hashlib.sha256(orjson.dumps(sorted(users))).hexdigest()
        run_id, done = await self._resume_point(scope, restart)
        todo = [u for u in users if sub_hash(u) not in done]
        report = Report(users=len(todo), skipped_users_done_before=len(users) - len(todo),
                        dry_run=self.applier.dry_run)  # fmt: skip
        progress = Progress(total_users=len(todo))
        # Users go in groups of `concurrency` (one read of each kind, one write of each kind
        # a group: `Applier.reconcile_users`), a few groups at a time, so that one group's
        # MongoDB work overlaps the other's PDS calls.
        size = max(1, self.concurrency)
        groups = [todo[i : i + size] for i in range(0, len(todo), size)]
        limiter = anyio.CapacityLimiter(GROUPS_IN_FLIGHT)
        stop_scheduling = anyio.Event()

        async def one(group: list[str]) -> None:
            async with limiter:
                if stop_scheduling.is_set():
                    return
                outcome = await reconcile_until_stable(self.applier, group, fix=self.fix)
                report.outcome.merge(outcome)
                if not self.applier.dry_run:
                    await self.store.user_done(run_id, group)
                progress.done_users += len(group)
                progress.counts.add(outcome.counts)
                if self.on_progress:
                    self.on_progress(progress)
                if limit is not None and progress.moods >= limit:
                    stop_scheduling.set()

        async with task_group() as tg:
            for group in groups:
                if stop_scheduling.is_set():
                    break
                tg.start_soon(one, group)
        report.users = progress.done_users
        report.interrupted = stop_scheduling.is_set() and progress.done_users < len(todo)
        if not self.applier.dry_run and not report.interrupted:
            await self.store.finish_run(self.name)
        report.seconds = time.monotonic() - started
        return report
