"""(c) The replicator end to end, as the production process (`python -m replicator.cli run`).

Every scenario has its own database (the same seeded users, their warm sessions copied in, as
a running sidecar holds them) and watches the PDS firehose: a record counts as mirrored when
its commit is sequenced by the PDS, the moment any client can see it. The burst, the purge and
the backfill run the replicator through `probe`, which records its PDS calls: their `shape`
is the commits they really sent (records per commit, calls, repos in flight; `shape.py`).

- burst: the replicator is running and idle; N moods are inserted (insert_many, chunks of 500)
  over all users; time from the first insert to the last of the N records on the firehose.
- purge: a few users' moods are mirrored first (untimed), then `deleteMany({user})` per user;
  time to the last record deletion on the firehose (and until the ledger has settled).
- backfill: N existing moods, `replicator backfill --json`; the job's own time.
- lag: a steady insert rate for a window; per mood, insert call → its record on the firehose.
- backlog: N moods inserted while the replicator is stopped with a saved checkpoint, then it
  is started: peak RSS (VmHWM) until it has caught up, or for at most `backlog_seconds`.
"""

from __future__ import annotations

import contextlib
import re
import resource
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import orjson
from bson import ObjectId

from replicator.backfill import Backfill
from replicator.config import Settings
from replicator.runtime import open_runtime
from replicator.store import Store
from replicator.tid import from_object_id

from .common import (
    MB,
    CpuMeter,
    Ctx,
    Firehose,
    insert_docs,
    mood_docs,
    percentile,
    prepare_db,
    rkeys_of,
    wait_stream_open,
    wait_until,
)
from .shape import summarize

STALL_SECONDS = 180.0  # no progress for this long: the scenario is reported as failed


class Unfinished(Exception):
    """A scenario that failed part way, with what it measured until then (`partial`: its
    commit shape, say), reported next to the error."""

    def __init__(self, cause: Exception, partial: dict[str, Any]) -> None:
        super().__init__(str(cause))
        self.cause = cause
        self.partial = partial


async def save_current_position(store: Store) -> None:
    """A checkpoint at the stream's current position, as a replicator that ran and stopped
    leaves it: what is inserted next is its backlog (kept by the oplog, like any history)."""
    async with await store.docs.watch() as stream:
        token = stream.resume_token
        if token is None:
            raise RuntimeError("the server opened a change stream without a resume token")
    await store.save_checkpoint(token, events_applied=0)


async def wait_progress(
    ctx: Ctx,
    what: str,
    count: Callable[[], Awaitable[int] | int],
    total: int,
    *,
    every: float = 0.1,
    alive: Callable[[], bool] | None = None,
    limit: float | None = None,
) -> int:
    """Until `count()` reaches `total` or `limit` seconds have passed; returns the last count.
    A line every 15 s; fails after STALL_SECONDS without progress."""
    started = last_change = last_say = time.monotonic()
    last_value = -1
    while True:
        got = count()
        value = await got if not isinstance(got, int) else got
        now = time.monotonic()
        if value >= total or (limit is not None and now - started >= limit):
            return value
        if value != last_value:
            last_value, last_change = value, now
        if now - last_change > STALL_SECONDS:
            raise TimeoutError(f"{what}: stuck at {value}/{total} for {STALL_SECONDS:.0f}s")
        if alive is not None and not alive():
            raise RuntimeError(f"{what}: the replicator exited at {value}/{total}")
        if now - last_say > 15:
            ctx.say(f"    {what}: {value:,}/{total:,}")
            last_say = now
        await anyio.sleep(every)


def _settings(ctx: Ctx, db_name: str) -> Settings:
    return ctx.settings(db_name)


async def _present(store: Store) -> int:
    return await store.ledger.count_documents({"state": "present"})


# -- burst ------------------------------------------------------------------------------------


async def burst(ctx: Ctx) -> dict[str, Any]:
    n = ctx.sizes.burst
    store = await prepare_db(ctx.client, ctx.db("burst"), ctx.users)
    docs = mood_docs(ctx.users, n, label="burst")
    want = set(rkeys_of(d["_id"] for d in docs))
    firehose = Firehose(ctx.pds_url)
    profiling = ctx.profile_dir is not None
    async with anyio.create_task_group() as tg:
        await tg.start(firehose.run)
        proc = await ctx.replicator(store.db.name, "burst", profile=profiling,
                                    probe=True).start()  # fmt: skip
        spy = await _spy_on_mongo(ctx, "burst") if profiling else None
        try:
            await wait_stream_open(store, proc)
            await anyio.sleep(0.5)
            meter = ctx.meter(replicator=proc.pid)
            cpu0 = meter.snapshot()
            firehose.reset()
            t0 = time.monotonic()
            insert_s = await insert_docs(store, docs)
            ctx.say(f"    {n:,} moods inserted in {insert_s:.1f}s")
            try:
                await wait_progress(ctx, "burst records on the PDS",
                                    lambda: sum(1 for k in want if k in firehose.created), n,
                                    every=0.2, alive=proc.alive)  # fmt: skip
            except (TimeoutError, RuntimeError) as exc:
                stalled: Exception | None = exc
            else:
                stalled = None
            seen = [firehose.created[k] for k in want if k in firehose.created]
            t_last = max(seen, default=time.monotonic())
            cpu = CpuMeter.between(cpu0, meter.snapshot())
            commits, ops = firehose.commits, firehose.ops
        finally:
            if spy is not None:
                await _stop_spy(spy)
                if ctx.profile_dir is not None:
                    summarize_pyspy(ctx.profile_dir / "burst-mongo.pyspy.txt")
            await proc.stop()
            tg.cancel_scope.cancel()
    seconds = t_last - t0
    if proc.profile_to is not None:
        await _render_pyinstrument(proc.profile_to)
    sent = _commits(commits, ops, summarize(proc.calls(), since=t0))
    if stalled is not None:  # what it did send is still what it sent: kept with the error
        raise Unfinished(stalled, {"moods": n, "users": len(ctx.users),
                                   "records_seen": len(seen), **sent, "cpu": cpu})  # fmt: skip
    return {
        "moods": n,
        "users": len(ctx.users),
        "seconds": round(seconds, 3),
        "records_per_s": round(n / seconds, 1),
        "insert_seconds": round(insert_s, 3),
        **sent,
        "ledger_present": await _present(store),
        "cpu": cpu,
    }


def _commits(firehose_commits: int, firehose_ops: int, shape: dict[str, Any]) -> dict[str, Any]:
    """The scenario's commits, as the replicator sent them (`shape`, from its own PDS calls)
    and as the firehose sequenced them (commits touching the mood collection)."""
    return {
        "commits": shape["commits"],
        "records_per_commit": shape["records_per_commit"],
        "firehose_commits": firehose_commits,
        "firehose_records_per_commit": round(firehose_ops / firehose_commits, 2)
        if firehose_commits
        else None,
        "shape": shape,
    }


# -- purge ------------------------------------------------------------------------------------


async def purge(ctx: Ctx) -> dict[str, Any]:
    users = ctx.purge_users
    n = ctx.sizes.purge
    db_name = ctx.db("purge")
    store = await prepare_db(ctx.client, db_name, users)
    await insert_docs(store, mood_docs(users, n, label="purge"))
    setup_started = time.monotonic()
    async with open_runtime(_settings(ctx, db_name), retry_timeout=120) as rt:
        await Backfill(rt.applier, concurrency=len(users)).run([u.sub for u in users])
    present = [d["rkey"] async for d in store.ledger.find({"state": "present"}, {"rkey": 1})]
    if len(present) != n:
        raise RuntimeError(f"purge setup: {len(present)} of {n} moods mirrored")
    ctx.say(f"    setup: {n:,} moods of {len(users)} users mirrored in "
            f"{time.monotonic() - setup_started:.1f}s (untimed)")  # fmt: skip
    firehose = Firehose(ctx.pds_url)
    async with anyio.create_task_group() as tg:
        await tg.start(firehose.run)
        proc = await ctx.replicator(db_name, "purge", probe=True).start()
        try:
            await wait_stream_open(store, proc)
            await anyio.sleep(0.5)
            meter = ctx.meter(replicator=proc.pid)
            cpu0 = meter.snapshot()
            firehose.reset()
            t0 = time.monotonic()
            for user in users:
                await store.docs.delete_many({"user": user.sub})
            delete_s = time.monotonic() - t0
            await wait_progress(ctx, "purge deletions on the PDS",
                                lambda: sum(1 for k in present if k in firehose.deleted), n,
                                every=0.2, alive=proc.alive)  # fmt: skip
            t_last = max(firehose.deleted[k] for k in present)
            cpu = CpuMeter.between(cpu0, meter.snapshot())
            commits, ops = firehose.commits, firehose.ops

            async def settled() -> bool:
                return await _present(store) == 0

            await wait_until(settled, within=STALL_SECONDS, what="ledger settled", every=0.25)
            t_settled = time.monotonic()
        finally:
            await proc.stop()
            tg.cancel_scope.cancel()
    seconds = t_last - t0
    return {
        "moods": n,
        "users": len(users),
        "seconds": round(seconds, 3),
        "records_per_s": round(n / seconds, 1),
        "delete_many_seconds": round(delete_s, 3),
        "ledger_settled_seconds": round(t_settled - t0, 3),
        **_commits(commits, ops, summarize(proc.calls(), since=t0)),
        "cpu": cpu,
    }


# -- backfill ---------------------------------------------------------------------------------


async def backfill(ctx: Ctx, *, null_pds: bool = False) -> dict[str, Any]:
    """`null_pds`: the same, with every PDS call answered at once in the replicator's process
    (its MongoDB ceiling: the same reads and writes, nothing else to wait for)."""
    n = ctx.sizes.backfill
    name = "backfill-null-pds" if null_pds else "backfill"
    db_name = ctx.db(name)
    store = await prepare_db(ctx.client, db_name, ctx.users)
    await insert_docs(store, mood_docs(ctx.users, n, label="backfill"))
    out_path = ctx.work_dir / f"{name}-summary.json"
    out_path.unlink(missing_ok=True)
    args = ["backfill", "--json"]  # --concurrency: REPLICATOR_CONCURRENCY when given
    profiling = ctx.profile_dir is not None and not null_pds
    proc = ctx.replicator(db_name, name, args=args, profile=profiling,
                          probe=True, stdout_path=out_path, null_pds=null_pds)  # fmt: skip
    profile_to = proc.profile_to
    firehose = Firehose(ctx.pds_url)
    async with anyio.create_task_group() as tg:
        await tg.start(firehose.run)
        await anyio.sleep(0.3)
        meter = ctx.meter()
        cpu0 = meter.snapshot()
        children0 = _children_cpu()
        t0 = time.monotonic()
        spy = await _spy_on_mongo(ctx, "backfill") if profile_to is not None else None
        await proc.start()
        code = await proc.wait()
        wall = time.monotonic() - t0
        if spy is not None:
            await _stop_spy(spy)
            if ctx.profile_dir is not None:
                summarize_pyspy(ctx.profile_dir / "backfill-mongo.pyspy.txt")
        cpu = CpuMeter.between(cpu0, meter.snapshot(), {"replicator": _children_cpu() - children0})
        await anyio.sleep(0.5)
        tg.cancel_scope.cancel()
    if profile_to is not None:
        await _render_pyinstrument(profile_to)
    summary = _read_json(out_path)
    if code not in (0, 1) or not summary:
        failed = RuntimeError(f"replicator backfill exited {code}; see {proc.log_path}")
        sent = _commits(firehose.commits, firehose.ops, summarize(proc.calls()))
        raise Unfinished(failed, {"moods": n, "users": len(ctx.users), **sent, "cpu": cpu})
    seconds = float(summary["seconds"])
    return {
        "moods": n,
        "users": len(ctx.users),
        "seconds": round(seconds, 3),
        "records_per_s": round(int(summary["written"]) / seconds, 1),
        "wall_seconds": round(wall, 3),
        "written": summary["written"],
        "failed": summary["failed"],
        **_commits(firehose.commits, firehose.ops, summarize(proc.calls())),
        "cpu": cpu,
    }


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# -- lag --------------------------------------------------------------------------------------


async def lag(ctx: Ctx) -> dict[str, Any]:
    rate, window = ctx.sizes.lag_rate, ctx.sizes.lag_seconds
    total = int(rate * window)
    store = await prepare_db(ctx.client, ctx.db("lag"), ctx.users)
    firehose = Firehose(ctx.pds_url)
    sent: dict[str, float] = {}
    insert_ms: list[float] = []
    async with anyio.create_task_group() as tg:
        await tg.start(firehose.run)
        proc = await ctx.replicator(store.db.name, "lag").start()
        try:
            await wait_stream_open(store, proc)
            await anyio.sleep(1.0)
            meter = ctx.meter(replicator=proc.pid)
            cpu0 = meter.snapshot()
            started = time.monotonic()
            for i in range(total):
                delay = started + i / rate - time.monotonic()
                if delay > 0:
                    await anyio.sleep(delay)
                mood_id = ObjectId()
                doc = {"_id": mood_id, "user": ctx.users[i % len(ctx.users)].sub,
                       "mood": f"steady mood {i}", "when": datetime.now(UTC)}  # fmt: skip
                t = time.monotonic()
                await store.docs.insert_one(doc)
                insert_ms.append((time.monotonic() - t) * 1000)
                sent[from_object_id(mood_id)] = t
            achieved = total / (time.monotonic() - started)
            cpu = CpuMeter.between(cpu0, meter.snapshot())
            with contextlib.suppress(TimeoutError):  # what never came is reported as missing
                await wait_progress(ctx, "lag records on the PDS",
                                    lambda: sum(1 for k in sent if k in firehose.created),
                                    total, alive=proc.alive)  # fmt: skip
        finally:
            await proc.stop()
            tg.cancel_scope.cancel()
    lags = [(firehose.created[k] - t) * 1000 for k, t in sent.items() if k in firehose.created]
    return {
        "rate": rate,
        "achieved_rate": round(achieved, 1),
        "window_seconds": window,
        "moods": total,
        "missing": total - len(lags),
        "p50_ms": round(percentile(lags, 50), 1),
        "p95_ms": round(percentile(lags, 95), 1),
        "p99_ms": round(percentile(lags, 99), 1),
        "max_ms": round(max(lags), 1) if lags else None,
        "insert_ms_p50": round(percentile(insert_ms, 50), 2),
        "insert_ms_p99": round(percentile(insert_ms, 99), 2),
        "cpu": cpu,
    }


# -- backlog: peak RSS --------------------------------------------------------------------------


async def backlog(ctx: Ctx) -> dict[str, Any]:
    n = ctx.sizes.backlog
    store = await prepare_db(ctx.client, ctx.db("backlog"), ctx.users)
    await save_current_position(store)  # the checkpoint a stopped replicator would have left
    insert_s = 0.0
    chunk = 10_000
    for start in range(0, n, chunk):
        docs = mood_docs(ctx.users, min(chunk, n - start), label=f"backlog {start}")
        insert_s += await insert_docs(store, docs, chunk=1_000)
        if start and start % 50_000 == 0:
            ctx.say(f"    {start:,} backlog moods inserted")
    ctx.say(f"    {n:,} moods inserted while stopped in {insert_s:.1f}s; starting it")
    proc = await ctx.replicator(store.db.name, "backlog").start()
    rss_samples: list[int] = []
    try:
        meter = ctx.meter(replicator=proc.pid)
        cpu0 = meter.snapshot()
        t0 = time.monotonic()

        async def applied() -> int:
            rss = proc.rss_kb()
            if rss:
                rss_samples.append(rss)
            doc = await store.load_checkpoint() or {}
            if doc.get("recovery"):  # the drain would be a reconcile of every user instead
                raise RuntimeError(
                    "not measured: the change stream's history was lost "
                    f"(the oplog did not hold the backlog); see {proc.log_path}"
                )
            return int(doc.get("events_applied", 0))

        # Each insert is followed by its own write-back update (`atproto.rkey`): 2 events.
        events = await wait_progress(ctx, "backlog events applied", applied, 2 * n,
                                     every=0.5, alive=proc.alive,
                                     limit=ctx.sizes.backlog_seconds)  # fmt: skip
        seconds = time.monotonic() - t0
        cpu = CpuMeter.between(cpu0, meter.snapshot())
        peak_kb = proc.peak_rss_kb() or 0
        end_kb = proc.rss_kb() or 0
    finally:
        await proc.stop()
    present = await _present(store)
    caught_up = events >= 2 * n
    return {
        "moods": n,
        "users": len(ctx.users),
        "peak_rss_mb": round(peak_kb / 1024, 1),
        "end_rss_mb": round(end_kb / 1024, 1),
        "median_rss_mb": round(percentile(rss_samples, 50) / 1024, 1) if rss_samples else None,
        "caught_up": caught_up,
        "drain_seconds": round(seconds, 3),
        "mirrored": present,
        "records_per_s": round(present / seconds, 1),
        "events_applied": events,
        "events_per_s": round(events / seconds, 1),
        "insert_seconds": round(insert_s, 3),
        "mode": "inserted while stopped (checkpoint saved first), then started"
        + ("" if caught_up else f"; drain stopped after {seconds:.0f} s, backlog not empty"),
        "cpu": cpu,
    }


# -- profiling helpers ------------------------------------------------------------------------


async def _spy_on_mongo(ctx: Ctx, scenario: str) -> Any:
    """py-spy on the embedded MongoDB server (where the replicator's Mongo time goes)."""
    pid = ctx.server_pids.get("mongo")
    if not pid or ctx.profile_dir is None:
        return None
    out = ctx.profile_dir / f"{scenario}-mongo.pyspy.txt"
    argv = [_py_spy(), "record", "-p", str(pid), "-f", "raw", "-r", "50", "--nonblocking",
            "-o", str(out)]  # fmt: skip
    try:
        return await anyio.open_process(argv, stdout=None, stderr=None)
    except OSError as exc:
        ctx.say(f"    (py-spy unavailable: {exc})")
        return None


def summarize_pyspy(raw: Path, top: int = 25) -> None:
    """py-spy's collapsed stacks → the functions with the most samples, inclusive and self,
    written next to it as `.summary.txt`."""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    try:
        lines = raw.read_text().splitlines()
    except OSError:
        return
    for line in lines:
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")]
        for frame in set(frames):
            inclusive[frame] += n
        own[frames[-1]] += n
    if not total:
        return
    out = [f"{total} samples", "", "inclusive:"]
    out += [f"{v / total:7.1%}  {k}" for k, v in inclusive.most_common(top)]
    out += ["", "self:"]
    out += [f"{v / total:7.1%}  {k}" for k, v in own.most_common(top)]
    raw.with_suffix(".summary.txt").write_text("\n".join(out) + "\n")


def _py_spy() -> str:
    """The venv's py-spy (its bin folder need not be on PATH)."""
    spy = Path(sys.executable).with_name("py-spy")
    return str(spy) if spy.exists() else "py-spy"


async def _stop_spy(proc: Any) -> None:
    import signal

    proc.send_signal(signal.SIGINT)
    with anyio.move_on_after(30):
        await proc.wait()
    if proc.returncode is None:
        proc.kill()
        await proc.wait()


async def _render_pyinstrument(session: Path) -> None:
    """The .pyisession as text next to it (what the report summarises)."""
    if not await anyio.Path(session).exists():
        return
    text = session.with_suffix(".txt")
    await anyio.run_process(
        [
            sys.executable,
            "-m",
            "pyinstrument",
            "--load",
            str(session),
            "-r",
            "text",
            "-o",
            str(text),
        ],
        check=False,
    )


__all__ = ["MB", "backfill", "backlog", "burst", "lag", "purge"]
