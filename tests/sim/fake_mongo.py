"""An in-memory MongoDB replica set, as far as the replicator can tell: collections, one oplog,
change streams.

What it keeps from a real replica set (and not from the test server):

- One oplog for every collection: each write that changes a document takes the next position
  (the replicator's own ledger and checkpoint writes included), so the post-batch resume token
  of an idle stream keeps moving, as a real server's does. A write that changes nothing (an
  `updateMany` of documents already nuked, a `$set` of the value already there) writes no
  oplog entry and makes no event.
- Change events look exactly like what `store.DOC_EVENT` / `USERS_EVENT` project: `_id`
  (the resume token), `operationType` (`update` and `replace` distinct), `documentKey`, `ns`,
  `clusterTime`, `wallTime`, never `fullDocument`, and `fullDocumentBeforeChange.user` only
  where the collection has pre-images on (a world option) and the event has one.
- Positions older than the pruned floor are gone: opening a stream there, or a getMore of a
  cursor that fell behind it, raises `OperationFailure` code 286 (ChangeStreamHistoryLost).
- A getMore returns at most `batch_size` events; its post-batch resume token is the last event
  returned when the batch is full, else the head of the oplog (everything scanned). An empty
  getMore waits `max_await_ms` of simulated time. The server may drop a cursor (no
  invalidate): `alive` turns False once its buffer is read, as PyMongo's does.
"""

from __future__ import annotations

import copy
from collections import deque
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from bson import ObjectId, Timestamp
from pymongo.errors import OperationFailure

from .scheduler import Clock, Process, Scheduler

Doc = dict[str, Any]
DB_NAME = "aesthetic"
HISTORY_LOST = 286


def token(position: int) -> dict[str, str]:
    """A resume token like a real one: `{"_data": <hex>}`, ordered like the oplog."""
    return {"_data": f"82{position:014x}"}


def position_of(resume_token: Mapping[str, Any]) -> int:
    return int(str(resume_token["_data"])[2:], 16)


def clone(value: Any) -> Any:
    """A copy the caller may change freely: no reference into the server's state escapes."""
    if isinstance(value, dict):
        return {k: clone(v) for k, v in value.items()}
    if isinstance(value, list):
        return [clone(v) for v in value]
    return value


def bson_order(value: Any) -> tuple[Any, ...]:
    """BSON's sort order across types (numbers < strings < objects < ObjectIds < ...)."""
    if value is None:
        return (1,)
    if isinstance(value, bool):
        return (8, value)
    if isinstance(value, int | float):
        return (2, value)
    if isinstance(value, str):
        return (3, value)
    if isinstance(value, dict):
        return (4, repr(sorted(value.items())))
    if isinstance(value, ObjectId):
        return (7, value.binary)
    return (9, repr(value))


def set_path(doc: Doc, path: str, value: Any) -> bool:
    """`$set` of a dotted path; False (and the error code) where MongoDB refuses it."""
    *parents, last = path.split(".")
    target: Any = doc
    for name in parents:
        if name not in target:
            target[name] = {}
        target = target[name]
        if not isinstance(target, dict):
            return False  # code 28: cannot create a field in a non-object
    target[last] = copy.deepcopy(value)
    return True


@dataclass
class Event:
    position: int
    collection: str
    body: Doc


@dataclass
class MongoState:
    """What survives every process: the documents, the oplog, the server's clock."""

    clock: Clock
    preimages: bool = False
    collections: dict[str, dict[Any, Doc]] = field(default_factory=dict)
    position: int = 0  # the head of the oplog
    floor: int = 0  # the oldest position still in the oplog
    events: list[Event] = field(default_factory=list)
    watched: tuple[str, ...] = ("moods", "users", "news-posts")
    last_positions: dict[str, int] = field(default_factory=dict)  # newest event, by collection
    on_write: Callable[[str, str, Any, Doc | None, Doc | None], None] | None = None

    def coll(self, name: str) -> dict[Any, Doc]:
        return self.collections.setdefault(name, {})

    # -- the oplog -------------------------------------------------------------------------

    def _log(self, collection: str, op: str, key: Any, before: Doc | None,
             after: Doc | None) -> None:  # fmt: skip
        self.position += 1
        if self.on_write is not None:
            self.on_write(collection, op, key, before, after)
        if collection not in self.watched:
            return
        self.last_positions[collection] = self.position
        now = self.clock.time()
        body: Doc = {
            "_id": token(self.position),
            "operationType": op,
            "clusterTime": Timestamp(int(now), self.position % 2**31),
            "wallTime": datetime.fromtimestamp(int(now * 1000) / 1000, UTC),
            "ns": {"db": DB_NAME, "coll": collection},
            "documentKey": {"_id": key},
        }
        if self.preimages and op != "insert" and before is not None and "user" in before:
            body["fullDocumentBeforeChange"] = {"user": clone(before["user"])}
        if collection == "users" and op == "update":
            old, new = before or {}, after or {}
            changed = [k for k in new if old.get(k, _MISSING) != new[k]]
            removed = [k for k in old if k not in new]
            body["changed"], body["removed"] = changed, removed
        elif collection == "users":
            body["changed"], body["removed"] = [], []
        self.events.append(Event(self.position, collection, body))

    def prune(self, floor: int) -> None:
        """Drop the oplog below `floor` (never the newest entry)."""
        self.floor = max(self.floor, min(floor, self.position))
        self.events = [e for e in self.events if e.position >= self.floor]

    def last_event(self, collection: str) -> int:
        """Position of the newest event of `collection`, pruned or not (0: none yet)."""
        return self.last_positions.get(collection, 0)

    def events_after(self, collections: Collection[str], position: int, limit: int) -> list[Event]:
        out = []
        for event in self.events:
            if event.position > position and event.collection in collections:
                out.append(event)
                if len(out) >= limit:
                    break
        return out

    # -- writes (the app's and the replicator's) ------------------------------------------

    def insert(self, collection: str, doc: Doc) -> None:
        docs = self.coll(collection)
        key = doc["_id"]
        if key in docs:
            raise KeyError(f"duplicate _id {key!r} in {collection}")
        docs[key] = clone(doc)
        self._log(collection, "insert", key, None, docs[key])

    def replace(self, collection: str, key: Any, doc: Doc, *, upsert: bool = False) -> bool:
        docs = self.coll(collection)
        before = docs.get(key)
        new = {"_id": key, **{k: clone(v) for k, v in doc.items() if k != "_id"}}
        if before is None:
            if not upsert:
                return False
            docs[key] = new
            self._log(collection, "insert", key, None, new)
        else:
            if new == before:
                return False
            docs[key] = new
            self._log(collection, "replace", key, before, new)
        return True

    def update(self, collection: str, key: Any, change: Callable[[Doc], None],
               *, upsert: bool = False) -> bool:  # fmt: skip
        """Apply `change` to a copy; an oplog entry (and event) only if it changed anything."""
        docs = self.coll(collection)
        before = docs.get(key)
        if before is None and not upsert:
            return False
        after = clone(before) if before is not None else {"_id": key}
        change(after)
        if after == before:
            return False
        docs[key] = after
        self._log(collection, "update" if before is not None else "insert", key, before, after)
        return True

    def delete(self, collection: str, key: Any) -> bool:
        docs = self.coll(collection)
        before = docs.pop(key, None)
        if before is None:
            return False
        self._log(collection, "delete", key, before, None)
        return True

    def find(self, collection: str, match: Callable[[Doc], bool] = lambda d: True) -> list[Doc]:
        """Copies of the matching documents, in `_id` order."""
        docs = self.coll(collection)
        return [clone(d) for k, d in sorted(docs.items(), key=lambda kv: bson_order(kv[0]))
                if match(d)]  # fmt: skip

    def get(self, collection: str, key: Any) -> Doc | None:
        doc = self.coll(collection).get(key)
        return clone(doc) if doc is not None else None


_MISSING = object()


class FakeChangeStream:
    """PyMongo's `AsyncChangeStream` as the stream loop uses it: `try_next`, `resume_token`,
    `alive`, `close`. A getMore is a step; events already in the batch are not (PyMongo hands
    them out without a round trip)."""

    def __init__(
        self,
        state: MongoState,
        scheduler: Scheduler,
        proc: Process,
        collection: str,
        start: int,
        start_token: Mapping[str, Any] | None,
        *,
        batch_size: int,
        max_await_ms: int,
        kill_cursor: Callable[[], bool] = lambda: False,
        idle_wait: Callable[[], float] | None = None,
        also: tuple[str, ...] = (),
    ) -> None:
        self._state = state
        self._scheduler = scheduler
        self._proc = proc
        self._collection = collection  # names its steps; `also`: more collections followed
        self._collections = (collection, *also)
        self._position = start
        self._resume_token: dict[str, Any] | None = dict(start_token) if start_token else None
        if self._resume_token is None:
            self._resume_token = token(start)  # the first reply's post-batch token
        self._batch: deque[Event] = deque()
        self._post_batch: dict[str, Any] | None = None
        self._batch_size = max(1, batch_size)
        self._max_await = max_await_ms / 1000
        self._kill_cursor = kill_cursor
        self._idle_wait = idle_wait
        self._killed = False  # the server forgot the cursor (no invalidate)
        self._closed = False

    @property
    def resume_token(self) -> Mapping[str, Any] | None:
        return dict(self._resume_token) if self._resume_token else None

    @property
    def alive(self) -> bool:
        """PyMongo 4.x: False once the stream is closed, by `close()` or because the server
        dropped the cursor and its last batch has been read."""
        return not self._closed

    async def close(self) -> None:
        self._proc.check()
        self._closed = True
        self._killed = True

    def _get_more(self) -> None:
        if self._position < self._state.floor:
            self._scheduler.note(f"history lost: getMore {self._collection}")
            raise OperationFailure(
                "Executor error during getMore :: caused by :: Resume of change stream was not "
                "possible, as the resume point may no longer be in the oplog.",
                code=HISTORY_LOST,
                details={"code": HISTORY_LOST, "codeName": "ChangeStreamHistoryLost"},
            )
        found = self._state.events_after(self._collections, self._position, self._batch_size)
        if len(found) >= self._batch_size:
            self._position = found[-1].position
        else:
            self._position = self._state.position  # scanned to the end
        self._batch.extend(found)
        self._post_batch = token(self._position)
        if not found and self._idle_wait is not None:
            self._scheduler.clock.advance(self._idle_wait())  # the server waited for changes
        if self._kill_cursor():
            self._killed = True  # the reply's cursor id is 0
            self._scheduler.note(f"cursor dropped: {self._collection}")

    async def try_next(self) -> Doc | None:
        """As PyMongo's: a buffered event costs no round trip; a dead cursor yields None and
        closes the stream once its buffer is empty."""
        change: Event | None = None
        if self._batch:
            change = self._batch.popleft()
        elif not self._killed:
            await self._scheduler.io(self._proc, f"getMore:{self._collection}", self._get_more)
            change = self._batch.popleft() if self._batch else None
        if self._killed and not self._batch:
            self._closed = True
        if change is None:
            if self._post_batch is not None:
                self._resume_token = dict(self._post_batch)
            if self._idle_wait is None and not self._closed:  # others move time on
                await self._scheduler.clock.sleep_until(self._scheduler.clock.now
                                                        + self._max_await)  # fmt: skip
            return None
        self._resume_token = dict(change.body["_id"])
        if not self._batch and self._post_batch is not None:
            self._resume_token = dict(self._post_batch)
        body: Doc = clone(change.body)
        return body


def open_stream(
    state: MongoState,
    scheduler: Scheduler,
    proc: Process,
    collection: str,
    start_after: Mapping[str, Any] | None,
    *,
    batch_size: int,
    max_await_ms: int,
    kill_cursor: Callable[[], bool] = lambda: False,
    idle_wait: Callable[[], float] | None = None,
    also: tuple[str, ...] = (),
) -> FakeChangeStream:
    """`watch(start_after=...)`: the aggregate that opens a stream (the caller's step);
    `also`: the other collections one database stream follows with `collection`."""
    if start_after is not None:
        start = position_of(start_after)
        if start < state.floor:
            scheduler.note(f"history lost: watch {collection}")
            raise OperationFailure(
                "Executor error during aggregate :: caused by :: Resume of change stream was "
                "not possible, as the resume point may no longer be in the oplog.",
                code=HISTORY_LOST,
                details={"code": HISTORY_LOST, "codeName": "ChangeStreamHistoryLost"},
            )
    else:
        start = state.position
    return FakeChangeStream(
        state, scheduler, proc, collection, start, start_after,
        batch_size=batch_size, max_await_ms=max_await_ms, kill_cursor=kill_cursor,
        idle_wait=idle_wait, also=also,
    )  # fmt: skip
