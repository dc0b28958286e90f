"""`replicator check`: the preflight, before the first `run` against real servers.

It reads the settings `run` reads (the same options and environment), tries what `run` will
do, and prints one line per check. The checks are in `replicator.probes` (I/O) and
`replicator.preflight` (verdicts).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import anyio
import click

from ..preflight import DEFAULT_OUTAGE_HOURS, exit_code, render, render_json
from ..probes import run_checks
from .common import connection_options, index_option, settings_from

__all__ = ["check"]


@click.command()
@connection_options
@index_option
@click.option(
    "--sample-accounts",
    envvar="REPLICATOR_CHECK_SAMPLE_ACCOUNTS",
    show_envvar=True,
    type=click.IntRange(0, 100),
    default=3,
    show_default=True,
    help="Users with ATProto credentials (picked at random) whose session is tried.",
)
@click.option(
    "--outage-hours",
    envvar="REPLICATOR_CHECK_OUTAGE_HOURS",
    show_envvar=True,
    type=click.FloatRange(0.0),
    default=DEFAULT_OUTAGE_HOURS,
    show_default=True,
    help="The longest replicator outage the oplog must outlast: warn below it.",
)
@click.option(
    "--lexicon-identifier",
    envvar="REPLICATOR_LEXICON_IDENTIFIER",
    show_envvar=True,
    metavar="HANDLE|DID",
    help="The lexicon authority's account (as for `lexicon publish`); unset: the "
    "lexicon is not checked.",
)
@click.option(
    "--lexicons",
    "lexicon_dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="Lexicon directory to compare with.",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object (for machines).")
def check(
    sample_accounts: int,
    outage_hours: float,
    lexicon_identifier: str | None,
    lexicon_dir: Path | None,
    as_json: bool,
    **kw: Any,
) -> None:  # fmt: skip
    """Preflight: try everything `run` needs, one line per check, with the fix.

    \b
    MongoDB reachable and a replica set; clock skew against it; the privileges `run` uses,
    tried (changeStream on moods and users, find on moods, users and @handles, update on
    moods, the moods.user index, read and write in replicator_*); the oplog window against
    the checkpoint's age; pre-images on moods (advised); the PDS and its version; a sample
    of accounts can get a session; the lexicons are published and equal to lexicons/.

    Changes nothing of the app's data (the update on moods matches nothing; the probe
    document goes to replicator_preflight and is deleted). Creates the moods.user index if
    it is missing, as `run` does at start.

    \b
    Exit status: 0 no check failed (warnings are advice), 1 some check failed, 2 usage.
    """
    settings = settings_from(kw)
    started = time.time()
    results = anyio.run(
        lambda: run_checks(
            settings,
            sample_accounts=sample_accounts,
            outage_hours=outage_hours,
            lexicon_identifier=lexicon_identifier,
            lexicon_dir=lexicon_dir,
        )
    )
    click.echo(render_json(results, started) if as_json else render(results))
    sys.exit(exit_code(results))
