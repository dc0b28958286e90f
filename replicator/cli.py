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
from .commands.common import connection_options, index_option, setting_option, settings_from
from .commands.dlq import dlq
from .commands.errors import Group, absent
from .commands.lexicon import lexicon
from .commands.status import status
from .config import spelled
from .errors import ConfigError
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
    for name in reversed(RUN_SETTINGS):
        fn = setting_option(name)(fn)
    return fn


RUN_SETTINGS = (
    "batch_size", "on_history_lost", "max_batch_ms", "reset_position", "lane_deadline",
    "account_recheck_seconds", "heartbeat_seconds", "lease_seconds", "dry_run", "only_users",
    "http_addr",
)  # fmt: skip


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
        raise ConfigError(f"{spelled('http_addr')}: {exc}") from None
    settings = settings_from(kw)
    sys.exit(anyio.run(functools.partial(run_replicator, settings)))


def _plugins() -> None:
    """The commands a working copy adds (`dev`, `setup`, `bench`: `replicator_dev`, declared
    under the `replicator.commands` entry points). The production image does not carry them:
    there they are absent (asking for one says so), and `replicator` is the sidecar and the
    operator commands alone."""
    for ep in entry_points(group="replicator.commands"):
        try:
            command = ep.load()
        except ModuleNotFoundError as exc:
            if (exc.name or "").split(".")[0] != ep.module.split(".")[0]:
                raise  # the plugin is there but broken: say so
            command = absent(ep.name)  # declared, not installed here
        main.add_command(command, ep.name)


_plugins()


if __name__ == "__main__":  # pragma: no cover
    main()
