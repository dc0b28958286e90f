"""What a real replica set does to a change stream, done for real on the test server: history
pruned past the checkpoint (at open and while reading), the collection dropped or renamed,
delete events with only `documentKey`, pre-images, a document near 16 MB, idle getMores that
wait, and the batch clock."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from bson import ObjectId
from pymongo.errors import OperationFailure

from replicator.config import Settings
from replicator.model import State
from replicator.runtime import Runtime, open_runtime
from replicator.store import DOC_EVENT, Store
from replicator_dev.devstack.faults import FaultTransport, nsid_of
from replicator_dev.devstack.seed import SeededUser, insert_mood
from replicator_dev.devstack.servers import EmbeddedMongo
from replicator_dev.devstack.stack import LocalStack

from .conftest import Users, env_for, with_settings
from .harness import clean, diff, eventually, records, running

pytestmark = pytest.mark.anyio
WHEN = datetime(2026, 3, 4, 5, 6, 7, 891000, tzinfo=UTC)


@dataclass
class OwnMongo:
    """A MongoDB server of the test's own (options of its own, restarts that hurt no one)."""

    mongo: EmbeddedMongo
    settings: Settings

    async def copy_user(self, store: Store, who: SeededUser, shared: Store) -> None:
        doc = await shared.users.find_one({"_id": who.sub})
        assert doc is not None
        await store.users.insert_one(doc)

    async def prune(self) -> int:
        async with _client(self.mongo.uri) as client:
            out = await client.admin.command("secantusAdmin.pruneOplog")
        return int(out["pruned"])


@asynccontextmanager
async def _client(uri: str) -> AsyncIterator[Any]:
    from pymongo import AsyncMongoClient

    client: Any = AsyncMongoClient(uri)
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture
def own_mongo(stack: LocalStack, settings: Settings, tmp_path: Path) -> Callable[..., OwnMongo]:
    if stack.mongo is None:
        pytest.skip("needs the embedded MongoDB (REPLICATOR_TEST_MONGODB_URI points elsewhere)")
    started: list[EmbeddedMongo] = []

    def start(*extra: str) -> OwnMongo:
        mongo = EmbeddedMongo(tmp_path / f"mongo{len(started)}", extra_args=extra).start()
        started.append(mongo)
        return OwnMongo(mongo, with_settings(settings, mongodb_uri=mongo.uri))

    yield start  # type: ignore[misc]
    for mongo in started:
        mongo.stop()


async def in_sync(rt: Runtime, *people: SeededUser) -> bool:
    for who in people:
        assert who.did is not None
        if not clean(await diff(rt.store, rt.settings.pds_url, who.sub, who.did)):
            return False
    return True


# -- history lost ---------------------------------------------------------------------------


async def test_history_pruned_past_the_checkpoint_while_stopped_is_reconciled_exactly(
    own_mongo: Callable[..., OwnMongo], users: Users
) -> None:
    own = own_mongo("--oplog-max-entries", "100")
    people = [await users.make() for _ in range(3)]
    async with open_runtime(own.settings) as rt:
        for who in people:
            await own.copy_user(rt.store, who, users.store)
        async with running(rt):
            kept = [await insert_mood(rt.store, people[0].sub, f"kept {i}", when=WHEN)
                    for i in range(3)]  # fmt: skip
            await insert_mood(rt.store, people[1].sub, "to be nuked", when=WHEN)
            await eventually(lambda: in_sync(rt, *people), 30, "mirrored before the gap")
        saved = await rt.store.load_checkpoint()
        # Stopped: changes the stream will never see again.
        await rt.store.docs.delete_one({"_id": kept[0]})
        await rt.store.docs.update_many({"user": people[1].sub}, {"$set": {"deleted": True}})
        for i in range(150):
            await insert_mood(rt.store, people[2].sub, f"during the gap {i}", when=WHEN)
        assert await own.prune() > 0
        with pytest.raises(OperationFailure) as refused:  # the server refuses the pruned token
            stream = await rt.store.watch_docs(saved["token"], max_await_ms=100, batch_size=10)
            await stream.try_next()
        assert refused.value.code == 286
        async with running(rt):
            await eventually(lambda: in_sync(rt, *people), 120, "reconciled after history loss")
            after = await insert_mood(rt.store, people[0].sub, "after the recovery", when=WHEN)
            await eventually(lambda: in_sync(rt, *people), 30, "the stream goes on")
        checkpoint = await rt.store.load_checkpoint()
        assert checkpoint is not None and "recovery" not in checkpoint
        mine = await records(rt.settings.pds_url, people[0].did or "")
        assert {v["ref"] for v in mine.values()} == {str(kept[1]), str(kept[2]), str(after)}
        assert await records(rt.settings.pds_url, people[2].did or "") != {}


async def test_history_lost_while_reading_after_pymongo_resumes(
    own_mongo: Callable[..., OwnMongo], users: Users
) -> None:
    """The cursor dies (server restart) while a batch is being applied; when PyMongo resumes
    from its last token, that token has been pruned: the 286 comes from `try_next`, and is
    handled like history lost at open."""
    own = own_mongo("--oplog-max-entries", "100")
    slow, other = await users.make(), await users.make()
    gate = anyio.Event()

    class Slow(FaultTransport):
        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            if nsid_of(request) == "com.atproto.repo.putRecord" and not gate.is_set():
                await gate.wait()
            return await super().handle_async_request(request)

    async with (
        httpx.AsyncClient(transport=Slow(), timeout=60) as http,
        open_runtime(own.settings, http=http) as rt,
    ):
        for who in (slow, other):
            await own.copy_user(rt.store, who, users.store)
        async with running(rt) as replicator:
            first = await insert_mood(rt.store, slow.sub, "held in flight", when=WHEN)

            async def in_flight() -> bool:
                entry = (await rt.store.ledger_by_id([first])).get(first)
                return entry is not None and entry.state is State.PENDING

            await eventually(in_flight, 30, "the first write in flight")
            for i in range(150):
                await insert_mood(rt.store, other.sub, f"while it waits {i}", when=WHEN)
            own.mongo.stop()
            own.mongo.start()  # the cursor is gone
            assert await own.prune() > 0  # and so is the history it would resume from
            gate.set()
            await eventually(lambda: in_sync(rt, slow, other), 120, "reconciled after the loss")

            async def reopened() -> bool:  # the reconcile ends before the stream reopens
                return replicator.stream_open

            await eventually(reopened, 30, "the stream reopened after the recovery")
            await insert_mood(rt.store, other.sub, "after the recovery", when=WHEN)
            await eventually(lambda: in_sync(rt, slow, other), 30, "the stream goes on")
        assert "recovery" not in (await rt.store.load_checkpoint() or {})


async def test_history_lost_with_the_fail_policy_exits_3(
    own_mongo: Callable[..., OwnMongo], users: Users, tmp_path: Path
) -> None:
    own = own_mongo("--oplog-max-entries", "100")
    who = await users.make()
    async with open_runtime(own.settings) as rt:
        await own.copy_user(rt.store, who, users.store)
        async with running(rt):
            await insert_mood(rt.store, who.sub, "before", when=WHEN)
            await eventually(lambda: in_sync(rt, who), 30, "mirrored")
        for i in range(150):
            await insert_mood(rt.store, who.sub, f"gap {i}", when=WHEN)
        assert await own.prune() > 0
        log = tmp_path / "fail.log"
        code = Run(own.settings, log).run("--on-history-lost", "fail")
        assert code == 3, log.read_text()
        assert "ChangeStreamHistoryLost" in log.read_text()
        assert len(await records(rt.settings.pds_url, who.did or "")) == 1  # nothing done


# -- drop and rename ------------------------------------------------------------------------


class Run:
    """`replicator run` as production runs it."""

    def __init__(self, settings: Settings, log: Path) -> None:
        self.settings, self.log = settings, log

    def start(self, *args: str) -> subprocess.Popen[bytes]:
        out = self.log.open("ab")
        return subprocess.Popen(
            [sys.executable, "-m", "replicator.cli", "run", "--http-addr", "off", *args],
            env=env_for(self.settings), stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip

    def run(self, *args: str, timeout: float = 60) -> int:
        proc = self.start(*args)
        return proc.wait(timeout)


@pytest.mark.parametrize("how", ["drop", "rename"])
async def test_drop_or_rename_exits_4_every_time_until_reset_position(
    rt: Runtime, users: Users, tmp_path: Path, how: str
) -> None:
    who = await users.make()
    log = tmp_path / "run.log"
    run = Run(rt.settings, log)
    proc = run.start()
    try:
        await eventually(lambda: _saved(rt.store), 30, "the stream open")
        first = await insert_mood(rt.store, who.sub, "before", when=WHEN)
        await eventually(lambda: in_sync(rt, who), 30, "mirrored")
        if how == "drop":
            await rt.store.docs.drop()
        else:
            await rt.store.docs.rename("moods_renamed")
        assert proc.wait(30) == 4
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "dropped or renamed" in log.read_text()
    # Not a loop that replays the drop: it says so at once, each time.
    started = time.monotonic()
    assert run.run() == 4
    assert time.monotonic() - started < 20
    assert "--reset-position" in log.read_text()
    if how == "rename":
        # Nothing to reset onto: every record would be deleted. Refused.
        assert run.run("--reset-position") == 4
        assert "does not exist" in log.read_text()
        await rt.store.db["moods_renamed"].rename("moods")
    # The app writes again (a restored collection, say); the reset reconciles every user.
    later = await insert_mood(rt.store, who.sub, "after", when=WHEN)
    proc = run.start("--reset-position")
    try:
        await eventually(lambda: in_sync(rt, who), 60, "reconciled from the new position")
        newest = await insert_mood(rt.store, who.sub, "and the stream goes on", when=WHEN)
        await eventually(lambda: in_sync(rt, who), 30, "mirrored after the reset")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    refs = {v["ref"] for v in (await records(rt.settings.pds_url, who.did or "")).values()}
    expected = {str(later), str(newest)} | ({str(first)} if how == "rename" else set())
    assert refs == expected
    assert "invalidated" not in (await rt.store.load_checkpoint() or {})


# -- what change events carry -------------------------------------------------------------


async def test_events_carry_only_what_is_used_and_deletes_only_the_key(store: Store) -> None:
    stream = await store.watch_docs(None, max_await_ms=200, batch_size=10)
    try:
        result = await store.docs.insert_one({"user": "auth0|x", "mood": "m", "when": WHEN})
        await store.docs.update_one({"_id": result.inserted_id}, {"$set": {"mood": "n"}})
        await store.docs.replace_one({"_id": result.inserted_id}, {"user": "auth0|x"})
        await store.docs.delete_one({"_id": result.inserted_id})
        seen = []
        while len(seen) < 4:
            change = await stream.try_next()
            if change is not None:
                seen.append(change)
    finally:
        await stream.close()
    assert [c["operationType"] for c in seen] == ["insert", "update", "replace", "delete"]
    allowed = {"_id", *(k.split(".")[0] for k in DOC_EVENT)}
    for change in seen:
        assert set(change) <= allowed, change  # no fullDocument, no updateDescription
        assert change["documentKey"] == {"_id": result.inserted_id}
    assert "fullDocumentBeforeChange" not in seen[3]  # no pre-images on this collection


async def test_with_pre_images_a_purged_mood_the_ledger_never_knew_is_cleaned(
    rt: Runtime, users: Users
) -> None:
    """The delete event names only `_id`; the ledger does not know this mood (the old inline
    writer made its record). With pre-images on, the event's pre-image names the user, whose
    repo is then reconciled: the record goes, the user's live moods stay."""
    await rt.store.db.create_collection(
        rt.settings.names.moods, changeStreamPreAndPostImages={"enabled": True}
    )  # on an existing collection: `collMod` (docs/deploy.md)
    who = await users.make()
    assert who.did and who.password
    old = ObjectId()
    async with running(rt):
        live = await insert_mood(rt.store, who.sub, "stays", when=WHEN)
        await eventually(lambda: in_sync(rt, who), 30, "the live mood mirrored")
    await rt.store.docs.insert_one({"_id": old, "user": who.sub, "mood": "old", "when": WHEN})
    await _put_direct(rt.settings.pds_url, who, "3kaaaaaaaaaa2", old, "old")
    assert len(await records(rt.settings.pds_url, who.did)) == 2
    # Skip the insert: the replicator resumes after it, as if it came before the ledger.
    await rt.store.save_checkpoint(await _head(rt.store))
    async with running(rt):
        await rt.store.docs.delete_one({"_id": old})

        async def cleaned() -> bool:
            have = await records(rt.settings.pds_url, who.did or "")
            return {v["ref"] for v in have.values()} == {str(live)}

        await eventually(cleaned, 30, "the unknown record deleted, the live one kept")


async def _head(store: Store) -> dict[str, Any]:
    stream = await store.watch_docs(None, max_await_ms=100, batch_size=1)
    try:
        assert stream.resume_token is not None
        return dict(stream.resume_token)
    finally:
        await stream.close()


async def _put_direct(pds_url: str, who: SeededUser, rkey: str, ref: ObjectId, text: str) -> None:
    record = {"$type": "computer.aesthetic.mood", "mood": text,
              "when": "2026-03-04T05:06:07.891Z", "ref": str(ref)}  # fmt: skip
    async with httpx.AsyncClient(base_url=f"{pds_url}/xrpc/") as http:
        session = await http.post(
            "com.atproto.server.createSession",
            json={"identifier": who.did, "password": who.password},
        )
        resp = await http.post(
            "com.atproto.repo.putRecord",
            json={"repo": who.did, "collection": "computer.aesthetic.mood", "rkey": rkey,
                  "record": record},
            headers={"authorization": f"Bearer {session.json()['accessJwt']}"},
        )  # fmt: skip
        resp.raise_for_status()


async def test_a_15_mb_document_is_dead_lettered_and_the_stream_goes_on(
    rt: Runtime, users: Users
) -> None:
    who = await users.make()
    async with running(rt):
        huge = await insert_mood(rt.store, who.sub, "x" * (15 * 1024 * 1024), when=WHEN)
        await rt.store.docs.update_one({"_id": huge}, {"$set": {"note": "y" * 1024}})
        after = await insert_mood(rt.store, who.sub, "after the huge one", when=WHEN)

        async def settled() -> bool:
            ledger = await rt.store.ledger_by_id([huge, after])
            return (
                huge in ledger and ledger[huge].state is State.INVALID
                and after in ledger and ledger[after].state is State.PRESENT
            )  # fmt: skip

        await eventually(settled, 60, "the huge mood reported, the next one mirrored")
    letter = await rt.store.dead_letters.find_one({"_id": str(huge)})
    assert letter is not None and letter["reason"].startswith("mood:")
    have = await records(rt.settings.pds_url, who.did or "")
    assert {v["ref"] for v in have.values()} == {str(after)}


# -- the clock of the stream -----------------------------------------------------------------


async def test_an_idle_stream_saves_at_most_one_checkpoint_per_heartbeat(
    rt: Runtime, users: Users
) -> None:
    """On a server whose post-batch token moves with every getMore (other collections are
    written meanwhile), 10 idle seconds with a 2 s heartbeat cost at most 6 saves."""
    heartbeat = 2.0
    fast = with_settings(rt.settings, heartbeat_seconds=heartbeat, max_batch_ms=100)
    checkpoint_id = rt.store.checkpoint_name
    async with open_runtime(fast) as runtime, running(runtime) as replicator:
        await eventually(lambda: _saved(runtime.store), 10, "first checkpoint")
        watch = await runtime.store.state.watch(
            [{"$match": {"documentKey._id": checkpoint_id}}], max_await_time_ms=50
        )
        probe = await runtime.store.watch_docs(None, max_await_ms=50, batch_size=10)
        writes = 0
        tokens = set()
        started = time.monotonic()
        noise = runtime.store.db["noise"]
        try:
            while time.monotonic() - started < 10:
                await noise.insert_one({"at": time.time()})  # moves the cluster's clock
                assert await probe.try_next() is None  # nothing happens to moods
                tokens.add(str(probe.resume_token))
                if await watch.try_next() is not None:
                    writes += 1
        finally:
            await watch.close()
            await probe.close()
        assert replicator.stream_open
    assert len(tokens) > 3 * (10 / heartbeat + 1)  # the post-batch token moved far more often
    assert 1 <= writes <= 10 / heartbeat + 1, writes


async def _saved(store: Store) -> bool:
    return await store.load_checkpoint() is not None


async def test_a_trickle_is_applied_within_the_batch_time(rt: Runtime, users: Users) -> None:
    """Moods arriving every 50 ms never fill a batch and never leave the stream idle: each
    batch still ends after `max_batch_ms` (here 250 ms) of reading and is applied."""
    who = await users.make()
    sizes: list[int] = []
    trickle = with_settings(rt.settings, max_batch_ms=250)
    async with (
        open_runtime(trickle) as runtime,
        running(runtime, on_batch=lambda n, _: sizes.append(n)),
    ):
        ids = []
        for i in range(40):
            ids.append(await insert_mood(runtime.store, who.sub, f"drop {i}", when=WHEN))
            await anyio.sleep(0.05)
        await eventually(lambda: in_sync(runtime, who), 30, "all mirrored")
    assert sum(sizes) >= 40
    batches_with_moods = [n for n in sizes if n]
    # 2 s of trickle in 250 ms batches: several batches, none holding everything.
    assert len(batches_with_moods) >= 5 and max(batches_with_moods) < 40, sizes
