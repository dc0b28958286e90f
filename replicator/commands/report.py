"""Progress and summaries for long commands: a live bar on a terminal, plain lines elsewhere."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import click
import orjson

from ..backfill import Progress


@contextmanager
def progress_reporter(
    label: str, total: int, *, quiet: bool
) -> Iterator[Callable[[Progress], None]]:
    """Yields the callback the backfill calls after each user."""
    if quiet or total == 0:
        yield lambda p: None
        return
    if sys.stderr.isatty():
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            TextColumn,
            TimeElapsedColumn,  # fmt: skip
            TimeRemainingColumn,
        )
        from rich.progress import Progress as Bar

        with Bar(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("users · {task.fields[moods]} moods · {task.fields[written]} written"),
            TimeElapsedColumn(), TimeRemainingColumn(), transient=False,
        ) as bar:  # fmt: skip
            task = bar.add_task(label, total=total, moods=0, written=0)

            def update(p: Progress) -> None:
                bar.update(task, completed=p.done_users, moods=p.moods, written=p.written)

            yield update
        return
    last = [0.0]

    def line(p: Progress) -> None:
        now = time.monotonic()
        if now - last[0] < 5 and p.done_users < p.total_users:
            return
        last[0] = now
        eta = p.eta_seconds
        click.echo(
            f"{label}: {p.done_users}/{p.total_users} users, {p.moods} moods, "
            f"{p.written} written" + (f", ETA {eta:.0f}s" if eta is not None else ""),
            err=True,
        )

    yield line


def emit(summary: dict[str, Any], *, as_json: bool, title: str) -> None:
    if as_json:
        click.echo(orjson.dumps(summary, option=orjson.OPT_INDENT_2).decode())
        return
    click.echo(title)
    for key, value in summary.items():
        if isinstance(value, dict):
            if value:
                click.echo(f"  {key}:")
                for k, v in value.items():
                    click.echo(f"    {k}: {v}")
        elif isinstance(value, list):
            if value:
                click.echo(f"  {key}:")
                for item in value:
                    click.echo(f"    {item}")
        else:
            click.echo(f"  {key}: {value}")
