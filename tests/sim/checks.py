"""The properties the simulation proves.

At every step (`Safety`, called by the fake PDS on each record change it commits and by the
fake MongoDB on each write):

- once the PDS has deleted a record of mood M while M's document was deleted or nuked, or its
  user erased, no record of M is created or updated again until M's document is live again
  (un-nuked). A delete of a duplicate while the mood is live does not count; the application
  making the document live again lifts the ban.
- confirm before absent: no ledger entry says `absent` (or `skipped`) while the PDS holds a
  record of its mood. The ledger records a record as gone only once the PDS confirmed it.

After convergence (`divergences`): for every user with an account, the repo's collection is
exactly the desired state: one record per live, non-deleted, valid mood, at the rkey written
back in the document's `atproto.rkey`, with exactly the record `desired_state` computes, and
nothing else; no record of any mood of a user without an account, anywhere; no mood with two
records in a repo. For every erased user: no record of theirs in any repo, and nothing in the
replicator's own collections names them (sub, DID or handle).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import orjson
from bson import ObjectId

from replicator import tid
from replicator.desired import desired_state
from replicator.model import State
from replicator.recordtypes import MOOD
from replicator.store import user_gone

from .app import MOODS, USERS, App, live
from .fake_mongo import Doc, MongoState
from .fake_pds import REFUSED, Applied, PdsState, Record, cid_of

LEDGER = "replicator_ledger"
GONE = frozenset({State.ABSENT.value, State.SKIPPED.value})  # "no record of this mood"


class Safety:
    def __init__(self, mongo: MongoState, pds: PdsState) -> None:
        self.mongo = mongo
        self.pds = pds
        self.banned: set[str] = set()  # refs whose delete was applied while the mood was dead
        self.violations: list[str] = []
        self.erased: Callable[[], set[str]] = set  # subs the app erased
        self.accounts: Callable[[], dict[str, str]] = dict  # every DID → its user

    def on_mongo_write(
        self, collection: str, op: str, key: Any, before: Doc | None, after: Doc | None
    ) -> None:
        if collection == MOODS and live(after):
            self.banned.discard(str(key))
        if collection == LEDGER and after is not None and after.get("state") in GONE:
            found = self._records_of(str(key))
            if found:
                self.violations.append(
                    f"the ledger says mood {key} is {after['state']} ({after.get('reason')}) "
                    f"while the PDS holds its record at {found}"
                )

    def _records_of(self, ref: str) -> list[str]:
        return [f"{did}/{rkey}" for did, repo in sorted(self.pds.repos.items())
                for rkey, (_, record) in sorted(repo.collection().items())
                if record.get("ref") == ref]  # fmt: skip

    def on_pds_change(self, applied: Applied, record: Record | None) -> None:
        ref = applied.ref
        if ref is None:
            return
        if applied.action == "delete":
            key: Any = ObjectId(ref) if ObjectId.is_valid(ref) else ref
            # Erased as Mongo says by then (the replicator cannot know any sooner).
            owner = self.accounts().get(applied.did)
            erased = owner in self.erased() and user_gone(self.mongo.coll(USERS).get(owner))
            if erased or not live(self.mongo.coll(MOODS).get(key)):
                self.banned.add(ref)
            return
        if ref in self.banned:
            self.violations.append(
                f"step {applied.step}: {applied.action} of {applied.did}/{applied.rkey} brings "
                f"back mood {ref}, whose delete was applied while its document was dead"
            )
        entry = self.mongo.coll(LEDGER).get(ref)
        if entry is not None and entry.get("state") in GONE:
            self.violations.append(
                f"step {applied.step}: {applied.action} of {applied.did}/{applied.rkey} while "
                f"the ledger says mood {ref} is {entry['state']}"
            )


def canonical(record: Record) -> bytes:
    return orjson.dumps(record, option=orjson.OPT_SORT_KEYS)


def divergences(app: App, pds: PdsState, history: Mapping[str, set[bytes]]) -> list[str]:
    """Everything in which the PDS differs from the desired state (empty: converged).

    A mood whose document is invalid, or whose record this PDS refuses for good, has no
    desired record; the PDS keeps the last good one (docs/bad-input.md): at most one record
    of it may remain, and only a version the mood really had (`history`)."""
    problems: list[str] = []
    owner_of = {str(d["_id"]): d.get("user") for d in app.all_moods()}
    accounts = {u.sub: u for u in app.current() if u.did is not None}
    kept: set[str] = set()  # refs of moods that may keep an earlier record
    for doc in app.all_moods():
        if not live(doc) or not isinstance(doc["_id"], ObjectId):
            continue
        want = desired_state(MOOD, doc["_id"], doc, has_account=True)
        if want.state is State.INVALID or (
            want.record is not None and REFUSED in want.record["mood"]
        ):
            kept.add(str(doc["_id"]))
    unwritten: set[str] = set()  # refs of live moods whose rkey was never written back
    for user in app.users:
        if user.erased is not None:
            if user.did in pds.repos and (left := sorted(pds.repos[user.did].collection())):
                problems.append(f"{user.handle} was erased but {len(left)} records of theirs "
                                f"are still on the PDS: {left[:5]}")  # fmt: skip
            continue
        expected: dict[str, Record] = {}
        for doc in app.moods_of(user):
            mood_id = doc["_id"]
            if not isinstance(mood_id, ObjectId) or str(mood_id) in kept:
                continue
            want = desired_state(MOOD, mood_id, doc, has_account=user.did is not None)
            if want.state is not State.PRESENT:
                continue
            assert want.record is not None
            atproto = doc.get("atproto")
            rkey = atproto.get("rkey") if isinstance(atproto, dict) else None
            if not tid.is_tid(rkey):
                unwritten.add(str(mood_id))
                problems.append(f"{user.handle}: mood {mood_id} has no rkey written back "
                                f"(atproto={doc.get('atproto')!r})")  # fmt: skip
                continue
            if rkey in expected:
                problems.append(f"{user.handle}: two live moods claim rkey {rkey}")
            expected[str(rkey)] = want.record
        if user.did is None:
            continue
        actual = pds.repos[user.did].collection()
        for rkey, record in sorted(expected.items()):
            found = actual.get(rkey)
            if found is None:
                problems.append(f"{user.handle}: missing record {rkey} of mood {record['ref']}")
            elif found[1] != record:
                problems.append(f"{user.handle}: record {rkey} is {found[1]!r}, want {record!r}")
            elif found[0] != cid_of(record):
                problems.append(f"{user.handle}: record {rkey} has a stale CID")
        for rkey, (_, record) in sorted(actual.items()):
            ref = str(record.get("ref"))
            if rkey in expected:
                continue
            if ref in kept and canonical(record) in history.get(ref, set()):
                continue  # the last good record of a mood that is invalid or refused now
            if ref in unwritten:
                why = "of a live mood whose rkey was not written back"
            else:
                why = "of a deleted or nuked mood" if ref in owner_of else "of no mood"
            problems.append(f"{user.handle}: extra record {rkey} {why} (ref {ref})")
    for did, repo in sorted(pds.repos.items()):
        refs: dict[str, int] = {}
        for rkey, (_, record) in sorted(repo.collection().items()):
            ref = str(record.get("ref"))
            refs[ref] = refs.get(ref, 0) + 1
            owner = owner_of.get(ref)
            if not isinstance(owner, str):
                continue
            if owner in app.erased_subs():
                problems.append(f"{did}/{rkey}: a record of a mood of {owner}, who was erased")
            elif owner not in accounts:
                problems.append(f"{did}/{rkey}: a record of a mood of {owner}, who has no account")
            elif accounts[owner].did != did:
                problems.append(f"{did}/{rkey}: a record of {owner}'s mood in another repo")
        for ref, n in sorted(refs.items()):
            if n > 1:
                problems.append(f"{did}: {n} records of mood {ref}")
    return problems


def remembered(mongo: MongoState, app: App) -> list[str]:
    """Where the replicator's own collections still name an erased user (sub, DID, handle):
    after convergence there must be nowhere (a one-way hash of the sub is all that stays)."""
    out: list[str] = []
    for user in app.users:
        if user.erased is None:
            continue
        names = [n for n in (user.sub, user.did, user.handle) if n]
        for name in sorted(mongo.collections):
            if not name.startswith("replicator_"):
                continue
            for key, doc in mongo.coll(name).items():
                text = repr(doc)
                if found := [n for n in names if n in text]:
                    out.append(f"{name} {key!r} names erased {user.handle} ({found[0]})")
    return out
