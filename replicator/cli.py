"""`replicator`: run the sidecar, set up and run the local stack, check lexicons.

Exit codes of `run`: 0 stopped cleanly; 1 error (MongoDB unreachable, credentials refused);
2 usage (a setting missing or malformed); 3 history lost with `--on-history-lost=fail`; 4 the
change stream was invalidated (collection dropped/renamed); 5 another process took the lease
over. Every command's configuration and connection errors are one line (commands/errors.py);
the README lists each command's exit codes.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import anyio
import click
from loguru import logger

from . import health, logs
from .commands.backfill import audit_command, backfill
from .commands.check import check
from .commands.common import connection_options, index_option, settings_from
from .commands.dlq import dlq
from .commands.errors import Group
from .commands.lexicon import lexicon
from .commands.status import status
from .config import Settings
from .errors import ConfigError
from .lease import Fenced
from .rollout import split_users
from .runtime import open_runtime
from .stream import HistoryLost, StreamInvalidated

F = TypeVar("F", bound=Callable[..., Any])

EXIT_HISTORY_LOST = 3
EXIT_INVALIDATED = 4
EXIT_LEASE_LOST = 5


@click.group(
    cls=Group,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(package_name="moods-replicator")
@click.option(
    "--debug",
    is_flag=True,
    help="Log at DEBUG and show the traceback of a configuration or connection error.",
)
def main(debug: bool) -> None:
    """Mirror aesthetic.computer moods from MongoDB into users' ATProto PDS repos.

    `replicator dev` starts a local stack and runs everything; `replicator run` is the
    production sidecar. Every flag can also be set by the environment variable shown.
    """
    logs.setup(level="DEBUG" if debug else None)


main.add_command(lexicon)
main.add_command(backfill)
main.add_command(audit_command)
main.add_command(status)
main.add_command(dlq)
main.add_command(check)

from .commands.bench import bench  # noqa: E402  (lean: the bench loads its modules when run)

main.add_command(bench)


def run_options(fn: F) -> F:
    options = [
        click.option("--batch-size", envvar="REPLICATOR_BATCH_SIZE", show_envvar=True,
                     type=click.IntRange(1, 10_000), default=2000, show_default=True,
                     help="Change events applied (and checkpointed) together at most."),
        click.option("--on-history-lost", envvar="REPLICATOR_ON_HISTORY_LOST",
                     show_envvar=True, type=click.Choice(["reconcile", "fail"]),
                     default="reconcile", show_default=True,
                     help="When the saved resume token is no longer usable: reconcile every "
                          "mood against the PDS and go on, or exit with code 3."),
        click.option("--max-batch-ms", envvar="REPLICATOR_MAX_BATCH_MS", show_envvar=True,
                     type=click.IntRange(10, 60_000), default=250, show_default=True,
                     help="A batch is applied after this long of reading, even if not full."),
        click.option("--reset-position", is_flag=True,
                     help="Ignore the saved position: start at the current one and reconcile "
                          "every user against the PDS (after the collection was dropped or "
                          "renamed: exit 4). Resumable."),
        click.option("--lane-deadline", envvar="REPLICATOR_LANE_DEADLINE", show_envvar=True,
                     type=click.FloatRange(1.0), default=60.0, show_default=True,
                     help="Seconds a user's PDS writes may keep failing before that user's "
                          "work is parked (retried with backoff) and the others move on."),
        click.option("--account-recheck", "account_recheck_seconds",
                     envvar="REPLICATOR_ACCOUNT_RECHECK_SECONDS", show_envvar=True,
                     type=click.FloatRange(0.1), default=30.0, show_default=True,
                     help="First re-check of a deactivated, taken down or moved account "
                          "(then with backoff, at most every 15 minutes)."),
        click.option("--heartbeat", "heartbeat_seconds", envvar="REPLICATOR_HEARTBEAT_SECONDS",
                     show_envvar=True, type=float, default=5.0, show_default=True,
                     help="Seconds between checkpoint saves on a quiet collection."),
        click.option("--lease-seconds", envvar="REPLICATOR_LEASE_SECONDS", show_envvar=True,
                     type=click.FloatRange(1.0), default=15.0, show_default=True,
                     help="One process writes at a time: a second one waits, and takes over "
                          "this long after the first dies."),
        click.option("--dry-run", envvar="REPLICATOR_DRY_RUN", show_envvar=True, is_flag=True,
                     help="Shadow mode: read the stream, log and count what would be done, "
                          "write nothing; keeps its own checkpoint."),
        click.option("--only-user", "only_users", envvar="REPLICATOR_ONLY_USERS",
                     show_envvar=True, multiple=True, metavar="SUB|@HANDLE",
                     help="Mirror only these users (repeatable; the variable takes a list). "
                          "Others' moods are skipped and recorded for a later backfill."),
        click.option("--http-addr", envvar="REPLICATOR_HTTP_ADDR", show_envvar=True,
                     default=health.DEFAULT_HTTP_ADDR, show_default=True,
                     help="Where /metrics, /healthz and /readyz listen (`off`: nowhere)."),
    ]  # fmt: skip
    for option in reversed(options):
        fn = option(fn)
    return fn


@main.command()
@connection_options
@run_options
@index_option
def run(**kw: Any) -> None:
    """Tail the moods change stream and mirror every change into the PDS (the sidecar).

    Resumes from the token saved in Mongo. SIGTERM or Ctrl-C: finishes the batch in flight,
    saves the checkpoint and exits 0. Other exits: 1 error (MongoDB unreachable, credentials
    refused), 2 usage, 3 history lost with --on-history-lost=fail, 4 the collection was
    dropped or renamed, 5 another process took the lease over.
    """
    try:
        health.parse_addr(kw["http_addr"])
    except ValueError as exc:
        raise ConfigError(f"REPLICATOR_HTTP_ADDR (--http-addr): {exc}") from None
    settings = settings_from(
        kw,
        batch_size=kw["batch_size"],
        max_batch_ms=kw["max_batch_ms"],
        reset_position=kw["reset_position"],
        lane_deadline=kw["lane_deadline"],
        account_recheck_seconds=kw["account_recheck_seconds"],
        on_history_lost=kw["on_history_lost"],
        heartbeat_seconds=kw["heartbeat_seconds"],
        lease_seconds=kw["lease_seconds"],
        dry_run=kw["dry_run"],
        only_users=split_users(kw["only_users"]),
        http_addr=kw["http_addr"],
    )
    sys.exit(anyio.run(functools.partial(run_replicator, settings)))


async def run_replicator(settings: Settings, ready: Callable[[], None] | None = None) -> int:
    stop = anyio.Event()
    # Signals are ours from the first line: a Ctrl-C while the runtime is still opening must
    # stop it too, not fall to asyncio's default handler.
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with anyio.create_task_group() as tg:

            async def on_signals() -> None:
                async for signum in signals:
                    logger.info("{}: finishing the batch in flight, then exiting",
                                signal.Signals(signum).name)  # fmt: skip
                    stop.set()
                    return

            tg.start_soon(on_signals)
            code = await _run(settings, stop, ready)
            tg.cancel_scope.cancel()
    return code


async def _run(settings: Settings, stop: anyio.Event, ready: Callable[[], None] | None) -> int:
    logger.info(
        "replicator starting: mongodb={} db={} pds={}",
        logs.redact_uri(settings.mongodb_uri), settings.db_name, settings.pds_url,
    )  # fmt: skip
    async with open_runtime(settings, lease=True) as rt, anyio.create_task_group() as tg:
        replicator = rt.replicator()
        await tg.start(health.serve, rt, replicator)  # /metrics /healthz /readyz, stats
        code = 0
        try:
            with anyio.CancelScope() as scope:

                async def grace() -> None:
                    await stop.wait()
                    await anyio.sleep(settings.shutdown_grace)
                    logger.warning("in-flight work abandoned after {}s; it will be replayed",
                                   settings.shutdown_grace)  # fmt: skip
                    scope.cancel()

                tg.start_soon(grace)
                if ready:
                    ready()
                await replicator.run(stop)
        except HistoryLost:
            code = EXIT_HISTORY_LOST
        except StreamInvalidated as exc:
            logger.critical("{}; not resuming. Check the collection, then `replicator run`.", exc)
            code = EXIT_INVALIDATED
        except Fenced:
            code = EXIT_LEASE_LOST
        _exit_within(settings.shutdown_grace + 5.0, code)
        tg.cancel_scope.cancel()
    logger.info("replicator stopped ({} events applied)", replicator.events_applied)
    return code


def _exit_within(seconds: float, code: int) -> None:
    """If closing the clients hangs (a PyMongo async client whose operations were cancelled
    can, on Python 3.11: tests/test_fencing.py), exit anyway: the supervisor restarts us."""

    def hard_exit() -> None:
        logger.error("shutdown did not finish within {:.0f}s; exiting", seconds)
        os._exit(code)

    timer = threading.Timer(seconds, hard_exit)
    timer.daemon = True
    timer.start()


@main.command()
def setup() -> None:
    """Install the local stack's reference PDS (npm ci with Node 22 from the venv)."""
    from .devstack.node import ensure_pds_installed, pds_installed

    if pds_installed():
        click.echo("reference PDS already installed")
        return
    ensure_pds_installed()
    click.echo("reference PDS installed")


@main.command()
@click.option(
    "--db",
    "db_name",
    default="aesthetic_dev",
    show_default=True,
    help="Database for the demo (reset at start: the local PDS starts empty).",
)
@click.option("--no-run", is_flag=True, help="Start and seed the stack, but not the replicator.")
def dev(db_name: str, no_run: bool) -> None:
    """Start the local stack (MongoDB + reference PDS), seed a demo user, run the replicator.

    Uses MONGODB_CONNECTION_STRING / PDS_URL when set, embedded servers otherwise (data and
    logs under ./.state). Ctrl-C stops everything.
    """  # fmt: skip
    from .devstack.dev import run_dev

    sys.exit(run_dev(db_name, run_replicator_too=not no_run))


if __name__ == "__main__":  # pragma: no cover
    main()
