"""The generation fence on ledger writes, both ways a write goes (on the real server).

An intent of a mood the caller read no entry for is inserted (one command for a burst of new
moods); an entry that exists after all takes the upsert, whose filter refuses an entry a
newer generation wrote. Both must end as the fence says: an older generation's entry is
overwritten, a newer one's is never touched and the write is `Fenced`.
"""

from __future__ import annotations

import pytest
from bson import ObjectId

from replicator.lease import Fence, Fenced
from replicator.model import LedgerEntry, State
from replicator.store import Store

pytestmark = pytest.mark.anyio
USER = "auth0|66db1c30aa0000000000f00d"
DID = "did:plc:moodsuser00000000000f"


def _entry(mood: ObjectId, rkey: str) -> LedgerEntry:
    return LedgerEntry(mood, USER, State.PENDING, DID, rkey, held=((DID, rkey),))


async def _stored(store: Store, mood: ObjectId) -> dict[str, object]:
    doc = await store.ledger.find_one({"_id": str(mood)})
    assert doc is not None
    return doc


@pytest.mark.parametrize("fresh", [True, False], ids=["inserted", "upserted"])
async def test_an_older_generations_entry_is_overwritten(store: Store, fresh: bool) -> None:
    mood = ObjectId()
    await store.fenced(Fence(3)).save_entries([_entry(mood, "3kaaaaaaaaaa2")])
    await store.fenced(Fence(4)).save_entries(
        [_entry(mood, "3kaaaaaaaaab2")], fresh={mood} if fresh else ()
    )
    doc = await _stored(store, mood)
    assert (doc["generation"], doc["rkey"]) == (4, "3kaaaaaaaaab2")


@pytest.mark.parametrize("fresh", [True, False], ids=["inserted", "upserted"])
async def test_a_newer_generations_entry_is_never_overwritten(store: Store, fresh: bool) -> None:
    mood, other = ObjectId(), ObjectId()
    await store.fenced(Fence(5)).save_entries([_entry(mood, "3kaaaaaaaaaa2")])
    with pytest.raises(Fenced):
        await store.fenced(Fence(4)).save_entries(
            [_entry(mood, "3kaaaaaaaaab2"), _entry(other, "3kaaaaaaaaac2")],
            fresh={mood, other} if fresh else (),
        )
    doc = await _stored(store, mood)
    assert (doc["generation"], doc["rkey"]) == (5, "3kaaaaaaaaaa2")


async def test_fresh_intents_of_a_burst_are_all_stored(store: Store) -> None:
    moods = [ObjectId() for _ in range(300)]
    await store.fenced(Fence(2)).save_entries(
        [_entry(m, f"3kaa{n:09d}") for n, m in enumerate(moods)], fresh=set(moods)
    )
    stored = await store.ledger.count_documents({"generation": 2, "state": State.PENDING.value})
    assert stored == 300
