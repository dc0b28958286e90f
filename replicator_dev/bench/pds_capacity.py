"""(a) What the PDS alone accepts on this machine, and (b) the old inline writer's way.

(a) is a direct load generator, no replicator involved: one session per account (logged in
once when the users are seeded), then for a fixed time `concurrency` workers, each on its own
slice of the repos (the PDS serialises writes per repo), send one commit after another as fast
as the PDS answers:

- `single_commits`: single-record `createRecord` commits;
- `apply_writes_batches`: `applyWrites` calls of 200 creates;
- `at_shape`: the commits a scenario itself produced (`shape`, measured through the probe):
  the same calls with the same numbers of records, interleaved in the same proportions
  (`replay_order`), from as many workers as the scenario had repos with a write in flight at
  most, over the same repos. A single write is `putRecord` with `swapRecord: null`, as the
  replicator sends a create.

Its records go to a collection of their own, so the mood collections the replicator
scenarios list stay exactly theirs.

(b) is what the app's HTTP handler does today, per mood: `createSession`, then `createRecord`,
one mood after another. Raw HTTP, no SDK overhead: an upper bound for the old writer.
"""

from __future__ import annotations

import itertools
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import anyio
import httpx
import orjson
from bson import ObjectId

from replicator.pds import APPLY_WRITES_MAX
from replicator.tid import from_object_id

from .common import BenchUser, percentile
from .shape import APPLY_WRITES

LOAD_COLLECTION = "computer.aesthetic.benchload"


def _record(i: int) -> dict[str, Any]:
    now = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return {"$type": LOAD_COLLECTION, "mood": f"load {i} ✨", "when": now,
            "ref": f"{i:024x}"}  # fmt: skip


def _client(pds_url: str, connections: int) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=f"{pds_url.rstrip('/')}/xrpc/",
        timeout=120,
        limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
    )


async def _post(
    http: httpx.AsyncClient, nsid: str, body: dict[str, Any], token: str | None = None
) -> httpx.Response:
    headers = {"content-type": "application/json"}
    if token:
        headers["authorization"] = f"Bearer {token}"
    return await http.post(nsid, content=orjson.dumps(body), headers=headers)


def _token(user: BenchUser) -> str:
    assert user.session is not None, "seeded users carry a session"
    return user.session.access


# One commit to send: (NSID, body, records it writes).
Call = tuple[str, dict[str, Any], int]


async def _drive(
    pds_url: str,
    users: Sequence[BenchUser],
    *,
    seconds: float,
    concurrency: int,
    call: Callable[[BenchUser, int], Call],
) -> tuple[int, int, int, Counter[int], list[float], float]:
    """`concurrency` workers, each on its own repos, sending `call(user, n)` commits as fast
    as the PDS answers for `seconds`: (workers, ok calls, records they wrote, statuses,
    latencies of the ok ones, elapsed)."""
    workers = max(1, min(concurrency, len(users)))
    statuses: Counter[int] = Counter()
    latencies: list[float] = []
    records = 0
    async with _client(pds_url, workers) as http:
        started = time.monotonic()
        deadline = started + seconds

        async def worker(w: int) -> None:
            nonlocal records
            mine = users[w::workers]
            i = 0
            while time.monotonic() < deadline:
                user = mine[i % len(mine)]
                nsid, body, count = call(user, i * workers + w)
                t = time.monotonic()
                resp = await _post(http, nsid, body, _token(user))
                statuses[resp.status_code] += 1
                if resp.status_code == 200:
                    latencies.append(time.monotonic() - t)
                    records += count
                i += 1

        async with anyio.create_task_group() as tg:
            for w in range(workers):
                tg.start_soon(worker, w)
        elapsed = time.monotonic() - started
    return workers, statuses[200], records, statuses, latencies, elapsed


def _creates(n: int, count: int) -> list[dict[str, Any]]:
    return [
        {"$type": "com.atproto.repo.applyWrites#create", "collection": LOAD_COLLECTION,
         "value": _record(n * APPLY_WRITES_MAX + j)}
        for j in range(count)
    ]  # fmt: skip


def _errors(statuses: Counter[int]) -> int:
    return sum(n for s, n in statuses.items() if s != 200)


def _p(latencies: list[float], q: float) -> float | None:
    return round(percentile(latencies, q) * 1000, 1) if latencies else None


async def single_commits(
    pds_url: str, users: Sequence[BenchUser], *, seconds: float, concurrency: int
) -> dict[str, Any]:
    """`createRecord` commits, `concurrency` in flight, each worker on its own repos."""
    driven = await _drive(
        pds_url, users, seconds=seconds, concurrency=concurrency,
        call=lambda user, n: ("com.atproto.repo.createRecord",
                              {"repo": user.did, "collection": LOAD_COLLECTION,
                               "record": _record(n)}, 1),
    )  # fmt: skip
    return {**_figures(*driven, digits=1), "latency_ms_p99": _p(driven[4], 99)}


async def apply_writes_batches(
    pds_url: str,
    users: Sequence[BenchUser],
    *,
    seconds: float,
    concurrency: int,
    batch: int = APPLY_WRITES_MAX,
) -> dict[str, Any]:
    """`applyWrites` of `batch` creates per call (one commit each), `concurrency` in flight."""

    def call(user: BenchUser, n: int) -> Call:
        return APPLY_WRITES, {"repo": user.did, "writes": _creates(n, batch)}, batch

    driven = await _drive(pds_url, users, seconds=seconds, concurrency=concurrency, call=call)
    return {**_figures(*driven), "batch": batch}


def _figures(
    workers: int,
    ok: int,
    records: int,
    statuses: Counter[int],
    latencies: list[float],
    elapsed: float,
    *,
    digits: int = 2,
) -> dict[str, Any]:
    """What every capacity run reports, from what `_drive` returns."""
    return {
        "commits": ok,
        "records": records,
        "seconds": round(elapsed, 3),
        "commits_per_s": round(ok / elapsed, digits),
        "records_per_s": round(records / elapsed, 1),
        "concurrency": workers,
        "errors": _errors(statuses),
        "latency_ms_p50": _p(latencies, 50),
    }


def replay_order(commit_sizes: Mapping[str, int]) -> list[tuple[str, int]]:
    """`{"applyWrites 50": 20, "putRecord 1": 10}` → the 30 (call, records), interleaved
    evenly (each kind at the middles of its equal shares of the cycle), so that any stretch
    of the replay, even a run shorter than one cycle, has the scenario's proportions."""
    slots: list[tuple[float, str, int]] = []
    for key, count in commit_sizes.items():
        name, _, records = key.partition(" ")
        slots += [((i + 0.5) / int(count), name, int(records)) for i in range(int(count))]
    return [(name, records) for _, name, records in sorted(slots)]


async def at_shape(
    pds_url: str, users: Sequence[BenchUser], *, seconds: float, shape: Mapping[str, Any]
) -> dict[str, Any]:
    """The scenario's commits (`shape` from `shape.summarize`), replayed as creates from as
    many workers as it had repos with a write in flight at most."""
    order = replay_order(shape.get("commit_sizes") or {})
    concurrency = (shape.get("repos_in_flight") or {}).get("max")
    if not order or not concurrency:
        raise RuntimeError("the scenario's commit shape was not measured (no commits seen)")
    unknown = {name for name, _ in order} - {"applyWrites", "putRecord", "createRecord"}
    if unknown:
        raise RuntimeError(f"cannot replay {', '.join(sorted(unknown))} commits as creates")
    sent: Counter[str] = Counter()
    turn = itertools.count()  # shared by the workers: the mix holds whoever is faster

    def call(user: BenchUser, n: int) -> Call:
        name, records = order[next(turn) % len(order)]
        sent[name] += 1
        if name == "applyWrites":
            return APPLY_WRITES, {"repo": user.did, "writes": _creates(n, records)}, records
        body: dict[str, Any] = {"repo": user.did, "collection": LOAD_COLLECTION,
                                "record": _record(n)}  # fmt: skip
        if name == "putRecord":
            body.update(rkey=from_object_id(ObjectId()), swapRecord=None)
        return f"com.atproto.repo.{name}", body, 1

    driven = await _drive(pds_url, users, seconds=seconds, concurrency=int(concurrency), call=call)
    ok, records = driven[1], driven[2]
    return {
        **_figures(*driven),
        "records_per_commit": round(records / ok, 2) if ok else None,
        "shape_records_per_commit": shape.get("records_per_commit"),
        "repos": len(users),
        "calls": dict(sent),
    }


async def old_approach(
    pds_url: str, users: Sequence[BenchUser], *, seconds: float, max_moods: int
) -> dict[str, Any]:
    """Per mood: `createSession` + `createRecord`, sequentially, as the app's handler does."""
    statuses: Counter[str] = Counter()
    login_s: list[float] = []
    write_s: list[float] = []
    done = 0
    async with _client(pds_url, 1) as http:
        started = time.monotonic()
        while done < max_moods and time.monotonic() - started < seconds:
            user = users[done % len(users)]
            t0 = time.monotonic()
            login = await _post(
                http, "com.atproto.server.createSession",
                {"identifier": user.handle, "password": user.password},
            )  # fmt: skip
            t1 = time.monotonic()
            statuses[f"createSession {login.status_code}"] += 1
            if login.status_code != 200:
                done += 1
                continue
            token = str(login.json()["accessJwt"])
            body = {"repo": user.did, "collection": LOAD_COLLECTION, "record": _record(done)}
            resp = await _post(http, "com.atproto.repo.createRecord", body, token)
            t2 = time.monotonic()
            statuses[f"createRecord {resp.status_code}"] += 1
            login_s.append(t1 - t0)
            write_s.append(t2 - t1)
            done += 1
        elapsed = time.monotonic() - started
    ok = statuses["createRecord 200"]
    return {
        "moods": ok,
        "seconds": round(elapsed, 3),
        "moods_per_s": round(ok / elapsed, 2),
        "login_ms_p50": round(percentile(login_s, 50) * 1000, 1) if login_s else None,
        "write_ms_p50": round(percentile(write_s, 50) * 1000, 1) if write_s else None,
        "errors": sum(n for k, n in statuses.items() if not k.endswith(" 200")),
    }
