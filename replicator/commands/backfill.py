"""`replicator backfill` and `replicator audit`: migrate what exists, then prove it."""

from __future__ import annotations

import sys
from dataclasses import replace
from typing import Any

import anyio
import click

from ..apply import Applier
from ..audit import audit
from ..backfill import Backfill, users_in_scope
from ..runtime import open_runtime
from .common import connection_options, empty_ok_option, index_option, settings_from
from .report import emit, progress_reporter

# Command-line tools give up on a PDS that stays unreachable, rather than hang like the sidecar.
CLI_RETRY_TIMEOUT = 120.0


@click.command()
@connection_options
@index_option
@empty_ok_option
@click.option(
    "--user",
    "users",
    multiple=True,
    metavar="SUB|@HANDLE",
    help="Only this user (repeatable). Default: every user with a mood.",
)
@click.option("--limit", type=click.IntRange(1), help="Stop after about N moods (whole users).")
@click.option("--rate", type=click.FloatRange(0.1), help="Writes per second, all users together.")
@click.option("--dry-run", is_flag=True, help="Say what would be done; write nothing anywhere.")
@click.option("--fix", is_flag=True, help="Also remove duplicate and orphan records.")
@click.option("--restart", is_flag=True, help="Start over instead of resuming an unfinished run.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def backfill(**kw: Any) -> None:
    """Mirror every existing mood to its desired state (resumable, safe next to `run`).

    Adopts records the old inline writer made (found by `ref` or legacy `mongoId`), keeps each
    mood's `atproto.rkey`, reports duplicates and orphans (removes them with --fix).
    Interrupted (Ctrl-C, kill -9), it resumes where it stopped when run again.
    Exit: 0 done, 1 some moods failed or were parked, 2 usage or error, 130 interrupted.
    """  # fmt: skip
    settings = replace(settings_from(kw), write_rate=kw["rate"] or None)
    try:
        summary = anyio.run(_backfill, settings, kw)
    except KeyboardInterrupt:
        click.echo("interrupted: run the same command again to resume", err=True)
        sys.exit(130)
    except LookupError as exc:
        raise click.UsageError(str(exc)) from None
    emit(summary, as_json=kw["as_json"], title="backfill summary")
    sys.exit(1 if summary["failed"] else 0)


async def _backfill(settings: Any, kw: dict[str, Any]) -> dict[str, Any]:
    async with open_runtime(
        settings, retry_timeout=CLI_RETRY_TIMEOUT, require_pds=True,
        require_moods=not kw["empty_ok"],
    ) as rt:  # fmt: skip
        users = await users_in_scope(rt.store, kw["users"])
        with progress_reporter("backfill", len(users), quiet=kw["as_json"]) as on_progress:
            job = Backfill(rt.applier, fix=kw["fix"], concurrency=settings.concurrency,
                           on_progress=on_progress)  # fmt: skip
            report = await job.run(users, limit=kw["limit"], restart=kw["restart"])
        return report.summary()


@click.command(name="audit")
@connection_options
@index_option
@empty_ok_option
@click.option(
    "--user", "users", multiple=True, metavar="SUB|@HANDLE", help="Only this user (repeatable)."
)
@click.option("--sample", type=click.IntRange(1), help="N users picked at random.")
@click.option("--fix", is_flag=True, help="Repair every divergence, then audit again.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def audit_command(**kw: Any) -> None:
    """Compare Mongo, the ledger and every record on the PDS; report (and --fix) divergences.

    Divergences: records missing, content mismatches, duplicates, orphans (no live mood),
    stale records of deleted moods, an out-of-date ledger. Also reported: moods whose user has
    no account, moods that cannot become a valid record (with the reason), dead letters.
    Exit: 0 in sync, 1 divergent, 2 usage or error. Fit for cron and CI.
    """  # fmt: skip
    settings = settings_from(kw)
    try:
        summary = anyio.run(_audit, settings, kw)
    except LookupError as exc:
        raise click.UsageError(str(exc)) from None
    emit(summary, as_json=kw["as_json"], title="audit")
    sys.exit(0 if summary["in_sync"] else 1)


async def _audit(settings: Any, kw: dict[str, Any]) -> dict[str, Any]:
    async with open_runtime(
        settings, retry_timeout=CLI_RETRY_TIMEOUT, require_pds=True,
        require_moods=not kw["empty_ok"],
    ) as rt:  # fmt: skip
        users = await users_in_scope(rt.store, kw["users"], kw["sample"])
        dry = Applier(
            rt.store,
            rt.writer,
            rt.pds,
            concurrency=settings.concurrency,
            dry_run=True,
        )
        whole = not kw["users"] and not kw["sample"]
        report = await audit(rt.store, dry, rt.applier, users, fix=kw["fix"], whole=whole)
        return report.summary()


__all__ = ["audit_command", "backfill"]
