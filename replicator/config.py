"""Settings: the app's own environment names, the replicator's under `REPLICATOR_*`."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Literal
from urllib.parse import urlsplit

from .errors import ConfigError
from .identity import PUBLIC_PLC
from .logs import redact_uri
from .store import Names

DEFAULT_DB = "aesthetic"
# The PDS's own name for it: an operator copies it from the PDS's environment (a secret: read
# from the environment only, never a flag that `ps` would show).
BYPASS_ENV = "PDS_RATE_LIMIT_BYPASS_KEY"


@dataclass(frozen=True)
class Option:
    """How a setting is given: its flag, its environment variable, its help (`commands`
    builds the click option from it, with the field's default). `kind`: the value's type,
    or the choices; `low`/`high`: its bounds."""

    flag: str
    env: str | None
    help: str | None
    kind: type | tuple[str, ...] = str
    low: float | None = None
    high: float | None = None
    many: bool = False  # repeatable (the variable takes a list)
    metavar: str | None = None
    # The command refuses to start without it (and says which flag and variable): no default
    # on the command line, whatever the field's (which is for code that builds `Settings`).
    required: bool = False


def setting(default: Any, option: Option) -> Any:
    return field(default=default, metadata={"option": option})


def option_of(name: str) -> tuple[Option, Any]:
    """A setting's `Option` and its default: the one place either is written."""
    f = next(f for f in fields(Settings) if f.name == name)
    return f.metadata["option"], f.default


def spelled(name: str) -> str:
    """How a setting is given, for messages: `PDS_URL (--pds-url)`."""
    spec = option_of(name)[0]
    return f"{spec.env} ({spec.flag})" if spec.env else spec.flag


_R = "REPLICATOR_"


@dataclass(frozen=True)
class Settings:
    """Every setting, its default, and how it is given (`Option`)."""

    mongodb_uri: str = field(
        metadata={
            "option": Option(
                "--mongodb-uri",
                "MONGODB_CONNECTION_STRING",
                "MongoDB connection string (a replica set: change streams need one).",
                required=True,
            )
        }
    )
    db_name: str = setting(
        DEFAULT_DB, Option("--db", "MONGODB_NAME", "Database holding the app's collections.")
    )
    pds_url: str = setting(
        "http://localhost:2583",
        Option(
            "--pds-url", "PDS_URL", "Base URL of the PDS hosting the users' repos.", required=True
        ),
    )
    # Each collection's flag and variable: `NAME_OPTIONS`; the defaults are `Names`'.
    names: Names = field(default_factory=Names)
    batch_size: int = setting(
        2000,
        Option(
            "--batch-size",
            f"{_R}BATCH_SIZE",
            "Change events applied (and checkpointed) together at most.",
            int,
            1,
            10_000,
        ),
    )
    max_batch_ms: int = setting(
        250,
        Option(
            "--max-batch-ms",
            f"{_R}MAX_BATCH_MS",
            "A batch is applied after this long of reading, even if not full.",
            int,
            10,
            60_000,
        ),
    )
    concurrency: int = setting(
        8,
        Option(
            "--concurrency",
            f"{_R}CONCURRENCY",
            "Users whose writes are applied in parallel.",
            int,
            1,
            256,
        ),
    )
    heartbeat_seconds: float = setting(
        5.0,
        Option(
            "--heartbeat",
            f"{_R}HEARTBEAT_SECONDS",
            "Seconds between checkpoint saves on a quiet collection.",
            float,
        ),
    )
    parked_retry_seconds: float = 60.0
    on_history_lost: Literal["reconcile", "fail"] = setting(
        "reconcile",
        Option(
            "--on-history-lost",
            f"{_R}ON_HISTORY_LOST",
            "When the saved resume token is no longer usable: reconcile every document against "
            "the PDS and go on, or exit with code 3.",
            ("reconcile", "fail"),
        ),
    )
    dry_run: bool = setting(
        False,
        Option(
            "--dry-run",
            f"{_R}DRY_RUN",
            "Shadow mode: read the stream, log and count what would "
            "be done, write nothing; keeps its own checkpoint.",
            bool,
        ),
    )
    only_users: tuple[str, ...] = setting(
        (),
        Option(
            "--only-user",
            f"{_R}ONLY_USERS",
            "Mirror only these users (repeatable; the variable "
            "takes a list). Others' documents are skipped and recorded for a later backfill.",
            many=True,
            metavar="SUB|@HANDLE",
        ),
    )
    http_timeout: float = 30.0
    shutdown_grace: float = 10.0
    lease_seconds: float = setting(
        15.0,
        Option(
            "--lease-seconds",
            f"{_R}LEASE_SECONDS",
            "One process writes at a time: a second one "
            "waits, and takes over this long after the first dies.",
            float,
            1.0,
        ),
    )
    lane_deadline: float = setting(
        60.0,
        Option(
            "--lane-deadline",
            f"{_R}LANE_DEADLINE",
            "Seconds a user's PDS writes may keep failing "
            "before that user's work is parked (retried with backoff) and the others move on.",
            float,
            1.0,
        ),
    )
    reset_position: bool = setting(
        False,
        Option(
            "--reset-position",
            None,
            "Ignore the saved position: start at the current one and "
            "reconcile every user against the PDS (after the collection was dropped or renamed: "
            "exit 4). Resumable.",
            bool,
        ),
    )
    plc_url: str = setting(
        PUBLIC_PLC,
        Option(
            "--plc-url",
            f"{_R}PLC_URL",
            "PLC directory that resolves did:plc to each account's PDS.",
        ),
    )
    account_recheck_seconds: float = setting(
        30.0,
        Option(
            "--account-recheck",
            f"{_R}ACCOUNT_RECHECK_SECONDS",
            "First re-check of a deactivated, "
            "taken down or moved account (then with backoff, at most every 15 minutes).",
            float,
            0.1,
        ),
    )
    http_addr: str = setting(
        "127.0.0.1:9464",
        Option(
            "--http-addr",
            f"{_R}HTTP_ADDR",
            "Where /metrics, /healthz and /readyz listen (`off`: nowhere).",
        ),
    )
    create_indexes: bool = setting(
        True,
        Option(
            "--create-indexes/--no-create-indexes",
            f"{_R}CREATE_INDEXES",
            "Create the index on the owner field of each type's collection (moods: user) when it "
            "is missing. Either way a missing one is logged with the command that creates it; the "
            "replicator_* collections' own indexes are always created.",
            bool,
        ),
    )
    # The PDS's own PDS_RATE_LIMIT_BYPASS_KEY: sent as `x-ratelimit-bypass` (a secret, read
    # from the environment only: never a flag that `ps` would show).
    rate_limit_bypass_key: str | None = field(default=None, repr=False)
    write_rate: float | None = None  # PDS writes a second at most, every lane together
    record_types: tuple[str, ...] = setting(
        ("mood",),
        Option(
            "--record-types",
            f"{_R}RECORD_TYPES",
            "Record types to mirror (comma list): mood, news.",
            metavar="TYPE[,TYPE]",
        ),
    )

    def __repr__(self) -> str:  # the URI may hold a password
        return f"Settings(db={self.db_name!r}, pds={self.pds_url!r}, names={self.names!r})"


# The flag and variable of each collection's name (a field of `store.Names`, whose default it
# takes): the app's names, given only where a deployment renamed its collections.
NAME_OPTIONS = {
    "moods": Option("--moods-collection", f"{_R}MOODS_COLLECTION", None),
    "users": Option("--users-collection", f"{_R}USERS_COLLECTION", None),
    "handles": Option("--handles-collection", f"{_R}HANDLES_COLLECTION", None),
}


def parse_list(value: str | tuple[str, ...]) -> tuple[str, ...]:
    """A comma list (a flag's or a variable's value): each name stripped, empty ones dropped,
    the first of each kept, in order."""
    items = value.split(",") if isinstance(value, str) else value
    return tuple(dict.fromkeys(n.strip() for n in items if n.strip()))


HTTP_SCHEMES = ("https", "http")
MONGODB_SCHEMES = ("mongodb", "mongodb+srv")


def _loopback(where: str) -> bool:
    """A host on this machine, as a dev PDS or PLC is: served over plain http."""
    host = where.split("/")[0].rsplit("@")[-1]
    host = host[1:].split("]")[0] if host.startswith("[") else host.split(":")[0]
    return host in ("localhost", "::1") or host.startswith("127.")


def check_url(setting: str, value: str, schemes: tuple[str, ...] = HTTP_SCHEMES) -> str:
    """`value` if it has one of `schemes` and a host, else `ConfigError` naming `setting`.

    Checked at start because a URL without a scheme (`pds.example`) would otherwise be
    taken as a relative path and fail on the first write, minutes or a backfill later."""
    parts = urlsplit(value)
    host = parts.hostname
    if "," not in parts.netloc:  # a MongoDB host list has a port per host
        try:
            _ = parts.port  # raises on a port that is not a number
        except ValueError:
            host = None
    if parts.scheme.lower() not in schemes or not host:
        rest = value.split("://")[-1].lstrip("/") or "host"
        scheme = "http" if "http" in schemes and _loopback(rest) else schemes[0]
        example = f"{scheme}://{rest}"
        raise ConfigError(
            f"{setting} {redact_uri(value)!r} is not a URL with a scheme ({', '.join(schemes)}) "
            f"and a host (and a numeric port, if any): e.g. {redact_uri(example)!r}"
        )
    return value
