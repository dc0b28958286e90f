"""One bench run: seed users once, run the selected measurements in order, assemble the report.

Order: (a) and (b) first (they measure the PDS while its repos are small), then the backfill
(whose listings then see only its own records), burst, purge (on users of its own), lag, the
backlog, and the core. The backfill and the burst are each followed at once by (a) at their
own commit shape (the same repos, a moment later). A measurement that fails is reported as
failed; the others still run.
"""

from __future__ import annotations

import os
import platform
import secrets
import time
import traceback
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio

from replicator.store import Store, connect, open_client

from . import core, pds_capacity, scenarios
from .common import BENCH_NAMES, CpuMeter, Ctx, Sizes, fake_users, seed_users
from .report import ratios, rows, targets

SCENARIOS = ("a", "b", "backfill", "burst", "purge", "lag", "backlog", "core")
GROUPS = {
    "c": ("backfill", "burst", "purge", "lag", "backlog", "core"),
    "rss": ("backlog",),
    "all": SCENARIOS,
}
NEEDS_PDS = frozenset({"a", "b", "backfill", "burst", "purge", "lag", "backlog"})


def parse_only(text: str) -> list[str]:
    """`a,b,c` / `burst,lag` / `core` → the scenarios, in the bench's own order."""
    wanted: set[str] = set()
    for item in (p.strip().lower() for p in text.split(",")):
        if not item:
            continue
        if item in GROUPS:
            wanted.update(GROUPS[item])
        elif item in SCENARIOS:
            wanted.add(item)
        else:
            choices = ", ".join([*SCENARIOS, *GROUPS])
            raise ValueError(f"unknown measurement {item!r} (choose from {choices})")
    return [s for s in SCENARIOS if s in wanted]


def _leaf(exc: BaseException) -> BaseException:
    """The first exception inside (nested) exception groups: the one worth a line."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def needs_pds(only: Sequence[str]) -> bool:
    return any(s in NEEDS_PDS for s in only)


async def run_bench(
    *,
    mongodb_uri: str,
    pds_url: str,
    admin_password: str | None,
    sizes: Sizes,
    only: Sequence[str],
    work_dir: Path,
    server_pids: dict[str, int | None],
    stack_kind: dict[str, str],
    plc_url: str | None = None,
    profile_dir: Path | None = None,
    keep: bool = False,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    started = time.monotonic()
    load_start = os.getloadavg()
    run_id = secrets.token_hex(3)
    await anyio.Path(work_dir).mkdir(parents=True, exist_ok=True)
    if profile_dir is not None:
        await anyio.Path(profile_dir).mkdir(parents=True, exist_ok=True)
    async with open_client(mongodb_uri) as probe:  # a MongoDB out of reach: one line, now
        await probe.admin.command("ping")
    client = connect(mongodb_uri)
    ctx = Ctx(mongodb_uri, pds_url, client, sizes, run_id, work_dir, plc_url=plc_url,
              server_pids=server_pids, profile_dir=profile_dir, say=say)  # fmt: skip
    results: dict[str, Any] = {}
    notes: list[str] = []
    try:
        if needs_pds(only):
            seed = Store(client, ctx.db("seed"), BENCH_NAMES)
            t = time.monotonic()
            say(f"seeding {sizes.users} users with PDS accounts (4 at a time)...")
            ctx.users = await seed_users(seed, pds_url, sizes.users, prefix=f"b{run_id}u",
                                         admin_password=admin_password)  # fmt: skip
            if "purge" in only:
                ctx.purge_users = await seed_users(
                    seed, pds_url, sizes.purge_users, prefix=f"b{run_id}p",
                    admin_password=admin_password,
                )  # fmt: skip
            say(f"  {len(ctx.users) + len(ctx.purge_users)} accounts in "
                f"{time.monotonic() - t:.1f}s")  # fmt: skip
        else:
            ctx.users = fake_users(sizes.users, prefix=f"b{run_id}u")

        steps: list[tuple[str, str, Callable[[], Awaitable[dict[str, Any]]]]] = []
        if "a" in only:
            steps.append(
                (
                    "a_single",
                    "(a) PDS single-record commits",
                    lambda: pds_capacity.single_commits(
                        pds_url,
                        ctx.users,
                        seconds=sizes.capacity_seconds,
                        concurrency=sizes.single_concurrency,
                    ),
                )
            )
            steps.append(
                (
                    "a_batch",
                    "(a) PDS applyWrites batches",
                    lambda: pds_capacity.apply_writes_batches(
                        pds_url,
                        ctx.users,
                        seconds=sizes.capacity_seconds,
                        concurrency=sizes.batch_concurrency,
                    ),
                )
            )
        if "b" in only:
            steps.append(
                (
                    "b_old",
                    "(b) old approach",
                    lambda: pds_capacity.old_approach(
                        pds_url, ctx.users, seconds=sizes.old_seconds, max_moods=sizes.old_max
                    ),
                )
            )

        def at_shape(scenario: str) -> Callable[[], Awaitable[dict[str, Any]]]:
            async def step() -> dict[str, Any]:
                measured = results.get(f"c_{scenario}") or {}
                if "shape" not in measured:
                    raise RuntimeError(f"not measured: the {scenario} has no commit shape")
                out = await pds_capacity.at_shape(pds_url, ctx.users,
                                                  seconds=sizes.capacity_seconds,
                                                  shape=measured["shape"])  # fmt: skip
                if "error" in measured:  # the commits it sent before it failed
                    out["partial_shape"] = True
                return out

            return step

        c_steps = {
            "backfill": ("c_backfill", "(c) backfill", lambda: scenarios.backfill(ctx)),
            "backfill_shape": ("a_backfill_shape", "(a) PDS at the backfill's commit shape",
                               at_shape("backfill")),
            "burst": ("c_burst", "(c) burst", lambda: scenarios.burst(ctx)),
            "burst_shape": ("a_burst_shape", "(a) PDS at the burst's commit shape",
                            at_shape("burst")),
            "backfill_mongo": ("m_backfill", "(m) MongoDB ceiling: the backfill with a null PDS",
                               lambda: scenarios.backfill(ctx, null_pds=True)),
            "purge": ("c_purge", "(c) purge", lambda: scenarios.purge(ctx)),
            "lag": ("c_lag", "(c) lag", lambda: scenarios.lag(ctx)),
            "backlog": ("c_backlog", "(c) backlog / peak RSS", lambda: scenarios.backlog(ctx)),
            "core": ("c_core", "(c) core with Mongo, null PDS", lambda: core.core_mongo(ctx)),
        }  # fmt: skip
        for name in only:
            if name in c_steps:
                steps.append(c_steps[name])
            for also in ("shape", "mongo"):
                if f"{name}_{also}" in c_steps:
                    steps.append(c_steps[f"{name}_{also}"])
        for key, label, step in steps:
            say(f"{label}...")
            t = time.monotonic()
            meter = ctx.meter()
            cpu0 = meter.snapshot()
            try:
                results[key] = await step()
                results[key].setdefault("cpu", CpuMeter.between(cpu0, meter.snapshot()))
            except Exception as exc:
                leaf = _leaf(exc)
                cause = getattr(leaf, "cause", leaf)
                results[key] = {"error": f"{type(cause).__name__}: {cause}",
                                **getattr(leaf, "partial", {})}  # fmt: skip
                (work_dir / f"{key}.error.txt").write_text(traceback.format_exc())
                say(f"  FAILED: {results[key]['error']}")
            else:
                say(f"  done in {time.monotonic() - t:.1f}s")
            if key == "a_single" and "error" not in results[key]:
                results[key]["repos"] = len(ctx.users)
        if "core" in only:
            say("(c) core, pure...")
            results["c_core_pure"] = core.core_pure(ctx.users, sizes.core, ctx.profile_dir)
    finally:
        if not keep:
            for name in ctx.databases:
                await client.drop_database(name)
        await client.close()

    if stack_kind.get("mongodb", "").startswith("embedded"):
        notes.append(
            "MongoDB is SecantusDB (a single-node replica set in Python on WiredTiger, run "
            "with --sync-on-commit: every commit waits for its log fsync), not mongod: its "
            f"CPU is the 'mongo' column. Oplog kept: {stack_kind.get('oplog_entries', '?')} "
            "entries (the server's cap is a count; a real replica set's is bytes)."
        )
    notes.append(
        "The replicator reads a batch for at most --max-batch-ms (its default, 250 ms) or "
        "--batch-size events, whichever comes first; the shapes in the table (records per "
        "commit, repos in flight) are counted from its own PDS calls, not derived."
    )
    notes.append(
        "Sessions are logged in once at seeding and copied into each scenario's database, as "
        "a running sidecar holds them; (b) logs in per mood by design."
    )
    if "backlog" in only:
        notes.append(
            "Backlog: the moods are inserted while the replicator is stopped (a checkpoint at "
            "the stream's position saved first), then it is started from that checkpoint."
        )
    load_end = os.getloadavg()
    notes.append(
        f"Shared machine: load average {load_start[0]:.2f} at start, {load_end[0]:.2f} at end; "
        "'other' in the CPU table is what processes outside the bench used."
    )
    report: dict[str, Any] = {
        "bench": "replicator bench",
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "seconds": round(time.monotonic() - started, 1),
        "only": list(only),
        "sizes": sizes.as_dict(),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "loadavg_start": [round(v, 2) for v in load_start],
            "loadavg_end": [round(v, 2) for v in load_end],
        },
        "stack": stack_kind,
        "results": results,
        "ratios": ratios(results),
        "targets": targets(results),
        "notes": notes,
    }
    report["table"] = rows(report)
    return report
