"""The apply path's own decisions: how often a refused write is sent, a write-back MongoDB
refuses, and the read and write concerns every decision rests on."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime

import httpx
import orjson
import pytest
from pymongo import ReadPreference

from replicator.model import State
from replicator.runtime import Runtime
from replicator.store import Names, Store, connect
from replicator_dev.devstack.faults import FaultTransport, nsid_of, repo_of
from replicator_dev.devstack.seed import insert_mood

from .conftest import Users
from .harness import records

pytestmark = pytest.mark.anyio
WHEN = datetime(2026, 3, 4, 5, 6, 7, 891000, tzinfo=UTC)


def _refuse(status: int, error: str, message: str) -> httpx.Response:
    return httpx.Response(status, json={"error": error, "message": message})


async def test_a_refused_apply_writes_is_retried_one_write_at_a_time_once(
    faulty: tuple[Runtime, FaultTransport], users: Users
) -> None:
    """One layer of fallback: the batch once, then each write once. A write refused again is
    parked with the reason, never sent a third time; the others are mirrored."""
    rt, transport = faulty
    who = await users.make()
    assert who.did is not None
    ids = [await insert_mood(rt.store, who.sub, f"mood {i}", when=WHEN) for i in range(5)]
    bad = str(ids[2])
    sent: Counter[str] = Counter()

    def rule(request: httpx.Request) -> httpx.Response | None:
        if repo_of(request) != who.did:
            return None
        nsid = nsid_of(request)
        body = orjson.loads(request.content)
        if nsid == "com.atproto.repo.applyWrites":
            sent["applyWrites"] += 1
            return _refuse(400, "InvalidRequest", "injected: one of these is refused")
        if nsid == "com.atproto.repo.putRecord":
            ref = body["record"]["ref"]
            sent[ref] += 1
            if ref == bad:
                return _refuse(400, "InvalidRequest", "injected: this record is refused")
        return None

    transport.rules.append(rule)
    await rt.applier.apply_ids(ids)
    assert sent["applyWrites"] == 1
    assert all(sent[str(i)] == 1 for i in ids), sent
    ledger = await rt.store.ledger_by_id(ids)
    assert ledger[ids[2]].state is State.PARKED
    assert "this record is refused" in (ledger[ids[2]].reason or "")
    assert {ledger[i].state for i in ids if i != ids[2]} == {State.PRESENT}
    have = await records(rt.settings.pds_url, who.did)
    assert {v["ref"] for v in have.values()} == {str(i) for i in ids} - {bad}
    assert await rt.store.dead_letters.find_one({"_id": bad}) is not None


async def test_a_failed_write_back_is_dead_lettered_and_the_others_go_on(
    rt: Runtime, users: Users
) -> None:
    """MongoDB refuses the `atproto.rkey` write-back of one mood (here a validator): that mood
    is reported with the reason; the batch's other moods are written back."""
    validator = {"$or": [{"mood": {"$ne": "locked"}}, {"atproto.rkey": {"$exists": False}}]}
    await rt.store.db.create_collection(rt.settings.names.moods, validator=validator)
    who = await users.make()
    locked = await insert_mood(rt.store, who.sub, "locked", when=WHEN)
    free = await insert_mood(rt.store, who.sub, "free", when=WHEN)
    outcome = await rt.applier.apply_ids([locked, free])
    assert outcome.counts.write_back_failed == 1
    letter = await rt.store.dead_letters.find_one({"_id": str(locked)})
    assert letter is not None
    assert letter["reason"].startswith("write-back of atproto.rkey failed")
    docs = await rt.store.moods_by_id([locked, free])
    assert "atproto" not in docs[locked]
    assert docs[free]["atproto"]["rkey"]
    # Its record exists and the ledger knows where: nothing is lost, only the permalink
    # field is missing, and the report says so.
    entry = (await rt.store.ledger_by_id([locked]))[locked]
    assert entry.state is State.PRESENT
    assert entry.rkey in await records(rt.settings.pds_url, who.did or "")


def test_decisions_read_the_primary_with_majority_whatever_the_uri_says() -> None:
    uri = (
        "mongodb://127.0.0.1:1/?readPreference=secondaryPreferred&readConcernLevel=local"
        "&w=1&directConnection=true"
    )
    client = connect(uri)
    store = Store(client, "aesthetic", Names())
    for collection in (store.docs, store.ledger, store.state, store.users):
        assert collection.read_preference == ReadPreference.PRIMARY
        assert collection.read_concern.level == "majority"
        assert collection.write_concern.document == {"w": "majority"}
