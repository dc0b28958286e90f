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
from dataclasses import dataclass
from typing import Any

import orjson
from bson import ObjectId

from replicator import tid
from replicator.desired import desired_state
from replicator.model import State
from replicator.recordtypes import MOOD, NEWS, RecordType
from replicator.store import Names, user_gone

from .app import MOODS, POSTS, USERS, App, live, live_post
from .fake_mongo import Doc, MongoState
from .fake_pds import REFUSED, Applied, PdsState, Record, cid_of

LEDGER = "replicator_ledger"
GONE = frozenset({State.ABSENT.value, State.SKIPPED.value})  # "no record of this document"


@dataclass(frozen=True)
class SimType:
    """A record type as the simulation's app writes it: its collection and what "live"
    (its record wanted, were it valid and its user's) means there."""

    rtype: RecordType
    collection: str
    alive: Callable[[Doc | None], bool]

    @property
    def ledger(self) -> str:
        return Names().ledger(self.rtype)


SIM_TYPES = (SimType(MOOD, MOODS, live), SimType(NEWS, POSTS, live_post))
BY_NSID = {t.rtype.nsid: t for t in SIM_TYPES}


class Safety:
    def __init__(
        self,
        mongo: MongoState,
        pds: PdsState,
        *,
        erased: Callable[[], set[str]] = set,
        accounts: Callable[[], dict[str, str]] = dict,
    ) -> None:
        self.mongo = mongo
        self.pds = pds
        # (collection, ref) whose delete was applied while the document was dead
        self.banned: set[tuple[str, str]] = set()
        self.violations: list[str] = []
        self.erased = erased  # subs the app erased
        self.accounts = accounts  # every DID → its user

    def on_mongo_write(
        self, collection: str, op: str, key: Any, before: Doc | None, after: Doc | None
    ) -> None:
        for t in SIM_TYPES:
            if collection == t.collection and t.alive(after):
                self.banned.discard((t.rtype.nsid, str(key)))
            if collection == t.ledger and after is not None and after.get("state") in GONE:
                found = self._records_of(t.rtype.nsid, str(key))
                if found:
                    self.violations.append(
                        f"the ledger says {t.rtype.name} {key} is {after['state']} "
                        f"({after.get('reason')}) while the PDS holds its record at {found}"
                    )

    def _records_of(self, nsid: str, ref: str) -> list[str]:
        return [f"{did}/{rkey}" for did, repo in sorted(self.pds.repos.items())
                for rkey, (_, record) in sorted(repo.collection(nsid).items())
                if record.get("ref") == ref]  # fmt: skip

    def on_pds_change(self, applied: Applied, record: Record | None) -> None:
        ref, t = applied.ref, BY_NSID[applied.collection]
        if ref is None:
            return
        if applied.action == "delete":
            key: Any = ObjectId(ref) if ObjectId.is_valid(ref) else ref
            # Erased as Mongo says by then (the replicator cannot know any sooner).
            owner = self.accounts().get(applied.did)
            erased = owner in self.erased() and user_gone(self.mongo.coll(USERS).get(owner))
            if erased or not t.alive(self.mongo.coll(t.collection).get(key)):
                self.banned.add((t.rtype.nsid, ref))
            return
        if (t.rtype.nsid, ref) in self.banned:
            self.violations.append(
                f"step {applied.step}: {applied.action} of {applied.did}/{applied.rkey} brings "
                f"back {t.rtype.name} {ref}, whose delete was applied while its document was dead"
            )
        entry = self.mongo.coll(t.ledger).get(ref)
        if entry is not None and entry.get("state") in GONE:
            self.violations.append(
                f"step {applied.step}: {applied.action} of {applied.did}/{applied.rkey} while "
                f"the ledger says {t.rtype.name} {ref} is {entry['state']}"
            )


def canonical(record: Record) -> bytes:
    return orjson.dumps(record, option=orjson.OPT_SORT_KEYS)


def divergences(app: App, pds: PdsState, history: Mapping[str, set[bytes]]) -> list[str]:
    """Everything in which the PDS differs from the desired state (empty: converged), type by
    type; and every post not ours still has the `atproto` the app gave it (never written)."""
    problems: list[str] = []
    for t in SIM_TYPES:
        problems += _diverged(app, pds, history, t)
    for key, theirs in sorted(app.theirs.items()):
        doc = app.mongo.get(POSTS, key)
        if doc is not None and doc.get("atproto") != theirs:
            problems.append(f"post {key} is not ours, but its atproto became {doc['atproto']!r}")
    return problems


def _diverged(app: App, pds: PdsState, history: Mapping[str, set[bytes]], t: SimType) -> list[str]:
    """A document whose record is invalid, or that this PDS refuses for good, has no desired
    record; the PDS keeps the last good one (docs/bad-input.md): at most one record of it may
    remain, and only a version the document really had (`history`)."""
    problems: list[str] = []
    rtype, nsid, what = t.rtype, t.rtype.nsid, t.rtype.name
    docs = app.mongo.find(t.collection)
    owner_of = {str(d["_id"]): d.get("user") for d in docs}
    accounts = {u.sub: u for u in app.current() if u.did is not None}
    kept: set[str] = set()  # refs of documents that may keep an earlier record
    for doc in docs:
        if not t.alive(doc) or not isinstance(doc["_id"], ObjectId):
            continue
        want = desired_state(rtype, doc["_id"], doc, has_account=True)
        if want.state is State.INVALID or (
            want.record is not None and REFUSED in str(want.record.get("mood", ""))
        ):
            kept.add(str(doc["_id"]))
    unwritten: set[str] = set()  # refs of live documents whose rkey was never written back
    for user in app.users:
        if user.erased is not None:
            if user.did in pds.repos and (left := sorted(pds.repos[user.did].collection(nsid))):
                problems.append(f"{user.handle} was erased but {len(left)} {what} records of "
                                f"theirs are still on the PDS: {left[:5]}")  # fmt: skip
            continue
        expected: dict[str, Record] = {}
        for doc in (d for d in docs if d.get("user") == user.sub):
            doc_id = doc["_id"]
            if not isinstance(doc_id, ObjectId) or str(doc_id) in kept:
                continue
            want = desired_state(rtype, doc_id, doc, has_account=user.did is not None)
            if want.state is not State.PRESENT:
                continue
            assert want.record is not None
            atproto = doc.get("atproto")
            rkey = atproto.get("rkey") if isinstance(atproto, dict) else None
            if not tid.is_tid(rkey):
                unwritten.add(str(doc_id))
                problems.append(f"{user.handle}: {what} {doc_id} has no rkey written back "
                                f"(atproto={doc.get('atproto')!r})")  # fmt: skip
                continue
            if rkey in expected:
                problems.append(f"{user.handle}: two live {what} documents claim rkey {rkey}")
            expected[str(rkey)] = want.record
        if user.did is None:
            continue
        actual = pds.repos[user.did].collection(nsid)
        for rkey, record in sorted(expected.items()):
            found = actual.get(rkey)
            if found is None:
                problems.append(f"{user.handle}: missing {what} record {rkey} of "
                                f"{record['ref']}")  # fmt: skip
            elif found[1] != record:
                problems.append(f"{user.handle}: record {rkey} is {found[1]!r}, want {record!r}")
            elif found[0] != cid_of(record):
                problems.append(f"{user.handle}: record {rkey} has a stale CID")
        for rkey, (_, record) in sorted(actual.items()):
            ref = str(record.get("ref"))
            if rkey in expected:
                continue
            if ref in kept and canonical(record) in history.get(ref, set()):
                continue  # the last good record of a document that is invalid or refused now
            if ref in unwritten:
                why = f"of a live {what} whose rkey was not written back"
            else:
                why = f"of a deleted or dead {what}" if ref in owner_of else f"of no {what}"
            problems.append(f"{user.handle}: extra record {rkey} {why} (ref {ref})")
    for did, repo in sorted(pds.repos.items()):
        refs: dict[str, int] = {}
        for rkey, (_, record) in sorted(repo.collection(nsid).items()):
            ref = str(record.get("ref"))
            refs[ref] = refs.get(ref, 0) + 1
            owner = owner_of.get(ref)
            if not isinstance(owner, str):
                continue
            if owner in app.erased_subs():
                problems.append(f"{did}/{rkey}: a record of a {what} of {owner}, who was erased")
            elif owner not in accounts:
                problems.append(f"{did}/{rkey}: a record of a {what} of {owner}, who has no "
                                "account")  # fmt: skip
            elif accounts[owner].did != did:
                problems.append(f"{did}/{rkey}: a record of {owner}'s {what} in another repo")
        for ref, n in sorted(refs.items()):
            if n > 1:
                problems.append(f"{did}: {n} records of {what} {ref}")
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
