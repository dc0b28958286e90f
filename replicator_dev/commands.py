"""`replicator setup` and `replicator dev`: the local stack, from a working copy."""

from __future__ import annotations

import sys

import click


@click.command()
def setup() -> None:
    """Install the local stack's reference PDS (npm ci with Node 22 from the venv)."""
    from replicator_dev.devstack.node import ensure_pds_installed, pds_installed

    if pds_installed():
        click.echo("reference PDS already installed")
        return
    ensure_pds_installed()
    click.echo("reference PDS installed")


@click.command()
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
    from replicator_dev.devstack.dev import run_dev

    sys.exit(run_dev(db_name, run_replicator_too=not no_run))
