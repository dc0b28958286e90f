"""Tail the `moods` change stream, apply in batches, checkpoint only what is applied.

Modelled on PyMongo's own `change_stream.py` resume logic: the resume token saved is always
one whose every preceding event has been applied (at-least-once delivery + idempotent apply).
`try_next()` returns None on an empty batch, which still moves the post-batch resume token
forward: saving it on a quiet collection keeps the token inside the oplog window.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any, Literal

import anyio
from bson import ObjectId, Timestamp
from loguru import logger
from pymongo.asynchronous.change_stream import AsyncChangeStream
from pymongo.errors import ConnectionFailure, OperationFailure, PyMongoError

from .apply import Applier
from .desired import bad_id_reason, valid_user
from .lease import Lease, LeaseLost
from .store import Doc, Store

HISTORY_LOST_CODES = {286: "ChangeStreamHistoryLost", 280: "ChangeStreamFatalError",
                      260: "InvalidResumeToken"}  # fmt: skip
IDLE_POLL_SECONDS = 0.05
_DOC_EVENTS = frozenset({"insert", "update", "replace", "delete"})
_END_EVENTS = frozenset({"invalidate", "drop", "rename", "dropDatabase"})

OpenStream = Callable[[Mapping[str, Any] | None], Awaitable[AsyncChangeStream[Doc]]]


class StreamInvalidated(RuntimeError):
    """The collection was dropped or renamed: the stream cannot go on."""


class HistoryLost(RuntimeError):
    """The saved position is no longer in the oplog (or was never valid)."""


def _first(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def _transient(exc: BaseException) -> bool:
    """Worth reconnecting for: network errors, elections, and errors MongoDB labels retryable,
    also when they come from the concurrent lanes, wrapped in an exception group."""
    if isinstance(exc, BaseExceptionGroup):
        return all(_transient(e) for e in exc.exceptions)
    if not isinstance(exc, PyMongoError):
        return False
    if isinstance(exc, ConnectionFailure):
        return True
    return any(
        exc.has_error_label(label)
        for label in (
            "ResumableChangeStreamError",
            "RetryableWriteError",
            "TransientTransactionError",
        )
    )


def cluster_seconds(change: Mapping[str, Any]) -> float | None:
    value = change.get("clusterTime") or change.get("wallTime")
    if isinstance(value, Timestamp):
        return float(value.time)
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()
    return None


class Replicator:
    def __init__(
        self,
        store: Store,
        applier: Applier,
        *,
        batch_size: int = 2000,
        max_await_ms: int = 500,
        heartbeat_seconds: float = 5.0,
        parked_retry_seconds: float = 60.0,
        on_history_lost: Literal["reconcile", "fail"] = "reconcile",
        open_stream: OpenStream | None = None,
        on_batch: Callable[[int, float | None], None] | None = None,
        lease: Lease | None = None,
    ) -> None:
        self.lease = lease
        self.store = store
        self.applier = applier
        self.batch_size = batch_size
        self.max_await_ms = max_await_ms
        self.heartbeat_seconds = heartbeat_seconds
        self.parked_retry_seconds = parked_retry_seconds
        self.on_history_lost = on_history_lost
        self._open_stream = open_stream or self._watch
        self._on_batch = on_batch
        self.events_applied = 0
        self.last_event_at: float | None = None
        self.stream_open = False
        self.last_checkpoint_at: float | None = None
        self.idle = False  # the last read found nothing waiting: caught up (lag 0)
        self._saved_token: Mapping[str, Any] | None = None

    async def _watch(self, token: Mapping[str, Any] | None) -> AsyncChangeStream[Doc]:
        return await self.store.moods.watch(
            full_document="updateLookup",
            start_after=dict(token) if token else None,
            max_await_time_ms=self.max_await_ms,
            batch_size=self.batch_size,
        )

    async def run(self, stop: anyio.Event) -> None:
        """Until `stop` is set; waits for the lease first when there is one."""
        if self.lease is not None and not await self._acquire(stop):
            return
        lost = False
        error: Exception | None = None
        async with anyio.create_task_group() as tg:
            if self.lease is not None:

                async def keep_lease() -> None:
                    nonlocal lost
                    assert self.lease is not None
                    while True:
                        await anyio.sleep(self.lease.ttl / 3)
                        try:
                            await self.lease.renew()
                        except LeaseLost:
                            lost = True
                            tg.cancel_scope.cancel()
                            return
                        except PyMongoError as exc:  # Mongo down: the stream will notice too
                            logger.warning("lease renewal failed: {}", exc)

                tg.start_soon(keep_lease)
            try:
                await self._run_stream(stop)
            except LeaseLost:
                lost = True
            except Exception as exc:  # re-raised below, outside the group, unwrapped
                error = exc
            finally:
                tg.cancel_scope.cancel()
        if error is not None:
            raise error
        if lost:
            logger.critical("the lease was taken over by another process; stopping")
            raise LeaseLost("another replicator took over")
        if self.lease is not None:
            with contextlib.suppress(PyMongoError):
                await self.lease.release()

    async def _acquire(self, stop: anyio.Event) -> bool:
        assert self.lease is not None
        said = False
        while not stop.is_set():
            try:
                if await self.lease.try_acquire():
                    logger.info("lease acquired (generation {})", self.lease.generation)
                    return True
            except ConnectionFailure as exc:
                logger.warning("MongoDB unreachable while acquiring the lease: {}", exc)
            if not said:
                holder = await self.lease.holder() or {}
                logger.warning(
                    "another replicator holds the lease ({}); waiting to take over",
                    holder.get("owner", "?"),
                )
                said = True
            with anyio.move_on_after(max(0.2, self.lease.ttl / 3)):
                await stop.wait()
        return False

    async def _run_stream(self, stop: anyio.Event) -> None:
        """Reconnects on connection errors, from the last checkpoint."""
        checkpoint = await self.store.load_checkpoint()
        self._saved_token = checkpoint["token"] if checkpoint else None
        if self._saved_token is None:
            logger.info(
                "no checkpoint for {}: starting at the current position; "
                "run `replicator backfill` to mirror the moods that exist already",
                self.store.names.moods,
            )
        delay = 0.5
        while not stop.is_set():
            try:
                stream = await self._open(self._saved_token)
                try:
                    delay = 0.5
                    await self._pump(stream, stop)
                finally:
                    self.stream_open = False
                    with contextlib.suppress(PyMongoError):
                        await stream.close()
            except Exception as exc:
                if not _transient(exc):
                    raise
                logger.warning("MongoDB unavailable ({}); resuming from the last checkpoint "
                               "in {:.1f}s", _first(exc), delay)  # fmt: skip
                with anyio.move_on_after(delay):
                    await stop.wait()
                delay = min(delay * 2, 10.0)

    async def _open(self, token: Mapping[str, Any] | None) -> AsyncChangeStream[Doc]:
        try:
            stream = await self._open_stream(token)
            if token is None:
                await self._checkpoint(stream.resume_token, force=True)
            self.stream_open = True
            return stream
        except OperationFailure as exc:
            if exc.code not in HISTORY_LOST_CODES:
                raise
            return await self._recover(exc)

    async def _recover(self, exc: OperationFailure) -> AsyncChangeStream[Doc]:
        cause = HISTORY_LOST_CODES.get(exc.code or 0, str(exc.code))
        if self.on_history_lost == "fail":
            logger.critical(
                "change stream history lost ({} {}): the saved resume token cannot be used. "
                "Exiting (--on-history-lost=fail). Recover with `replicator run "
                "--on-history-lost=reconcile` or `replicator backfill` + `audit --fix`.",
                exc.code, cause,
            )  # fmt: skip
            raise HistoryLost(f"{cause} (code {exc.code})") from None
        logger.critical(
            "change stream history lost ({} {}): events since the last checkpoint are gone. "
            "Recovery: opening a new stream position first, reconciling every mood against the "
            "ledger and the PDS, then continuing from that position.",
            exc.code, cause,
        )  # fmt: skip
        stream = await self._open_stream(None)
        position = stream.resume_token
        subs = set(await self.store.moods.distinct("user")) | set(
            await self.store.ledger.distinct("user")
        )
        users = sorted(s for s in subs if valid_user(s))
        for user in users:
            await self.applier.reconcile_user(user, fix=True)
        await self._checkpoint(position, force=True)
        logger.warning("history-loss recovery done: {} users reconciled", len(users))
        self.stream_open = True
        return stream

    async def _pump(self, stream: AsyncChangeStream[Doc], stop: anyio.Event) -> None:
        next_parked = time.monotonic() + self.parked_retry_seconds
        while not stop.is_set():
            started = time.monotonic()
            batch: list[Doc] = []
            while len(batch) < self.batch_size and not stop.is_set():
                change = await stream.try_next()
                if change is None:
                    break
                batch.append(change)
            self.idle = not batch
            if batch:
                await self._apply_batch(stream, batch)
            else:
                await self._checkpoint(stream.resume_token)
                if time.monotonic() - started < self.max_await_ms / 4000:
                    # The server answered an empty batch at once instead of waiting for
                    # changes: poll gently rather than spin (every wait here is added lag).
                    with anyio.move_on_after(IDLE_POLL_SECONDS):
                        await stop.wait()
            if not stream.alive:
                # The server dropped the cursor without an invalidate (a restart that forgot
                # it, say): reopen from the checkpoint rather than stall on a closed stream.
                logger.warning("the change stream closed unexpectedly; reopening it from the "
                               "last checkpoint")  # fmt: skip
                with anyio.move_on_after(0.5):
                    await stop.wait()
                return
            if time.monotonic() >= next_parked:
                next_parked = time.monotonic() + self.parked_retry_seconds
                await self.applier.retry_parked()

    async def _apply_batch(self, stream: AsyncChangeStream[Doc], batch: list[Doc]) -> None:
        ids: list[ObjectId] = []
        end: Doc | None = None
        applied_upto: Mapping[str, Any] | None = None
        for change in batch:
            op = change.get("operationType")
            if op in _END_EVENTS:
                end = change
                break
            applied_upto = change["_id"]
            if op not in _DOC_EVENTS:
                continue
            mood_id = (change.get("documentKey") or {}).get("_id")
            if isinstance(mood_id, ObjectId):
                ids.append(mood_id)
            elif op == "delete":  # never mirrorable, now gone: nothing left to report
                await self.store.dead_letters.delete_one({"_id": repr(mood_id)})
            else:
                reason = bad_id_reason(mood_id)
                user = valid_user((change.get("fullDocument") or {}).get("user"))
                logger.bind(mood_id=repr(mood_id)).error("bad mood document: {}", reason)
                await self.store.dead_letter(mood_id, user, None, reason)
        if ids:
            await self.applier.apply_ids(ids)
        self.events_applied += len(batch) if end is None else batch.index(end)
        seconds = [s for s in map(cluster_seconds, batch) if s is not None]
        if seconds:
            self.last_event_at = max(seconds)
        if self._on_batch:
            self._on_batch(len(ids), self.last_event_at)
        if end is not None:
            if applied_upto is not None:
                await self._checkpoint(applied_upto, force=True)
            raise StreamInvalidated(
                f"the change stream on {self.store.names.moods!r} ended with "
                f"{end.get('operationType')!r}: the collection was dropped or renamed"
            )
        await self._checkpoint(stream.resume_token, force=True)

    async def _checkpoint(self, token: Mapping[str, Any] | None, *, force: bool = False) -> None:
        if token is None:
            return
        now = time.monotonic()
        fresh = self.last_checkpoint_at is not None and (
            now - self.last_checkpoint_at < self.heartbeat_seconds
        )
        if not force and token == self._saved_token and fresh:
            return
        extra: dict[str, Any] = {"events_applied": self.events_applied}
        if self.last_event_at is not None and math.isfinite(self.last_event_at):
            extra["last_event_at"] = self.last_event_at
        fence = self.lease.generation if self.lease is not None else None
        if not await self.store.save_checkpoint(token, fence=fence, **extra):
            raise LeaseLost("a newer lease generation owns the checkpoint")
        self._saved_token = dict(token)
        self.last_checkpoint_at = now


__all__ = ["HistoryLost", "PyMongoError", "Replicator", "StreamInvalidated"]
