"""`replicator run` killed (SIGKILL, by itself) at each named crash point, then restarted.

Each test drives a scripted mix of production-shaped operations: a baseline mirrored while the
replicator runs; then, while it is stopped, the writes that will be in flight when it dies (a
burst of inserts that becomes one `applyWrites`, edits, a replace that drops `atproto.rkey`, an
un-nuke, a nuke, a purge of a user with records the ledger never knew, moods of a user without
an account); a start with `REPLICATOR_CRASH_AT=<point>:<n>` that dies there (checked: exit -9,
and the database shows the process stopped where the point says); more writes while it is down
(a nuke of a user whose burst was in flight, edits, inserts); a restart without the variable.
The PDS must then hold exactly the desired state: per user, 0 missing, 0 duplicates, 0 records
of deleted or nuked moods, every record equal to its desired record.

Starting the crashing run only once the writes are waiting makes its first batch hold all of
them, so every point is reached at the same place every time (no timing luck).

`recovery` has its own test on a server of its own with a 200-entry oplog (a real history
loss); the tests at the end reproduce in-process, in a second or two, what the kills found.
"""

from __future__ import annotations

import dataclasses
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from bson import ObjectId

from replicator import tid
from replicator.config import Settings
from replicator.desired import desired_state
from replicator.ledger import intents_for
from replicator.model import State
from replicator.plan import plan_user
from replicator.recordtypes import MOOD as MOOD_TYPE
from replicator.runtime import Runtime, open_runtime
from replicator.store import Store, sub_hash
from replicator_dev.devstack.seed import SeededUser, insert_mood
from replicator_dev.devstack.servers import EmbeddedMongo
from replicator_dev.devstack.stack import LocalStack

from .conftest import Users, env_for
from .harness import eventually, figures, records, tally

pytestmark = pytest.mark.anyio

MOOD = "computer.aesthetic.mood"
BASE = datetime(2026, 5, 6, 7, 8, 9, 123000, tzinfo=UTC)
LEASE_SECONDS = 4  # a restart after a kill -9 waits this long for the dead holder's lease
BURST = 30
CONVERGE_TIMEOUT = 45.0  # healthy: 5-11 s after the restart, the lease wait included
LANE_DEADLINE = 10  # a lane the PDS keeps failing is parked after this long (default 60 s)


class Proc:
    """`replicator run` in a subprocess, one log file per start."""

    def __init__(self, settings: Settings, logs: Path) -> None:
        self.settings = settings
        self.logs = logs
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self, crash_at: str | None = None) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        env = env_for(
            self.settings,
            REPLICATOR_LOG_LEVEL="WARNING",
            REPLICATOR_LEASE_SECONDS=str(LEASE_SECONDS),
            REPLICATOR_HTTP_ADDR="off",
            REPLICATOR_LANE_DEADLINE=str(LANE_DEADLINE),
        )
        env.pop("REPLICATOR_CRASH_AT", None)
        if crash_at is not None:
            env["REPLICATOR_CRASH_AT"] = crash_at
        self.starts += 1
        with self.log(self.starts).open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "replicator.cli", "run"],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def log(self, start: int) -> Path:
        return self.logs / f"replicator-{start}.log"

    def text(self, start: int | None = None) -> str:
        return self.log(start or self.starts).read_text(errors="replace")

    async def exited(self, timeout: float, what: str) -> int:
        assert self.proc is not None
        proc = self.proc

        async def gone() -> bool:
            return proc.poll() is not None

        try:
            await eventually(gone, timeout, what)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; its log:\n{self.text()[-3000:]}") from None
        return proc.returncode

    def terminate(self, timeout: float = 30) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def ensure_stopped(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
async def proc_factory(tmp_path: Path) -> AsyncIterator[Callable[[Settings], Proc]]:
    made: list[Proc] = []

    def make(settings: Settings) -> Proc:
        made.append(Proc(settings, tmp_path))
        return made[-1]

    yield make
    for p in made:
        p.ensure_stopped()


# -- the cast and the script ------------------------------------------------------------------


@dataclasses.dataclass
class Cast:
    burst: SeededUser  # a burst in flight when it dies, then nuked (and back) while it is down
    steady: SeededUser  # a burst in flight when it dies, then edits: its burst must stay
    unnuked: SeededUser  # nuked in the baseline; un-nuked, edited and replaced in flight
    nuked: SeededUser  # nuked in flight; a new mood while it is down
    purged: SeededUser  # purged in flight; has records the ledger never knew (old writer)
    no_account: SeededUser  # no ATProto account: nothing may reach a PDS for it
    erased: SeededUser  # erased in flight: moods deleted, then the users document
    unset: SeededUser  # `atproto` unset in flight; moods deleted while down
    ids: dict[str, list[ObjectId]] = dataclasses.field(default_factory=dict)
    erasing: bool = False  # the erasures are on their way (in_flight): both must end forgotten
    baseline_rkeys: dict[str, set[str]] = dataclasses.field(default_factory=dict)

    @property
    def with_account(self) -> list[SeededUser]:
        return [self.burst, self.steady, self.unnuked, self.nuked, self.purged]


async def make_cast(users: Users) -> Cast:
    a, b, c, d, e = [await users.make() for _ in range(5)]
    none = await users.make(with_account=False)
    return Cast(a, b, c, d, e, none, await users.make(), await users.make())


_counter = 0


def _mood(user: SeededUser, text: str) -> dict[str, Any]:
    global _counter
    _counter += 1
    return {"user": user.sub, "mood": f"{text} #{_counter} ✨\nline two",
            "when": BASE + timedelta(seconds=_counter)}  # fmt: skip


async def insert(store: Store, cast: Cast, user: SeededUser, n: int, text: str) -> None:
    result = await store.docs.insert_many([_mood(user, text) for _ in range(n)])
    cast.ids.setdefault(user.sub, []).extend(result.inserted_ids)


async def edit(store: Store, mood_id: ObjectId, text: str) -> None:
    await store.docs.update_one({"_id": mood_id}, {"$set": {"mood": text}})


async def nuke(store: Store, user: SeededUser, deleted: Any = True) -> None:
    await store.docs.update_many({"user": user.sub}, {"$set": {"deleted": deleted}})


async def baseline(store: Store, cast: Cast) -> None:
    """While the replicator runs (no crash point): 4 moods each, the no-account user's 2."""
    for user in [*cast.with_account, cast.erased, cast.unset]:
        await insert(store, cast, user, 4, "baseline")
    await insert(store, cast, cast.no_account, 2, "baseline")


async def in_flight(store: Store, cast: Cast) -> None:
    """While it is stopped: what its first batch after the start will hold."""
    await insert(store, cast, cast.burst, BURST, "burst")
    await insert(store, cast, cast.steady, BURST, "steady burst")
    for user in (cast.burst, cast.steady):
        first = cast.ids[user.sub][0]
        await edit(store, first, "edited in flight")
    await nuke(store, cast.unnuked, deleted=False)
    b = cast.ids[cast.unnuked.sub]
    await edit(store, b[0], "edited after the un-nuke")
    # A replace as the app does it: the whole document again, `atproto` (the rkey) dropped.
    await store.docs.replace_one(
        {"_id": b[1]}, {"user": cast.unnuked.sub, "mood": "replaced", "when": BASE}
    )
    await nuke(store, cast.nuked)
    await store.docs.delete_many({"user": cast.purged.sub})
    await insert(store, cast, cast.no_account, 2, "in flight")
    await edit(store, cast.ids[cast.no_account.sub][0], "edited, no account")
    cast.erasing = True
    await store.docs.delete_many({"user": cast.erased.sub})  # the app's erasure, moods first
    await store.handles.delete_one({"_id": cast.erased.sub})
    await store.users.delete_one({"_id": cast.erased.sub})
    await store.users.update_one({"_id": cast.unset.sub}, {"$unset": {"atproto": ""}})


async def while_down(store: Store, cast: Cast) -> None:
    """After the kill, before the restart."""
    await nuke(store, cast.burst)  # its burst was in flight: records may or may not exist
    await insert(store, cast, cast.burst, 1, "back after the nuke")
    await edit(store, cast.ids[cast.steady.sub][1], "edited while down")
    await edit(store, cast.ids[cast.steady.sub][-1], "burst mood edited while down")
    await edit(store, cast.ids[cast.unnuked.sub][2], "edited while down")
    await insert(store, cast, cast.nuked, 1, "back after the nuke")
    await insert(store, cast, cast.no_account, 1, "while down")
    await store.docs.delete_many({"user": cast.unset.sub})  # its moods after its `users`


async def put_legacy(pds_url: str, user: SeededUser, refs: list[ObjectId], n: int) -> set[str]:
    """Records the old inline writer made (the ledger never knew them), `ref` = a mood id,
    written with the user's own password in `applyWrites` of ≤ 200."""
    assert user.did and user.password
    rkeys = [tid.from_object_id(ObjectId()) for _ in range(n)]
    async with httpx.AsyncClient(base_url=f"{pds_url}/xrpc/", timeout=60) as http:
        session = await http.post(
            "com.atproto.server.createSession",
            json={"identifier": user.did, "password": user.password},
        )
        session.raise_for_status()
        auth = {"authorization": f"Bearer {session.json()['accessJwt']}"}
        for start in range(0, n, 200):
            writes = [
                {"$type": "com.atproto.repo.applyWrites#create", "collection": MOOD,
                 "rkey": rkey, "value": {"$type": MOOD, "mood": "the old writer's copy",
                                         "when": "2025-01-01T00:00:00.000Z",
                                         "ref": str(refs[i % len(refs)])}}
                for i, rkey in enumerate(rkeys[start : start + 200], start)
            ]  # fmt: skip
            resp = await http.post(
                "com.atproto.repo.applyWrites",
                json={"repo": user.did, "writes": writes},
                headers=auth,
            )
            resp.raise_for_status()
    return set(rkeys)


# -- conditions -------------------------------------------------------------------------------


async def checkpoint_token(store: Store) -> Any:
    return ((await store.load_checkpoint()) or {}).get("token")


async def pending_count(store: Store) -> int:
    return await store.ledger.count_documents({"state": State.PENDING.value})


async def written_back(store: Store, ids: list[ObjectId]) -> int:
    return await store.docs.count_documents(
        {"_id": {"$in": ids}, "atproto.rkey": {"$type": "string"}}
    )


async def converged(store: Store, pds_url: str, cast: Cast) -> bool:
    """The PDS equals the desired state and nothing is in flight or parked; the erased users'
    records are gone and nothing names them."""
    for user in cast.with_account:
        assert user.did
        if any((await tally(store, pds_url, user.sub, user.did)).values()):
            return False
    for user in (cast.erased, cast.unset):
        left = len(await records(pds_url, user.did or ""))
        if (left or await named(store, user)) if cast.erasing else left != 4:
            return False
    busy = {"state": {"$in": [State.PENDING.value, State.PARKED.value]}}
    return await store.ledger.count_documents(busy) == 0


async def named(store: Store, user: SeededUser) -> list[str]:
    """Where `replicator_*` still names the user (sub, DID, handle)."""
    needles = [n for n in (user.sub, user.did, user.handle) if n]
    found = []
    for name in sorted(await store.db.list_collection_names()):
        if name.startswith(store.names.prefix):
            async for doc in store.db[name].find({}):
                found += [f"{name} {doc['_id']!r}" for n in needles if n in repr(doc)]
    return found


async def assert_exact(store: Store, pds_url: str, cast: Cast, point: str) -> None:
    """Per user with an account: 0 missing, 0 duplicates, 0 records of deleted or nuked
    moods, every record its desired record. Without an account: nothing on any PDS."""
    bad = {}
    for user in cast.with_account:
        assert user.did
        t = await tally(store, pds_url, user.sub, user.did)
        if any(t.values()):
            bad[user.handle] = f"{figures(t)}: {t}"
    assert not bad, f"{point}: the PDS is not the desired state: {bad}"
    # The un-nuked moods are back under their permalinks, the replaced one included.
    unnuked = cast.unnuked
    assert unnuked.did
    assert set(await records(pds_url, unnuked.did)) == cast.baseline_rkeys[unnuked.sub]
    # The user without an account: no record of theirs in any repo, every mood skipped.
    theirs = {str(i) for i in cast.ids[cast.no_account.sub]}
    for user in cast.with_account:
        assert user.did
        refs = {str(v.get("ref")) for v in (await records(pds_url, user.did)).values()}
        assert not refs & theirs, f"{point}: a mood of a user without an account on a PDS"
    ledger = await store.ledger_by_id(cast.ids[cast.no_account.sub])
    assert {e.state for e in ledger.values()} == {State.SKIPPED}
    assert len(ledger) == len(theirs)
    assert await store.dead_letter_count() == 0
    # The erased users: nothing of theirs on the PDS, nothing in replicator_* names them.
    for user in (cast.erased, cast.unset):
        assert await records(pds_url, user.did or "") == {}, f"{point}: {user.handle} kept"
        assert await named(store, user) == [], f"{point}: {user.handle} still named"
    assert await store.erasure_count() == 2


# -- where the crashing run stopped -----------------------------------------------------------


async def lanes_visible(pds_url: str, cast: Cast) -> int:
    """How many users' in-flight commits the PDS shows (each lane is one `applyWrites`)."""
    counts = {u.sub: len(await records(pds_url, u.did or "")) for u in cast.with_account}
    return sum(
        [
            counts[cast.burst.sub] > 4,
            counts[cast.steady.sub] > 4,
            counts[cast.unnuked.sub] > 0,
            counts[cast.nuked.sub] == 0,
            counts[cast.purged.sub] == len(cast.baseline_rkeys["legacy"]),
        ]
    )


async def check_stopped_at(
    point: str, n: int, store: Store, pds_url: str, cast: Cast, token_before: Any
) -> None:
    """The database and the PDS as the crashing run left them say where it died."""
    burst_ids = cast.ids[cast.steady.sub][4:]
    pending = await pending_count(store)
    backs = await written_back(store, burst_ids)
    token_moved = await checkpoint_token(store) != token_before
    state = f"{pending} pending, {backs}/{len(burst_ids)} written back, moved={token_moved}"
    if point == "intent":
        assert pending > 2 * BURST, state
        assert await lanes_visible(pds_url, cast) == 0, "a PDS write before the intents"
        assert backs == 0 and not token_moved, state
    elif point == "pds_call":
        assert pending > 2 * BURST, f"the ledger was flushed: {state}"
        assert await lanes_visible(pds_url, cast) >= n, f"fewer than {n} PDS calls done"
        assert backs == 0 and not token_moved, state
    elif point == "write_back":  # before the ledger settles: the intents are still pending
        assert pending > 2 * BURST, f"the ledger settled before the write-back: {state}"
        assert backs == len(burst_ids) and not token_moved, state
    elif point == "ledger":
        assert pending == 0 and backs == len(burst_ids), state
        assert not token_moved, state
    elif point == "checkpoint":
        assert pending == 0 and backs == len(burst_ids), state
        assert token_moved, state
    elif point == "forget":
        # The first erasure confirmed (one of the two users' repo empty), not forgotten.
        left = [len(await records(pds_url, u.did or "")) for u in (cast.erased, cast.unset)]
        assert 0 in left, left
        assert await named(store, cast.erased) or await named(store, cast.unset)
        assert await store.erasure_count() == 0
    elif point == "sweep":
        # Killed between the sweep's two `applyWrites` (200 of the 250 deletes done).
        left = await records(pds_url, cast.purged.did or "")
        assert len(left) == len(cast.baseline_rkeys["legacy"]) - 200, len(left)
        assert not token_moved, state
    else:
        raise AssertionError(point)


# -- the tests --------------------------------------------------------------------------------

# intent and pds_call leave pending entries: the restart must send writes whose target only
# may exist without `applyWrites` (whose #create/#update/#delete the reference PDS fails with a
# 500 when the record is there / is not). Found by these tests (Applier._chunks, plan_mood).
POINTS = [
    pytest.param("intent", 1, id="intent"),
    pytest.param("pds_call", 1, id="pds_call-1"),
    pytest.param("pds_call", 3, id="pds_call-3"),
    pytest.param("write_back", 1, id="write_back"),
    pytest.param("ledger", 1, id="ledger"),
    pytest.param("checkpoint", 1, id="checkpoint"),
    pytest.param("sweep", 1, id="sweep"),
    pytest.param("forget", 1, id="forget"),
]


async def run_baseline(
    store: Store, settings: Settings, proc: Proc, cast: Cast
) -> Callable[[], Awaitable[bool]]:
    proc.start()

    async def has_checkpoint() -> bool:
        return await checkpoint_token(store) is not None

    await eventually(has_checkpoint, 30, "first checkpoint")
    await baseline(store, cast)

    async def done() -> bool:
        return await converged(store, settings.pds_url, cast)

    await eventually(done, CONVERGE_TIMEOUT, "baseline mirrored")
    await nuke(store, cast.unnuked)
    await eventually(done, CONVERGE_TIMEOUT, "baseline nuke mirrored")
    assert proc.terminate() == 0, proc.text()
    return done


@pytest.mark.parametrize(("point", "n"), POINTS)
async def test_killed_at_crash_point_converges_exactly(
    point: str,
    n: int,
    rt: Runtime,
    users: Users,
    proc_factory: Callable[[Settings], Proc],
) -> None:
    await crash_scenario(point, n, rt, users, proc_factory(rt.settings))


async def test_purged_user_back_while_down_after_a_kill_before_the_sweep(
    rt: Runtime, users: Users, proc_factory: Callable[[Settings], Proc]
) -> None:
    """Killed between a purge's ledger flush and its sweep; the user posts again before the
    restart. The old writer's records of the purged moods must still go."""
    await crash_scenario("write_back", 1, rt, users, proc_factory(rt.settings), purged_back=True)


async def crash_scenario(
    point: str, n: int, rt: Runtime, users: Users, proc: Proc, *, purged_back: bool = False
) -> None:
    store, pds_url = rt.store, rt.settings.pds_url
    cast = await make_cast(users)
    done = await run_baseline(store, rt.settings, proc, cast)
    for user in cast.with_account:
        if user is not cast.unnuked:
            cast.baseline_rkeys[user.sub] = set(await records(pds_url, user.did or ""))
    cast.baseline_rkeys[cast.unnuked.sub] = {
        d["atproto"]["rkey"] async for d in store.docs.find({"user": cast.unnuked.sub})
    }
    # The old writer's copies of the purged user's moods: the sweep's work (two `applyWrites`
    # where the sweep itself is the point, so the kill lands between them).
    legacy = 250 if point == "sweep" else 3
    cast.baseline_rkeys["legacy"] = await put_legacy(
        pds_url, cast.purged, cast.ids[cast.purged.sub], legacy
    )
    token_before = await checkpoint_token(store)

    await in_flight(store, cast)
    proc.start(crash_at=f"{point}:{n}")
    code = await proc.exited(90, f"the run with REPLICATOR_CRASH_AT={point}:{n} to die")
    assert code == -signal.SIGKILL, f"exit {code}, not SIGKILL:\n{proc.text()[-3000:]}"
    await check_stopped_at(point, n, store, pds_url, cast, token_before)

    await while_down(store, cast)
    if purged_back:
        await insert(store, cast, cast.purged, 1, "back after the purge")
    proc.start()
    started = time.monotonic()
    try:
        await eventually(done, CONVERGE_TIMEOUT, f"{point}:{n}: PDS equal to the desired state")
    except AssertionError:
        bad = {u.handle: figures(await tally(store, pds_url, u.sub, u.did or ""))
               for u in cast.with_account}  # fmt: skip
        raise AssertionError(f"{point}:{n} not converged: {bad}\n{proc.text()[-3000:]}") from None
    print(f"{point}:{n}: converged {time.monotonic() - started:.1f}s after the restart")
    assert proc.terminate() == 0, proc.text()
    await assert_exact(store, pds_url, cast, f"{point}:{n}")


# -- history-loss recovery, interrupted -------------------------------------------------------

RECOVERY_DONE = re.compile(
    r"recovery done: (\d+) users reconciled \((\d+) before an interruption\)"
)


async def test_killed_during_history_loss_recovery_resumes_and_converges_exactly(
    settings: Settings,
    stack: LocalStack,
    tmp_path: Path,
    proc_factory: Callable[[Settings], Proc],
) -> None:
    """A real history loss (the oplog pruned past the checkpoint), a kill after the recovery's
    first user, a restart that finishes the recovery without redoing that user."""
    mongo = EmbeddedMongo(tmp_path / "mongo", extra_args=("--oplog-max-entries", "200")).start()
    try:
        mine = dataclasses.replace(settings, mongodb_uri=mongo.uri)
        async with open_runtime(mine) as rt:
            await _recovery_scenario(rt, Users(rt.store, stack), proc_factory(mine))
    finally:
        mongo.stop()


async def _recovery_scenario(rt: Runtime, users: Users, proc: Proc) -> None:
    store, pds_url = rt.store, rt.settings.pds_url
    cast = await make_cast(users)
    done = await run_baseline(store, rt.settings, proc, cast)
    cast.baseline_rkeys[cast.unnuked.sub] = {
        d["atproto"]["rkey"] async for d in store.docs.find({"user": cast.unnuked.sub})
    }
    cast.baseline_rkeys["legacy"] = await put_legacy(
        pds_url, cast.purged, cast.ids[cast.purged.sub], 3
    )
    # While it is stopped: the in-flight mix, then 240 edits (cheap to reconcile: the same
    # 4 moods of one user), then the oplog pruned to its last 200 entries.
    await in_flight(store, cast)
    steady = cast.ids[cast.steady.sub]
    for i in range(240):
        await edit(store, steady[i % 4], f"edit {i}")
    token = await checkpoint_token(store)
    pruned = await store.client.admin.command("secantusAdmin.pruneOplog")
    assert pruned["pruned"] > 0
    assert await store.client.local["oplog.rs"].count_documents({}) <= 200

    proc.start(crash_at="recovery:1")
    code = await proc.exited(90, "the run with REPLICATOR_CRASH_AT=recovery:1 to die")
    assert code == -signal.SIGKILL, f"exit {code}, not SIGKILL:\n{proc.text()[-3000:]}"
    assert "history lost" in proc.text(), proc.text()
    checkpoint = await store.load_checkpoint() or {}
    recovery = checkpoint.get("recovery")
    assert recovery and recovery["kind"] == "history-lost", checkpoint
    assert checkpoint.get("token") == token  # the old position, never "now" silently
    run_doc = await store.load_run(f"recovery:{store.names.moods}:{recovery['started_at']}")
    assert run_doc is not None and not run_doc["finished"], run_doc
    done_before = {d["_id"]: d["done_at"] async for d in store.runs.find({"run": run_doc["run"]})}
    assert 1 <= len(done_before) < len(await store.users_in_scope()), done_before

    await while_down(store, cast)
    # The scope the recovery resumes over (the erased users it forgot, and the moods
    # deleted while it was down, are out of it now).
    scope = await store.users_in_scope()
    in_scope = len(scope)
    done_in_scope = set(done_before) & {sub_hash(u) for u in scope}
    proc.start()
    try:
        await eventually(done, CONVERGE_TIMEOUT, "recovery: PDS equal to the desired state")

        async def recovery_logged() -> bool:
            return RECOVERY_DONE.search(proc.text()) is not None

        await eventually(recovery_logged, 30, "the recovery-done log line")
    finally:
        log = proc.text()
    assert proc.terminate() == 0, log
    found = RECOVERY_DONE.search(log)
    assert found is not None
    reconciled, before = int(found[1]), int(found[2])
    assert before == len(done_in_scope), log
    assert reconciled + before == in_scope, log
    # The users done before the interruption were not reconciled again.
    after = {
        d["_id"]: d["done_at"] async for d in store.runs.find({"_id": {"$in": list(done_before)}})
    }
    assert after == done_before
    assert (await store.load_run(run_doc["_id"]) or {}).get("finished") is True
    assert "recovery" not in (await store.load_checkpoint() or {})
    await assert_exact(store, pds_url, cast, "recovery:1")


# -- what the kills found, in-process and minimal ------------------------------------------


async def _intents_as_a_kill_leaves_them(rt: Runtime, sub: str, ids: list[ObjectId]) -> None:
    """Plan these moods and write their intents, as `Applier._execute` does right before its
    `intent` crash point; nothing is sent (the process died there)."""
    docs = await rt.store.moods_by_id(ids)
    ledger = await rt.store.ledger_by_id(ids)
    account = (await rt.store.accounts([sub]))[sub]
    desired = [desired_state(MOOD_TYPE, i, docs.get(i), has_account=True) for i in ids]
    plan = plan_user(sub, account, desired, ledger, tid.from_object_id)
    intents = intents_for(plan.moods, ledger, rt.store.fence.generation)
    assert len(intents) == len(ids)
    await rt.store.save_entries(list(intents.values()))


@pytest.mark.settings(lane_deadline=5.0)
async def test_edits_whose_intents_outlived_a_kill_are_applied(rt: Runtime, users: Users) -> None:
    """Two mirrored moods edited; killed after the intents: one apply must put both edits
    (the records exist: `applyWrites#create` is refused)."""
    user = await users.make()
    assert user.did
    ids = [await insert_mood(rt.store, user.sub, f"mood {i}", when=BASE) for i in range(2)]
    await rt.applier.apply_ids(ids)
    await rt.store.docs.update_many({"user": user.sub}, {"$set": {"mood": "edited"}})
    await _intents_as_a_kill_leaves_them(rt, user.sub, ids)
    await rt.applier.apply_ids(ids)
    t = await tally(rt.store, rt.settings.pds_url, user.sub, user.did)
    assert not any(t.values()), figures(t)


@pytest.mark.settings(lane_deadline=5.0)
async def test_inserts_whose_intents_outlived_a_kill_then_nuked_are_deleted(
    rt: Runtime, users: Users
) -> None:
    """Two inserts killed after their intents (never sent), then the user nukes and posts a
    new mood: one apply must delete nothing that is not there and mirror the new mood
    (`applyWrites#delete` of a missing record is refused)."""
    user = await users.make()
    assert user.did
    ids = [await insert_mood(rt.store, user.sub, f"mood {i}", when=BASE) for i in range(2)]
    await _intents_as_a_kill_leaves_them(rt, user.sub, ids)
    await rt.store.docs.update_many({"user": user.sub}, {"$set": {"deleted": True}})
    new = await insert_mood(rt.store, user.sub, "after the nuke", when=BASE)
    await rt.applier.apply_ids([*ids, new])
    t = await tally(rt.store, rt.settings.pds_url, user.sub, user.did)
    assert not any(t.values()), figures(t)


async def test_purge_applied_with_the_users_next_mood_still_sweeps(
    rt: Runtime, users: Users
) -> None:
    """What the replay after that kill is: the purge's deletes and the user's next mood in one
    apply. The old writer's records of the purged moods must go too."""
    user = await users.make()
    assert user.did
    ids = [await insert_mood(rt.store, user.sub, f"mood {i}", when=BASE) for i in range(2)]
    await rt.applier.apply_ids(ids)
    await put_legacy(rt.settings.pds_url, user, ids, 2)
    await rt.store.docs.delete_many({"user": user.sub})
    new = await insert_mood(rt.store, user.sub, "after the purge", when=BASE)
    await rt.applier.apply_ids([*ids, new])
    t = await tally(rt.store, rt.settings.pds_url, user.sub, user.did)
    assert not any(t.values()), figures(t)
