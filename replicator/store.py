"""MongoDB: the app's collections (read) and the replicator's own (`replicator_*`).

Everything the replicator knows survives in Mongo next to the data it mirrors: the resume
token, the ledger of what the PDS holds, sessions and dead letters. No local state file.
The replicator's own documents are keyed by strings (a mood's ledger entry by its id in hex,
the `ref` its record carries) and stamp times as epoch seconds, which every tool compares
without a date parser.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bson import ObjectId
from bson.codec_options import DatetimeConversion
from pymongo import AsyncMongoClient, UpdateOne
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import BulkWriteError, DuplicateKeyError

from .desired import is_deleted
from .model import Account, LedgerEntry, State
from .sessions import Session

Doc = dict[str, Any]


@dataclass(frozen=True)
class Names:
    """Collection names; the production names are the defaults."""

    moods: str = "moods"
    users: str = "users"
    handles: str = "@handles"
    prefix: str = "replicator_"

    @property
    def ledger(self) -> str:
        return f"{self.prefix}ledger"

    @property
    def state(self) -> str:
        return f"{self.prefix}state"

    @property
    def sessions(self) -> str:
        return f"{self.prefix}sessions"

    @property
    def dead_letters(self) -> str:
        return f"{self.prefix}dead_letters"


def connect(uri: str) -> AsyncMongoClient[Doc]:
    return AsyncMongoClient(uri, tz_aware=True, serverSelectionTimeoutMS=10_000)


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
    }


class Store:
    def __init__(self, client: AsyncMongoClient[Doc], db_name: str, names: Names) -> None:
        self.client = client
        # Invalid UTF-8 and dates outside the years 1-9999 decode (to lone surrogates, to
        # `DatetimeMS`) instead of making every read of the document raise, the change
        # stream's included: `desired` reports such a mood as invalid (docs/bad-input.md).
        codec = client.codec_options.with_options(
            unicode_decode_error_handler="surrogateescape",
            datetime_conversion=DatetimeConversion.DATETIME_AUTO,
        )
        self.db: AsyncDatabase[Doc] = client.get_database(db_name, codec_options=codec)
        self.names = names
        self.moods: AsyncCollection[Doc] = self.db[names.moods]
        self.users: AsyncCollection[Doc] = self.db[names.users]
        self.handles: AsyncCollection[Doc] = self.db[names.handles]
        self.ledger: AsyncCollection[Doc] = self.db[names.ledger]
        self.state: AsyncCollection[Doc] = self.db[names.state]
        self.sessions: AsyncCollection[Doc] = self.db[names.sessions]
        self.dead_letters: AsyncCollection[Doc] = self.db[names.dead_letters]
        # A dry run (shadow) appends ":dry-run": it never moves the real replicator's position.
        self.checkpoint_name = f"checkpoint:{names.moods}"

    async def ensure_indexes(self) -> None:
        """The ledger's own, and `moods.user`: the backfill, the audit and the purge sweep read
        a user's moods, as the app does (a no-op where the app's index already exists)."""
        await self.moods.create_index("user")
        await self.ledger.create_index("user")
        await self.ledger.create_index("rkey")  # TIDs are near-unique: the selective key
        await self.ledger.create_index("state")
        await self.dead_letters.create_index("user")

    # -- the app's data ---------------------------------------------------------------------

    async def moods_by_id(self, ids: Sequence[ObjectId]) -> dict[ObjectId, Doc]:
        if not ids:
            return {}
        return {d["_id"]: d async for d in self.moods.find({"_id": {"$in": list(ids)}})}

    async def moods_of_user(self, sub: str) -> list[Doc]:
        return [d async for d in self.moods.find({"user": sub}).sort("_id", 1)]

    async def user_has_live_moods(self, sub: str) -> bool:
        """Any mood of the user that is not nuked (stops at the first one found)."""
        async for doc in self.moods.find({"user": sub}, {"deleted": 1}):
            if not is_deleted(doc.get("deleted")):
                return True
        return False

    async def accounts(self, subs: Iterable[str]) -> dict[str, Account | None]:
        wanted = sorted(set(subs))
        found: dict[str, Account | None] = dict.fromkeys(wanted)
        if wanted:
            async for doc in self.users.find({"_id": {"$in": wanted}}):
                found[str(doc["_id"])] = account_from_user(doc)
        return found

    async def resolve_user(self, who: str) -> str | None:
        """A sub, or `@handle` looked up in the handles collection."""
        if not who.startswith("@"):
            return who
        doc = await self.handles.find_one({"handle": who[1:]})
        return str(doc["_id"]) if doc else None

    async def write_back_many(self, rkeys: Mapping[ObjectId, str]) -> None:
        """`$set atproto.rkey`, never upserting: a deleted document is not resurrected. Only
        called when the document's rkey differs, so the replicator's own update is rare."""
        if not rkeys:
            return
        items = list(rkeys.items())
        try:
            await self.moods.bulk_write(
                [UpdateOne({"_id": i}, {"$set": {"atproto.rkey": r}}) for i, r in items],
                ordered=False,
            )
        except BulkWriteError as exc:
            # `atproto` holds something that is not an object (bad input): replace it.
            for error in exc.details.get("writeErrors", []):
                mood_id, rkey = items[error["index"]]
                await self.moods.update_one({"_id": mood_id}, {"$set": {"atproto": {"rkey": rkey}}})

    # -- ledger -----------------------------------------------------------------------------

    async def ledger_by_id(self, ids: Sequence[ObjectId]) -> dict[ObjectId, LedgerEntry]:
        if not ids:
            return {}
        cursor = self.ledger.find({"_id": {"$in": [str(i) for i in ids]}})
        return {(e := entry_from_doc(d)).mood_id: e async for d in cursor}

    async def ledger_of_user(self, sub: str) -> dict[ObjectId, LedgerEntry]:
        cursor = self.ledger.find({"user": sub})
        return {(e := entry_from_doc(d)).mood_id: e async for d in cursor}

    async def rkey_owners(self, did: str, rkeys: Sequence[str]) -> dict[str, ObjectId]:
        """Which mood's ledger entry holds each of these rkeys in the repo `did`."""
        cursor = self.ledger.find({"rkey": {"$in": list(rkeys)}}, {"rkey": 1, "did": 1})
        return {str(d["rkey"]): ObjectId(d["_id"]) async for d in cursor if d.get("did") == did}

    async def save_entries(self, entries: Sequence[LedgerEntry]) -> None:
        if not entries:
            return
        now = time.time()
        await self.ledger.bulk_write(
            [
                UpdateOne(
                    {"_id": str(e.mood_id)},
                    {"$set": {**entry_to_doc(e), "updated_at": now}},
                    upsert=True,
                )
                for e in entries
            ],
            ordered=False,
        )

    async def ledger_counts(self) -> dict[str, int]:
        cursor = await self.ledger.aggregate([{"$group": {"_id": "$state", "n": {"$sum": 1}}}])
        return {str(d["_id"]): int(d["n"]) async for d in cursor}

    async def parked_ids(self, limit: int = 500) -> list[ObjectId]:
        """Parked moods whose retry time has come."""
        now = time.time()
        cursor = self.ledger.find({"state": State.PARKED.value}, {"_id": 1, "retry_at": 1})
        due = [d["_id"] async for d in cursor if (d.get("retry_at") or 0) <= now]
        return [ObjectId(i) for i in due[:limit]]

    # -- checkpoint ---------------------------------------------------------------------------

    def _checkpoint_id(self) -> str:
        return self.checkpoint_name

    async def load_checkpoint(self) -> Doc | None:
        return await self.state.find_one({"_id": self._checkpoint_id()})

    async def save_checkpoint(
        self, token: Mapping[str, Any], *, fence: int | None = None, **extra: Any
    ) -> bool:
        """With `fence` (the lease generation), refuse to overwrite a newer generation's
        checkpoint: returns False when refused."""
        fields = {"token": dict(token), "saved_at": time.time(), **extra}
        query: dict[str, Any] = {"_id": self._checkpoint_id()}
        if fence is not None:
            fields["generation"] = fence
            query["$or"] = [{"generation": {"$lte": fence}}, {"generation": {"$exists": False}}]
        try:
            await self.state.update_one(query, {"$set": fields}, upsert=True)
        except DuplicateKeyError:
            return False  # the document exists with a newer generation
        return True

    # -- sessions (SessionStore) --------------------------------------------------------------

    async def load_session(self, did: str) -> Session | None:
        doc = await self.sessions.find_one({"_id": did})
        if not doc:
            return None
        return Session(doc["access"], doc["refresh"])

    async def save_session(self, did: str, session: Session) -> None:
        await self.sessions.update_one(
            {"_id": did},
            {"$set": {"access": session.access, "refresh": session.refresh,
                      "saved_at": time.time()}},
            upsert=True,
        )  # fmt: skip

    # -- dead letters -------------------------------------------------------------------------

    async def dead_letter(
        self, mood_id: Any, user: str | None, did: str | None, reason: str
    ) -> None:
        """Keyed by the mood id (hex, or the repr of an id that is not an ObjectId)."""
        now = time.time()
        key = str(mood_id) if isinstance(mood_id, ObjectId) else repr(mood_id)
        await self.dead_letters.update_one(
            {"_id": key},
            {
                "$set": {"user": user, "did": did, "reason": reason, "last_at": now},
                "$setOnInsert": {"first_at": now},
                "$inc": {"attempts": 1},
            },
            upsert=True,
        )

    async def clear_dead_letters(self, ids: Sequence[ObjectId]) -> None:
        if ids:
            await self.dead_letters.delete_many({"_id": {"$in": [str(i) for i in ids]}})

    async def dead_letter_count(self) -> int:
        return await self.dead_letters.count_documents({})
