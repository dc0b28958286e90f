"""Wiring: settings → Mongo store, PDS client, sessions, writer, applier. One place."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import httpx

from . import metrics
from .apply import Applier
from .config import Settings
from .lease import Lease
from .pds import Pds
from .rollout import resolve_allowlist
from .sessions import SessionPool
from .store import Store, connect
from .stream import Replicator
from .writer import RepoWriter


@dataclass
class Runtime:
    settings: Settings
    store: Store
    pds: Pds
    sessions: SessionPool
    writer: RepoWriter
    applier: Applier

    def replicator(self) -> Replicator:
        s = self.settings
        return Replicator(
            self.store,
            self.applier,
            batch_size=s.batch_size,
            max_await_ms=s.max_await_ms,
            heartbeat_seconds=s.heartbeat_seconds,
            parked_retry_seconds=s.parked_retry_seconds,
            on_history_lost=s.on_history_lost,
            on_batch=metrics.observe_batch,
            # A shadow (dry-run) replicator never blocks the real one.
            lease=None
            if s.dry_run
            else Lease(self.store.state, f"lease:{s.names.moods}", ttl=s.lease_seconds),
        )


@asynccontextmanager
async def open_runtime(
    settings: Settings,
    *,
    retry_timeout: float | None = None,
    http: httpx.AsyncClient | None = None,
) -> AsyncIterator[Runtime]:
    """`http` replaces the PDS connection pool (fault-injection tests wrap its transport)."""
    client = connect(settings.mongodb_uri)
    pds = Pds(
        settings.pds_url, http=http, timeout=settings.http_timeout, retry_timeout=retry_timeout,
        on_request=metrics.observe_pds_request, on_retry=metrics.observe_retry,
    )  # fmt: skip
    try:
        store = Store(client, settings.db_name, settings.names)
        if settings.dry_run:
            store.checkpoint_name += ":dry-run"
        await store.ensure_indexes()
        sessions = SessionPool(pds, store)
        writer = RepoWriter(sessions)
        applier = Applier(
            store,
            writer,
            concurrency=settings.concurrency,
            dry_run=settings.dry_run,
            only_users=await resolve_allowlist(store, settings.only_users),
        )
        yield Runtime(settings, store, pds, sessions, writer, applier)
    finally:
        await pds.aclose()
        await client.close()
