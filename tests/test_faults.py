"""Faults: the PDS down, 5xx, timeouts, 429s, bad credentials, MongoDB restarts, two writers."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
from loguru import logger

from replicator.config import Settings
from replicator.model import State
from replicator.runtime import Runtime, open_runtime
from replicator.sessions import Session
from replicator_dev.devstack.faults import FaultTransport, fail_next, timeout_next
from replicator_dev.devstack.seed import insert_mood
from replicator_dev.devstack.servers import EmbeddedMongo
from replicator_dev.devstack.stack import LocalStack

from .conftest import Users, env_for, with_settings
from .harness import clean, diff, eventually, records, running

pytestmark = pytest.mark.anyio
WRITES = {"com.atproto.repo.putRecord", "com.atproto.repo.applyWrites",
          "com.atproto.repo.deleteRecord"}  # fmt: skip


async def in_sync(rt: Runtime, *people: Any) -> bool:
    for who in people:
        if not clean(await diff(rt.store, rt.settings.pds_url, who.sub, who.did)):
            return False
    return True


async def changed_after(rt: Runtime, token: Any) -> set[Any]:
    """The ids of the moods changed after a resume token, as a restart would read them."""
    ids: set[Any] = set()
    async with await rt.store.docs.watch(start_after=token, max_await_time_ms=200) as stream:
        with anyio.move_on_after(5):
            while (change := await stream.try_next()) is not None or not ids:
                if change is not None:
                    ids.add(change["documentKey"]["_id"])
    return ids


async def test_pds_down_60s_then_back(stack: LocalStack, rt: Runtime, users: Users) -> None:
    if stack.pds is None:
        pytest.skip("needs the embedded PDS (REPLICATOR_TEST_PDS_URL points elsewhere)")
    alice, bob = await users.make(), await users.make()
    async with running(rt):
        for i in range(3):
            await insert_mood(rt.store, alice.sub, f"before {i}")
        await eventually(lambda: in_sync(rt, alice), what="mirrored before the outage")
        logins = rt.sessions.logins
        before = await rt.store.load_checkpoint()
        assert before is not None
        stack.pds.pause()
        t0 = time.monotonic()
        try:
            during_ids = [await insert_mood(rt.store, bob.sub, f"during {i}") for i in range(5)]
            await rt.store.docs.update_many({"user": alice.sub}, {"$set": {"deleted": True}})
            await anyio.sleep(5)
            during = await rt.store.load_checkpoint()
            assert during is not None
            # An idle stream's position may be saved meanwhile (a quiet collection's token
            # moves with the oplog); what must hold is that every change the PDS never
            # received is still after the checkpoint.
            assert set(during_ids) <= await changed_after(rt, during["token"]), (
                "checkpoint advanced past work the PDS never received"
            )
            await anyio.sleep(max(0.0, 60 - (time.monotonic() - t0)))
        finally:
            stack.pds.resume()
        back = time.monotonic()
        await eventually(lambda: in_sync(rt, alice, bob), 60, "caught up after the outage")
        caught_up = time.monotonic() - back
    assert len(await records(rt.settings.pds_url, bob.did or "")) == 5
    assert await records(rt.settings.pds_url, alice.did or "") == {}
    assert rt.sessions.logins == logins + 1  # bob's first login only: sessions survived
    print(f"\ncaught up {caught_up:.1f}s after the PDS came back")


async def test_5xx_and_timeouts_are_retried_without_loss_or_duplicates(
    faulty: tuple[Runtime, FaultTransport], users: Users
) -> None:
    rt, transport = faulty
    people = [await users.make() for _ in range(3)]
    transport.rules += [fail_next(6, WRITES, 503), fail_next(2, WRITES, 500),
                        timeout_next(3, WRITES)]  # fmt: skip
    async with running(rt):
        for i in range(30):
            await insert_mood(rt.store, people[i % 3].sub, f"m{i}")
        await eventually(lambda: in_sync(rt, *people), 90, "all mirrored despite faults")
    assert transport.injected == 11
    for who in people:
        values = list((await records(rt.settings.pds_url, who.did or "")).values())
        assert len(values) == 10 and len({v["ref"] for v in values}) == 10


async def test_short_429_is_waited_out(
    faulty: tuple[Runtime, FaultTransport], users: Users
) -> None:
    rt, transport = faulty
    who = await users.make()
    transport.rules.append(fail_next(2, WRITES, 429, {"Retry-After": "1"}))
    async with running(rt):
        started = time.monotonic()
        await insert_mood(rt.store, who.sub, "patience")
        await eventually(lambda: in_sync(rt, who), 30)
    assert time.monotonic() - started >= 1.0
    assert transport.injected == 2


async def test_exhausted_account_budget_parks_that_user_only(
    faulty: tuple[Runtime, FaultTransport], users: Users
) -> None:
    rt, transport = faulty
    busy, other = await users.make(), await users.make()
    hour = {"Retry-After": "3600", "RateLimit-Limit": "5000", "RateLimit-Remaining": "0",
            "RateLimit-Policy": "5000;w=3600"}  # fmt: skip
    transport.rules.append(fail_next(1000, WRITES, 429, hour, did=busy.did))
    async with running(rt):
        busy_ids = [await insert_mood(rt.store, busy.sub, f"busy {i}") for i in range(3)]
        for i in range(3):
            await insert_mood(rt.store, other.sub, f"other {i}")
        await eventually(lambda: in_sync(rt, other), 30, "the other user flows")

        async def parked() -> bool:
            entries = await rt.store.ledger_by_id(busy_ids)
            return len(entries) == 3 and all(e.state is State.PARKED for e in entries.values())

        await eventually(parked, 30, "the busy user's moods parked")
    entry = next(iter((await rt.store.ledger_by_id(busy_ids)).values()))
    assert entry.retry_at is not None and entry.retry_at > time.time() + 3000
    assert "write budget" in (entry.reason or "")
    # When the budget is back, the parked moods are applied (what `dlq retry` does).
    transport.rules.clear()
    await rt.applier.apply_ids(busy_ids)
    assert await in_sync(rt, busy)
    assert await rt.store.dead_letter_count() == 0


async def test_wrong_password_parks_only_that_user_and_never_leaks(
    rt: Runtime, users: Users
) -> None:
    good, bad = await users.make(), await users.make()
    assert bad.password is not None
    wrong = "wrong-" + bad.password
    await rt.store.users.update_one({"_id": bad.sub}, {"$set": {"atproto.password": wrong}})
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m)), level="DEBUG")
    try:
        async with running(rt):
            bad_id = await insert_mood(rt.store, bad.sub, "locked out")
            await insert_mood(rt.store, good.sub, "flows")
            await eventually(lambda: in_sync(rt, good), 30)

            async def parked() -> bool:
                entry = (await rt.store.ledger_by_id([bad_id])).get(bad_id)
                return entry is not None and entry.state is State.PARKED

            await eventually(parked, 30)
    finally:
        logger.remove(sink)
    letters = [d async for d in rt.store.dead_letters.find({})]
    assert [d["reason"] for d in letters] == [
        "PDS refused the account's password (AuthenticationRequired)"
    ]
    everything = "\n".join(lines) + repr(letters)
    assert wrong not in everything and bad.password not in everything
    # The password is fixed: the parked mood goes through, its dead letter is cleared.
    await rt.store.users.update_one({"_id": bad.sub}, {"$set": {"atproto.password": bad.password}})
    await rt.applier.apply_ids([bad_id])
    assert await in_sync(rt, bad)
    assert await rt.store.dead_letter_count() == 0


async def test_expired_or_revoked_sessions_refresh_then_login_once(
    rt: Runtime, users: Users
) -> None:
    who = await users.make()
    first = await insert_mood(rt.store, who.sub, "one")
    await rt.applier.apply_ids([first])
    assert rt.sessions.logins == 1
    real = await rt.sessions.session((await rt.store.accounts([who.sub]))[who.sub])  # type: ignore[arg-type]
    # The access token stops working: refreshed, no new login.
    stale = Session("not-a-valid-token", real.refresh)
    rt.sessions._cache[who.did or ""] = stale
    second = await insert_mood(rt.store, who.sub, "two")
    await rt.applier.apply_ids([second])
    assert (rt.sessions.refreshes, rt.sessions.logins) == (1, 1)
    # Both tokens revoked: one new login.
    rt.sessions._cache[who.did or ""] = Session("not-a-valid-token", "revoked-too")
    third = await insert_mood(rt.store, who.sub, "three")
    await rt.applier.apply_ids([third])
    assert rt.sessions.logins == 2
    assert await in_sync(rt, who)


async def test_sessions_survive_a_restart(settings: Settings, users: Users, rt: Runtime) -> None:
    who = await users.make()
    await rt.applier.apply_ids([await insert_mood(rt.store, who.sub, "first process")])
    async with open_runtime(settings) as again:  # a new process: empty memory, same Mongo
        await again.applier.apply_ids([await insert_mood(rt.store, who.sub, "second process")])
        assert again.pds.requests["com.atproto.server.createSession"] == 0
    assert await in_sync(rt, who)


async def test_mongodb_restart_mid_stream(
    stack: LocalStack, users: Users, settings: Settings, tmp_path: Path
) -> None:
    if stack.mongo is None:
        pytest.skip("needs the embedded MongoDB (REPLICATOR_TEST_MONGODB_URI points elsewhere)")
    mongo = EmbeddedMongo(tmp_path / "mongo").start()
    try:
        own = with_settings(settings, mongodb_uri=mongo.uri)
        async with open_runtime(own) as rt:
            who = await users.make()  # in the shared Mongo: copy the user over
            user_doc = await users.store.users.find_one({"_id": who.sub})
            await rt.store.users.insert_one(user_doc or {})
            async with running(rt):
                for i in range(5):
                    await insert_mood(rt.store, who.sub, f"before {i}")
                await eventually(lambda: in_sync(rt, who), 30)
                mongo.stop()
                await anyio.sleep(3)
                mongo.start()
                for i in range(5):
                    await insert_mood(rt.store, who.sub, f"after {i}")
                await eventually(lambda: in_sync(rt, who), 60, "resumed after the restart")
            assert len(await records(rt.settings.pds_url, who.did or "")) == 10
    finally:
        mongo.stop()


def _run(settings: Settings, log: Any) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "replicator.cli", "run"],
        env=env_for(settings, REPLICATOR_LEASE_SECONDS="3"),
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip


async def test_second_process_waits_then_takes_over(
    rt: Runtime, users: Users, tmp_path: Path
) -> None:
    who = await users.make()
    logs = [(tmp_path / f"r{i}.log").open("wb") for i in range(2)]
    first = _run(rt.settings, logs[0])
    lease_id = "lease:" + rt.settings.names.moods

    async def holder() -> str:
        doc = await rt.store.state.find_one({"_id": lease_id})
        return str((doc or {}).get("owner", ""))

    async def held_by(pid: int) -> bool:
        return f":{pid}:" in await holder()

    async def streaming() -> bool:  # with no checkpoint, the stream starts where it opens
        return await held_by(first.pid) and bool(await rt.store.load_checkpoint())

    await eventually(streaming, 30, "first process holds the lease and reads the stream")
    second = _run(rt.settings, logs[1])
    try:
        await insert_mood(rt.store, who.sub, "while both run")
        await eventually(lambda: in_sync(rt, who), 30)
        await anyio.sleep(2)
        assert await held_by(first.pid)
        assert "waiting to take over" in (tmp_path / "r1.log").read_text()
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        killed = time.monotonic()
        await eventually(lambda: held_by(second.pid), 20, "second process takes over")
        took = time.monotonic() - killed
        await insert_mood(rt.store, who.sub, "after the takeover")
        await eventually(lambda: in_sync(rt, who), 30)
    finally:
        for proc in (first, second):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(20)
        for log in logs:
            log.close()
    assert took < 10
    assert len(await records(rt.settings.pds_url, who.did or "")) == 2
    print(f"\ntakeover {took:.1f}s after kill -9 (lease 3s)")


async def test_announced_write_budget_paces_the_busy_account_before_any_429(
    faulty: tuple[Runtime, FaultTransport], users: Users
) -> None:
    """The PDS says the busy account has 6 points left this hour: the replicator spends them,
    then parks that account's work until the window resets; the other account never waits."""
    from replicator_dev.devstack.faults import announce_budget

    rt, transport = faulty
    busy, other = await users.make(), await users.make()
    transport.after.append(announce_budget(busy.did or "", remaining=6, reset_in=3600))
    first = await insert_mood(rt.store, busy.sub, "spends the budget")
    await rt.applier.apply_ids([first])  # the answer announces what is left
    busy_ids = [await insert_mood(rt.store, busy.sub, f"busy {i}") for i in range(4)]
    other_ids = [await insert_mood(rt.store, other.sub, f"other {i}") for i in range(4)]
    sent_before = rt.pds.requests["com.atproto.repo.applyWrites"]
    await rt.applier.apply_ids([*busy_ids, *other_ids])
    assert await in_sync(rt, other)
    entries = await rt.store.ledger_by_id(busy_ids)
    assert {e.state for e in entries.values()} == {State.PARKED}
    assert all((e.retry_at or 0) > time.time() + 3000 for e in entries.values())
    # Only the other account's batch reached the PDS: the busy one got no 429, it was paced.
    assert rt.pds.requests["com.atproto.repo.applyWrites"] - sent_before == 1
    assert transport.injected == 0
