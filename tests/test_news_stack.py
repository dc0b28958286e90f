"""News posts beside moods on the real stack: one stream, the second declared type end to end,
and an upgrade from the release before types that re-mirrors nothing."""

from __future__ import annotations

import io
import json
import shutil
import signal
import subprocess
import sys
import tarfile
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from bson import ObjectId

from replicator.config import Settings
from replicator.pds import WRITE_NSIDS
from replicator.recordtypes import NEWS
from replicator.runtime import Runtime, open_runtime
from replicator.store import Store
from replicator_dev.devstack.observe import listed_records

from .conftest import Users, env_for, with_settings
from .harness import eventually, records, running

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

ROOT = Path(__file__).resolve().parent.parent
WHEN = datetime(2026, 2, 12, 9, 30, 1, 250000, tzinfo=UTC)
# The last release before record types: what an upgrade starts from.
RELEASE_BEFORE_TYPES = "dbc290f"


@pytest.fixture
async def both(settings: Settings) -> AsyncIterator[Runtime]:
    async with open_runtime(with_settings(settings, record_types=("mood", "news"))) as runtime:
        yield runtime
        await runtime.store.client.drop_database(settings.db_name)


async def news_of(pds_url: str, did: str) -> dict[str, dict[str, Any]]:
    async with httpx.AsyncClient(timeout=30) as http:
        return await listed_records(http, pds_url, did, NEWS.nsid)


def post(user: str | None, **fields: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"_id": ObjectId(), "title": "A headline", "text": "", "url": "",
                           "when": WHEN, "status": "live", **fields}  # fmt: skip
    if user is not None:
        doc["user"] = user
    return doc


async def test_news_and_moods_flow_through_one_stream(both: Runtime, users: Users) -> None:
    alice = await users.make()
    assert alice.did is not None
    news = both.store.of(NEWS).docs
    pds = both.settings.pds_url
    live = post(alice.sub, text="The body", url="https://aesthetic.computer/news")
    async with running(both):
        await news.insert_one(live)
        await both.store.docs.insert_one({"_id": ObjectId(), "user": alice.sub,
                                          "mood": "reading the news", "when": WHEN})  # fmt: skip

        async def mirrored() -> bool:
            doc = await news.find_one({"_id": live["_id"]})
            rkey = ((doc or {}).get("atproto") or {}).get("rkey")
            return rkey in await news_of(pds, alice.did) and len(await records(pds, alice.did)) == 1

        await eventually(mirrored, 30, "the post and the mood mirrored")
        doc = await news.find_one({"_id": live["_id"]})
        assert doc is not None
        rkey = doc["atproto"]["rkey"]
        assert (await news_of(pds, alice.did))[rkey] == {
            "$type": "computer.aesthetic.news", "headline": "A headline", "body": "The body",
            "link": "https://aesthetic.computer/news", "when": "2026-02-12T09:30:01.250Z",
            "ref": str(live["_id"]),
        }  # fmt: skip

        await news.update_one({"_id": live["_id"]}, {"$set": {"title": "Edited"}})

        async def edited() -> bool:
            value = (await news_of(pds, alice.did)).get(rkey) or {}
            return value.get("headline") == "Edited"

        await eventually(edited, 30, "the edit mirrored in place")
        await news.update_one({"_id": live["_id"]}, {"$set": {"status": "dead"}})

        async def gone() -> bool:
            return rkey not in await news_of(pds, alice.did)

        await eventually(gone, 30, "the dead post's record deleted")
        await news.update_one({"_id": live["_id"]}, {"$set": {"status": "live"}})

        async def back() -> bool:
            return list(await news_of(pds, alice.did)) == [rkey]

        await eventually(back, 30, "the post restored under the same rkey")
    assert len(await records(pds, alice.did)) == 1  # the mood untouched by all of it


async def test_posts_not_ours_or_refused_are_never_written_and_the_rest_flows(
    both: Runtime, users: Users
) -> None:
    alice = await users.make()
    assert alice.did is not None
    news = both.store.of(NEWS).docs
    pds = both.settings.pds_url
    theirs = {"rkey": "3lbskyabcdef2", "uri": "at://did:plc:someone/app.bsky.feed.post/3lbsky",
              "did": "did:plc:someone"}  # fmt: skip
    external = post(alice.sub, external={"source": "bsky"}, atproto=dict(theirs))
    ownerless = post(None)
    untitled = post(alice.sub, title="")
    long_headline = post(alice.sub, title="x" * 301)
    long_body = post(alice.sub, text="y" * 10_001)
    fine = post(alice.sub, title="Still flowing")
    async with running(both):
        await news.insert_many([external, ownerless, untitled, long_headline, long_body, fine])

        async def flowed() -> bool:
            return [v["ref"] for v in (await news_of(pds, alice.did)).values()] == [
                str(fine["_id"])
            ]

        await eventually(flowed, 30, "the valid post mirrored")
        letters = both.store.of(NEWS).dead_letters

        async def reported() -> bool:
            return await letters.count_documents({}) == 3

        await eventually(reported, 30, "three dead letters")
    ext = await news.find_one({"_id": external["_id"]})
    assert ext is not None and ext["atproto"] == theirs  # never written
    nobody = await news.find_one({"_id": ownerless["_id"]})
    assert nobody is not None and "atproto" not in nobody
    reasons = {d["_id"]: d["reason"] async for d in letters.find({})}
    assert reasons == {
        str(untitled["_id"]): "title: empty",
        str(long_headline["_id"]): "title (headline): longer than maxLength 300 UTF-8 bytes (301)",
        str(long_body["_id"]): "text (body): longer than maxLength 10000 UTF-8 bytes (10001)",
    }
    assert await both.store.dead_letters.count_documents({}) == 0  # the moods' queue: none


async def test_backfill_audit_and_erasure_cover_news(both: Runtime, users: Users) -> None:
    from replicator.apply import Applier
    from replicator.audit import audit
    from replicator.backfill import Backfill

    alice = await users.make()
    assert alice.did is not None
    news = both.store.of(NEWS).docs
    pds = both.settings.pds_url
    await news.insert_many([post(alice.sub, title=f"post {i}") for i in range(3)])
    await both.store.docs.insert_one({"_id": ObjectId(), "user": alice.sub, "mood": "m",
                                      "when": WHEN})  # fmt: skip
    report = await Backfill(both.applier, fix=True).run([alice.sub], scope="test")
    assert report.users == 1
    assert len(await news_of(pds, alice.did)) == 3 and len(await records(pds, alice.did)) == 1
    dry = Applier(both.store, both.writer, both.pds, dry_run=True)
    audited = await audit(both.store, dry, both.applier, [alice.sub])
    assert audited.in_sync, audited.summary()
    await both.store.users.delete_one({"_id": alice.sub})  # the app erases alice
    await both.applier.erase_user(alice.sub)
    assert await news_of(pds, alice.did) == {} and await records(pds, alice.did) == {}
    for view in both.store.views:
        assert await view.ledger.count_documents({}) == 0, view.rtype


def _release_before_types(tmp: Path) -> Path:
    """The package as the release before types shipped it, from this repository's history."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed: the previous release cannot be extracted")
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", RELEASE_BEFORE_TYPES, "replicator", "lexicons"],
        capture_output=True, check=False,
    )  # fmt: skip
    if archive.returncode != 0:
        pytest.skip(f"commit {RELEASE_BEFORE_TYPES} is not in this clone's history (shallow?)")
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(tmp, filter="data")
    return tmp


async def test_an_upgrade_keeps_the_ledger_and_checkpoint_and_mirrors_nothing_again(
    settings: Settings, users: Users, tmp_path: Path
) -> None:
    old = _release_before_types(tmp_path / "release")
    alice = await users.make()
    assert alice.did is not None
    store: Store = users.store
    pds = settings.pds_url
    await store.docs.insert_many(
        [{"_id": ObjectId(), "user": alice.sub, "mood": f"mood {i}", "when": WHEN}
         for i in range(5)]
    )  # fmt: skip
    env = env_for(settings, PYTHONPATH=str(old), REPLICATOR_HTTP_ADDR="off")
    proc = subprocess.Popen([sys.executable, "-m", "replicator.cli", "backfill"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    assert proc.wait(timeout=120) == 0, proc.stdout.read() if proc.stdout else ""
    proc = subprocess.Popen([sys.executable, "-m", "replicator.cli", "run"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    try:

        async def checkpointed() -> bool:
            return await store.load_checkpoint() is not None

        await eventually(checkpointed, 60, "the old release's checkpoint")
        await store.docs.insert_one({"_id": ObjectId(), "user": alice.sub, "mood": "late",
                                     "when": WHEN})  # fmt: skip

        async def six() -> bool:
            return len(await records(pds, alice.did)) == 6

        await eventually(six, 60, "the old release mirrored the late mood")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    before = await records(pds, alice.did)
    ledger = {d["_id"]: d async for d in store.ledger.find({})}
    checkpoint = await store.load_checkpoint()
    assert len(ledger) == 6 and checkpoint is not None and checkpoint.get("token")

    news = post(alice.sub, title="after the upgrade")
    await store.of(NEWS).docs.insert_one(news)
    upgraded = with_settings(settings, record_types=("mood", "news"))
    async with open_runtime(upgraded) as rt, running(rt):

        async def news_mirrored() -> bool:
            return len(await news_of(pds, alice.did)) == 1

        await eventually(news_mirrored, 60, "the existing post mirrored once news is enabled")
        # Nothing of the moods was written again: one write, the post's.
        assert sum(rt.pds.requests[n] for n in WRITE_NSIDS) == 1, rt.pds.requests
        await rt.store.docs.insert_one({"_id": ObjectId(), "user": alice.sub,
                                        "mood": "after", "when": WHEN})  # fmt: skip

        async def seven() -> bool:
            return len(await records(pds, alice.did)) == 7

        await eventually(seven, 30, "a new mood after the upgrade")
    after = await records(pds, alice.did)
    assert {k: v for k, v in after.items() if k in before} == before
    kept = {d["_id"]: d async for d in store.ledger.find({"_id": {"$in": list(ledger)}})}
    assert {k: (d["state"], d["rkey"], d["cid"]) for k, d in kept.items()} == {
        k: (d["state"], d["rkey"], d["cid"]) for k, d in ledger.items()
    }


def _cli(settings: Settings, *args: str) -> tuple[int, dict[str, Any], str]:
    env = env_for(settings, REPLICATOR_RECORD_TYPES="mood,news")
    out = subprocess.run([sys.executable, "-m", "replicator.cli", *args], env=env,
                         capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    try:
        payload = json.loads(out.stdout)
    except json.JSONDecodeError:
        payload = {}
    return out.returncode, payload, out.stderr


async def test_the_operator_commands_cover_news(settings: Settings, users: Users) -> None:
    """backfill, audit, status, dlq and check, each given `REPLICATOR_RECORD_TYPES`."""
    alice = await users.make()
    assert alice.did is not None
    store: Store = users.store
    await store.docs.insert_one({"_id": ObjectId(), "user": alice.sub, "mood": "m",
                                 "when": WHEN})  # fmt: skip
    bad = post(alice.sub, title="")
    await store.of(NEWS).docs.insert_many([post(alice.sub), post(alice.sub), bad])
    code, report, err = _cli(settings, "backfill", "--json")
    assert code == 0, err
    assert (report["moods"], report["written"], report["invalid"]) == (4, 3, 1), report
    assert len(await news_of(settings.pds_url, alice.did)) == 2
    code, report, err = _cli(settings, "audit", "--json")
    assert code == 0 and report["in_sync_percent"] == 100.0, (report, err)
    code, report, err = _cli(settings, "status", "--json")
    assert code == 0, err
    assert report["types"]["news"]["documents"] == 3 and report["types"]["mood"]["documents"] == 1
    assert report["types"]["news"]["ledger"] == {"invalid": 1, "present": 2}
    assert report["launch"]["records"] == 3 and report["dead_letters"]["invalid"] == 1
    env = env_for(settings, REPLICATOR_RECORD_TYPES="mood,news")
    shown = subprocess.run([sys.executable, "-m", "replicator.cli", "status"], env=env,
                           capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    assert "news-posts: 3 documents, 2 records, 1 dead letters" in shown.stdout, shown.stdout
    code, report, err = _cli(settings, "dlq", "list", "--json")
    assert code == 0, err
    assert [(e["id"], e["type"], e["reason"]) for e in report["dead_letters"]] == [
        (str(bad["_id"]), "news", "title: empty")
    ]
    out = subprocess.run([sys.executable, "-m", "replicator.cli", "check"], env=env,
                         capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    lines = out.stdout.splitlines()
    for name in ("changeStream moods, news-posts", "update news-posts", "update moods"):
        assert any(name in line for line in lines), (name, out.stdout, out.stderr)
