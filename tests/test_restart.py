"""The replicator as a process: kill -9 at several points, SIGTERM, and what the firehose sees."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from typing import Any

import anyio
import pytest
from bson import ObjectId

from replicator.config import Settings
from replicator.runtime import Runtime
from replicator.store import Store

from .conftest import Users, env_for
from .harness import clean, diff, eventually, records, running

pytestmark = pytest.mark.anyio


class Process:
    """`replicator run` in a subprocess, as production runs it."""

    def __init__(self, settings: Settings, log: Any) -> None:
        self.settings = settings
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "replicator.cli", "run"],
            env=env_for(self.settings, REPLICATOR_LOG_LEVEL="WARNING"),
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.starts += 1

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def terminate(self, timeout: float = 20) -> tuple[int, float]:
        assert self.proc is not None
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        return code, time.monotonic() - started


async def checkpoint_moved(store: Store, since: float) -> bool:
    doc = await store.load_checkpoint()
    return doc is not None and float(doc["saved_at"]) > since


@pytest.mark.slow
async def test_kill9_at_several_points_converges_exactly(
    rt: Runtime, users: Users, tmp_path: Any
) -> None:
    rng = random.Random(7)
    people = [await users.make() for _ in range(20)]
    store = rt.store
    log = (tmp_path / "replicator.log").open("wb")
    proc = Process(rt.settings, log)
    proc.start()
    t0 = time.time()
    await eventually(lambda: checkpoint_moved(store, 0), 30, "first checkpoint")
    ids: list[ObjectId] = []

    active = list(people)

    async def insert(n: int) -> None:
        for _ in range(n):
            who = rng.choice(active)
            result = await store.docs.insert_one(
                {"user": who.sub, "mood": f"mood {len(ids)} ✨", "when": datetime.now(UTC)}
            )
            ids.append(result.inserted_id)

    # 1. Killed in the middle of a burst of inserts; more inserts while it is down.
    await insert(120)
    proc.kill9()
    await insert(80)
    proc.start()
    # 2. Edits, killed mid-way, restarted.
    await insert(150)
    await anyio.sleep(0.5)
    for mood_id in rng.sample(ids, 100):
        await store.docs.update_one({"_id": mood_id}, {"$set": {"mood": f"edited {mood_id}"}})
    proc.kill9()
    proc.start()
    # 3. Nukes and un-nukes, killed right after the nukes.
    nuked = people[:4]
    for who in nuked:
        await store.docs.update_many({"user": who.sub}, {"$set": {"deleted": True}})
    await anyio.sleep(0.3)
    proc.kill9()
    for who in nuked[:2]:
        await store.docs.update_many({"user": who.sub}, {"$set": {"deleted": False}})
    active = [p for p in people if p not in nuked[2:]]  # the still-nuked stay empty
    proc.start()
    # 4. More inserts, then purges, killed during the purge.
    await insert(150)
    await anyio.sleep(0.5)
    purged = people[4:7]
    for who in purged:
        await store.docs.delete_many({"user": who.sub})
    proc.kill9()
    proc.start()
    assert len(ids) == 500
    try:

        async def converged() -> bool:
            for who in people:
                assert who.did is not None
                if not clean(await diff(store, rt.settings.pds_url, who.sub, who.did)):
                    return False
            return True

        await eventually(converged, 180, "PDS equal to the desired state")
    finally:
        proc.terminate()
        log.close()
    for who in purged + nuked[2:]:
        assert who.did is not None
        assert await records(rt.settings.pds_url, who.did) == {}
    total = sum([len(await records(rt.settings.pds_url, p.did or "")) for p in people])
    live = await store.docs.count_documents({"deleted": {"$ne": True}})
    assert total == live
    print(f"\n{proc.starts} starts, 500 moods, {total} records, {time.time() - t0:.1f}s")


async def test_sigterm_saves_checkpoint_and_exits_zero_quickly(
    rt: Runtime, users: Users, tmp_path: Any
) -> None:
    user = await users.make()
    log = (tmp_path / "replicator.log").open("wb")
    proc = Process(rt.settings, log)
    proc.start()
    await eventually(lambda: checkpoint_moved(rt.store, 0), 30, "first checkpoint")
    for i in range(40):
        await rt.store.docs.insert_one(
            {"user": user.sub, "mood": f"m{i}", "when": datetime.now(UTC)}
        )
    await anyio.sleep(0.3)  # mid-stream
    code, took = proc.terminate()
    log.close()
    assert code == 0, (tmp_path / "replicator.log").read_text()
    assert took < 10
    # Whatever it had not applied is applied after a restart; nothing twice.
    async with running(rt):
        await eventually(
            lambda: _clean(rt, user.sub, user.did), 60, "all 40 moods mirrored after restart"
        )
    assert len(await records(rt.settings.pds_url, user.did or "")) == 40


async def _clean(rt: Runtime, sub: str, did: str | None) -> bool:
    assert did is not None
    return clean(await diff(rt.store, rt.settings.pds_url, sub, did)) and len(
        await records(rt.settings.pds_url, did)
    ) == await rt.store.docs.count_documents({"user": sub})


async def test_firehose_shows_create_update_delete(rt: Runtime, users: Users) -> None:
    """Downstream view: an AppView subscribed to the PDS firehose sees our commits."""
    from atproto import AsyncFirehoseSubscribeReposClient, parse_subscribe_repos_message

    user = await users.make()
    seen: list[tuple[str, str]] = []
    port = rt.settings.pds_url.rsplit(":", 1)[-1]
    firehose = AsyncFirehoseSubscribeReposClient(base_uri=f"ws://localhost:{port}/xrpc")

    async def on_message(message: Any) -> None:
        commit = parse_subscribe_repos_message(message)
        if getattr(commit, "repo", None) == user.did:
            for op in commit.ops:
                seen.append((op.action, op.path))

    async with anyio.create_task_group() as tg:
        tg.start_soon(firehose.start, on_message)
        await anyio.sleep(1.0)
        async with running(rt):
            mood_id = (
                await rt.store.docs.insert_one(
                    {"user": user.sub, "mood": "v1", "when": datetime.now(UTC)}
                )
            ).inserted_id
            await eventually(lambda: _text_is(rt, user.did, "v1"))
            await rt.store.docs.update_one({"_id": mood_id}, {"$set": {"mood": "v2"}})
            await eventually(lambda: _text_is(rt, user.did, "v2"))
            await rt.store.docs.delete_one({"_id": mood_id})
            await eventually(lambda: _count(rt, user.did, 0))

        async def all_seen() -> bool:
            return [a for a, _ in seen] == ["create", "update", "delete"]

        try:
            await eventually(all_seen, 15, f"create/update/delete on the firehose (saw {seen})")
        finally:
            await firehose.stop()
            tg.cancel_scope.cancel()
    assert len({path for _, path in seen}) == 1
    assert seen[0][1].startswith("computer.aesthetic.mood/")


async def _text_is(rt: Runtime, did: str | None, text: str) -> bool:
    values = list((await records(rt.settings.pds_url, did or "")).values())
    return len(values) == 1 and values[0]["mood"] == text


async def _count(rt: Runtime, did: str | None, n: int) -> bool:
    return len(await records(rt.settings.pds_url, did or "")) == n
