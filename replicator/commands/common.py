"""Options every command that talks to Mongo and the PDS shares, read from the app's env."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

from ..config import DEFAULT_DB, Settings
from ..identity import PUBLIC_PLC
from ..store import Names

F = TypeVar("F", bound=Callable[..., Any])


def connection_options(fn: F) -> F:
    """Where the data lives; each flag also reads the app's own environment variable."""
    options = [
        click.option("--mongodb-uri", envvar="MONGODB_CONNECTION_STRING", show_envvar=True,
                     help="MongoDB connection string (a replica set: change streams need one)."),
        click.option("--db", "db_name", envvar="MONGODB_NAME", show_envvar=True,
                     default=DEFAULT_DB, show_default=True, help="Database holding `moods`."),
        click.option("--pds-url", envvar="PDS_URL", show_envvar=True,
                     help="Base URL of the PDS hosting the users' repos."),
        click.option("--moods-collection", envvar="REPLICATOR_MOODS_COLLECTION",
                     show_envvar=True, default="moods", show_default=True),
        click.option("--users-collection", envvar="REPLICATOR_USERS_COLLECTION",
                     show_envvar=True, default="users", show_default=True),
        click.option("--handles-collection", envvar="REPLICATOR_HANDLES_COLLECTION",
                     show_envvar=True, default="@handles", show_default=True),
        click.option("--plc-url", envvar="REPLICATOR_PLC_URL", show_envvar=True,
                     default=PUBLIC_PLC, show_default=True,
                     help="PLC directory that resolves did:plc to each account's PDS."),
        click.option("--concurrency", envvar="REPLICATOR_CONCURRENCY", show_envvar=True,
                     type=click.IntRange(1, 256), default=8, show_default=True,
                     help="Users whose writes are applied in parallel."),
    ]  # fmt: skip
    for option in reversed(options):
        fn = option(fn)
    return fn


def settings_from(kw: dict[str, Any], **extra: Any) -> Settings:
    if not kw.get("mongodb_uri"):
        raise click.UsageError("set MONGODB_CONNECTION_STRING or --mongodb-uri")
    if not kw.get("pds_url"):
        raise click.UsageError("set PDS_URL or --pds-url")
    names = Names(kw["moods_collection"], kw["users_collection"], kw["handles_collection"])
    return Settings(
        mongodb_uri=kw["mongodb_uri"],
        db_name=kw["db_name"],
        pds_url=kw["pds_url"],
        names=names,
        concurrency=kw["concurrency"],
        plc_url=kw["plc_url"],
        **extra,
    )
