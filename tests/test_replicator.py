"""The replicator against the real local stack: inserts, edits, nukes, purges, resumption."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import anyio
import httpx
import pytest
from bson import ObjectId

from replicator.model import State
from replicator.runtime import Runtime
from replicator.store import Store
from replicator_dev.devstack.seed import insert_mood

from .conftest import Users
from .harness import clean, diff, eventually, latest_rev, records, running

pytestmark = pytest.mark.anyio
WHEN = datetime(2026, 3, 4, 5, 6, 7, 891000, tzinfo=UTC)


async def doc(store: Store, mood_id: ObjectId) -> dict[str, Any]:
    found = await store.docs.find_one({"_id": mood_id})
    assert found is not None
    return found


async def test_insert_makes_one_record_and_writes_back_rkey(rt: Runtime, users: Users) -> None:
    user = await users.make()
    async with running(rt):
        mood_id = await insert_mood(rt.store, user.sub, "hello ✨\nworld", when=WHEN)

        async def written_back() -> bool:
            return bool(((await doc(rt.store, mood_id)).get("atproto") or {}).get("rkey"))

        await eventually(written_back, what="atproto.rkey written back")
    rkey = (await doc(rt.store, mood_id))["atproto"]["rkey"]
    assert await records(rt.settings.pds_url, user.did) == {
        rkey: {
            "$type": "computer.aesthetic.mood",
            "mood": "hello ✨\nworld",
            "when": "2026-03-04T05:06:07.891Z",
            "ref": str(mood_id),
        }
    }
    entry = (await rt.store.ledger_by_id([mood_id]))[mood_id]
    assert (entry.state, entry.did, entry.rkey) == (State.PRESENT, user.did, rkey)


async def test_replayed_event_makes_no_second_record_or_commit(rt: Runtime, users: Users) -> None:
    user = await users.make()
    async with running(rt) as replicator:
        await eventually(lambda: _has_checkpoint(rt.store), what="first checkpoint")
        before = (await rt.store.load_checkpoint() or {})["token"]
        mood_id = await insert_mood(rt.store, user.sub, "once", when=WHEN)
        await eventually(lambda: _has_records(rt, user.did, 1), what="record on the PDS")
        await eventually(lambda: _ledger_state(rt.store, mood_id, State.PRESENT))
        applied = replicator.events_applied
    rev = await latest_rev(rt.settings.pds_url, user.did)
    # Crash before the checkpoint: the same events are delivered again.
    await rt.store.save_checkpoint(before)
    puts_before = rt.pds.requests["com.atproto.repo.putRecord"]
    async with running(rt) as again:
        await eventually(lambda: _applied(again, applied), what="events replayed")
    assert rt.pds.requests["com.atproto.repo.putRecord"] == puts_before  # ledger: no call
    # Crash between the PDS write and the ledger write: the ledger forgot, the put repeats.
    await rt.store.ledger.delete_many({})
    await rt.store.save_checkpoint(before)
    async with running(rt) as third:
        await eventually(lambda: _applied(third, applied), what="events replayed again")
        await eventually(lambda: _ledger_state(rt.store, mood_id, State.PRESENT))
    assert len(await records(rt.settings.pds_url, user.did)) == 1
    assert await latest_rev(rt.settings.pds_url, user.did) == rev  # no new commit


async def test_user_without_account_is_skipped_then_mirrored_later(
    rt: Runtime, users: Users
) -> None:
    user = await users.make(with_account=False)
    async with running(rt):
        calls = sum(rt.pds.requests.values())
        mood_id = await insert_mood(rt.store, user.sub, "no account yet", when=WHEN)
        await eventually(lambda: _ledger_state(rt.store, mood_id, State.SKIPPED))
        assert sum(rt.pds.requests.values()) == calls  # no PDS call at all
    assert await rt.store.dead_letter_count() == 0  # skipped is not an error
    # Later the user gets an account: the backfill path (reconcile_user) mirrors the old moods.
    from replicator_dev.devstack.seed import create_account

    did = await create_account(rt.settings.pds_url, "late" + user.sub[-6:] + ".test", "pw-late-1")
    await rt.store.users.update_one(
        {"_id": user.sub},
        {"$set": {"atproto": {"did": did, "handle": "late.test", "password": "pw-late-1"}}},
    )
    await rt.applier.reconcile_user(user.sub)
    assert clean(await diff(rt.store, rt.settings.pds_url, user.sub, did))
    assert len(await records(rt.settings.pds_url, did)) == 1


async def test_nuke_deletes_all_and_unnuke_restores_same_rkeys(rt: Runtime, users: Users) -> None:
    user, other = await users.make(), await users.make()
    ids = [await insert_mood(rt.store, user.sub, f"mood {i}", when=WHEN) for i in range(5)]
    await insert_mood(rt.store, other.sub, "other's mood", when=WHEN)
    async with running(rt):
        await rt.store.docs.update_many({"_id": {"$in": ids}}, {"$set": {"mood": "edited"}})
        await eventually(lambda: _has_records(rt, user.did, 5), what="5 records")
        first = await records(rt.settings.pds_url, user.did)
        await rt.store.docs.update_many({"user": user.sub}, {"$set": {"deleted": True}})
        await eventually(lambda: _has_records(rt, user.did, 0), what="all records deleted")
        await rt.store.docs.update_many({"user": user.sub}, {"$set": {"deleted": False}})
        await eventually(lambda: _has_records(rt, user.did, 5), what="records restored")
    assert await records(rt.settings.pds_url, user.did) == first
    assert clean(await diff(rt.store, rt.settings.pds_url, user.sub, user.did))


async def test_edit_updates_record_in_place(rt: Runtime, users: Users) -> None:
    user = await users.make()
    async with running(rt):
        mood_id = await insert_mood(rt.store, user.sub, "before", when=WHEN)
        await eventually(lambda: _has_records(rt, user.did, 1))
        rkey = next(iter(await records(rt.settings.pds_url, user.did)))
        await rt.store.docs.update_one({"_id": mood_id}, {"$set": {"mood": "after update"}})
        await eventually(lambda: _record_text(rt, user.did, rkey, "after update"))
        current = await doc(rt.store, mood_id)
        current["mood"] = "after replace"
        await rt.store.docs.replace_one({"_id": mood_id}, current)
        await eventually(lambda: _record_text(rt, user.did, rkey, "after replace"))
    assert list(await records(rt.settings.pds_url, user.did)) == [rkey]


async def test_purge_empties_the_collection_in_batches(rt: Runtime, users: Users) -> None:
    user, keep = await users.make(), await users.make()
    async with running(rt):
        await rt.store.docs.insert_many(
            [{"user": user.sub, "mood": f"m{i}", "when": WHEN} for i in range(450)]
        )
        await insert_mood(rt.store, keep.sub, "stays", when=WHEN)
        await eventually(lambda: _has_records(rt, user.did, 450), 120, "450 records")
    # Records the ledger never knew: the old inline writer's, one with legacy `mongoId`.
    legacy = {"$type": "computer.aesthetic.mood", "mood": "old", "when": "2024-01-01T00:00:00.000Z"}
    await _put_direct(rt, user, "3kaaaaaaaaab2", {**legacy, "mongoId": str(ObjectId())})
    await _put_direct(rt, user, "3kaaaaaaaaac2", {**legacy, "ref": str(ObjectId())})
    batches = rt.writer.batches
    async with running(rt):
        await rt.store.docs.delete_many({"user": user.sub})
        await eventually(lambda: _has_records(rt, user.did, 0), 120, "collection emptied")
    assert rt.writer.batches - batches >= 3  # 452 deletes → at least 3 applyWrites of ≤200
    assert len(await records(rt.settings.pds_url, keep.did)) == 1


async def test_purge_of_an_account_gone_from_the_pds_counts_as_done(
    rt: Runtime, users: Users
) -> None:
    user = await users.make()
    ids = [await insert_mood(rt.store, user.sub, f"m{i}", when=WHEN) for i in range(3)]
    await rt.applier.apply_ids(ids)
    assert len(await records(rt.settings.pds_url, user.did)) == 3
    async with httpx.AsyncClient() as http:
        resp = await http.post(
            f"{rt.settings.pds_url}/xrpc/com.atproto.admin.deleteAccount",
            json={"did": user.did},
            auth=("admin", "admin-pass"),
        )
        assert resp.status_code == 200, resp.text
    await rt.store.docs.delete_many({"user": user.sub})
    await rt.applier.apply_ids(ids)
    ledger = await rt.store.ledger_by_id(ids)
    assert {e.state for e in ledger.values()} == {State.ABSENT}
    assert await rt.store.dead_letter_count() == 0


async def test_quiet_collection_token_still_saved_and_nothing_replayed(
    rt: Runtime, users: Users
) -> None:
    user = await users.make()
    async with running(rt) as replicator:
        await insert_mood(rt.store, user.sub, "then silence", when=WHEN)
        await eventually(lambda: _has_records(rt, user.did, 1))
        first = await rt.store.load_checkpoint()
        assert first is not None
        await anyio.sleep(1.5)  # quiet: heartbeat is 0.2 s in tests
        later = await rt.store.load_checkpoint()
        assert later is not None and later["saved_at"] > first["saved_at"]
        stream_token = replicator._saved_token
    assert later["token"] == stream_token
    calls = sum(rt.pds.requests.values())
    async with running(rt) as again:
        await anyio.sleep(1.0)
        assert again.events_applied == 0
    assert sum(rt.pds.requests.values()) == calls


# -- helpers ----------------------------------------------------------------------------------


async def _has_checkpoint(store: Store) -> bool:
    return await store.load_checkpoint() is not None


async def _has_records(rt: Runtime, did: str | None, n: int) -> bool:
    assert did is not None
    return len(await records(rt.settings.pds_url, did)) == n


async def _record_text(rt: Runtime, did: str | None, rkey: str, text: str) -> bool:
    assert did is not None
    return (await records(rt.settings.pds_url, did)).get(rkey, {}).get("mood") == text


async def _ledger_state(store: Store, mood_id: ObjectId, state: State) -> bool:
    entry = (await store.ledger_by_id([mood_id])).get(mood_id)
    return entry is not None and entry.state is state


async def _applied(replicator: Any, n: int) -> bool:
    return bool(replicator.events_applied >= n)


async def _put_direct(rt: Runtime, user: Any, rkey: str, record: dict[str, Any]) -> None:
    async with httpx.AsyncClient(base_url=f"{rt.settings.pds_url}/xrpc/") as http:
        session = await http.post(
            "com.atproto.server.createSession",
            json={"identifier": user.did, "password": user.password},
        )
        token = session.json()["accessJwt"]
        resp = await http.post(
            "com.atproto.repo.putRecord",
            json={"repo": user.did, "collection": "computer.aesthetic.mood", "rkey": rkey,
                  "record": record},
            headers={"authorization": f"Bearer {token}"},
        )  # fmt: skip
        resp.raise_for_status()


async def test_nuke_also_deletes_records_the_ledger_never_knew(rt: Runtime, users: Users) -> None:
    """Records of the old inline writer (unknown to the ledger) go too, and come back on
    un-nuke under their old rkeys."""
    user = await users.make()
    ids = [await insert_mood(rt.store, user.sub, f"old {i}", when=WHEN) for i in range(2)]
    for i, mood_id in enumerate(ids):
        record = {"$type": "computer.aesthetic.mood", "mood": f"old {i}",
                  "when": "2026-03-04T05:06:07.891Z", "ref": str(mood_id)}  # fmt: skip
        await _put_direct(rt, user, f"3kaaaaaaaaa{i}2", record)
    old = await records(rt.settings.pds_url, user.did or "")
    assert len(old) == 2
    async with running(rt):
        await rt.store.docs.update_many({"user": user.sub}, {"$set": {"deleted": True}})
        await eventually(lambda: _has_records(rt, user.did, 0), what="old records deleted")
        await rt.store.docs.update_many({"user": user.sub}, {"$set": {"deleted": False}})
        await eventually(lambda: _has_records(rt, user.did, 2), what="restored")
    assert set(await records(rt.settings.pds_url, user.did or "")) == set(old)


async def test_derived_rkey_collision_is_salted(rt: Runtime, users: Users) -> None:
    """Two moods whose derived TIDs collide (forced here) still get two records."""
    from replicator import tid
    from replicator.model import LedgerEntry

    user = await users.make()
    mood_id = await insert_mood(rt.store, user.sub, "second of a collision", when=WHEN)
    taken = tid.from_object_id(mood_id)
    squatter = ObjectId()
    await rt.store.save_entries(
        [LedgerEntry(squatter, user.sub, State.PRESENT, user.did, taken, "h", None)]
    )
    await rt.applier.apply_ids([mood_id])
    rkey = (await doc(rt.store, mood_id))["atproto"]["rkey"]
    assert rkey == tid.from_object_id(mood_id, 1) != taken
    assert list(await records(rt.settings.pds_url, user.did or "")) == [rkey]


async def test_a_cursor_closed_without_invalidate_is_reopened(rt: Runtime, users: Users) -> None:
    """A stream that reports itself dead (PyMongo's `alive`) without an invalidate must not be
    read silently forever: it is reopened from the checkpoint."""
    user = await users.make()
    opened: list[ClosingStream] = []

    async def open_stream(token: Mapping[str, Any] | None) -> Any:
        stream = ClosingStream(
            await rt.store.watch_docs(token, max_await_ms=200, batch_size=100), die=not opened
        )
        opened.append(stream)
        return stream

    async with running(rt, open_stream=open_stream):
        await eventually(_opened_twice(opened), what="stream reopened")
        await insert_mood(rt.store, user.sub, "after the reopen", when=WHEN)
        await eventually(lambda: _has_records(rt, user.did, 1), what="mirrored")


def _opened_twice(opened: list[Any]) -> Any:
    async def check() -> bool:
        return len(opened) >= 2

    return check


class ClosingStream:
    """The real stream, whose first empty answer reports the cursor gone (alive False)."""

    def __init__(self, stream: Any, *, die: bool) -> None:
        self.stream, self.die, self.dead = stream, die, False

    @property
    def resume_token(self) -> Any:
        return self.stream.resume_token

    async def close(self) -> None:
        await self.stream.close()

    @property
    def alive(self) -> bool:
        return not self.dead and bool(self.stream.alive)

    async def try_next(self) -> Any:
        change = await self.stream.try_next()
        if change is None and self.die:
            self.dead = True
        return change
