"""`replicator`: run the sidecar, set up and run the local stack, check lexicons.

Exit codes of `run`: 0 stopped cleanly; 1 error (MongoDB unreachable, credentials refused);
2 usage (a setting missing or malformed); 3 history lost with `--on-history-lost=fail`; 4 the
change stream was invalidated (collection dropped/renamed); 5 another process took the lease
over. Every command's configuration and connection errors are one line (commands/errors.py);
the README lists each command's exit codes.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any, TypeVar

import anyio
import click

from . import health, logs
from .commands.backfill import audit_command, backfill
from .commands.check import check
from .commands.common import connection_options, index_option, settings_from
from .commands.dlq import dlq
from .commands.errors import Group
from .commands.lexicon import lexicon
from .commands.status import status
from .errors import ConfigError
from .rollout import split_users
from .service import run_replicator

F = TypeVar("F", bound=Callable[..., Any])


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


def _plugins() -> None:
    """The commands a working copy adds (`dev`, `setup`, `bench`: `replicator_dev`, declared
    under the `replicator.commands` entry points). The production image does not carry them:
    there they are absent, and `replicator` is the sidecar and the operator commands alone."""
    for ep in entry_points(group="replicator.commands"):
        try:
            command = ep.load()
        except ModuleNotFoundError as exc:
            if (exc.name or "").split(".")[0] != ep.module.split(".")[0]:
                raise  # the plugin is there but broken: say so
            continue  # declared, not installed here
        main.add_command(command, ep.name)


_plugins()


if __name__ == "__main__":  # pragma: no cover
    main()
