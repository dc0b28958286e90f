"""Options every command that talks to Mongo and the PDS shares, read from the app's env."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import fields
from typing import Any, TypeVar

import click

from ..config import (
    BYPASS_ENV,
    MONGODB_SCHEMES,
    NAME_OPTIONS,
    Option,
    Settings,
    check_url,
    option_of,
    parse_list,
    spelled,
)
from ..errors import ConfigError
from ..recordtypes import RecordType, enabled
from ..rollout import split_users
from ..store import Names

F = TypeVar("F", bound=Callable[..., Any])


def setting_option(name: str) -> Callable[[F], F]:
    """The click option of a setting, built from its `config.Option` and its default: flags,
    variables, defaults and help are written once, in `config.Settings`. The parameter is
    the setting's own name, whatever its flag (`--heartbeat`: `heartbeat_seconds`)."""
    spec, default = option_of(name)
    return _option(spec, default, name)


def _option(spec: Option, default: Any, param: str) -> Callable[[F], F]:
    kw: dict[str, Any] = {"help": spec.help, "show_default": True}
    if spec.env:
        kw |= {"envvar": spec.env, "show_envvar": True}
    if spec.metavar:
        kw |= {"metavar": spec.metavar}
    if spec.required:  # checked by the command, which names the flag and the variable
        kw |= {"show_default": False}
    elif spec.many:
        kw |= {"multiple": True, "show_default": False}
    elif isinstance(spec.kind, tuple):
        kw |= {"type": click.Choice(list(spec.kind)), "default": default}
    elif spec.kind is bool:
        kw |= {"default": default}
        if "/" not in spec.flag:
            kw |= {"is_flag": True, "show_default": False}
    elif spec.kind in (int, float):
        low, high = spec.low, spec.high
        kind: Any = spec.kind
        if spec.kind is int and (low is not None or high is not None):
            kind = click.IntRange(
                None if low is None else int(low), None if high is None else int(high)
            )
        elif low is not None or high is not None:
            kind = click.FloatRange(low, high)
        kw |= {"type": kind, "default": default}
    elif isinstance(default, tuple):  # a comma list
        kw |= {"default": ",".join(default)}
    else:
        kw |= {"default": default}
    return click.option(spec.flag, param, **kw)


def collection_option(name: str) -> Callable[[F], F]:
    """`--<name>-collection`: a collection's name (`config.NAME_OPTIONS`, `store.Names`)."""
    return _option(NAME_OPTIONS[name], getattr(Names(), name), f"{name}_collection")


def _apply(fn: F, options: list[Callable[[F], F]]) -> F:
    for option in reversed(options):
        fn = option(fn)
    return fn


def mongo_options(fn: F) -> F:
    """Where the data lives, for every command; each flag also reads the app's own variable."""
    return _apply(fn, [
        setting_option("mongodb_uri"),
        setting_option("db_name"),
        collection_option("moods"),
        collection_option("users"),
        collection_option("handles"),
        setting_option("record_types"),
    ])  # fmt: skip


def pds_option(fn: F) -> F:
    return setting_option("pds_url")(fn)


def connection_options(fn: F) -> F:
    """For the commands that write to the PDS: MongoDB, the PDS, the DID directory, lanes."""
    return mongo_options(pds_option(_apply(fn, [
        setting_option("plc_url"), setting_option("concurrency"),
    ])))  # fmt: skip


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
    return setting_option("create_indexes")(fn)


def _given(name: str) -> tuple[str | None, str]:
    """A setting's variable and flag."""
    spec = option_of(name)[0]
    return spec.env, spec.flag


def mongo_from(kw: dict[str, Any]) -> tuple[str, Names]:
    """The MongoDB URI (checked: scheme and host) and collection names, for the commands that
    need MongoDB alone (`status`, `dlq list`)."""
    uri = kw.get("mongodb_uri")
    if not uri:
        raise ConfigError("set {} or {}".format(*_given("mongodb_uri")))
    check_url(spelled("mongodb_uri"), uri, MONGODB_SCHEMES)
    return uri, Names(kw["moods_collection"], kw["users_collection"], kw["handles_collection"])


def rtypes_from(kw: dict[str, Any]) -> tuple[RecordType, ...]:
    """`--record-types`, each a known type (else `ConfigError` naming the known ones)."""
    return enabled(parse_list(kw["record_types"]))


def pds_url_from(kw: dict[str, Any]) -> str | None:
    """PDS_URL checked (scheme and host), or None when it is not set."""
    url = kw.get("pds_url")
    return check_url(spelled("pds_url"), url) if url else None


def settings_from(kw: dict[str, Any]) -> Settings:
    """The `Settings` of a command's options (every setting it has a flag for; the others
    keep their defaults), checked before anything is contacted: a bad one is a
    `ConfigError`."""
    uri, names = mongo_from(kw)
    pds_url = pds_url_from(kw)
    if not pds_url:
        raise ConfigError("set {} or {}".format(*_given("pds_url")))
    checked = {
        "rate_limit_bypass_key": os.environ.get(BYPASS_ENV) or None,
        "mongodb_uri": uri,
        "pds_url": pds_url,
        "names": names,
        "plc_url": check_url(spelled("plc_url"), kw["plc_url"]),
        "record_types": tuple(t.name for t in rtypes_from(kw)),
    }
    given = {f.name: kw[f.name] for f in fields(Settings) if f.name in kw}
    if "only_users" in given:
        given["only_users"] = split_users(given["only_users"])
    return Settings(**(given | checked))
