"""Writes whose target only *may* exist never go into an `applyWrites`.

Found by the deterministic simulation (tests/test_simulation.py): after a crash between the
write-ahead intents and the PDS call, two moods of one user are `pending` ("may be on the
PDS") while the PDS holds nothing. The planner then sent `#update` / `#delete` for both in one
`applyWrites`, and the reference PDS answers a batch whose `#update` or `#delete` finds no
record with HTTP 500 (its MST throws a plain Error; checked against the local stack's PDS).
The sidecar retries a 500 until the lane deadline, parks both moods, and the parked retry
sends the same batch again: they never converged, and every retry stalled the stream for a
lane deadline. Now such writes go one at a time (`putRecord` upserts, `deleteRecord` of a
missing record succeeds), and a delete is marked known only when a listing or a sure ledger
says the record is there.
"""

from __future__ import annotations

from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any, cast

import pytest
from bson import ObjectId

from replicator import tid
from replicator.apply import Applier
from replicator.desired import desired_state
from replicator.model import Account, LedgerEntry, State, Write
from replicator.pds import Pds
from replicator.plan import plan_mood
from replicator.recordtypes import MOOD as MOOD_TYPE
from replicator.runtime import Runtime
from replicator.store import Store
from replicator.writer import RepoWriter
from replicator_dev.devstack.seed import insert_mood

from .conftest import Users
from .harness import records

USER = "auth0|66db1c30aa0000000000beef"
ACCOUNT = Account(sub=USER, did="did:plc:moodsuser000000000000", handle="moods.test", password="pw")
WHEN = datetime(2026, 3, 4, 5, 6, 7, 891000, tzinfo=UTC)
MOOD = ObjectId("6955b900ac09b273a2382649")
RKEY = tid.from_object_id(MOOD)


def _nuked() -> dict[str, Any]:
    return {"_id": MOOD, "user": USER, "mood": "gone", "when": WHEN, "deleted": True}


def test_a_delete_where_an_intent_left_a_record_that_may_be_there_is_not_known() -> None:
    entry = LedgerEntry(MOOD, USER, State.PENDING, ACCOUNT.did, RKEY, held=((ACCOUNT.did, RKEY),))
    want = desired_state(MOOD_TYPE, MOOD, _nuked(), has_account=True)
    plan = plan_mood(want, entry, ACCOUNT, None,
                     tid.from_object_id)  # fmt: skip
    assert [(w.action, w.rkey, w.exists) for w in plan.writes] == [("delete", RKEY, None)]


def test_a_delete_the_ledger_is_sure_of_is_known() -> None:
    entry = LedgerEntry(MOOD, USER, State.PRESENT, ACCOUNT.did, RKEY, "hash", "bafycid")
    want = desired_state(MOOD_TYPE, MOOD, _nuked(), has_account=True)
    plan = plan_mood(want, entry, ACCOUNT, None,
                     tid.from_object_id)  # fmt: skip
    assert [(w.action, w.exists, w.cid) for w in plan.writes] == [("delete", True, "bafycid")]


def test_writes_of_unknown_existence_are_sent_alone_in_order() -> None:
    def put(rkey: str, exists: bool | None) -> Write:
        return Write("put", ACCOUNT.did, rkey, MOOD, {"mood": rkey}, exists)

    writes = [put("a", None), put("b", True), put("c", False), put("d", None), put("e", True),
              Write("delete", ACCOUNT.did, "f", MOOD, exists=None)]  # fmt: skip
    applier = Applier(
        cast(Store, None),
        cast(RepoWriter, SimpleNamespace(batch=True)),
        cast(Pds, None),
    )
    chunks = [[w.rkey for w in chunk] for chunk in applier._chunks(writes)]
    assert chunks == [["a"], ["b", "c"], ["d"], ["e"], ["f"]]


@pytest.mark.anyio
@pytest.mark.settings(lane_deadline=10.0)  # without the fix: 500s until here, then parked
async def test_intents_a_crash_left_reach_the_real_pds(rt: Runtime, users: Users) -> None:
    """Against the reference PDS: a live mood and a nuked one, both `pending` at their derived
    rkeys and absent from the PDS (the crash came before the call), converge in one apply."""
    who = await users.make()
    assert who.did is not None
    live = await insert_mood(rt.store, who.sub, "still here", when=WHEN)
    gone = await insert_mood(rt.store, who.sub, "nuked meanwhile", when=WHEN, deleted=True)
    await rt.store.save_entries([
        LedgerEntry(i, who.sub, State.PENDING, who.did, tid.from_object_id(i),
                    held=((who.did, tid.from_object_id(i)),))
        for i in (live, gone)
    ])  # fmt: skip
    outcome = await rt.applier.apply_ids([live, gone])
    assert outcome.counts.parked == 0
    ledger = await rt.store.ledger_by_id([live, gone])
    assert (ledger[live].state, ledger[gone].state) == (State.PRESENT, State.ABSENT)
    assert list(await records(rt.settings.pds_url, who.did)) == [tid.from_object_id(live)]
