"""Settings: the app's own environment names, the replicator's under `REPLICATOR_*`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .identity import PUBLIC_PLC
from .store import Names

DEFAULT_DB = "aesthetic"


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

    def __repr__(self) -> str:  # the URI may hold a password
        return f"Settings(db={self.db_name!r}, pds={self.pds_url!r}, names={self.names!r})"


def redact_uri(uri: str) -> str:
    """`mongodb://user:secret@host` → `mongodb://user:***@host`, for logs and status."""
    scheme, sep, rest = uri.partition("://")
    if not sep or "@" not in rest.split("/", 1)[0]:
        return uri
    creds, host = rest.split("@", 1)
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}"
