"""Tail the `moods` change stream, apply in batches, checkpoint only what is applied.

Modelled on PyMongo's own `change_stream.py` resume logic: the resume token saved is always
one whose every preceding event has been applied (at-least-once delivery + idempotent apply).
`try_next()` returns None on an empty batch, which still moves the post-batch resume token
forward: saving it (at most once per heartbeat) keeps a quiet collection's token inside the
oplog window.

A batch ends after `batch_size` events or `max_batch_ms` of reading, whichever comes first,
so a burst of one user's moods becomes one `applyWrites` while a trickle is applied within a
quarter of a second.

Positions that cannot be resumed never mean "start from now" silently:

- history lost (286/280/260, when the stream opens or while it is read): a new position is
  taken first, every user is reconciled against the PDS, then the stream continues from that
  position. The recovery saves its position and progress, so an interrupted one resumes.
- the collection dropped or renamed (`invalidate`): the checkpoint is marked and the process
  exits 4, every time, until an operator restarts it with `--reset-position` (the same
  recovery from "now"). See docs/runbook.md.

The `users` collection is followed too (its own stream and checkpoint): a user who gets an
ATProto account, a new DID or a new password is reconciled between batches, and so is one the
app erases (their document deleted, or `atproto` removed): their records are deleted.
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
from pymongo.errors import ConnectionFailure, OperationFailure, PyMongoError

from . import crashpoints
from .apply import Applier
from .backfill import Backfill
from .config import Settings
from .desired import bad_id_reason, valid_user
from .lease import Fenced, Lease
from .model import State
from .outcome import Counts, Outcome
from .ports import ChangeStream, CoreStore
from .recordtypes import MOOD
from .store import Doc

HISTORY_LOST_CODES = {286: "ChangeStreamHistoryLost", 280: "ChangeStreamFatalError",
                      260: "InvalidResumeToken"}  # fmt: skip
_DOC_EVENTS = frozenset({"insert", "update", "replace", "delete"})
_END_EVENTS = frozenset({"invalidate", "drop", "rename", "dropDatabase"})

OpenStream = Callable[[Mapping[str, Any] | None], Awaitable[ChangeStream]]


class StreamInvalidated(RuntimeError):
    """The collection was dropped or renamed: the stream cannot go on (exit 4)."""


class HistoryLost(RuntimeError):
    """The saved position is no longer in the oplog (or was never valid) (exit 3)."""


class _Lost(Exception):
    def __init__(self, exc: OperationFailure) -> None:
        super().__init__(str(exc))
        self.code = exc.code or 0


def find(exc: BaseException, kind: type[BaseException]) -> BaseException | None:
    """The first `kind` in `exc` or, for the concurrent lanes' exception groups, inside it."""
    if isinstance(exc, kind):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            if (found := find(inner, kind)) is not None:
                return found
    return None


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


def _history_lost(exc: BaseException) -> OperationFailure | None:
    return exc if isinstance(exc, OperationFailure) and exc.code in HISTORY_LOST_CODES else None


def cluster_seconds(change: Mapping[str, Any]) -> float | None:
    """When the change happened: `wallTime` (milliseconds, MongoDB 6+), else `clusterTime`
    (whole seconds)."""
    for value in (change.get("wallTime"), change.get("clusterTime")):
        if isinstance(value, datetime):
            return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()
        if isinstance(value, Timestamp):
            return float(value.time)
    return None


def _erasing(change: Mapping[str, Any]) -> bool:
    """A `users` event by which the app erases a user: the document deleted, or `atproto`
    removed (AC-RECORD-TYPES.md, "Account erasure")."""
    op = change.get("operationType")
    return op == "delete" or (op == "update" and "atproto" in (change.get("removed") or ()))


def _account_changed(change: Mapping[str, Any]) -> bool:
    """A `users` event that may give a user an account, a new DID or a new password, or erase
    them (the document deleted, or `atproto` removed)."""
    op = change.get("operationType")
    if op in ("insert", "replace", "delete"):
        return True
    if op != "update":
        return False
    fields = [*(change.get("changed") or []), *(change.get("removed") or [])]
    return any(f == "atproto" or str(f).startswith("atproto.") for f in fields)


class Replicator:
    def __init__(
        self,
        store: CoreStore,
        applier: Applier,
        *,
        batch_size: int = Settings.batch_size,
        max_batch_ms: int = Settings.max_batch_ms,
        max_await_ms: int | None = None,
        heartbeat_seconds: float = Settings.heartbeat_seconds,
        parked_retry_seconds: float = Settings.parked_retry_seconds,
        on_history_lost: Literal["reconcile", "fail"] = Settings.on_history_lost,
        reset_position: bool = Settings.reset_position,
        follow_users: bool = True,
        open_stream: OpenStream | None = None,
        on_batch: Callable[[int, float | None], None] | None = None,
        lease: Lease | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.lease = lease
        self.store = store
        self.applier = applier
        self.batch_size = batch_size
        self.max_batch_ms = max_batch_ms
        # A getMore waits at most this long for changes: it also bounds how long a batch that
        # has started can wait for more (so `max_batch_ms` holds for a trickle).
        self.max_await_ms = max_await_ms if max_await_ms is not None else max_batch_ms
        self.heartbeat_seconds = heartbeat_seconds
        self.parked_retry_seconds = parked_retry_seconds
        self.on_history_lost = on_history_lost
        self.reset_position = reset_position
        self.follow_users = follow_users
        self._open_stream = open_stream or self._watch
        self._on_batch = on_batch
        self._clock = clock
        self.events_applied = 0
        self.last_event_at: float | None = None
        self.oldest_unapplied_at: float | None = None  # cluster time of the batch in flight
        self.stream_open = False
        self.last_checkpoint_at: float | None = None
        self.checkpoints_saved = 0
        self._saved_token: Mapping[str, Any] | None = None
        self._users_due: dict[str, bool] = {}  # sub → erased by the event
        self._users_token: Mapping[str, Any] | None = None
        self._users_saved: Mapping[str, Any] | None = None
        self._users_saved_at: float | None = None

    @property
    def _types(self) -> list[str]:
        return [t.name for t in self.store.rtypes]

    @property
    def _watched(self) -> str:
        return ", ".join(repr(v.collection) for v in self.store.views)

    @property
    def idle(self) -> bool:
        """Caught up: nothing read and not yet applied (lag 0)."""
        return self.oldest_unapplied_at is None

    async def _watch(self, token: Mapping[str, Any] | None) -> ChangeStream:
        return await self.store.watch_docs(
            token, max_await_ms=self.max_await_ms, batch_size=self.batch_size
        )

    # -- the lease -----------------------------------------------------------------------------

    async def run(self, stop: anyio.Event) -> None:
        """Until `stop` is set; waits for the lease first when there is one. A process that
        can no longer prove it holds the lease (taken over, or its deadline passed) abandons
        the batch in flight, which whoever holds the lease replays, and raises `Fenced`: it
        exits 5 and its supervisor starts it again as a standby. It does not wait again in the
        same process: operations cancelled mid-flight can leave PyMongo's async client on
        Python 3.11 wedged (tests/test_fencing.py), and a fresh process starts clean."""
        if self.lease is None:
            await self._run_stream(stop)
            return
        try:
            async with self.lease.kept(stop) as acquired:
                if acquired:
                    await self._run_stream(stop)
        except Exception as exc:
            fenced = find(exc, Fenced)
            if fenced is None:
                raise
            logger.critical("{}: the batch in flight is abandoned; stopping", fenced)
            raise fenced from None
        finally:
            self.stream_open = False

    # -- positions -----------------------------------------------------------------------------

    async def _run_stream(self, stop: anyio.Event) -> None:
        """Reconnects on connection errors, from the last checkpoint."""
        self._users_due.clear()
        error: Exception | None = None
        async with anyio.create_task_group() as tg:
            if self.follow_users:
                tg.start_soon(self._follow_users, stop)
            try:
                await self._moods(stop)
            except Exception as exc:  # re-raised below, outside the group, unwrapped
                error = exc
            finally:
                tg.cancel_scope.cancel()
        if error is not None:
            raise error

    async def _moods(self, stop: anyio.Event) -> None:
        delay = 0.5
        first = True
        while not stop.is_set():
            try:
                stream = await self._position(first)
                first = False
                try:
                    delay = 0.5
                    self.stream_open = True
                    await self._pump(stream, stop)
                finally:
                    self.stream_open = False
                    # A batch given up with its stream (history lost while reading, an error,
                    # a fence) is not in flight any more: it is read again, or recovered.
                    self.oldest_unapplied_at = None
                    with (
                        anyio.CancelScope(shield=True),
                        anyio.move_on_after(5),
                        contextlib.suppress(PyMongoError),
                    ):
                        await stream.close()
            except _Lost as lost:
                await self._lost(lost.code)
            except Exception as exc:
                if not _transient(exc):
                    raise
                logger.warning("MongoDB unavailable ({}); resuming from the last checkpoint "
                               "in {:.1f}s", find(exc, PyMongoError) or exc, delay)  # fmt: skip
                with anyio.move_on_after(delay):
                    await stop.wait()
                delay = min(delay * 2, 10.0)

    async def _position(self, first: bool) -> ChangeStream:
        """The stream to read, from the checkpoint; recovers first where it must."""
        checkpoint = await self.store.load_checkpoint() or {}
        if checkpoint.get("recovery"):
            return await self._recover(checkpoint["recovery"])
        if first and self.reset_position:
            missing = await self.store.missing_collections()
            if missing:
                raise StreamInvalidated(
                    f"--reset-position: the collection {', '.join(map(repr, missing))} does "
                    "not exist; restore or create it first (every record would be deleted)"
                )
            logger.warning("--reset-position: starting at the current position and "
                           "reconciling every user")  # fmt: skip
            return await self._recover(None, kind="reset")
        if checkpoint.get("invalidated"):
            raise StreamInvalidated(
                f"the change stream on {self._watched} ended with "
                f"{checkpoint['invalidated']!r} (the collection was dropped or renamed). Check "
                "the collection, then restart with `replicator run --reset-position`"
            )
        token = checkpoint.get("token")
        self._saved_token = token
        if token is None:
            logger.info(
                "no checkpoint for {}: starting at the current position; "
                "run `replicator backfill` to mirror the documents that exist already",
                self._watched,
            )
        # A type enabled since the checkpoint was saved (a release before types mirrored
        # moods alone): its documents that exist are mirrored first, as after a lost history.
        known = checkpoint.get("types") or [MOOD.name]
        if token is not None and (added := [t for t in self._types if t not in known]):
            logger.warning("record types newly enabled ({}): reconciling every user before "
                           "following the stream", ", ".join(added))  # fmt: skip
            return await self._recover(None, kind="types added")
        try:
            stream = await self._open_stream(token)
        except OperationFailure as exc:
            if _history_lost(exc) is None:
                raise
            await self._lost(exc.code or 0)
            return await self._position(first=False)
        if token is None:
            await self._checkpoint(_position_of(stream), force=True)
        return stream

    async def _lost(self, code: int) -> None:
        cause = HISTORY_LOST_CODES.get(code, str(code))
        if self.on_history_lost == "fail":
            logger.critical(
                "change stream history lost ({} {}): the saved resume token cannot be used. "
                "Exiting (--on-history-lost=fail). Recover with `replicator run "
                "--on-history-lost=reconcile` or `replicator backfill` + `audit --fix`.",
                code, cause,
            )  # fmt: skip
            raise HistoryLost(f"{cause} (code {code})")
        logger.critical(
            "change stream history lost ({} {}): events since the last checkpoint are gone. "
            "Recovery: a new stream position first, every user reconciled against the ledger "
            "and the PDS, then the stream continues from that position.",
            code, cause,
        )  # fmt: skip
        stream = await self._open_stream(None)
        try:
            token = _position_of(stream)
        finally:
            await stream.close()
        recovery = {"token": token, "kind": "history-lost", "started_at": time.time()}
        await self.store.save_checkpoint(None, recovery=recovery)

    async def _recover(
        self, recovery: Mapping[str, Any] | None, *, kind: str = "history-lost"
    ) -> ChangeStream:
        """Reconcile every user, then continue from the position taken before the first of
        them. Progress is saved per user: an interrupted recovery resumes where it stopped."""
        if recovery is None:
            stream = await self._open_stream(None)
            token = _position_of(stream)
            recovery = {"token": token, "kind": kind, "started_at": time.time()}
            await self.store.save_checkpoint(None, recovery=recovery)
        else:
            try:
                stream = await self._open_stream(recovery["token"])
            except OperationFailure as exc:
                if _history_lost(exc) is None:
                    raise
                logger.critical("the recovery's own position is gone too: starting it again")
                return await self._recover(None, kind=recovery["kind"])
        run = f"recovery:{self.store.names.moods}:{recovery['started_at']}"
        users = [u for u in await self.store.users_in_scope() if valid_user(u)]
        backfill = Backfill(self.applier, fix=True, name=run, on_progress=_recovery_progress)
        report = await backfill.run(users, scope="every user")
        await self.store.save_checkpoint(recovery["token"], types=self._types)
        await self.store.clear_checkpoint_marks("recovery", "invalidated")
        self._saved_token = recovery["token"]
        self.last_checkpoint_at = self._clock()
        logger.warning(
            "{} recovery done: {} users reconciled ({} before an interruption)",
            recovery["kind"], report.users, report.skipped_users_done_before,
        )  # fmt: skip
        return stream

    # -- reading -------------------------------------------------------------------------------

    async def _pump(self, stream: ChangeStream, stop: anyio.Event) -> None:
        next_parked = self._clock() + self.parked_retry_seconds
        while not stop.is_set():
            batch = await self._read(stream, stop)
            if batch:
                await self._apply_batch(stream, batch)
            else:
                await self._checkpoint(stream.resume_token)
            if not stream.alive:
                # The server dropped the cursor without an invalidate (a restart that forgot
                # it, say): reopen from the checkpoint rather than stall on a closed stream.
                logger.warning("the change stream closed unexpectedly; reopening it from the "
                               "last checkpoint")  # fmt: skip
                return
            await self._reconcile_users()
            retry = self._clock() >= next_parked
            if retry:
                next_parked = self._clock() + self.parked_retry_seconds
            await self.applier.maintain(retry_parked=retry)

    async def _read(self, stream: ChangeStream, stop: anyio.Event) -> list[Doc]:
        batch: list[Doc] = []
        started = 0.0
        while len(batch) < self.batch_size and not stop.is_set():
            try:
                change = await stream.try_next()
            except OperationFailure as exc:
                if _history_lost(exc) is None:
                    raise
                raise _Lost(exc) from None  # after PyMongo's own resume: the position is gone
            if change is None:
                break
            if not batch:
                started = self._clock()
                self.oldest_unapplied_at = cluster_seconds(change) or time.time()
            batch.append(change)
            if self._clock() - started >= self.max_batch_ms / 1000:
                break
        return batch

    async def _apply_batch(self, stream: ChangeStream, batch: list[Doc]) -> None:
        views = {view.collection: view for view in self.store.views}
        ids: dict[str, list[ObjectId]] = {}  # by collection
        owners: dict[ObjectId, str] = {}
        end: Doc | None = None
        applied_upto: Mapping[str, Any] | None = None
        for change in batch:
            op = change.get("operationType")
            if op in _END_EVENTS:
                end = change
                break
            applied_upto = change["_id"]
            view = views.get(str((change.get("ns") or {}).get("coll")))
            if op not in _DOC_EVENTS or view is None:
                continue
            mood_id = (change.get("documentKey") or {}).get("_id")
            if isinstance(mood_id, ObjectId):
                ids.setdefault(view.collection, []).append(mood_id)
                before = (change.get("fullDocumentBeforeChange") or {}).get(view.rtype.owner)
                if op == "delete" and (owner := valid_user(before)) is not None:
                    owners[mood_id] = owner
            elif op == "delete":  # never mirrorable, now gone: nothing left to report
                await view.forget_dead_letter(repr(mood_id))
            else:
                reason = bad_id_reason(mood_id, view.rtype)
                user = valid_user(await view.user_of_mood(mood_id))
                if user is not None and await self.store.forgotten([user]):
                    user = None  # an erased user's: reported, without naming them
                logger.bind(mood_id=repr(mood_id)).error("bad {} document: {}", view.rtype.name,
                                                         reason)  # fmt: skip
                await view.dead_letter(mood_id, user, None, reason, "invalid")
        changes = sum(map(len, ids.values()))
        if ids:
            done = Outcome()
            for name, some in ids.items():  # one type after another: no two lanes of a user
                done.merge(await self.applier.apply_ids(some, owners, views[name].rtype))
            _log_batch(changes, done.counts, self.oldest_unapplied_at,
                       dry_run=self.applier.dry_run)  # fmt: skip
        self.events_applied += len(batch) if end is None else batch.index(end)
        seconds = [s for s in map(cluster_seconds, batch) if s is not None]
        if seconds:
            self.last_event_at = max(seconds)
        if self._on_batch:
            self._on_batch(changes, self.last_event_at)
        if end is not None:
            if applied_upto is not None:
                await self._checkpoint(applied_upto, force=True)
            what = end.get("operationType")
            if what == "invalidate":
                what = "drop or rename"
            await self.store.save_checkpoint(None, invalidated=what)
            raise StreamInvalidated(
                f"the change stream on {self._watched} ended with {what!r}: the "
                "collection was dropped or renamed. Check it, then restart with "
                "`replicator run --reset-position`"
            )
        await self._checkpoint(stream.resume_token, force=True)
        self.oldest_unapplied_at = None

    async def _checkpoint(self, token: Mapping[str, Any] | None, *, force: bool = False) -> None:
        """After a batch (`force`), or at most once per heartbeat on a quiet collection: a
        server whose post-batch token moves with every getMore must not cost a write each."""
        if token is None:
            return
        now = self._clock()
        if not force and (
            token == self._saved_token
            or (
                self.last_checkpoint_at is not None
                and now - self.last_checkpoint_at < self.heartbeat_seconds
            )
        ):
            return
        extra: dict[str, Any] = {"events_applied": self.events_applied, "types": self._types}
        if self.last_event_at is not None and math.isfinite(self.last_event_at):
            extra["last_event_at"] = self.last_event_at
        await self.store.save_checkpoint(token, **extra)
        self._saved_token = dict(token)
        self.last_checkpoint_at = now
        self.checkpoints_saved += 1

    # -- the users collection ------------------------------------------------------------------

    async def _follow_users(self, stop: anyio.Event) -> None:
        """Notes users whose account may have changed; the moods loop reconciles them between
        batches (never beside a lane of the same user) and then saves this stream's token.

        An `invalidate` (the collection dropped or renamed) ends a stream for good: the next
        one starts after it (`startAfter` the invalidate's token), as MongoDB allows, so a
        `users` collection that is recreated is followed again."""
        delay = 0.5
        after: Mapping[str, Any] | None = None  # the token of an invalidate just read
        while not stop.is_set():
            try:
                token = after or ((await self.store.load_checkpoint("users")) or {}).get("token")
                fresh = token is None
                try:
                    stream = await self.store.watch_users(token, max_await_ms=self.max_await_ms)
                except OperationFailure as exc:
                    if _history_lost(exc) is None:
                        raise
                    logger.warning("users change stream history lost: reconciling every "
                                   "user with an account")  # fmt: skip
                    for sub in await self.store.users_in_scope():
                        self._users_due.setdefault(sub, False)
                    stream = await self.store.watch_users(None, max_await_ms=self.max_await_ms)
                    token = None
                if token is None:
                    self._users_token = _position_of(stream)
                if fresh:  # saved at once: what happens from here on is never missed
                    await self.store.save_checkpoint(self._users_token, stream="users")
                    self._users_saved = self._users_token
                try:
                    after = await self._read_users(stream, stop)
                finally:
                    await stream.close()
                if after is not None:
                    logger.warning("the {} collection was dropped or renamed; following it "
                                   "from there", self.store.names.users)  # fmt: skip
                    with anyio.move_on_after(delay):
                        await stop.wait()
            except Exception as exc:
                if not _transient(exc) and _history_lost(exc) is None:
                    raise
                logger.warning("users change stream interrupted ({}); reopening", exc)
                with anyio.move_on_after(delay):
                    await stop.wait()
                delay = min(delay * 2, 10.0)

    async def _read_users(
        self, stream: ChangeStream, stop: anyio.Event
    ) -> Mapping[str, Any] | None:
        """Until `stop`, or until the stream ends: then the token to start after."""
        while not stop.is_set():
            change = await stream.try_next()
            if change is not None and change.get("operationType") == "invalidate":
                self._users_token = change["_id"]
                return dict(change["_id"])
            if change is not None and _account_changed(change):
                user = (change.get("documentKey") or {}).get("_id")
                if isinstance(user, str):
                    self._users_due[user] = self._users_due.get(user, False) or _erasing(change)
            self._users_token = stream.resume_token or self._users_token
            if not stream.alive:
                return None  # closed without an invalidate: reopen from the checkpoint
        return None

    async def _reconcile_users(self) -> None:
        token, due = self._users_token, list(self._users_due)
        if token is None:
            return
        for sub in due:
            if self._users_due.pop(sub, False):
                logger.info("the app erased {}: deleting their records", sub)
                await self.applier.erase_user(sub)
            else:
                logger.info("the account of {} changed: reconciling", sub)
                await self.applier.reconcile_user(sub)
        now = self._clock()
        if due or (
            token != self._users_saved
            and (
                self._users_saved_at is None or now - self._users_saved_at >= self.heartbeat_seconds
            )
        ):
            await self.store.save_checkpoint(token, stream="users")
            self._users_saved, self._users_saved_at = dict(token), now


def _log_batch(changes: int, counts: Counts, oldest: float | None, *, dry_run: bool) -> None:
    """One INFO line a batch: what reached the PDS (or, dry, would have), and how far behind
    MongoDB it was."""
    lag = max(0.0, time.time() - oldest) if oldest is not None else 0.0
    trouble = "".join(
        f", {n} {word}" for n, word in ((counts.parked, "parked"),
                                        (counts.desired[State.INVALID], "invalid")) if n
    )  # fmt: skip
    writes = counts.would if dry_run else counts.sent
    # A batch that asked the PDS for nothing (the echo of our own rkey write-back, an edit of
    # a field the record does not carry) is not news at INFO.
    level = "INFO" if writes.created or writes.updated or writes.deleted or trouble else "DEBUG"
    logger.log(
        level, "applied {} change{}{}: {} created, {} updated, {} deleted{}; lag {:.1f}s",
        changes, "" if changes == 1 else "s", " (dry run: would have)" if dry_run else "",
        writes.created, writes.updated, writes.deleted, trouble, lag,
    )  # fmt: skip


def _position_of(stream: ChangeStream) -> Mapping[str, Any]:
    """Where a stream just opened at "now" stands (MongoDB 4.0.7+ answers it with the first
    reply: the post-batch resume token)."""
    token = stream.resume_token
    if token is None:
        raise RuntimeError("the server opened a change stream without a resume token")
    return token


def _recovery_progress(_: Any) -> None:
    crashpoints.hit("recovery")


__all__ = ["HistoryLost", "PyMongoError", "Replicator", "StreamInvalidated"]
