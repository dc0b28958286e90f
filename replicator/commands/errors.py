"""How every command reports a problem of the deployment: one line and the documented exit.

The adapters raise `ConfigError` (a setting missing or malformed: exit 2, a usage error) or
`Unavailable` (a server that cannot be used as configured: the command's error exit code) from
replicator/errors.py; this is the one place that turns them into a line on stderr, so no
command repeats it. The line is redacted, and there is no traceback unless `--debug` or
`REPLICATOR_LOG_LEVEL=DEBUG` (redacted too). Any other exception is a bug: its traceback,
redacted, and the same error exit code (an uncaught exception would exit 1, which for `audit`
means "divergent").
"""

from __future__ import annotations

import os
import traceback
from typing import Any, NoReturn

import click
from loguru import logger

from ..errors import ConfigError, OperatorError, Unavailable
from ..logs import redact

EXIT_USAGE = 2
# Where 1 already means a finding (audit: divergent; backfill: moods failed; dlq: entries
# remain; lexicon: invalid or refused), an error exits 2; everywhere else it exits 1.
EXIT_ERROR = {"audit": 2, "backfill": 2, "dlq": 2, "lexicon": 2}


class Group(click.Group):
    """The top-level group: reports operator errors for every subcommand, and lists each
    command's whole summary (click cuts them at the terminal width with "...")."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            try:
                return super().invoke(ctx)
            except BaseExceptionGroup as group:  # anyio's task groups wrap what they raise
                problem = _sole(group)
                if problem is None:
                    raise
                raise problem  # noqa: B904 - its own cause (the driver's error) is kept
        except ConfigError as exc:
            _fail(ctx, exc, EXIT_USAGE)
        except Unavailable as exc:
            _fail(ctx, exc, error_exit(ctx))
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise  # click's own: usage errors, exits, Ctrl-C at a prompt
        except Exception as exc:  # a bug: its traceback (redacted), and the error exit code
            _print_traceback(exc)
            ctx.exit(error_exit(ctx))

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = []
        for name in self.list_commands(ctx):
            command = self.get_command(ctx, name)
            if command is not None and not command.hidden:
                rows.append((name, command.get_short_help_str(limit=1_000)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


def _sole(group: BaseExceptionGroup[Any]) -> OperatorError | None:
    """The operator error a group holds alone (nested groups included), else None."""
    inner: BaseException = group
    while isinstance(inner, BaseExceptionGroup) and len(inner.exceptions) == 1:
        inner = inner.exceptions[0]
    return inner if isinstance(inner, OperatorError) else None


def error_exit(ctx: click.Context) -> int:
    return EXIT_ERROR.get(ctx.invoked_subcommand or "", 1)


def debugging(ctx: click.Context) -> bool:
    return bool(ctx.params.get("debug")) or (
        os.environ.get("REPLICATOR_LOG_LEVEL", "").upper() == "DEBUG"
    )


def _print_traceback(exc: BaseException) -> None:
    click.echo(redact("".join(traceback.format_exception(exc))).rstrip(), err=True)


def _fail(ctx: click.Context, exc: OperatorError, code: int) -> NoReturn:
    if debugging(ctx):
        _print_traceback(exc)
    where = " ".join(filter(None, (ctx.command_path, ctx.invoked_subcommand)))
    line = redact(f"{where}: {exc}")
    if os.environ.get("REPLICATOR_LOG_FORMAT") == "json":  # a log collector reads JSON lines
        logger.critical("{}", line)
    else:
        click.echo(line, err=True)
    ctx.exit(code)


def absent(name: str) -> click.Command:
    """A command the working copy adds (`replicator_dev`, declared under the
    `replicator.commands` entry points) where it is not installed, as in the production image:
    hidden from the help, and asking for it says why in one line (exit 2, a usage error)."""

    @click.command(
        name,
        hidden=True,
        add_help_option=False,
        context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    )
    def command() -> None:
        raise ConfigError(
            "not in this installation: a development command, which comes with the "
            "repository's working copy (replicator_dev/: `pip install -e '.[dev]'` in a clone); "
            "this one has `run` and the operator commands (`replicator --help`)"
        )

    return command
