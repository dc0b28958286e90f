"""MongoDB: the app's collections (read) and the replicator's own (`replicator_*`).

Everything the replicator knows survives in Mongo next to the data it mirrors: the resume
token, the ledger of what the PDS holds, sessions and dead letters. No local state file.
The replicator's own documents are keyed by strings (a mood's ledger entry by its id in hex,
the `ref` its record carries) and stamp times as epoch seconds, which every tool compares
without a date parser.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import secrets
import time
from collections.abc import AsyncIterator, Collection, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any, Literal
from urllib.parse import parse_qs, urlsplit

import anyio
import bson
from bson import ObjectId
from bson.codec_options import DatetimeConversion
from loguru import logger
from pymongo import AsyncMongoClient, ReadPreference, UpdateOne, WriteConcern
from pymongo.asynchronous.change_stream import AsyncChangeStream
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import (
    BulkWriteError,
    ConfigurationError,
    ConnectionFailure,
    DuplicateKeyError,
    InvalidURI,
    OperationFailure,
    PyMongoError,
)
from pymongo.read_concern import ReadConcern

from . import crashpoints
from .accounts import ParkedAccount
from .errors import ConfigError, OperatorError, Unavailable
from .lease import Fence, Fenced
from .logs import redact_uri
from .model import Account, LedgerEntry, Location, State
from .recordtypes import MOOD, RecordType
from .sessions import Session, session_from_doc, session_to_doc
from .tasks import task_group
from .typeviews import TypeViews

# What the stream loop reads of a change event of a mirrored collection: which document,
# what happened, when.
# The document itself is read by `_id` when the event is applied (so a replay converges on
# the current state), so nothing of it is asked for: no `updateLookup`, and a document near
# 16 MB cannot make an event too large to return (a crash loop: such an event cannot be
# resumed past). The pre-image's owner field (`user`; each type's own is added) names the
# owner of a purged document the ledger never knew, where the collection has pre-images on
# (docs/deploy.md).
DOC_EVENT = {
    "operationType": 1, "documentKey": 1, "ns": 1, "to": 1, "clusterTime": 1, "wallTime": 1,
    "fullDocumentBeforeChange.user": 1,
}  # fmt: skip
# Of a `users` event: whose, and which fields changed (names only: the values hold passwords).
USERS_EVENT = {
    "operationType": 1, "documentKey": 1, "ns": 1, "clusterTime": 1,
    "changed": {"$map": {"input": {"$objectToArray": {
        "$ifNull": ["$updateDescription.updatedFields", {}]}}, "as": "f", "in": "$$f.k"}},
    "removed": {"$ifNull": ["$updateDescription.removedFields", []]},
}  # fmt: skip

Doc = dict[str, Any]


@dataclass(frozen=True)
class Names:
    """Collection names; the production names are the defaults. `moods`: the mood type's
    collection (REPLICATOR_MOODS_COLLECTION); it also names the one stream's checkpoint and
    lease, as it did before there were other types (an upgrade keeps them)."""

    moods: str = "moods"
    users: str = "users"
    handles: str = "@handles"
    prefix: str = "replicator_"

    def collection(self, rtype: RecordType) -> str:
        """The app's collection of a type: as declared, the mood type's as configured."""
        return self.moods if rtype.name == MOOD.name else rtype.collection

    def ledger(self, rtype: RecordType) -> str:
        return f"{self.prefix}ledger{rtype.suffix}"

    def dead_letters(self, rtype: RecordType) -> str:
        return f"{self.prefix}dead_letters{rtype.suffix}"

    @property
    def state(self) -> str:
        return f"{self.prefix}state"

    @property
    def sessions(self) -> str:
        return f"{self.prefix}sessions"

    @property
    def accounts(self) -> str:
        return f"{self.prefix}accounts"

    @property
    def erasures(self) -> str:
        return f"{self.prefix}erasures"


SERVER_SELECTION_MS = 10_000
# `$in` lists are sent in chunks of this many, `IN_PARALLEL` at a time (Store._find_in).
IN_CHUNK = 100
IN_PARALLEL = 4
_AUTH_FAILED = frozenset({18, 8000})  # AuthenticationFailed; Atlas's "bad auth"
_UNAUTHORIZED = 13


def connect(uri: str) -> AsyncMongoClient[Doc]:
    """A `serverSelectionTimeoutMS` in the URI wins over our 10 s: the operator's choice."""
    given = {key.lower() for key in parse_qs(urlsplit(uri).query)}
    options: dict[str, Any] = {"tz_aware": True}
    if "serverselectiontimeoutms" not in given:
        options["serverSelectionTimeoutMS"] = SERVER_SELECTION_MS
    return AsyncMongoClient(uri, **options)


@asynccontextmanager
async def open_client(uri: str) -> AsyncIterator[AsyncMongoClient[Doc]]:
    """The client every command uses. A MongoDB that cannot be used as configured (a URI
    it refuses, an SRV name that does not resolve, no server within the selection timeout,
    credentials or privileges refused), at open or while the command runs, raises
    `ConfigError` or `Unavailable` naming what to check; any other error passes unchanged."""
    client = None
    try:
        client = connect(uri)
        yield client
    except PyMongoError as exc:
        problem = mongo_problem(exc, uri)
        if problem is None:
            raise
        raise problem from exc
    finally:
        if client is not None:
            await client.close()


def unreachable(exc: ConnectionFailure, uri: str = "") -> str:
    """The driver's connection error in one line: which host said what, without the topology
    dump and the timeouts it appends."""
    text = str(exc).replace(uri, redact_uri(uri)) if uri else str(exc)
    reason = re.sub(r" \(configured timeouts:[^)]*\)", "", text.split(", Timeout:")[0])
    return f"no server reachable ({reason.rstrip('.')})"


def mongo_problem(exc: PyMongoError, uri: str) -> OperatorError | None:
    """What the operator should check for `exc`, or None when it is not a problem of the
    deployment (a bug, a conflict: those keep their traceback). Never holds the password."""
    where = f"MongoDB {redact_uri(uri)}"
    text = str(exc).replace(uri, redact_uri(uri)).rstrip(".")
    if isinstance(exc, InvalidURI):
        return ConfigError(f"MONGODB_CONNECTION_STRING (--mongodb-uri): {text}")
    if isinstance(exc, ConfigurationError):
        if "DNS" in text or type(exc.__cause__).__module__.startswith("dns"):
            return Unavailable(
                f"{where}: {text}: check the host name (a mongodb+srv:// URI needs the DNS "
                "record _mongodb._tcp.<host>) and that this machine can resolve it"
            )
        return ConfigError(f"{where}: {text}: check the URI's options")
    if isinstance(exc, ConnectionFailure):
        return Unavailable(
            f"{where}: {unreachable(exc, uri)}: check the host and port, that MongoDB "
            "runs, and the network path (firewall, Atlas IP access list, TLS options)"
        )
    if isinstance(exc, OperationFailure) and exc.code in _AUTH_FAILED:
        return Unavailable(
            f"{where}: authentication failed: check the user name and password in the URI "
            "(special characters percent-encoded) and authSource"
        )
    if isinstance(exc, OperationFailure) and exc.code == _UNAUTHORIZED:
        errmsg = (exc.details or {}).get("errmsg") or text
        return Unavailable(
            f"{where}: not authorized: {errmsg}: grant this user the privileges the "
            "replicator needs (find, changeStream, update on the app's collections; readWrite "
            "on replicator_*)"
        )
    return None


def create_index_command(db: str, collection: str, keys: Mapping[str, int]) -> str:
    """The mongosh line that creates this index: what an operator who creates indexes
    themselves (`--no-create-indexes`) is told to run."""
    spec = ", ".join(f"{json.dumps(k)}: {v}" for k, v in keys.items())
    return (
        f"db.getSiblingDB({json.dumps(db)}).getCollection({json.dumps(collection)})"
        f".createIndex({{{spec}}})"
    )


def account_from_user(doc: Mapping[str, Any] | None) -> Account | None:
    """An account needs a DID and a password; anything less is "no ATProto account"."""
    if not doc:
        return None
    atproto = doc.get("atproto")
    if not isinstance(atproto, Mapping):
        return None
    did, password = atproto.get("did"), atproto.get("password")
    if not (isinstance(did, str) and did.startswith("did:") and isinstance(password, str)):
        return None
    if not password:
        return None
    handle = atproto.get("handle")
    return Account(str(doc["_id"]), did, handle if isinstance(handle, str) else None, password)


def user_gone(doc: Mapping[str, Any] | None) -> bool:
    """The app erases a user by deleting the `users` document or unsetting its `atproto`:
    either, for a user the replicator knows a DID of, means "erase their records". An
    `atproto` that is there but unusable (no password, say) is not an erasure: a typo must
    never delete anyone's records."""
    return doc is None or doc.get("atproto") is None


def sub_hash(sub: str) -> str:
    """What stays of an erased user: `sha256(sub)`, as the app keeps in its tombstones."""
    return hashlib.sha256(sub.encode("utf-8", "surrogateescape")).hexdigest()


def _held(doc: Mapping[str, Any]) -> tuple[Location, ...]:
    if "held" in doc:
        return tuple((str(h[0]), str(h[1])) for h in doc.get("held") or ())
    # Written before `held` existed: a record is where the entry says, if it says it is there.
    did, rkey, state = doc.get("did"), doc.get("rkey"), doc.get("state")
    there = state == State.PRESENT.value or (
        state in (State.INVALID.value, State.PARKED.value) and (doc.get("hash") or doc.get("cid"))
    )
    return ((str(did), str(rkey)),) if there and did and rkey else ()


def entry_from_doc(doc: Mapping[str, Any]) -> LedgerEntry:
    return LedgerEntry(
        mood_id=ObjectId(doc["_id"]),
        user=doc.get("user"),
        state=State(doc.get("state", State.ABSENT)),
        did=doc.get("did"),
        rkey=doc.get("rkey"),
        hash=doc.get("hash"),
        cid=doc.get("cid"),
        reason=doc.get("reason"),
        attempts=int(doc.get("attempts", 0)),
        retry_at=doc.get("retry_at"),
        held=_held(doc),
        generation=doc.get("generation"),
    )


def entry_to_doc(entry: LedgerEntry) -> Doc:
    return {
        "user": entry.user,
        "state": entry.state.value,
        "did": entry.did,
        "rkey": entry.rkey,
        "hash": entry.hash,
        "cid": entry.cid,
        "reason": entry.reason,
        "attempts": entry.attempts,
        "retry_at": entry.retry_at,
        "held": [list(h) for h in entry.held],
        "generation": entry.generation,
    }


# A pending intent this old was left by a process that died: a lane gives up long before
# (`Settings.lane_deadline`), so nobody is still sending it.
STALE_INTENT_SECONDS = 600.0


def _due(entry: Mapping[str, Any], now: float) -> bool:
    if entry.get("state") == State.PENDING.value:
        return float(entry.get("updated_at") or 0) <= now - STALE_INTENT_SECONDS
    return float(entry.get("retry_at") or 0) <= now


class Store(TypeViews):
    """Every read a decision depends on comes from the primary with majority read concern,
    and every write waits for a majority, whatever the connection string says: a decision made
    on a read that a failover rolls back could resurrect a record."""

    def __init__(
        self,
        client: AsyncMongoClient[Doc],
        db_name: str,
        names: Names,
        fence: Fence | None = None,
        rtypes: Sequence[RecordType] = (MOOD,),
        *,
        shadow: bool = False,
    ) -> None:
        """`rtypes`: the record types mirrored; this store reads and writes the first one's
        documents, ledger and dead letters (`of` gives another's), and the rest is shared.
        `shadow`: a dry run's, whose checkpoint is its own (it never moves the real
        replicator's position). `fence`: what every write checks (`fenced` gives a store
        with another)."""
        self.client = client
        self.fence = fence or Fence()
        # Invalid UTF-8 and dates outside the years 1-9999 decode (to lone surrogates, to
        # `DatetimeMS`) instead of making every read of the document raise, the change
        # stream's included: `desired` reports such a mood as invalid (docs/bad-input.md).
        codec = client.codec_options.with_options(
            unicode_decode_error_handler="surrogateescape",
            datetime_conversion=DatetimeConversion.DATETIME_AUTO,
        )
        self.db: AsyncDatabase[Doc] = client.get_database(
            db_name,
            codec_options=codec,
            read_preference=ReadPreference.PRIMARY,
            read_concern=ReadConcern("majority"),
            write_concern=WriteConcern("majority"),
        )
        self.names = names
        self.rtypes = tuple(rtypes)
        self.users: AsyncCollection[Doc] = self.db[names.users]
        self.handles: AsyncCollection[Doc] = self.db[names.handles]
        self.state: AsyncCollection[Doc] = self.db[names.state]
        self.sessions: AsyncCollection[Doc] = self.db[names.sessions]
        self.parked: AsyncCollection[Doc] = self.db[names.accounts]
        self.erasures: AsyncCollection[Doc] = self.db[names.erasures]
        self.runs: AsyncCollection[Doc] = self.db[f"{names.prefix}backfill"]
        self.checkpoint_name = f"checkpoint:{names.moods}" + (":dry-run" if shadow else "")
        self._bind(self.rtypes[0])

    def _bind(self, rtype: RecordType) -> None:
        self.rtype = rtype
        self.collection = self.names.collection(rtype)
        self.docs: AsyncCollection[Doc] = self.db[self.collection]
        self.ledger: AsyncCollection[Doc] = self.db[self.names.ledger(rtype)]
        self.dead_letters: AsyncCollection[Doc] = self.db[self.names.dead_letters(rtype)]

    def fenced(self, fence: Fence) -> Store:
        """This store, its writes checked against `fence` (the lease, once it is known)."""
        view = copy.copy(self)
        view.fence = fence
        return view

    async def ensure_indexes(self, *, create_app_indexes: bool = True) -> None:
        """The ledger's own, and `moods.user`: the backfill, the audit and the purge sweep read
        a user's moods, as the app does. The replicator's collections are its own; the app's
        `moods` is not, so its index is created only with `create_app_indexes` (and where the
        user may), and a missing one is a warning with the command that creates it. Never on a
        `moods` that does not exist: that would create an empty collection where one was
        dropped or renamed away."""
        for view in self.views:
            if await view.docs_exist():
                await self._ensure_app_index(
                    view.collection, {view.rtype.owner: 1}, create_app_indexes
                )
            await view.ledger.create_index("user")
            await view.ledger.create_index("rkey")  # TIDs are near-unique: the selective key
            await view.ledger.create_index("state")
            await view.dead_letters.create_index("user")
        await self.sessions.create_index("sub")

    async def has_index(self, name: str, fields: Sequence[str]) -> bool:
        """An index led by `fields` on the collection `name` (a compound one serves too)."""
        async for index in await self.db[name].list_indexes():
            if list(index["key"])[: len(fields)] == list(fields):
                return True
        return False

    async def _ensure_app_index(self, name: str, keys: dict[str, int], create: bool) -> None:
        collection = self.db[name]
        if await self.has_index(name, list(keys)):
            return
        if not create:
            what = "is missing (--no-create-indexes): a user's moods are read by a full scan until"
        else:
            try:
                await collection.create_index(list(keys.items()))
            except OperationFailure as exc:
                if exc.code != _UNAUTHORIZED:
                    raise
                what = "is missing and this user may not create it (--no-create-indexes skips it):"
            else:
                what = "was missing and is created (--no-create-indexes leaves it to you), as"
        command = create_index_command(self.db.name, name, keys)
        logger.warning("index {} on {} {} `{}`", keys, name, what, command)

    # -- the app's data ---------------------------------------------------------------------

    async def _find_in(
        self,
        collection: AsyncCollection[Doc],
        field: str,
        values: Sequence[Any],
        projection: Mapping[str, Any] | None = None,
    ) -> list[Doc]:
        """`find({field: {$in: values}})` in chunks of `IN_CHUNK`, a few at a time: no
        server's cost for one query then grows with the square of a batch, and the chunks
        overlap their round trips."""
        chunks = [values[i : i + IN_CHUNK] for i in range(0, len(values), IN_CHUNK)]
        found: list[list[Doc]] = [[] for _ in chunks]
        limiter = anyio.CapacityLimiter(IN_PARALLEL)

        async def one(i: int) -> None:
            async with limiter:
                query = {field: {"$in": list(chunks[i])}}
                found[i] = [d async for d in collection.find(query, projection)]

        async with task_group() as tg:
            for i in range(len(chunks)):
                tg.start_soon(one, i)
        return [d for part in found for d in part]

    async def moods_by_id(self, ids: Sequence[ObjectId]) -> dict[ObjectId, Doc]:
        return {d["_id"]: d for d in await self._find_in(self.docs, "_id", list(ids))}

    async def moods_of_user(self, sub: str) -> list[Doc]:
        return (await self.moods_of_users([sub])).get(sub, [])

    async def moods_of_users(
        self, subs: Sequence[str], fields: Sequence[str] | None = None
    ) -> dict[str, list[Doc]]:
        """Each user's moods, in `_id` order (the `moods.user` index serves it); `fields`:
        only those (and `_id`, `user`)."""
        found: dict[str, list[Doc]] = {}
        owner = self.rtype.owner
        projection = dict.fromkeys([*fields, owner], 1) if fields is not None else None
        for doc in await self._find_in(self.docs, owner, list(subs), projection):
            found.setdefault(str(doc.get(owner)), []).append(doc)
        for docs in found.values():
            docs.sort(key=lambda d: _id_order(d["_id"]))
        return found

    async def accounts(self, subs: Iterable[str]) -> dict[str, Account | None]:
        wanted = sorted(set(subs))
        found: dict[str, Account | None] = dict.fromkeys(wanted)
        for doc in await self._find_in(self.users, "_id", wanted):
            found[str(doc["_id"])] = account_from_user(doc)
        return found

    async def users_gone(self, subs: Iterable[str]) -> dict[str, bool]:
        """Which of these users have no `atproto` in `users` (`user_gone`), each with whether
        their document is gone altogether."""
        wanted = sorted(set(subs))
        if not wanted:
            return {}
        there = {str(d["_id"]): d for d in await self._find_in(self.users, "_id", wanted,
                                                                 {"atproto": 1})}  # fmt: skip
        return {sub: sub not in there for sub in wanted if user_gone(there.get(sub))}

    async def user_of_mood(self, mood_id: Any) -> Any:
        """The `user` field of a mood, read by `_id` (any `_id`, an unusable one included)."""
        doc = await self.docs.find_one({"_id": mood_id}, {self.rtype.owner: 1})
        return (doc or {}).get(self.rtype.owner)

    async def resolve_user(self, who: str) -> str | None:
        """A sub, or `@handle` looked up in the handles collection."""
        if not who.startswith("@"):
            return who
        doc = await self.handles.find_one({"handle": who[1:]})
        return str(doc["_id"]) if doc else None

    async def write_back_many(self, rkeys: Mapping[ObjectId, str]) -> dict[ObjectId, str]:
        """`atproto.rkey` set on each document, never upserting: a deleted document is not
        resurrected. Only called where the document's rkey differs, so the replicator's own
        update is rare. One pipeline `update_many` a chunk (each document's rkey picked from
        a map by its `_id`; an `atproto` that is not an object, bad input, is replaced);
        a chunk MongoDB refuses is done one document at a time, to name the failures.
        Returns the moods whose write-back failed, with the reason (they are dead-lettered)."""
        if not rkeys:
            return {}
        self.fence.check()
        items = list(rkeys.items())
        failed: dict[ObjectId, str] = {}
        for start in range(0, len(items), IN_CHUNK):
            chunk = dict(items[start : start + IN_CHUNK])
            try:
                await self.docs.update_many(
                    {"_id": {"$in": list(chunk)}}, _rkey_pipeline(chunk, self.rtype.write_back)
                )
            except OperationFailure:
                failed |= await self._write_back_each(chunk)
        return failed

    async def _write_back_each(self, rkeys: Mapping[ObjectId, str]) -> dict[ObjectId, str]:
        failed: dict[ObjectId, str] = {}
        for mood_id, rkey in rkeys.items():
            try:
                pipeline = _rkey_pipeline({mood_id: rkey}, self.rtype.write_back)
                await self.docs.update_one({"_id": mood_id}, pipeline)
            except OperationFailure as exc:
                failed[mood_id] = f"write-back of {self.rtype.write_back}.rkey failed: {exc}"
        return failed

    # -- ledger -----------------------------------------------------------------------------

    async def ledger_by_id(self, ids: Sequence[ObjectId]) -> dict[ObjectId, LedgerEntry]:
        docs = await self._find_in(self.ledger, "_id", [str(i) for i in ids])
        return {(e := entry_from_doc(d)).mood_id: e for d in docs}

    async def ledger_of_user(self, sub: str) -> dict[ObjectId, LedgerEntry]:
        return (await self.ledger_of_users([sub])).get(sub, {})

    async def ledger_of_users(self, subs: Sequence[str]) -> dict[str, dict[ObjectId, LedgerEntry]]:
        found: dict[str, dict[ObjectId, LedgerEntry]] = {}
        for doc in await self._find_in(self.ledger, "user", list(subs)):
            entry = entry_from_doc(doc)
            found.setdefault(str(entry.user), {})[entry.mood_id] = entry
        return found

    async def rkey_owners(
        self, where: Collection[tuple[str, str]]
    ) -> dict[tuple[str, str], ObjectId]:
        """Which mood's ledger entry holds each of these (did, rkey): one query by rkey (TIDs
        are near-unique, and indexed), in chunks."""
        rkeys = sorted({rkey for _, rkey in where})
        docs = await self._find_in(self.ledger, "rkey", rkeys, {"rkey": 1, "did": 1})
        found = {(str(d.get("did")), str(d["rkey"])): ObjectId(d["_id"]) for d in docs}
        return {key: owner for key, owner in found.items() if key in where}

    async def save_entries(
        self,
        entries: Sequence[LedgerEntry],
        *,
        fresh: Collection[ObjectId] = (),
        since: Written | None = None,
    ) -> Written:
        """Upsert, stamped with this process's lease generation; an entry a newer generation
        wrote is never overwritten (MongoDB refuses the upsert: `Fenced`).

        How MongoDB is asked changes nothing of what ends stored (the simulation's store
        does not ask differently), only what it costs the server:

        - `fresh`: moods the caller read no entry for (the intents of new moods, most of a
          burst): inserted in one command; one that exists after all (written meanwhile)
          goes the upsert way, so the fence decides it exactly as before.
        - `since`: what this returned when the caller stored these moods' intents. An
          outcome that differs from its intent by the same fields and values as others (a
          burst of creates: only `state`) is one `update_many` for all of them, not one
          update each. It matches only entries still exactly as that write left them (its
          `write` id): any other writer meanwhile, and they all go the upsert way."""
        write = secrets.token_hex(8)
        if not entries:
            return Written(write, {})
        self.fence.check()
        now = time.time()
        generation = self.fence.generation
        docs = {
            e.mood_id: {
                **entry_to_doc(replace(e, generation=generation)), "updated_at": now,
                "write": write,
            }
            for e in entries
        }  # fmt: skip
        inserts = [i for i in docs if i in fresh]
        rest = [i for i in docs if i not in fresh]
        if inserts:
            rest += await self._insert_entries(inserts, docs)
        if since is not None and since.entries:
            rest = await self._update_like(rest, docs, since, generation)
        if not rest:
            return Written(write, {e.mood_id: e for e in entries})
        query = _not_newer_than(generation)
        try:
            await self.ledger.bulk_write(
                [UpdateOne({"_id": str(i), **query}, {"$set": docs[i]}, upsert=True)
                 for i in rest],
                ordered=False,
            )  # fmt: skip
        except BulkWriteError as exc:
            errors = exc.details.get("writeErrors", [])
            if any(e.get("code") == 11000 for e in errors):
                raise Fenced("a newer lease generation wrote these ledger entries") from None
            raise
        return Written(write, {e.mood_id: e for e in entries})

    async def _insert_entries(
        self, ids: list[ObjectId], docs: Mapping[ObjectId, Doc]
    ) -> list[ObjectId]:
        """Insert; returns the ones that existed after all (to be upserted)."""
        try:
            await self.ledger.insert_many([{"_id": str(i), **docs[i]} for i in ids], ordered=False)
        except BulkWriteError as exc:
            errors = exc.details.get("writeErrors", [])
            if any(e.get("code") != 11000 for e in errors):
                raise
            return [ids[e["index"]] for e in errors]
        return []

    async def _update_like(
        self,
        ids: list[ObjectId],
        docs: Mapping[ObjectId, Doc],
        since: Written,
        generation: int | None,
    ) -> list[ObjectId]:
        """Entries whose change from `since` is the same, one `update_many` a group (and a
        chunk); returns the ones still to upsert one by one."""
        groups: dict[bytes, list[ObjectId]] = {}
        changes: dict[bytes, Doc] = {}
        left = []
        for i in ids:
            before = since.entries.get(i)
            if before is None:
                left.append(i)
                continue
            old = entry_to_doc(replace(before, generation=generation))
            change = {k: v for k, v in docs[i].items()
                      if k in ("updated_at", "write") or old.get(k) != v}  # fmt: skip
            key = bson.encode(change)
            groups.setdefault(key, []).append(i)
            changes[key] = change
        query = {"write": since.write}  # as the intents' write left them, whoever is newer
        for key, group in groups.items():
            for start in range(0, len(group), IN_CHUNK):
                chunk = group[start : start + IN_CHUNK]
                done = await self.ledger.update_many(
                    {"_id": {"$in": [str(i) for i in chunk]}, **query}, {"$set": changes[key]}
                )
                if done.matched_count != len(chunk):
                    left += chunk  # the upsert way decides each (and raises `Fenced`)
        return left

    async def records_held(self) -> int:
        """Records on the PDS as the ledger knows them: every location it holds, a record kept
        after an invalid edit and one in flight included."""
        cursor = await self.ledger.aggregate(
            [{"$project": {"n": {"$size": {"$ifNull": ["$held", []]}}}},
             {"$group": {"_id": None, "n": {"$sum": "$n"}}}]
        )  # fmt: skip
        async for doc in cursor:
            return int(doc["n"])
        return 0

    async def ledger_counts(self) -> dict[str, int]:
        cursor = await self.ledger.aggregate([{"$group": {"_id": "$state", "n": {"$sum": 1}}}])
        return {str(d["_id"]): int(d["n"]) async for d in cursor}

    async def parked_ids(self, limit: int = 500) -> list[ObjectId]:
        """Parked moods whose retry time has come, and intents a dead process left pending.
        Work done after the checkpoint moved past its event (a parked retry, the reconcile of
        an account that is back) has no replay to finish it: without this, such an intent
        would stay pending, its record missing or stale, forever."""
        now = time.time()
        cursor = self.ledger.find(
            {"state": {"$in": [State.PARKED.value, State.PENDING.value]}},
            {"_id": 1, "state": 1, "retry_at": 1, "updated_at": 1},
        )
        due = [d["_id"] async for d in cursor if _due(d, now)]
        return [ObjectId(i) for i in due[:limit]]

    # -- change streams and checkpoints -------------------------------------------------------

    async def watch_docs(
        self, token: Mapping[str, Any] | None, *, max_await_ms: int, batch_size: int
    ) -> AsyncChangeStream[Doc]:
        """One stream for every mirrored type's collection, one position, one checkpoint: the
        collection's own stream when one type is mirrored (the privileges of a release before
        types: `changeStream` on that collection), else the database's, filtered by namespace
        (and what ends it: the database dropped), which needs `changeStream` on the database.
        A token the other kind of stream cannot resume from is a lost history: reconciled."""
        colls = sorted({view.collection for view in self.views})
        owners = {f"fullDocumentBeforeChange.{v.rtype.owner}": 1 for v in self.views}
        pipeline: list[Doc] = [{"$project": {**DOC_EVENT, **owners}}]
        target: AsyncCollection[Doc] | AsyncDatabase[Doc] = self.db[colls[0]]
        if len(colls) > 1:
            target = self.db
            pipeline.insert(0, {"$match": {"$or": [
                {"ns.coll": {"$in": colls}},
                {"operationType": {"$in": ["dropDatabase", "invalidate"]}},
            ]}})  # fmt: skip
        stream: AsyncChangeStream[Doc] = await target.watch(
            pipeline,
            start_after=dict(token) if token else None,
            full_document_before_change="whenAvailable",
            max_await_time_ms=max_await_ms,
            batch_size=batch_size,
        )
        return stream

    async def watch_users(
        self, token: Mapping[str, Any] | None, *, max_await_ms: int
    ) -> AsyncChangeStream[Doc]:
        return await self.users.watch(
            [{"$project": USERS_EVENT}],
            start_after=dict(token) if token else None,
            max_await_time_ms=max_await_ms,
        )

    def _checkpoint_id(self, stream: str | None = None) -> str:
        if stream is None:
            return self.checkpoint_name
        return self.checkpoint_name.replace(
            f"checkpoint:{self.names.moods}", f"checkpoint:{stream}"
        )

    async def load_checkpoint(self, stream: str | None = None) -> Doc | None:
        """`stream`: None for `moods`, else the name of another collection followed."""
        return await self.state.find_one({"_id": self._checkpoint_id(stream)})

    async def save_checkpoint(
        self, token: Mapping[str, Any] | None, *, stream: str | None = None, **fields: Any
    ) -> None:
        """Stamped with the lease generation; a newer generation's checkpoint is never
        overwritten (`Fenced`). `token` None keeps the saved token (sets `fields` only)."""
        self.fence.check()
        generation = self.fence.generation
        values = {"saved_at": time.time(), **fields}
        if token is not None:
            values["token"] = dict(token)
        query: dict[str, Any] = {"_id": self._checkpoint_id(stream), **_not_newer_than(generation)}
        if generation is not None:
            values["generation"] = generation
        try:
            await self.state.update_one(query, {"$set": values}, upsert=True)
        except DuplicateKeyError:
            raise Fenced("a newer lease generation owns the checkpoint") from None
        if token is not None:
            crashpoints.hit("checkpoint")

    async def clear_checkpoint_marks(self, *names: str) -> None:
        self.fence.check()
        await self.state.update_one(
            {"_id": self._checkpoint_id()}, {"$unset": dict.fromkeys(names, "")}
        )

    async def require_collections(self, *, empty_ok: bool = False) -> None:
        """`ConfigError` (a usage error: exit 2, nothing created) unless the database has the
        collection of every type mirrored, or `empty_ok` says one without it is meant: a wrong
        MONGODB_NAME would otherwise read as an empty, healthy deployment. Names the
        databases of the server that have the first one missing."""
        if empty_ok:
            return
        missing = await self.missing_collections()
        if not missing:
            return
        elsewhere = await self._databases_with(missing[0])
        hint = (f"; databases here with a {missing[0]!r} collection: {', '.join(elsewhere)}"
                if elsewhere else "")  # fmt: skip
        names = " or ".join(map(repr, missing))
        raise ConfigError(
            f"database {self.db.name!r} has no {names} collection: check MONGODB_NAME / "
            f"--db (the dev stack's is 'aesthetic_dev'){hint}. If it is meant (nothing "
            "written yet), add --empty-ok"
        )

    async def _databases_with(self, collection: str) -> list[str]:
        """The databases of this server that have `collection` (none where listing them is
        refused)."""
        try:
            found = []
            for name in sorted(await self.client.list_database_names()):
                if name in ("admin", "local", "config"):
                    continue
                there = await self.client[name].list_collection_names(filter={"name": collection})
                if collection in there:
                    found.append(name)
            return found
        except PyMongoError:
            return []

    async def docs_exist(self) -> bool:
        """This type's collection exists (`list_collection_names`: no document is read)."""
        name = self.collection
        return name in await self.db.list_collection_names(filter={"name": name})

    async def users_in_scope(self) -> list[str]:
        """Every user who has documents of a type mirrored, ledger entries, or an ATProto
        account: a purged user whose records the ledger never knew is still someone to clean
        up."""
        found = set(await self.users.distinct("_id", {"atproto.did": {"$type": "string"}}))
        found |= set(await self.sessions.distinct("sub")) | set(await self.parked.distinct("sub"))
        for view in self.views:
            found |= set(await view.docs.distinct(view.rtype.owner))
            found |= set(await view.ledger.distinct("user"))
            found |= set(await view.dead_letters.distinct("user"))
        return sorted(u for u in found if isinstance(u, str))

    # -- backfill and recovery runs: resumable, user by user ------------------------------------

    async def load_run(self, name: str) -> Doc | None:
        return await self.state.find_one({"_id": name})

    async def start_run(self, name: str, run: str, scope: str) -> None:
        await self.state.update_one(
            {"_id": name},
            {"$set": {"run": run, "scope": scope, "started_at": time.time(), "finished": False}},
            upsert=True,
        )

    async def finish_run(self, name: str) -> None:
        await self.state.update_one(
            {"_id": name}, {"$set": {"finished": True, "finished_at": time.time()}}
        )

    async def users_done(self, run: str) -> set[str]:
        """The users the run finished, as `sub_hash`es: a progress mark must not name anyone
        (an erased user's is kept, and that must not be their sub)."""
        return {str(d["_id"]) async for d in self.runs.find({"run": run}, {"_id": 1})}

    async def user_done(self, run: str, subs: Sequence[str]) -> None:
        """These users are done in the run (one write for a group)."""
        now = time.time()
        await self.runs.bulk_write(
            [UpdateOne({"_id": sub_hash(s)}, {"$set": {"run": run, "done_at": now}}, upsert=True)
             for s in subs],
            ordered=False,
        )  # fmt: skip

    # -- parked accounts (accounts.AccountStore) -------------------------------------------------

    async def parked_accounts(self) -> list[ParkedAccount]:
        return [
            ParkedAccount(
                str(d["_id"]),
                str(d.get("sub", "")),
                d.get("kind", "unavailable"),
                str(d.get("reason", "")),
                float(d.get("since", 0.0)),
                float(d.get("next_check_at", 0.0)),
                int(d.get("attempts", 0)),
            )
            async for d in self.parked.find({})
        ]

    async def save_parked_account(self, parked: ParkedAccount) -> None:
        await self.parked.update_one(
            {"_id": parked.did},
            {"$set": {"sub": parked.sub, "kind": parked.kind, "reason": parked.reason,
                      "since": parked.since, "next_check_at": parked.next_check_at,
                      "attempts": parked.attempts}},
            upsert=True,
        )  # fmt: skip

    async def release_account(self, did: str) -> None:
        await self.parked.delete_one({"_id": did})

    # -- sessions (SessionStore) --------------------------------------------------------------

    async def load_session(self, did: str) -> Session | None:
        doc = await self.sessions.find_one({"_id": did})
        if not doc:
            return None
        return session_from_doc(doc)

    async def save_session(self, did: str, session: Session) -> None:
        await self.sessions.update_one(
            {"_id": did}, {"$set": {**session_to_doc(session), "saved_at": time.time()}},
            upsert=True,
        )  # fmt: skip

    async def credentials_of(self, sub: str) -> dict[str, str | None]:
        """Every DID this user had a session for, newest first, with the last password seen
        for it: what an erasure deletes their records with once `users` no longer says."""
        cursor = self.sessions.find({"sub": sub}, {"password": 1}).sort("saved_at", -1)
        return {str(d["_id"]): d.get("password") async for d in cursor}

    # -- erasure ------------------------------------------------------------------------------

    async def begin_erasure(self, sub: str, dids: Collection[str]) -> None:
        """The durable note that this user's erasure is under way, and in which repos: what
        finishes it after a crash, when no replayed event would (`pending_erasures`)."""
        self.fence.check()
        await self.erasures.update_one(
            {"_id": sub_hash(sub)},
            {"$set": {"sub": sub}, "$addToSet": {"dids": {"$each": sorted(dids)}},
             "$setOnInsert": {"started_at": time.time()}},
            upsert=True,
        )  # fmt: skip

    async def pending_erasures(self) -> dict[str, list[str]]:
        """Erasures begun and not finished: sub → the DIDs being erased."""
        cursor = self.erasures.find({"sub": {"$exists": True}}, {"sub": 1, "dids": 1})
        return {str(d["sub"]): [str(x) for x in d.get("dids") or ()] async for d in cursor}

    async def cancel_erasure(self, sub: str) -> None:
        """`users` has `atproto` again: not an erasure (a mark of an earlier one stays)."""
        self.fence.check()
        key = sub_hash(sub)
        await self.erasures.delete_one({"_id": key, "erased_at": {"$exists": False}})
        await self.erasures.update_one({"_id": key}, {"$unset": {"sub": "", "dids": ""}})

    async def forgotten(self, subs: Iterable[str]) -> set[str]:
        """Which of these users were erased and forgotten (their hash is all that is left)."""
        by_hash = {sub_hash(s): s for s in set(subs)}
        if not by_hash:
            return set()
        query = {"_id": {"$in": sorted(by_hash)}, "sub": {"$exists": False}}
        return {by_hash[d["_id"]] async for d in self.erasures.find(query, {"_id": 1})}

    async def forget_user(self, sub: str, dids: Collection[str], records_deleted: int) -> None:
        """Once an erased user's records are confirmed gone, nothing that names them stays:
        only `sha256(sub)` (so moods the app may have left are not recorded under them
        again). The note of the erasure under way loses their sub last: a crash in between
        leaves it pending, and it is finished again."""
        self.fence.check()
        ids = sorted(dids)
        named = {"$or": [{"user": sub}, {"did": {"$in": ids}}]}
        await self.parked.delete_many({"$or": [{"sub": sub}, {"_id": {"$in": ids}}]})
        await self.sessions.delete_many({"$or": [{"sub": sub}, {"_id": {"$in": ids}}]})
        for view in self.views:
            await view.dead_letters.delete_many(named)
        await self.runs.delete_many({"_id": sub})  # progress marks of earlier releases
        for view in self.views:
            await view.ledger.delete_many(named)
        await self.erasures.update_one(
            {"_id": sub_hash(sub)},
            {"$set": {"erased_at": time.time()}, "$unset": {"sub": "", "dids": ""},
             "$inc": {"records_deleted": records_deleted}},
            upsert=True,
        )  # fmt: skip

    async def erasure_count(self) -> int:
        return await self.erasures.count_documents({"sub": {"$exists": False}})

    # -- dead letters -------------------------------------------------------------------------

    async def dead_letter(
        self, mood_id: Any, user: str | None, did: str | None, reason: str, kind: LetterKind
    ) -> None:
        await self.dead_letter_many([(mood_id, user, did, reason, kind)])

    async def dead_letter_many(self, letters: Sequence[Letter]) -> None:
        """(mood id, user, did, reason, kind) each, in one bulk write. Keyed by the mood id
        (hex, or the repr of an id that is not an ObjectId). `kind`: `invalid` (the document
        cannot become a record) or `failed` (its write is parked, or its write-back failed):
        what `status`, `audit` and `dlq` count under those names."""
        if not letters:
            return
        now = time.time()
        await self.dead_letters.bulk_write(
            [
                UpdateOne(
                    {"_id": letter_key(mood_id)},
                    {
                        "$set": {"user": user, "did": did, "reason": reason, "kind": kind,
                                 "last_at": now},
                        "$setOnInsert": {"first_at": now},
                        "$inc": {"attempts": 1},
                    },
                    upsert=True,
                )
                for mood_id, user, did, reason, kind in letters
            ],
            ordered=False,
        )  # fmt: skip

    async def forget_dead_letter(self, key: str) -> None:
        await self.dead_letters.delete_one({"_id": key})

    async def clear_dead_letters(self, ids: Sequence[ObjectId]) -> None:
        if ids:
            await self.dead_letters.delete_many({"_id": {"$in": [str(i) for i in ids]}})

    async def clear_dead_letters_but(self, sub: str, keep: Iterable[Any]) -> None:
        """A user's letters about moods that are neither in `moods` nor in the ledger: nothing
        is left to report (a reconcile read both)."""
        kept = sorted({letter_key(i) for i in keep})
        await self.dead_letters.delete_many({"user": sub, "_id": {"$nin": kept}})

    async def dead_letter_count(self) -> int:
        return await self.dead_letters.count_documents({})

    async def moods_without_user(self) -> int:
        """Moods whose `user` is missing, not a string or empty: no user's to reconcile."""
        owner = self.rtype.owner
        query = {"$or": [{owner: {"$exists": False}}, {owner: {"$not": {"$type": "string"}}},
                         {owner: ""}]}  # fmt: skip
        return await self.docs.count_documents(query)

    async def invalid_without_user(self) -> int:
        """Invalid moods of no user (no usable `user`): reported, but in no user's scope."""
        cursor = self.dead_letters.find({"user": None}, {"kind": 1, "reason": 1})
        return sum([letter_kind(d) == "invalid" async for d in cursor])

    async def dead_letter_counts(self) -> dict[str, int]:
        """Dead letters by kind (`invalid`, `failed`; letters of earlier releases, which have
        none, by their reason: an invalid document's names a field)."""
        cursor = self.dead_letters.find({}, {"kind": 1, "reason": 1})
        out = {"invalid": 0, "failed": 0}
        async for doc in cursor:
            out[letter_kind(doc)] += 1
        return out


def _rkey_pipeline(rkeys: Mapping[ObjectId, str], where: str) -> list[Doc]:
    """`$set <where>.rkey` to each document's own rkey, looked up by its `_id` (a string key:
    ObjectIds as hex, as `$toString` gives them); a `<where>` that is not an object (bad
    input) becomes `{rkey}`. MongoDB 5.0+ (`$getField`)."""
    by_id = {str(i): r for i, r in rkeys.items()}
    rkey = {"$getField": {"field": {"$toString": "$_id"}, "input": {"$literal": by_id}}}
    kept = {"$cond": [{"$eq": [{"$type": f"${where}"}, "object"]}, f"${where}", {}]}
    return [{"$set": {where: {"$mergeObjects": [kept, {"rkey": rkey}]}}}]


def _id_order(value: Any) -> tuple[int, float, str]:
    """`_id`s as MongoDB sorts the kinds moods have: numbers, strings, ObjectIds (others
    after, by their repr)."""
    if isinstance(value, bool):
        return (4, 0.0, repr(value))
    if isinstance(value, int | float):
        return (0, float(value), "")
    if isinstance(value, str):
        return (1, 0.0, value)
    if isinstance(value, ObjectId):
        return (2, 0.0, str(value))
    return (4, 0.0, repr(value))


LetterKind = Literal["invalid", "failed"]
Letter = tuple[Any, str | None, str | None, str, LetterKind]  # id, user, did, reason, kind


def letter_kind(doc: Mapping[str, Any]) -> LetterKind:
    kind = doc.get("kind")
    if kind == "invalid" or kind == "failed":
        return "invalid" if kind == "invalid" else "failed"
    reason = str(doc.get("reason") or "")
    failed = ("PDS", "parked", "write-back", "account", "erased", "budget")
    return "failed" if any(word in reason for word in failed) else "invalid"


def letter_key(mood_id: Any) -> str:
    """A dead letter's `_id`: the mood id in hex, or the repr of an id that is no ObjectId."""
    return str(mood_id) if isinstance(mood_id, ObjectId) else repr(mood_id)


@dataclass(frozen=True)
class Written:
    """What one `save_entries` stored: its `write` id (in every document it wrote) and the
    entries. Given back as `since`, it lets the next write of the same moods send only the
    change (`Store._update_like`)."""

    write: str
    entries: Mapping[ObjectId, LedgerEntry]


def _not_newer_than(generation: int | None) -> dict[str, Any]:
    """Matches a document no newer lease generation wrote (an older one, or none): with the
    `_id`, an upsert that finds nothing fails on the duplicate key, which is the fence. One
    predicate on the field, not an `$or`, so the `_id` lookup stays an index lookup."""
    return {} if generation is None else {"generation": {"$not": {"$gt": generation}}}
