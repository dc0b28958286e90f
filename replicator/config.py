"""Settings: the app's own environment names, the replicator's under `REPLICATOR_*`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal
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
class Settings:
    mongodb_uri: str
    db_name: str = DEFAULT_DB
    pds_url: str = "http://localhost:2583"
    names: Names = field(default_factory=Names)
    batch_size: int = 2000
    max_batch_ms: int = 250
    concurrency: int = 8
    heartbeat_seconds: float = 5.0
    parked_retry_seconds: float = 60.0
    on_history_lost: Literal["reconcile", "fail"] = "reconcile"
    dry_run: bool = False
    only_users: tuple[str, ...] = ()
    http_timeout: float = 30.0
    shutdown_grace: float = 10.0
    lease_seconds: float = 15.0
    lane_deadline: float = 60.0  # a user whose PDS writes keep failing this long is parked
    reset_position: bool = False
    plc_url: str = PUBLIC_PLC
    account_recheck_seconds: float = 30.0
    http_addr: str = "127.0.0.1:9464"  # /metrics /healthz /readyz; "off": none
    create_indexes: bool = True  # the index on the app's `moods`; False: only warn if missing
    # The PDS's own PDS_RATE_LIMIT_BYPASS_KEY: sent as `x-ratelimit-bypass` (a secret).
    rate_limit_bypass_key: str | None = field(default=None, repr=False)
    record_types: tuple[str, ...] = ("mood",)  # recordtypes.TYPES by name

    def __repr__(self) -> str:  # the URI may hold a password
        return f"Settings(db={self.db_name!r}, pds={self.pds_url!r}, names={self.names!r})"


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
