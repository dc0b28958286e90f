"""Intents a dead process left pending are retried with the parked work.

Found by the deterministic simulation (tests/test_simulation.py, seed 266 when it was found):
work the sidecar does after its checkpoint has moved past the event (the retry of parked
moods, the reconcile of an account that is writable again) has no replay to finish it. A
kill -9 after its intents were written and before they settled left them `pending`, and
nothing ever looked at a pending entry again: the account was already released, the moods
were not parked, their records stayed missing (or stale) forever. `Store.parked_ids` now also
returns pending entries older than `STALE_INTENT_SECONDS` (longer than any lane can still be
sending them).
"""

from __future__ import annotations

import time

import pytest
from bson import ObjectId

from replicator.model import LedgerEntry, State
from replicator.store import STALE_INTENT_SECONDS, Store

pytestmark = pytest.mark.anyio
USER = "auth0|66db1c30aa0000000000beef"
DID = "did:plc:moodsuser000000000000"


async def test_parked_ids_takes_intents_a_dead_process_left(store: Store) -> None:
    old, fresh, parked = ObjectId(), ObjectId(), ObjectId()
    await store.save_entries([
        LedgerEntry(old, USER, State.PENDING, DID, "3kaaaaaaaaaa2", held=((DID, "3kaaaaaaaaaa2"),)),
        LedgerEntry(fresh, USER, State.PENDING, DID, "3kaaaaaaaaab2",
                    held=((DID, "3kaaaaaaaaab2"),)),
        LedgerEntry(parked, USER, State.PARKED, DID, "3kaaaaaaaaac2", retry_at=time.time() - 1),
    ])  # fmt: skip
    await store.ledger.update_one(
        {"_id": str(old)}, {"$set": {"updated_at": time.time() - STALE_INTENT_SECONDS - 1}}
    )
    due = await store.parked_ids()
    assert old in due, "a pending intent nobody is sending any more must be retried"
    assert fresh not in due, "an intent a live lane may still be sending is left alone"
    assert parked in due
