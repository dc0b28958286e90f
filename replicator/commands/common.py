"""Options every command that talks to Mongo and the PDS shares, read from the app's env."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

import click

from ..config import BYPASS_ENV, DEFAULT_DB, MONGODB_SCHEMES, Settings, check_url
from ..errors import ConfigError
from ..identity import PUBLIC_PLC
from ..recordtypes import TYPES, RecordType, enabled
from ..store import Names

F = TypeVar("F", bound=Callable[..., Any])


def mongo_options(fn: F) -> F:
    """Where the data lives, for every command; each flag also reads the app's own variable."""
    options = [
        click.option("--mongodb-uri", envvar="MONGODB_CONNECTION_STRING", show_envvar=True,
                     help="MongoDB connection string (a replica set: change streams need one)."),
        click.option("--db", "db_name", envvar="MONGODB_NAME", show_envvar=True,
                     default=DEFAULT_DB, show_default=True, help="Database holding `moods`."),
        click.option("--moods-collection", envvar="REPLICATOR_MOODS_COLLECTION",
                     show_envvar=True, default="moods", show_default=True),
        click.option("--users-collection", envvar="REPLICATOR_USERS_COLLECTION",
                     show_envvar=True, default="users", show_default=True),
        click.option("--handles-collection", envvar="REPLICATOR_HANDLES_COLLECTION",
                     show_envvar=True, default="@handles", show_default=True),
        click.option("--record-types", envvar="REPLICATOR_RECORD_TYPES", show_envvar=True,
                     default=",".join(Settings.record_types), show_default=True,
                     metavar="TYPE[,TYPE]",
                     help=f"Record types to mirror (comma list): {', '.join(TYPES)}."),
    ]  # fmt: skip
    for option in reversed(options):
        fn = option(fn)
    return fn


def pds_option(fn: F) -> F:
    return click.option("--pds-url", envvar="PDS_URL", show_envvar=True,
                        help="Base URL of the PDS hosting the users' repos.")(fn)  # fmt: skip


def connection_options(fn: F) -> F:
    """For the commands that write to the PDS: MongoDB, the PDS, the DID directory, lanes."""
    options = [
        click.option("--plc-url", envvar="REPLICATOR_PLC_URL", show_envvar=True,
                     default=PUBLIC_PLC, show_default=True,
                     help="PLC directory that resolves did:plc to each account's PDS."),
        click.option("--concurrency", envvar="REPLICATOR_CONCURRENCY", show_envvar=True,
                     type=click.IntRange(1, 256), default=8, show_default=True,
                     help="Users whose writes are applied in parallel."),
    ]  # fmt: skip
    for option in reversed(options):
        fn = option(fn)
    return mongo_options(pds_option(fn))


def empty_ok_option(fn: F) -> F:
    """For the commands that refuse a database without `moods` (a wrong MONGODB_NAME reads as
    an empty, healthy deployment otherwise)."""
    return click.option(
        "--empty-ok", is_flag=True, envvar="REPLICATOR_EMPTY_OK", show_envvar=True,
        help="Go on even though the database has no `moods` collection (a deployment whose "
             "app has not written a mood yet); without it, that is a usage error, exit 2.",
    )(fn)  # fmt: skip


def index_option(fn: F) -> F:
    """For the commands that open the runtime, which makes sure of the indexes first."""
    return click.option(
        "--create-indexes/--no-create-indexes", envvar="REPLICATOR_CREATE_INDEXES",
        show_envvar=True, default=True, show_default=True,
        help="Create the index on the app's moods (user) when it is missing. Either way a "
             "missing one is logged with the command that creates it; the replicator_* "
             "collections' own indexes are always created.",
    )(fn)  # fmt: skip


def mongo_from(kw: dict[str, Any]) -> tuple[str, Names]:
    """The MongoDB URI (checked: scheme and host) and collection names, for the commands that
    need MongoDB alone (`status`, `dlq list`)."""
    uri = kw.get("mongodb_uri")
    if not uri:
        raise ConfigError("set MONGODB_CONNECTION_STRING or --mongodb-uri")
    check_url("MONGODB_CONNECTION_STRING (--mongodb-uri)", uri, MONGODB_SCHEMES)
    return uri, Names(kw["moods_collection"], kw["users_collection"], kw["handles_collection"])


def rtypes_from(kw: dict[str, Any]) -> tuple[RecordType, ...]:
    """`--record-types`, each a known type (else `ConfigError` naming the known ones)."""
    return enabled(n.strip() for n in str(kw["record_types"]).split(",") if n.strip())


def pds_url_from(kw: dict[str, Any]) -> str | None:
    """PDS_URL checked (scheme and host), or None when it is not set."""
    url = kw.get("pds_url")
    return check_url("PDS_URL (--pds-url)", url) if url else None


def settings_from(kw: dict[str, Any], **extra: Any) -> Settings:
    """Every setting checked before anything is contacted: a bad one is a `ConfigError`."""
    uri, names = mongo_from(kw)
    pds_url = pds_url_from(kw)
    if not pds_url:
        raise ConfigError("set PDS_URL or --pds-url")
    return Settings(
        rate_limit_bypass_key=os.environ.get(BYPASS_ENV) or None,
        mongodb_uri=uri,
        db_name=kw["db_name"],
        pds_url=pds_url,
        names=names,
        concurrency=kw["concurrency"],
        plc_url=check_url("REPLICATOR_PLC_URL (--plc-url)", kw["plc_url"]),
        create_indexes=kw.get("create_indexes", True),
        record_types=tuple(t.name for t in rtypes_from(kw)),
        **extra,
    )
