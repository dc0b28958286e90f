"""Wiring: settings → Mongo store, PDS client, sessions, writer, applier. One place."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import httpx

from . import metrics
from .accounts import AccountGate
from .apply import Applier
from .config import Settings
from .errors import Unavailable
from .identity import Directory
from .lease import Fence, Lease
from .logs import redact_uri
from .outbound import Outbound
from .pds import Pds
from .ratelimit import TokenBucket
from .recordtypes import enabled
from .rollout import resolve_allowlist
from .sessions import SessionPool
from .store import Store, open_client
from .stream import Replicator
from .tasks import task_group
from .writer import RepoWriter


@dataclass
class Runtime:
    settings: Settings
    store: Store
    pds: Pds
    sessions: SessionPool
    writer: RepoWriter
    applier: Applier
    directory: Directory | None = None
    lease: Lease | None = None
    rate: TokenBucket | None = None  # the writes a second every lane together (the writer's)

    def replicator(self) -> Replicator:
        s = self.settings
        return Replicator(
            self.store,
            self.applier,
            batch_size=s.batch_size,
            max_batch_ms=s.max_batch_ms,
            heartbeat_seconds=s.heartbeat_seconds,
            parked_retry_seconds=s.parked_retry_seconds,
            on_history_lost=s.on_history_lost,
            reset_position=s.reset_position,
            on_batch=metrics.observe_batch,
            lease=self.lease,
        )


@asynccontextmanager
async def open_runtime(
    settings: Settings,
    *,
    retry_timeout: float | None = None,
    http: httpx.AsyncClient | None = None,
    lease: bool = False,
    require_pds: bool = False,
    require_moods: bool = False,
) -> AsyncIterator[Runtime]:
    """`http` replaces the PDS connection pool (fault-injection tests wrap its transport).
    `lease`: this process will hold the lease (`replicator run`) and fences every write with
    it; otherwise writes carry the lease generation current when the runtime opens.
    `require_pds`: a command fails at once (`Unavailable`) on a PDS that does not answer,
    rather than after retrying every user's calls (the sidecar waits for it instead).
    `require_moods`: a database without the collection of a type mirrored is a usage error
    (`ConfigError`), before anything is created in it (`Store.require_collections`)."""
    pds = Pds(
        settings.pds_url, http=http, timeout=settings.http_timeout, retry_timeout=retry_timeout,
        on_request=metrics.observe_pds_request, on_retry=metrics.observe_retry,
        bypass_key=settings.rate_limit_bypass_key,
    )  # fmt: skip
    plc = httpx.AsyncClient(timeout=10.0)
    try:
        async with open_client(settings.mongodb_uri) as client, task_group() as tg:
            store = Store(
                client, settings.db_name, settings.names, rtypes=enabled(settings.record_types),
                shadow=settings.dry_run,
            )  # fmt: skip
            if require_moods:
                await store.require_collections()
            await store.ensure_indexes(create_app_indexes=settings.create_indexes)
            if require_pds and (error := await pds.unreachable()) is not None:
                raise Unavailable(f"PDS {redact_uri(settings.pds_url)}: {error}: check PDS_URL, "
                                  "and that the PDS is up and reachable from here")  # fmt: skip
            keeper = None
            fence: Fence
            if lease and not settings.dry_run:  # a shadow replicator never blocks the real one
                fence = keeper = Lease(
                    store.state, lease_name(settings), ttl=settings.lease_seconds
                )
            else:
                fence = Fence(await current_generation(store, settings))
            store = store.fenced(fence)
            sessions = SessionPool(pds, store)
            rate = TokenBucket(settings.write_rate) if settings.write_rate else None
            writer = RepoWriter(sessions, Outbound(pds, fence, rate=rate))
            directory = Directory(plc, settings.plc_url)
            tg.start_soon(directory.run)  # beside the writes, for the runtime's whole life
            gate = AccountGate(
                store, pds, settings.pds_url, directory,
                recheck_seconds=settings.account_recheck_seconds,
            )  # fmt: skip
            applier = Applier(
                store,
                writer,
                pds,
                gate=gate,
                concurrency=settings.concurrency,
                dry_run=settings.dry_run,
                only_users=await resolve_allowlist(store, settings.only_users),
                lane_deadline=settings.lane_deadline,
            )
            try:
                yield Runtime(
                    settings, store, pds, sessions, writer, applier, directory, keeper, rate
                )
            finally:
                tg.cancel_scope.cancel()
    finally:
        await plc.aclose()
        await pds.aclose()


def lease_name(settings: Settings) -> str:
    return f"lease:{settings.names.moods}"


async def current_generation(store: Store, settings: Settings) -> int | None:
    """The generation of the lease as it stands: what a command's writes are stamped with."""
    doc = await store.state.find_one({"_id": lease_name(settings)}, {"generation": 1})
    generation = (doc or {}).get("generation")
    return int(generation) if isinstance(generation, int) else None
