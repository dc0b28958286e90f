"""The core alone, without a PDS.

- `core_mongo`: the real `Replicator` + `Applier` in this process against the real MongoDB,
  with a `RepoWriter` that answers every write at once with a made-up CID. N moods are
  inserted after a checkpoint at the stream's current position, then the replicator starts
  from that checkpoint and drains them: change stream →
  direct read → desired state → ledger diff → ledger write + `atproto.rkey` write-back →
  checkpoint, and then the write-back's own update events (a no-op each). events/s counts both.
- `core_pure`: `desired_state` + `plan_user` on in-memory documents, grouped per user in
  batches of 500 as the stream groups them, with an empty ledger (every mood new) and with
  the ledger that results (a replay: nothing to write).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
from loguru import logger

from replicator import tid
from replicator.apply import Applier
from replicator.desired import desired_state
from replicator.model import Account, LedgerEntry, Write
from replicator.plan import plan_user
from replicator.recordtypes import MOOD
from replicator.runtime import open_runtime
from replicator.stream import Replicator
from replicator.writer import RepoWriter

from .common import (
    BenchUser,
    CpuMeter,
    Ctx,
    Doc,
    insert_docs,
    mood_docs,
    prepare_db,
)
from .scenarios import save_current_position, wait_progress

FAKE_CID = "bafyreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku"
NULL_PDS_URL = "http://null-pds.invalid"


class NullWriter(RepoWriter):
    """Every write succeeds at once, without HTTP."""

    calls = 0
    writes = 0

    async def send(
        self, account: Account, writes: Sequence[Write], collection: str
    ) -> dict[str, str | None]:
        self.calls += 1
        self.writes += len(writes)
        return {w.rkey: FAKE_CID if w.action == "put" else None for w in writes}


async def core_mongo(ctx: Ctx) -> dict[str, Any]:
    n = ctx.sizes.core
    db_name = ctx.db("core")
    store = await prepare_db(ctx.client, db_name, ctx.users)
    await save_current_position(store)
    lost: list[str] = []
    sink = logger.add(lambda m: lost.append(str(m)), level="CRITICAL",
                      filter=lambda r: "history lost" in r["message"])  # fmt: skip
    try:
        await insert_docs(store, mood_docs(ctx.users, n, label="core"), chunk=1_000)
        settings = ctx.settings(db_name, NULL_PDS_URL)
        async with open_runtime(settings) as rt:
            writer = NullWriter(rt.sessions, rt.writer.outbound)
            applier = Applier(rt.store, writer, rt.pds, concurrency=settings.concurrency)
            replicator = Replicator(rt.store, applier, batch_size=settings.batch_size,
                                    max_batch_ms=settings.max_batch_ms)  # fmt: skip
            stop = anyio.Event()
            meter = ctx.meter()
            profiler = _profiler(ctx.profile_dir)
            cpu0 = meter.snapshot()
            t0 = time.monotonic()
            async with anyio.create_task_group() as tg:
                if profiler is not None:
                    profiler.start()
                tg.start_soon(replicator.run, stop)
                # Each insert, then its own write-back update: 2 events per mood.
                done = await wait_progress(
                    ctx, "core events applied", lambda: replicator.events_applied, 2 * n,
                    every=0.02, limit=ctx.sizes.core_seconds,
                )  # fmt: skip
                seconds = time.monotonic() - t0
                cpu = CpuMeter.between(cpu0, meter.snapshot())
                if profiler is not None:
                    profiler.stop()
                stop.set()
            events = done
            present = await rt.store.ledger.count_documents({"state": "present"})
    finally:
        logger.remove(sink)
    if lost:
        raise RuntimeError(f"not measured: the change stream's history was lost ({lost[0]})")
    if profiler is not None and ctx.profile_dir is not None:
        _write_profile(profiler, ctx.profile_dir / "core-mongo.txt")
    return {
        "moods": n,
        "events": events,
        "seconds": round(seconds, 3),
        "events_per_s": round(events / seconds, 1),
        "moods_per_s": round(present / seconds, 1),
        "caught_up": done >= 2 * n,
        "null_pds_calls": writer.calls,
        "ledger_present": present,
        "cpu": cpu,
    }


def core_pure(
    users: Sequence[BenchUser], n: int, profile_dir: Path | None = None, batch: int = 500
) -> dict[str, Any]:
    docs = mood_docs(users, n, label="pure")
    accounts = {u.sub: Account(u.sub, u.did, u.handle, u.password) for u in users}
    ledger: dict[Any, LedgerEntry] = {}

    def one_pass(current: dict[Any, LedgerEntry]) -> tuple[float, int]:
        writes = 0
        started = time.perf_counter()
        for i in range(0, len(docs), batch):
            by_user: dict[str, list[Doc]] = {}
            for doc in docs[i : i + batch]:
                by_user.setdefault(doc["user"], []).append(doc)
            for user, mine in by_user.items():
                desired = [desired_state(MOOD, d["_id"], d, has_account=True) for d in mine]
                plan = plan_user(user, accounts[user], desired, current, tid.from_object_id)
                writes += len(plan.writes)
                for mood in plan.moods:
                    ledger[mood.mood_id] = mood.entry
        return time.perf_counter() - started, writes

    profiler = _profiler(profile_dir)
    if profiler is not None:
        profiler.start()
    first, first_writes = one_pass({})
    if profiler is not None:
        profiler.stop()
        _write_profile(profiler, (profile_dir or Path()) / "core-pure.txt")
    replay, replay_writes = one_pass(dict(ledger))
    return {
        "moods": n,
        "events_per_s": round(n / first, 1),
        "replay_events_per_s": round(n / replay, 1),
        "writes_planned": first_writes,
        "replay_writes_planned": replay_writes,
        "seconds": round(first, 3),
    }


def _profiler(profile_dir: Path | None) -> Any:
    if profile_dir is None:
        return None
    try:
        from pyinstrument import Profiler
    except ImportError:  # pragma: no cover - a dev extra
        return None
    return Profiler(async_mode="disabled", interval=0.001)  # every task of the loop


def _write_profile(profiler: Any, path: Path) -> None:
    path.write_text(profiler.output_text(show_all=False, unicode=True))
