"""Helpers for integration tests: run the replicator in-process, wait for conditions, read
the PDS as any client would, and state what the PDS must hold (computed from Mongo)."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx

from replicator.desired import desired_state
from replicator.lexicon import LEXICON_DIR
from replicator.model import State
from replicator.recordtypes import MOOD
from replicator.runtime import Runtime
from replicator.store import Store
from replicator.stream import OpenStream, Replicator
from replicator_dev.devstack.observe import listed_records


async def eventually(
    check: Callable[[], Awaitable[bool]], timeout: float = 30.0, what: str = "condition"
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if await check():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout:.0f}s")
        await anyio.sleep(0.1)


def make_replicator(rt: Runtime, open_stream: OpenStream | None = None, **kw: Any) -> Replicator:
    s = rt.settings
    return Replicator(
        rt.store,
        rt.applier,
        batch_size=kw.pop("batch_size", s.batch_size),
        max_batch_ms=s.max_batch_ms,
        heartbeat_seconds=s.heartbeat_seconds,
        parked_retry_seconds=s.parked_retry_seconds,
        open_stream=open_stream,
        **kw,
    )


@asynccontextmanager
async def running(
    rt: Runtime, open_stream: OpenStream | None = None, **kw: Any
) -> AsyncIterator[Replicator]:
    replicator = make_replicator(rt, open_stream, **kw)
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(replicator.run, stop)

        async def is_open() -> bool:
            return replicator.stream_open

        await eventually(is_open, 20, "change stream open")
        try:
            yield replicator
        finally:
            stop.set()


async def records(pds_url: str, did: str) -> dict[str, dict[str, Any]]:
    """rkey → value, listing every page, as an AppView would."""
    async with httpx.AsyncClient(timeout=30) as http:
        return await listed_records(http, pds_url, did)


async def latest_rev(pds_url: str, did: str) -> str:
    async with httpx.AsyncClient() as http:
        resp = await http.get(
            f"{pds_url}/xrpc/com.atproto.sync.getLatestCommit", params={"did": did}
        )
        resp.raise_for_status()
        return str(resp.json()["rev"])


async def expected_records(store: Store, sub: str) -> dict[str, dict[str, Any]]:
    """What the user's collection must hold: one record per live mood, under the document's
    written-back `atproto.rkey`. Computed from Mongo alone."""
    account = (await store.accounts([sub]))[sub]
    out: dict[str, dict[str, Any]] = {}
    for doc in await store.moods_of_user(sub):
        desired = desired_state(MOOD, doc["_id"], doc, has_account=account is not None)
        if desired.state is State.PRESENT:
            rkey = (doc.get("atproto") or {}).get("rkey") or f"(not written back: {doc['_id']})"
            assert desired.record is not None
            out[rkey] = desired.record
    return out


async def diff(store: Store, pds_url: str, sub: str, did: str) -> dict[str, Any]:
    """Missing, unexpected and differing records between Mongo's desired state and the PDS."""
    want = await expected_records(store, sub)
    have = await records(pds_url, did)
    refs = [v.get("ref") for v in have.values()]
    return {
        "missing": sorted(set(want) - set(have)),
        "unexpected": sorted(set(have) - set(want)),
        "different": sorted(k for k in set(want) & set(have) if want[k] != have[k]),
        "duplicate_refs": sorted({r for r in refs if refs.count(r) > 1}),
    }


def clean(d: dict[str, Any]) -> bool:
    return not any(d.values())


async def tally(store: Store, pds_url: str, sub: str, did: str) -> dict[str, list[str]]:
    """`diff` as the figures of an exact mirror, each counted separately: `missing` (a live
    mood with no record), `duplicates` (a further record of a live mood), `dead` (a record of
    a deleted or nuked mood, or of no mood at all), `different` (a mood's record is not its
    desired record), `not_written_back` (a live mood's record exists but its rkey is not in
    the document's `atproto.rkey`). Exact: every list empty."""
    want = await expected_records(store, sub)
    have = await records(pds_url, did)
    by_ref: dict[str, list[str]] = {}
    for rkey, value in sorted(have.items()):
        by_ref.setdefault(str(value.get("ref")), []).append(rkey)
    kinds = ("missing", "duplicates", "dead", "different", "not_written_back")
    out: dict[str, list[str]] = {k: [] for k in kinds}
    claimed: set[str] = set()
    for rkey, record in want.items():
        if rkey not in have and rkey.startswith("(not written back") and by_ref.get(record["ref"]):
            out["not_written_back"].append(record["ref"])
            rkey = by_ref[record["ref"]][0]
        if rkey not in have:
            out["missing"].append(rkey)
            continue
        claimed.add(rkey)
        if have[rkey] != record:
            out["different"].append(rkey)
    live = {str(r["ref"]) for r in want.values()}
    for rkey in sorted(set(have) - claimed):
        out["duplicates" if str(have[rkey].get("ref")) in live else "dead"].append(rkey)
    return out


def figures(t: dict[str, list[str]]) -> str:
    return ", ".join(f"{len(v)} {k.replace('_', ' ')}" for k, v in t.items())


def changed_lexicons(tmp_path: Path, description: str) -> Path:
    """A copy of lexicons/ whose mood lexicon has another description: a lexicon that differs
    from the published one."""
    changed = tmp_path / "lexicons"
    shutil.copytree(LEXICON_DIR, changed)
    path = changed / "computer/aesthetic/mood.json"
    doc = json.loads(path.read_text())
    doc["defs"]["main"]["description"] = description
    path.write_text(json.dumps(doc))
    return changed
