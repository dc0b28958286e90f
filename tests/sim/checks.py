"""The two properties the simulation proves.

At every step (`Safety`, called by the fake PDS on each record change it commits): once the
PDS has deleted a record of mood M while M's document was deleted or nuked, no record of M is
created or updated again until M's document is live again (un-nuked). A delete of a
duplicate while the mood is live does not count; the application making the document live
again lifts the ban.

After convergence (`divergences`): for every user with an account, the repo's collection is
exactly the desired state: one record per live, non-deleted, valid mood, at the rkey written
back in the document's `atproto.rkey`, with exactly the record `desired_state` computes, and
nothing else; no record of any mood of a user without an account, anywhere; no mood with two
records in a repo.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
from bson import ObjectId

from replicator import tid
from replicator.desired import desired_state
from replicator.model import State

from .app import MOODS, App, live
from .fake_mongo import Doc, MongoState
from .fake_pds import REFUSED, Applied, PdsState, Record, cid_of


class Safety:
    def __init__(self, mongo: MongoState) -> None:
        self.mongo = mongo
        self.banned: set[str] = set()  # refs whose delete was applied while the mood was dead
        self.violations: list[str] = []

    def on_mongo_write(
        self, collection: str, op: str, key: Any, before: Doc | None, after: Doc | None
    ) -> None:
        if collection == MOODS and live(after):
            self.banned.discard(str(key))

    def on_pds_change(self, applied: Applied, record: Record | None) -> None:
        ref = applied.ref
        if ref is None:
            return
        if applied.action == "delete":
            key: Any = ObjectId(ref) if ObjectId.is_valid(ref) else ref
            if not live(self.mongo.coll(MOODS).get(key)):
                self.banned.add(ref)
        elif ref in self.banned:
            self.violations.append(
                f"step {applied.step}: {applied.action} of {applied.did}/{applied.rkey} brings "
                f"back mood {ref}, whose delete was applied while its document was dead"
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
    accounts = {u.sub: u for u in app.users if u.did is not None}
    kept: set[str] = set()  # refs of moods that may keep an earlier record
    for doc in app.all_moods():
        if not live(doc) or not isinstance(doc["_id"], ObjectId):
            continue
        want = desired_state(doc["_id"], doc, has_account=True)
        if want.state is State.INVALID or (
            want.record is not None and REFUSED in want.record["mood"]
        ):
            kept.add(str(doc["_id"]))
    unwritten: set[str] = set()  # refs of live moods whose rkey was never written back
    for user in app.users:
        expected: dict[str, Record] = {}
        for doc in app.moods_of(user):
            mood_id = doc["_id"]
            if not isinstance(mood_id, ObjectId) or str(mood_id) in kept:
                continue
            want = desired_state(mood_id, doc, has_account=user.did is not None)
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
            if owner not in accounts:
                problems.append(f"{did}/{rkey}: a record of a mood of {owner}, who has no account")
            elif accounts[owner].did != did:
                problems.append(f"{did}/{rkey}: a record of {owner}'s mood in another repo")
        for ref, n in sorted(refs.items()):
            if n > 1:
                problems.append(f"{did}: {n} records of mood {ref}")
    return problems
