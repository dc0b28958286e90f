"""`replicator.store.Store` over the fake replica set: the same methods, the same semantics.

Each method is one step (one await the scheduler may crash at), and does what the real one's
query does, read off store.py: `save_entries` stamps the fence's generation and refuses to
overwrite a newer one (`Fenced`, after applying the others: the bulk write is unordered);
`write_back_many` never upserts and replaces an `atproto` that is not an object (the real
adapter's code-28 fallback); `save_checkpoint(None, ...)` keeps the token; a method that the
real adapter returns from early without a round trip (`if not ids`) makes no step here
either. Ledger documents go through the real `entry_to_doc`/`entry_from_doc`, so what the
core reads back is exactly what it would read from MongoDB.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any, TypeVar

from bson import ObjectId

from replicator.accounts import ParkedAccount
from replicator.lease import Fence, Fenced
from replicator.model import Account, LedgerEntry, State
from replicator.recordtypes import MOOD, RecordType
from replicator.sessions import Session, session_from_doc, session_to_doc
from replicator.store import (
    Letter,
    LetterKind,
    Names,
    Written,
    _due,
    account_from_user,
    entry_from_doc,
    entry_to_doc,
    letter_key,
    sub_hash,
    user_gone,
)
from replicator.typeviews import TypeViews

from .fake_mongo import Doc, FakeChangeStream, MongoState, clone, open_stream
from .scheduler import Process, Scheduler

T = TypeVar("T")


class FakeStore(TypeViews):
    """One process's connection to the fake replica set."""

    def __init__(
        self,
        state: MongoState,
        scheduler: Scheduler,
        proc: Process,
        names: Names | None = None,
        fence: Fence | None = None,
        *,
        rtypes: Sequence[RecordType] = (MOOD,),
        kill_cursor: Callable[[], bool] = lambda: False,
        idle_wait: Callable[[], float] = lambda: 0.25,
    ) -> None:
        self.state = state
        self.scheduler = scheduler
        self.proc = proc
        self.names = names or Names()
        self.fence = fence or Fence()
        self.checkpoint_name = f"checkpoint:{self.names.moods}"
        self._kill_cursor = kill_cursor
        self._idle_wait = idle_wait
        self.rtypes = tuple(rtypes)
        self._bind(self.rtypes[0])

    def _bind(self, rtype: RecordType) -> None:
        self.rtype = rtype
        self.collection = self.names.collection(rtype)
        self._ledger = self.names.ledger(rtype)
        self._letters = self.names.dead_letters(rtype)

    async def _io(self, site: str, op: Callable[[], T]) -> T:
        return await self.scheduler.io(self.proc, site, op)

    def _now(self) -> float:
        return self.scheduler.clock.time()

    # -- the app's data ----------------------------------------------------------------------

    async def moods_by_id(self, ids: Sequence[ObjectId]) -> dict[ObjectId, Doc]:
        if not ids:
            return {}
        wanted = set(ids)
        docs = await self._io(
            "moods_by_id", lambda: self.state.find(self.collection, lambda d: d["_id"] in wanted)
        )
        return {d["_id"]: d for d in docs}

    async def moods_of_user(self, sub: str) -> list[Doc]:
        return (await self.moods_of_users([sub])).get(sub, [])

    async def moods_of_users(
        self, subs: Sequence[str], fields: Sequence[str] | None = None
    ) -> dict[str, list[Doc]]:
        """`fields` is how much MongoDB sends, not what the fingerprint reads: ignored."""
        wanted = set(subs)

        def op() -> dict[str, list[Doc]]:
            found: dict[str, list[Doc]] = {}
            for doc in self.state.find(self.collection, lambda d: d.get("user") in wanted):
                found.setdefault(str(doc["user"]), []).append(doc)
            return found

        return await self._io("moods_of_user", op)

    async def accounts(self, subs: Iterable[str]) -> dict[str, Account | None]:
        wanted = sorted(set(subs))
        found: dict[str, Account | None] = dict.fromkeys(wanted)
        if not wanted:
            return found

        def op() -> None:
            for doc in self.state.find(self.names.users, lambda d: d["_id"] in found):
                found[str(doc["_id"])] = account_from_user(doc)

        await self._io("accounts", op)
        return found

    async def users_gone(self, subs: Iterable[str]) -> dict[str, bool]:
        wanted = sorted(set(subs))
        if not wanted:
            return {}

        def op() -> dict[str, bool]:
            docs = {s: self.state.get(self.names.users, s) for s in wanted}
            return {s: doc is None for s, doc in docs.items() if user_gone(doc)}

        return await self._io("users_gone", op)

    async def user_of_mood(self, mood_id: Any) -> Any:
        doc = await self._io("user_of_mood", lambda: self.state.get(self.collection, mood_id))
        return (doc or {}).get("user")

    async def resolve_user(self, who: str) -> str | None:
        if not who.startswith("@"):
            return who
        found = await self._io(
            "resolve_user",
            lambda: self.state.find(self.names.handles, lambda d: d.get("handle") == who[1:]),
        )
        return str(found[0]["_id"]) if found else None

    async def write_back_many(self, rkeys: Mapping[ObjectId, str]) -> dict[ObjectId, str]:
        if not rkeys:
            return {}
        self.fence.check()
        items = list(rkeys.items())

        def op() -> dict[ObjectId, str]:
            for mood_id, rkey in items:
                doc = self.state.get(self.collection, mood_id)
                if doc is None:
                    continue  # never upserted: a deleted document is not resurrected
                atproto = doc.get("atproto", {})
                change = _set_rkey if isinstance(atproto, dict) else _replace_atproto  # code 28
                self.state.update(self.collection, mood_id, functools.partial(change, rkey=rkey))
            return {}

        return await self._io("write_back_many", op)

    # -- ledger ------------------------------------------------------------------------------

    def _ledger_docs(self, match: Callable[[Doc], bool]) -> list[Doc]:
        return self.state.find(self._ledger, match)

    async def ledger_by_id(self, ids: Sequence[ObjectId]) -> dict[ObjectId, LedgerEntry]:
        if not ids:
            return {}
        keys = {str(i) for i in ids}
        docs = await self._io("ledger_by_id", lambda: self._ledger_docs(lambda d: d["_id"] in keys))
        return {(e := entry_from_doc(d)).mood_id: e for d in docs}

    async def ledger_of_user(self, sub: str) -> dict[ObjectId, LedgerEntry]:
        return (await self.ledger_of_users([sub])).get(sub, {})

    async def ledger_of_users(self, subs: Sequence[str]) -> dict[str, dict[ObjectId, LedgerEntry]]:
        wanted = set(subs)
        docs = await self._io(
            "ledger_of_user", lambda: self._ledger_docs(lambda d: d.get("user") in wanted)
        )
        found: dict[str, dict[ObjectId, LedgerEntry]] = {}
        for d in docs:
            entry = entry_from_doc(d)
            found.setdefault(str(entry.user), {})[entry.mood_id] = entry
        return found

    async def rkey_owners(
        self, where: Collection[tuple[str, str]]
    ) -> dict[tuple[str, str], ObjectId]:
        rkeys = {rkey for _, rkey in where}

        def op() -> dict[tuple[str, str], ObjectId]:
            docs = self._ledger_docs(lambda d: d.get("rkey") in rkeys)
            docs.sort(key=lambda d: (d["rkey"], d["_id"]))  # the rkey index's order
            found = {(str(d.get("did")), str(d["rkey"])): ObjectId(d["_id"]) for d in docs}
            return {key: owner for key, owner in found.items() if key in where}

        return await self._io("rkey_owners", op)

    async def save_entries(
        self,
        entries: Sequence[LedgerEntry],
        *,
        fresh: Collection[ObjectId] = (),
        since: Written | None = None,
    ) -> Written:
        """`fresh` and `since` change how MongoDB is asked, not what ends stored: ignored."""
        written = Written("sim", {e.mood_id: e for e in entries})
        if not entries:
            return written
        self.fence.check()
        generation = self.fence.generation
        now = self._now()

        def op() -> None:
            refused = False
            for e in entries:
                key = str(e.mood_id)
                current = self.state.get(self._ledger, key)
                newer = (
                    generation is not None
                    and current is not None
                    and current.get("generation") is not None
                    and current["generation"] > generation
                )
                if newer:
                    refused = True  # the upsert's insert hits the _id: E11000
                    continue
                values = {**entry_to_doc(replace(e, generation=generation)), "updated_at": now}
                self.state.update(
                    self._ledger, key, functools.partial(_merge, values=values), upsert=True
                )
            if refused:
                raise Fenced("a newer lease generation wrote these ledger entries")

        await self._io("save_entries", op)
        return written

    async def ledger_counts(self) -> dict[str, int]:
        def op() -> dict[str, int]:
            out: dict[str, int] = {}
            for d in self._ledger_docs(lambda d: True):
                out[str(d.get("state"))] = out.get(str(d.get("state")), 0) + 1
            return out

        return await self._io("ledger_counts", op)

    async def parked_ids(self, limit: int = 500) -> list[ObjectId]:
        now = self._now()

        def op() -> list[ObjectId]:
            docs = self.state.coll(self._ledger).values()  # natural order
            waiting = (State.PARKED.value, State.PENDING.value)
            due = [d["_id"] for d in docs if d.get("state") in waiting and _due(d, now)]
            return [ObjectId(i) for i in due[:limit]]

        return await self._io("parked_ids", op)

    # -- change streams and checkpoints ------------------------------------------------------

    async def watch_docs(
        self, token: Mapping[str, Any] | None, *, max_await_ms: int, batch_size: int
    ) -> FakeChangeStream:
        return await self._io(
            "watch_docs",
            lambda: open_stream(
                self.state,
                self.scheduler,
                self.proc,
                self.collection,
                token,
                batch_size=batch_size,
                max_await_ms=max_await_ms,
                kill_cursor=self._kill_cursor,
                idle_wait=self._idle_wait,
                also=tuple(v.collection for v in self.views if v is not self),
            ),
        )

    async def watch_users(
        self, token: Mapping[str, Any] | None, *, max_await_ms: int
    ) -> FakeChangeStream:
        return await self._io(
            "watch_users",
            lambda: open_stream(
                self.state,
                self.scheduler,
                self.proc,
                self.names.users,
                token,
                batch_size=101,
                max_await_ms=max_await_ms,
            ),
        )

    def _checkpoint_id(self, stream: str | None = None) -> str:
        if stream is None:
            return self.checkpoint_name
        return self.checkpoint_name.replace(
            f"checkpoint:{self.names.moods}", f"checkpoint:{stream}"
        )

    async def load_checkpoint(self, stream: str | None = None) -> Doc | None:
        key = self._checkpoint_id(stream)
        return await self._io("load_checkpoint", lambda: self.state.get(self.names.state, key))

    async def save_checkpoint(
        self, token: Mapping[str, Any] | None, *, stream: str | None = None, **fields: Any
    ) -> None:
        self.fence.check()
        generation = self.fence.generation
        values: Doc = {"saved_at": self._now(), **fields}
        if token is not None:
            values["token"] = dict(token)
        if generation is not None:
            values["generation"] = generation
        key = self._checkpoint_id(stream)

        def op() -> None:
            current = self.state.get(self.names.state, key)
            if (
                generation is not None
                and current is not None
                and current.get("generation") is not None
                and current["generation"] > generation
            ):
                raise Fenced("a newer lease generation owns the checkpoint")
            self.state.update(self.names.state, key, lambda d: d.update(clone(values)),
                              upsert=True)  # fmt: skip

        await self._io("save_checkpoint", op)

    async def clear_checkpoint_marks(self, *names: str) -> None:
        self.fence.check()
        key = self._checkpoint_id()

        def unset(doc: Doc) -> None:
            for name in names:
                doc.pop(name, None)

        await self._io(
            "clear_checkpoint_marks", lambda: self.state.update(self.names.state, key, unset)
        )

    async def docs_exist(self) -> bool:
        return await self._io("docs_exist", lambda: self.collection in self.state.collections)

    async def users_in_scope(self) -> list[str]:
        def op() -> list[str]:
            found = {d["_id"] for d in self.state.find(self.names.users) if _has_did(d)}
            found |= {d.get("sub") for d in self.state.find(self.names.sessions)}
            found |= {d.get("sub") for d in self.state.find(self.names.accounts)}
            for view in self.views:
                found |= {d.get(view.rtype.owner) for d in self.state.find(view.collection)}
                found |= {d.get("user") for d in view._ledger_docs(lambda d: True)}
                found |= {d.get("user") for d in self.state.find(view._letters)}
            return sorted(u for u in found if isinstance(u, str))

        return await self._io("users_in_scope", op)

    # -- backfill and recovery runs ----------------------------------------------------------

    @property
    def _runs(self) -> str:
        return f"{self.names.prefix}backfill"

    async def load_run(self, name: str) -> Doc | None:
        return await self._io("load_run", lambda: self.state.get(self.names.state, name))

    async def start_run(self, name: str, run: str, scope: str) -> None:
        values = {"run": run, "scope": scope, "started_at": self._now(), "finished": False}
        await self._io("start_run", lambda: self.state.update(
            self.names.state, name, lambda d: d.update(values), upsert=True))  # fmt: skip

    async def finish_run(self, name: str) -> None:
        values = {"finished": True, "finished_at": self._now()}
        await self._io("finish_run", lambda: self.state.update(
            self.names.state, name, lambda d: d.update(values)))  # fmt: skip

    async def users_done(self, run: str) -> set[str]:
        def op() -> set[str]:
            return {
                str(d["_id"]) for d in self.state.find(self._runs, lambda d: d.get("run") == run)
            }

        return await self._io("users_done", op)

    async def user_done(self, run: str, subs: Sequence[str]) -> None:
        values = {"run": run, "done_at": self._now()}

        def op() -> None:
            for sub in subs:
                self.state.update(self._runs, sub_hash(sub), lambda d: d.update(values),
                                  upsert=True)  # fmt: skip

        await self._io("user_done", op)

    # -- parked accounts ---------------------------------------------------------------------

    async def parked_accounts(self) -> list[ParkedAccount]:
        docs = await self._io("parked_accounts", lambda: self.state.find(self.names.accounts))
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
            for d in docs
        ]

    async def save_parked_account(self, parked: ParkedAccount) -> None:
        values = {"sub": parked.sub, "kind": parked.kind, "reason": parked.reason,
                  "since": parked.since, "next_check_at": parked.next_check_at,
                  "attempts": parked.attempts}  # fmt: skip
        await self._io("save_parked_account", lambda: self.state.update(
            self.names.accounts, parked.did, lambda d: d.update(values), upsert=True))  # fmt: skip

    async def release_account(self, did: str) -> None:
        await self._io("release_account", lambda: self.state.delete(self.names.accounts, did))

    # -- sessions ----------------------------------------------------------------------------

    async def load_session(self, did: str) -> Session | None:
        doc = await self._io("load_session", lambda: self.state.get(self.names.sessions, did))
        return session_from_doc(doc) if doc else None

    async def save_session(self, did: str, session: Session) -> None:
        values = {**session_to_doc(session), "saved_at": self._now()}
        await self._io("save_session", lambda: self.state.update(
            self.names.sessions, did, lambda d: d.update(values), upsert=True))  # fmt: skip

    async def credentials_of(self, sub: str) -> dict[str, str | None]:
        def op() -> dict[str, str | None]:
            docs = self.state.find(self.names.sessions, lambda d: d.get("sub") == sub)
            docs.sort(key=lambda d: -float(d.get("saved_at") or 0))
            return {str(d["_id"]): d.get("password") for d in docs}

        return await self._io("credentials_of", op)

    # -- erasure -----------------------------------------------------------------------------

    async def begin_erasure(self, sub: str, dids: Collection[str]) -> None:
        self.fence.check()
        now = self._now()

        def note(doc: Doc) -> None:
            doc["sub"] = sub
            doc["dids"] = [*doc.get("dids", []), *(d for d in sorted(dids)
                                                   if d not in doc.get("dids", []))]  # fmt: skip
            doc.setdefault("started_at", now)

        await self._io("begin_erasure", lambda: self.state.update(
            self.names.erasures, sub_hash(sub), note, upsert=True))  # fmt: skip

    async def pending_erasures(self) -> dict[str, list[str]]:
        def op() -> dict[str, list[str]]:
            docs = self.state.find(self.names.erasures, lambda d: "sub" in d)
            return {str(d["sub"]): [str(x) for x in d.get("dids") or ()] for d in docs}

        return await self._io("pending_erasures", op)

    async def cancel_erasure(self, sub: str) -> None:
        self.fence.check()
        key = sub_hash(sub)

        def unset(doc: Doc) -> None:
            doc.pop("sub", None)
            doc.pop("dids", None)

        def op() -> None:
            doc = self.state.get(self.names.erasures, key)
            if doc is not None and "erased_at" not in doc:
                self.state.delete(self.names.erasures, key)
            else:
                self.state.update(self.names.erasures, key, unset)

        await self._io("cancel_erasure", op)

    async def forgotten(self, subs: Iterable[str]) -> set[str]:
        by_hash = {sub_hash(s): s for s in set(subs)}
        if not by_hash:
            return set()

        def op() -> set[str]:
            docs = (self.state.get(self.names.erasures, h) for h in sorted(by_hash))
            return {by_hash[d["_id"]] for d in docs if d is not None and "sub" not in d}

        return await self._io("forgotten", op)

    async def forget_user(self, sub: str, dids: Collection[str], records_deleted: int) -> None:
        """The real adapter's six writes, each its own round trip: a crash may fall between."""
        self.fence.check()
        ids = set(dids)
        now = self._now()

        def named(d: Doc) -> bool:
            return d.get("user") == sub or d.get("did") in ids

        def by_key(d: Doc) -> bool:
            return d.get("sub") == sub or d["_id"] in ids

        def done(doc: Doc) -> None:
            doc.pop("sub", None)
            doc.pop("dids", None)
            doc["erased_at"] = now
            doc["records_deleted"] = doc.get("records_deleted", 0) + records_deleted

        for collection, match in (
            (self.names.accounts, by_key), (self.names.sessions, by_key),
            *((v._letters, named) for v in self.views), (self._runs, lambda d: d["_id"] == sub),
            *((v._ledger, named) for v in self.views),
        ):  # fmt: skip
            await self._io("forget_user", functools.partial(self._delete_many, collection, match))
        await self._io("forget_user", lambda: self.state.update(
            self.names.erasures, sub_hash(sub), done, upsert=True))  # fmt: skip

    def _delete_many(self, collection: str, match: Callable[[Doc], bool]) -> None:
        for doc in self.state.find(collection, match):
            self.state.delete(collection, doc["_id"])

    async def erasure_count(self) -> int:
        def op() -> int:
            return sum(1 for d in self.state.coll(self.names.erasures).values() if "sub" not in d)

        return await self._io("erasure_count", op)

    # -- dead letters ------------------------------------------------------------------------

    async def dead_letter(
        self, mood_id: Any, user: str | None, did: str | None, reason: str, kind: LetterKind
    ) -> None:
        await self.dead_letter_many([(mood_id, user, did, reason, kind)])

    async def dead_letter_many(self, letters: Sequence[Letter]) -> None:
        if not letters:
            return
        now = self._now()

        def op() -> None:
            for mood_id, user, did, reason, kind in letters:
                key = letter_key(mood_id)

                def change(
                    doc: Doc, user: Any = user, did: Any = did, why: Any = reason, kind: Any = kind
                ) -> None:
                    doc.setdefault("first_at", now)
                    doc.update({"user": user, "did": did, "reason": why, "kind": kind,
                                "last_at": now})  # fmt: skip
                    doc["attempts"] = doc.get("attempts", 0) + 1

                self.state.update(self._letters, key, change, upsert=True)

        await self._io("dead_letter_many", op)

    async def forget_dead_letter(self, key: str) -> None:
        await self._io("forget_dead_letter",
                       lambda: self.state.delete(self._letters, key))  # fmt: skip

    async def clear_dead_letters(self, ids: Sequence[ObjectId]) -> None:
        if not ids:
            return

        def op() -> None:
            for i in ids:
                self.state.delete(self._letters, str(i))

        await self._io("clear_dead_letters", op)

    async def clear_dead_letters_but(self, sub: str, keep: Iterable[Any]) -> None:
        kept = {letter_key(i) for i in keep}

        def op() -> None:
            self._delete_many(
                self._letters, lambda d: d.get("user") == sub and d["_id"] not in kept
            )

        await self._io("clear_dead_letters_but", op)

    async def dead_letter_count(self) -> int:
        return await self._io("dead_letter_count",
                              lambda: len(self.state.coll(self._letters)))  # fmt: skip


def _set_rkey(doc: Doc, rkey: str) -> None:
    atproto = doc.setdefault("atproto", {})
    atproto["rkey"] = rkey


def _has_did(user: Doc) -> bool:
    """`{"atproto.did": {"$type": "string"}}`."""
    atproto = user.get("atproto")
    return isinstance(atproto, dict) and isinstance(atproto.get("did"), str)


def _replace_atproto(doc: Doc, rkey: str) -> None:
    """Where `atproto` is not an object, `$set atproto.rkey` fails (code 28): the adapter
    then sets the whole object."""
    doc["atproto"] = {"rkey": rkey}


def _merge(doc: Doc, values: Doc) -> None:
    doc.update(clone(values))
