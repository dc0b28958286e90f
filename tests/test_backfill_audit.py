"""Backfill and audit from a messy production-like state, through the real CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import httpx
import pytest
from bson import ObjectId

from replicator.config import Settings
from replicator.runtime import Runtime
from replicator_dev.devstack.seed import SeededUser

from .conftest import Users, env_for
from .harness import clean, diff, records

pytestmark = pytest.mark.anyio
T0 = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
NSID = "computer.aesthetic.mood"


def cli(settings: Settings, *args: str, timeout: float = 300) -> tuple[int, dict[str, Any], str]:
    out = subprocess.run(
        [sys.executable, "-m", "replicator.cli", *args, "--json"],
        env=env_for(settings), capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip
    try:
        payload = json.loads(out.stdout)
    except json.JSONDecodeError:
        payload = {}
    return out.returncode, payload, out.stderr


class OldWriter:
    """The app's old inline writer: log in, createRecord (PDS-assigned TID), one at a time."""

    def __init__(self, pds_url: str, user: SeededUser) -> None:
        self.http = httpx.AsyncClient(base_url=f"{pds_url}/xrpc/", timeout=30)
        self.user = user
        self.token = ""

    async def __aenter__(self) -> OldWriter:
        resp = await self.http.post("com.atproto.server.createSession",
                                    json={"identifier": self.user.did,
                                          "password": self.user.password})  # fmt: skip
        self.token = resp.json()["accessJwt"]
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.http.aclose()

    async def create(self, value: dict[str, Any]) -> str:
        resp = await self.http.post(
            "com.atproto.repo.createRecord",
            json={"repo": self.user.did, "collection": NSID, "record": value},
            headers={"authorization": f"Bearer {self.token}"},
        )
        resp.raise_for_status()
        return str(resp.json()["uri"]).rsplit("/", 1)[-1]


def record_of(doc: dict[str, Any], *, legacy: bool = False) -> dict[str, Any]:
    when = doc["when"].strftime("%Y-%m-%dT%H:%M:%S.") + f"{doc['when'].microsecond // 1000:03d}Z"
    key = "mongoId" if legacy else "ref"
    return {"$type": NSID, "mood": doc["mood"], "when": when, key: str(doc["_id"])}


async def mood(rt: Runtime, user: SeededUser, i: int, **extra: Any) -> dict[str, Any]:
    doc = {"_id": ObjectId(), "user": user.sub, "mood": f"{user.handle} mood {i}",
           "when": T0 + timedelta(minutes=i), **extra}  # fmt: skip
    await rt.store.docs.insert_one(doc)
    return doc


async def messy_state(rt: Runtime, users: Users) -> dict[str, SeededUser]:
    """Every kind of damage production has."""
    u = {name: await users.make() for name in
         ("old", "legacy", "dups", "orphans", "missing", "nuked", "empty_atproto")}  # fmt: skip
    u["noaccount"] = await users.make(with_account=False)
    async with OldWriter(rt.settings.pds_url, u["old"]) as w:  # old path, rkey written back
        for i in range(5):
            doc = await mood(rt, u["old"], i)
            rkey = await w.create(record_of(doc))
            await rt.store.docs.update_one({"_id": doc["_id"]}, {"$set": {"atproto.rkey": rkey}})
    async with OldWriter(rt.settings.pds_url, u["legacy"]) as w:  # `mongoId`, no write-back
        for i in range(3):
            await w.create(record_of(await mood(rt, u["legacy"], i), legacy=True))
    async with OldWriter(rt.settings.pds_url, u["dups"]) as w:  # interrupted migration
        for i in range(3):
            doc = await mood(rt, u["dups"], i)
            await w.create(record_of(doc))
            second = await w.create(record_of(doc))
            await rt.store.docs.update_one({"_id": doc["_id"]}, {"$set": {"atproto.rkey": second}})
    async with OldWriter(rt.settings.pds_url, u["orphans"]) as w:  # moods long gone
        await mood(rt, u["orphans"], 0)
        for _ in range(2):
            await w.create({"$type": NSID, "mood": "ghost", "when": "2024-01-01T00:00:00.000Z",
                            "ref": str(ObjectId())})  # fmt: skip
    for i in range(4):  # moods that never got a record
        await mood(rt, u["missing"], i)
    async with OldWriter(rt.settings.pds_url, u["nuked"]) as w:  # soft delete never synced
        for i in range(3):
            doc = await mood(rt, u["nuked"], i, deleted=True)
            await w.create(record_of(doc))
    async with OldWriter(rt.settings.pds_url, u["empty_atproto"]) as w:
        for i in range(2):
            await w.create(record_of(await mood(rt, u["empty_atproto"], i, atproto={})))
    for i in range(2):
        await mood(rt, u["noaccount"], i)
    return u


async def assert_clean(rt: Runtime, u: dict[str, SeededUser]) -> None:
    for name, user in u.items():
        if user.did is not None:
            found = await diff(rt.store, rt.settings.pds_url, user.sub, user.did)
            assert clean(found), (name, found)


async def test_backfill_then_audit_fix_ends_clean(rt: Runtime, users: Users) -> None:
    u = await messy_state(rt, users)
    old_rkeys = set(await records(rt.settings.pds_url, u["old"].did or ""))
    code, before, _ = cli(rt.settings, "audit")
    assert code == 1 and not before["in_sync"]
    div = before["divergences"]
    assert div["missing"] >= 4 and div["duplicate"] == 3 and div["orphan"] == 2
    assert div["stale"] == 3

    code, summary, err = cli(rt.settings, "backfill")
    assert code == 0, err
    assert summary["adopted"] >= 5 + 3 + 2  # old path, mongoId, atproto {}
    assert summary["duplicates"] == 3 and summary["orphans"] == 2
    assert summary["no_account_reasons"] == {"no ATProto account": 2}
    # Permalinks kept: the old writer's rkeys are still the records' keys.
    assert set(await records(rt.settings.pds_url, u["old"].did or "")) == old_rkeys

    code, report, err = cli(rt.settings, "audit", "--fix")
    assert code == 0, (report, err)
    assert (
        report["in_sync"] and report["repairs"]["delete"] + report["repairs"]["delete_orphan"] == 5
    )
    await assert_clean(rt, u)
    dups = await records(rt.settings.pds_url, u["dups"].did or "")
    docs = {str(d["_id"]): d async for d in rt.store.docs.find({"user": u["dups"].sub})}
    assert {k: v["ref"] for k, v in dups.items()} == {
        d["atproto"]["rkey"]: ref for ref, d in docs.items()
    }  # the duplicate kept is the one atproto.rkey pointed to

    code, again, _ = cli(rt.settings, "backfill")
    assert code == 0 and again["written"] == 0 and again["deleted"] == 0
    code, final, _ = cli(rt.settings, "audit")
    assert code == 0 and final["in_sync_percent"] == 100.0


async def test_dry_run_writes_nothing(rt: Runtime, users: Users) -> None:
    u = await messy_state(rt, users)
    snapshot = {n: await records(rt.settings.pds_url, x.did) for n, x in u.items() if x.did}
    ledger_before = await rt.store.ledger.count_documents({})
    code, summary, err = cli(rt.settings, "backfill", "--dry-run", "--fix")
    assert code == 0, err
    assert summary["dry_run"] and summary["written"] > 0
    assert {n: await records(rt.settings.pds_url, x.did) for n, x in u.items() if x.did} == snapshot
    assert await rt.store.ledger.count_documents({}) == ledger_before
    assert await rt.store.docs.count_documents({"atproto.rkey": {"$exists": True}}) == 5 + 3


async def test_backfill_for_one_handle(rt: Runtime, users: Users) -> None:
    u = await messy_state(rt, users)
    handle = u["missing"].handle.split(".")[0]
    code, summary, _ = cli(rt.settings, "backfill", "--user", f"@{handle}")
    assert code == 0 and summary["users"] == 1 and summary["written"] == 4
    code, _, err = cli(rt.settings, "backfill", "--user", "@nobody-here")
    assert code == 2 and "unknown user" in err


@pytest.mark.slow
async def test_interrupted_backfill_resumes_without_duplicates(rt: Runtime, users: Users) -> None:
    people = [await users.make() for _ in range(12)]
    for person in people:
        await rt.store.docs.insert_many(
            [{"user": person.sub, "mood": f"m{i}", "when": T0 + timedelta(seconds=i)}
             for i in range(25)]
        )  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "replicator.cli", "backfill", "--concurrency", "1",
         "--rate", "60", "--json"],
        env=env_for(rt.settings), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # kill -9 once some, but not all, users are done
        done = await rt.store.db["replicator_backfill"].count_documents({})
        if done >= 2:
            break
        await anyio.sleep(0.1)
    proc.kill()
    proc.wait(10)
    done = await rt.store.db["replicator_backfill"].count_documents({})
    assert 2 <= done < len(people)
    code, summary, err = cli(rt.settings, "backfill")
    assert code == 0, err
    assert summary["users_already_done"] == done
    for person in people:
        assert len(await records(rt.settings.pds_url, person.did or "")) == 25
        assert clean(await diff(rt.store, rt.settings.pds_url, person.sub, person.did or ""))
    code, report, _ = cli(rt.settings, "audit")
    assert code == 0 and report["in_sync"]
