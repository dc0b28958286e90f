"""Soak test: minutes of mixed load on `moods` while the replicator, the PDS and MongoDB fail.

    python scripts/soak.py --minutes 30 [--seed N] [--users 30] [--json FILE]

It starts its own stack in a fresh directory (the embedded MongoDB wire-protocol server and the
reference PDS, started directly so they can be restarted), seeds users (most with an ATProto
account, a few without), runs `replicator run` as a subprocess, and drives a steady mix of
inserts, edits, nukes, un-nukes, purges and bad documents. One fault at a time, at random
intervals, it kills the replicator with SIGKILL (restarted 1-10 s later), restarts the PDS
(down 5-60 s) or restarts MongoDB (down 2-10 s; the load retries what failed). At the end it
lets the replicator catch up, runs `replicator audit --json`, and compares Mongo with the PDS
on its own: every live, non-deleted, valid mood of a user with an account must have exactly
one record, and no other record may exist. Exit 0 iff nothing was lost or duplicated and the
audit is in sync; 1 otherwise; 2 if the soak itself could not run.

The embedded server keeps change history for only the last 1000 changes of a collection (a
real replica set keeps hours in its oplog). So that a replicator outage never outlives that
history, the load pauses while the replicator's checkpoint is more than `LAG_PAUSE` changes
behind the head of the stream, and a PDS outage is cut short past `LAG_CUT`. The checkpoint's
position is its resume token (`nx:<row>`), the head is read from the server's SQLite file; on
other servers the guard is off.

A replicator process that exits on its own is restarted (as a supervisor would) and reported;
one that stays up while its checkpoint does not move for `STALL_SECONDS` although changes wait
(outside faults) is reported as stalled and restarted (as a liveness probe would).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import re
import secrets
import shutil
import signal
import sqlite3
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import anyio
import httpx
from bson import ObjectId
from pymongo import AsyncMongoClient
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import ConnectionFailure, DuplicateKeyError, PyMongoError

from replicator.devstack.observe import listed_records
from replicator.devstack.procs import Child, free_port
from replicator.devstack.seed import SeededUser, seed_user
from replicator.devstack.servers import EmbeddedMongo, LocalPDS
from replicator.store import Names, Store

Doc = dict[str, Any]
T = TypeVar("T")

DB_NAME = "soak"
REPO = Path(__file__).resolve().parent.parent
NAMES = Names()
MOOD_NSID = "computer.aesthetic.mood"
MAX_MOOD_BYTES = 5000  # lexicons/computer/aesthetic/mood.json, maxLength (UTF-8 bytes)

# Change-history guard for the embedded server (1000 changes of history per collection).
LAG_PAUSE = 600  # the load waits while the checkpoint is this many changes behind...
LAG_RESUME = 300  # ...until it is back under this
LAG_CUT = 750  # a PDS outage ends early past this
LAG_BEFORE_FAULT = 100  # a fault is injected only once the replicator has (nearly) caught up
# A replicator is stalled when changes wait and its checkpoint has not moved for this long,
# outside faults (a PDS outage holds it back legitimately).
STALL_SECONDS = 90.0
STALL_LAG = 5

OPS = {"insert": 50, "edit": 26, "nuke": 4, "unnuke": 4, "purge": 1, "bad": 6}
BAD_KINDS = (
    "mood_missing",
    "mood_not_string",
    "mood_too_long",
    "when_string",
    "user_missing",
    "string_id",
)
FAULTS = ("kill_replicator", "restart_pds", "restart_mongo")
WORDS = [
    "sunny",
    "tired",
    "🌈",
    "ok",
    "zen",
    "groovy",
    "meh",
    "☕️",
    "rain",
    "😴",
    "✨",
    "ça va",
    "日本語",
    "emoji 👩‍💻",
    "line\nbreak",
    "tabs\there",
    "fine",
    "loud",
    "🎹",
]


class SoakError(RuntimeError):
    """The soak itself could not go on (not a finding about the replicator)."""


def now() -> float:
    return time.monotonic()


def rowid(token: Mapping[str, Any] | None) -> int | None:
    """The embedded server's resume tokens are `{"_data": "nx:<changelog row>"}`."""
    data = token.get("_data") if isinstance(token, Mapping) else None
    match = re.fullmatch(r"nx:(\d+)", data) if isinstance(data, str) else None
    return int(match.group(1)) if match else None


@dataclass
class Stats:
    started: float = field(default_factory=now)
    ops: Counter[str] = field(default_factory=Counter)
    bad: Counter[str] = field(default_factory=Counter)
    bad_by_user: Counter[str] = field(default_factory=Counter)
    writes: int = 0  # documents written by the load (inserted, modified, deleted)
    faults: Counter[str] = field(default_factory=Counter)
    fault_seconds: dict[str, float] = field(default_factory=dict)
    mongo_retries: int = 0  # load operations retried because MongoDB was down
    load_errors: Counter[str] = field(default_factory=Counter)
    throttled_seconds: float = 0.0
    max_lag: int = 0
    replicator_starts: int = 0
    unexpected_exits: list[dict[str, Any]] = field(default_factory=list)
    stalls: list[dict[str, Any]] = field(default_factory=list)
    head_start: int | None = None


class Timeline:
    """`soak.log`: one JSON line per fault, restart and pause, for the evidence."""

    def __init__(self, path: Path, verbose: bool) -> None:
        self.path = path
        self.verbose = verbose
        self.t0 = now()

    def __call__(self, event: str, **data: Any) -> None:
        line = {
            "t": round(now() - self.t0, 1),
            "at": datetime.now(UTC).isoformat(),
            "event": event,
            **data,
        }
        with self.path.open("a") as f:
            f.write(json.dumps(line, default=str) + "\n")
        if self.verbose:
            detail = " ".join(f"{k}={v}" for k, v in data.items())
            print(f"[{line['t']:>7.1f}s] {event} {detail}", flush=True)


class ReplicatorProcess:
    """`python -m replicator.cli run`, as production runs it; its log is appended to."""

    def __init__(self, env: dict[str, str], log_path: Path, stats: Stats, log: Timeline):
        self.env = env
        self.log_path = log_path
        self.stats = stats
        self.timeline = log
        self.child: Child | None = None
        self.expected_down = False
        self.started_at = now()

    def start(self) -> None:
        self.child = Child(
            "replicator",
            [sys.executable, "-m", "replicator.cli", "run"],
            self.log_path,
            env=self.env,
            cwd=self.log_path.parent,
        )
        self.stats.replicator_starts += 1
        self.started_at = now()
        self.expected_down = False
        self.timeline("replicator_started", pid=self.child.pid)

    def alive(self) -> bool:
        return self.child is not None and self.child.alive()

    def kill9(self) -> None:
        assert self.child is not None
        self.expected_down = True
        self.child.kill()

    def stop(self) -> int | None:
        """SIGTERM (SIGKILL after 10 s); the exit code."""
        if self.child is None:
            return None
        self.expected_down = True
        if not self.child.alive():
            self.child.stop()
            return self.child.proc.returncode
        self.child.stop(timeout=20)
        return self.child.proc.returncode


# -- the load ---------------------------------------------------------------------------------


def mood_text(rng: random.Random) -> str:
    roll = rng.random()
    if roll < 0.01:
        return "x" * rng.randint(4000, MAX_MOOD_BYTES)  # long, still valid
    words = rng.choices(WORDS, k=rng.randint(1, 8))
    return f"{' '.join(words)} #{rng.randint(0, 10**6)}"


def mood_when(rng: random.Random) -> datetime:
    if rng.random() < 0.1:
        return datetime(2020, 1, 1, tzinfo=UTC) + timedelta(milliseconds=rng.randint(0, 2**40))
    return datetime.now(UTC)


class Load:
    """One task doing operations at `rate`/s, sequentially; Mongo outages are waited out."""

    def __init__(
        self,
        moods: AsyncCollection[Doc],
        users: list[SeededUser],
        rng: random.Random,
        stats: Stats,
        log: Timeline,
        *,
        rate: float,
        lag: Callable[[], int | None],
        mongo_up: Callable[[], anyio.Event],
    ) -> None:
        self.moods = moods
        self.users = users
        self.rng = rng
        self.stats = stats
        self.log = log
        self.rate = rate
        self.lag = lag
        self.mongo_up = mongo_up
        self.ids: dict[str, list[ObjectId]] = {u.sub: [] for u in users}
        self.nuked: set[str] = set()
        self.bulk_done = anyio.Event()  # set after each nuke/un-nuke/purge (for timed kills)

    async def run(self, until: float) -> None:
        kinds, weights = list(OPS), list(OPS.values())
        while now() < until:
            await self._throttle()
            started = now()
            kind = self.rng.choices(kinds, weights)[0]
            done = await self._op(kind)
            if done:
                self.stats.ops[done] += 1
            pause = self.rng.uniform(0.5, 1.5) / self.rate - (now() - started)
            if pause > 0:
                await anyio.sleep(pause)

    async def _throttle(self, size: int = 1) -> None:
        """Wait while the replicator is too far behind for `size` more changes."""
        lag = self.lag()
        if lag is None or lag + size <= LAG_PAUSE:
            return
        self.log("load_paused", lag=lag, next_op_changes=size)
        began = now()
        while (lag := self.lag()) is not None and lag > LAG_RESUME:  # noqa: ASYNC110 - polled
            await anyio.sleep(0.5)
        self.stats.throttled_seconds += now() - began
        self.log("load_resumed", lag=lag, paused_s=round(now() - began, 1))

    async def _retry(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        """Retry `call` while MongoDB is down (planned or not); other errors propagate."""
        first = now()
        retried = False
        while True:
            try:
                result = await call()
            except ConnectionFailure as exc:
                if now() - first > 180:
                    raise SoakError(f"{what}: MongoDB unreachable for 180 s ({exc})") from exc
                if not retried:
                    retried = True
                    self.stats.mongo_retries += 1
                    if self.mongo_up().is_set():
                        self.stats.load_errors[f"unplanned {type(exc).__name__}"] += 1
                await self.mongo_up().wait()
                await anyio.sleep(0.3)
                continue
            return result

    async def _insert(self, doc: Doc) -> None:
        doc.setdefault("_id", ObjectId())

        async def once() -> None:
            # DuplicateKeyError: an earlier attempt got through before the connection broke.
            with contextlib.suppress(DuplicateKeyError):
                await self.moods.insert_one(dict(doc))

        await self._retry("insert", once)
        self.stats.writes += 1

    def _user(self, *, with_moods: bool = False) -> SeededUser | None:
        pool = [u for u in self.users if self.ids[u.sub]] if with_moods else self.users
        return self.rng.choice(pool) if pool else None

    async def _op(self, kind: str) -> str | None:
        try:
            return await getattr(self, f"_op_{kind}")()  # type: ignore[no-any-return]
        except SoakError:
            raise
        except PyMongoError as exc:
            self.stats.load_errors[f"{kind}: {type(exc).__name__}"] += 1
            self.log("load_error", op=kind, error=f"{type(exc).__name__}: {exc}")
            return None

    async def _op_insert(self) -> str:
        user = self._user()
        assert user is not None
        oid = ObjectId()
        await self._insert(
            {"_id": oid, "user": user.sub, "mood": mood_text(self.rng), "when": mood_when(self.rng)}
        )
        self.ids[user.sub].append(oid)
        return "insert"

    async def _op_edit(self) -> str | None:
        user = self._user(with_moods=True)
        if user is None:
            return await self._op_insert()
        oid = self.rng.choice(self.ids[user.sub])
        if self.rng.random() < 0.15:
            # A full replace, as an admin tool would: `atproto.rkey` is dropped and must come
            # back unchanged (the permalink).
            doc = await self._retry("find", lambda: self.moods.find_one({"_id": oid}))
            if doc is None:
                return None
            new = {k: v for k, v in doc.items() if k not in ("_id", "atproto")}
            new["mood"] = mood_text(self.rng)
            result = await self._retry("replace", lambda: self.moods.replace_one({"_id": oid}, new))
            self.stats.writes += result.modified_count
            return "replace"
        text = mood_text(self.rng)
        res = await self._retry(
            "edit", lambda: self.moods.update_one({"_id": oid}, {"$set": {"mood": text}})
        )
        self.stats.writes += res.modified_count
        return "edit"

    async def _op_nuke(self) -> str | None:
        pool = [u for u in self.users if self.ids[u.sub] and u.sub not in self.nuked]
        if not pool:
            return None
        user = self.rng.choice(pool)
        await self._throttle(self._size(user))
        res = await self._retry(
            "nuke",
            lambda: self.moods.update_many({"user": user.sub}, {"$set": {"deleted": True}}),
        )
        self.nuked.add(user.sub)
        self.stats.writes += res.modified_count
        self._bulk()
        return "nuke"

    async def _op_unnuke(self) -> str | None:
        pool = [u for u in self.users if u.sub in self.nuked]
        if not pool:
            return None
        user = self.rng.choice(pool)
        await self._throttle(self._size(user))
        res = await self._retry(
            "unnuke",
            lambda: self.moods.update_many({"user": user.sub}, {"$set": {"deleted": False}}),
        )
        self.nuked.discard(user.sub)
        self.stats.writes += res.modified_count
        self._bulk()
        return "unnuke"

    async def _op_purge(self) -> str | None:
        user = self._user(with_moods=True)
        if user is None:
            return None
        await self._throttle(self._size(user))
        res = await self._retry("purge", lambda: self.moods.delete_many({"user": user.sub}))
        self.ids[user.sub] = []
        self.stats.bad_by_user[user.sub] = 0
        self.nuked.discard(user.sub)
        self.stats.writes += res.deleted_count
        self._bulk()
        return "purge"

    async def _op_bad(self) -> str:
        user = self.rng.choice([u for u in self.users if u.has_account] or self.users)
        kind = self.rng.choice(BAD_KINDS)
        doc: Doc = {"user": user.sub, "mood": mood_text(self.rng), "when": datetime.now(UTC)}
        if kind == "mood_missing":
            del doc["mood"]
        elif kind == "mood_not_string":
            doc["mood"] = self.rng.choice([42, 3.5, ["a", "list"], {"text": "obj"}, True])
        elif kind == "mood_too_long":
            doc["mood"] = "é" * 3000  # 6000 UTF-8 bytes > maxLength 5000
        elif kind == "when_string":
            doc["when"] = "2024-05-01T12:00:00Z"
        elif kind == "user_missing":
            del doc["user"]
        elif kind == "string_id":
            doc["_id"] = f"bad-{secrets.token_hex(8)}"
        await self._insert(doc)
        self.stats.bad[kind] += 1
        if kind != "user_missing":
            self.stats.bad_by_user[user.sub] += 1
        return "bad"

    def _size(self, user: SeededUser) -> int:
        """About how many change events a bulk write of this user's moods makes."""
        return len(self.ids[user.sub]) + self.stats.bad_by_user[user.sub]

    def _bulk(self) -> None:
        self.bulk_done.set()
        self.bulk_done = anyio.Event()


# -- the soak ---------------------------------------------------------------------------------


@dataclass
class Options:
    minutes: float
    seed: int
    users: int
    without_account: int
    rate: float
    fault_min: float
    fault_max: float
    faults: tuple[str, ...]
    json_path: Path | None
    directory: Path | None
    keep: bool
    verbose: bool


class Soak:
    def __init__(self, opts: Options, workdir: Path) -> None:
        self.opts = opts
        self.dir = workdir
        self.rng = random.Random(opts.seed)
        self.stats = Stats()
        self.log = Timeline(workdir / "soak.log", opts.verbose)
        self.mongo = EmbeddedMongo(workdir / "mongo")
        self.pds = LocalPDS(workdir / "pds")
        self.replicator: ReplicatorProcess | None = None
        self.client: AsyncMongoClient[Doc] | None = None
        self.store: Store | None = None
        self.users: list[SeededUser] = []
        self.lag: int | None = None
        self.head: int | None = None
        self.head_changed_at = now()
        self.mark: int | None = None  # the checkpoint's position, and when it last moved
        self.mark_changed_at = now()
        self.mongo_up = anyio.Event()  # replaced by an unset one while MongoDB is down
        self.fault_now: str | None = None
        self.last_fault: tuple[str, float] | None = None
        self.load_seconds = 0.0
        self.code: dict[str, Any] = {}
        self.http_port = free_port()  # the replicator's /metrics; not the shared default
        self.caught_up_after: float | None = None

    # -- plumbing ---------------------------------------------------------------------------

    @property
    def moods(self) -> AsyncCollection[Doc]:
        assert self.store is not None
        return self.store.moods

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(self.dir / "code"), *filter(None, [os.environ.get("PYTHONPATH")])]
        )
        env.update(
            MONGODB_CONNECTION_STRING=self.mongo.uri,
            MONGODB_NAME=DB_NAME,
            PDS_URL=self.pds.url,
            REPLICATOR_MOODS_COLLECTION=NAMES.moods,
            REPLICATOR_USERS_COLLECTION=NAMES.users,
            REPLICATOR_HANDLES_COLLECTION=NAMES.handles,
            REPLICATOR_LOG_LEVEL="WARNING",
            REPLICATOR_LOG_FORMAT="json",
            REPLICATOR_HTTP_ADDR=f"127.0.0.1:{self.http_port}",
        )
        return env

    async def positions(self) -> tuple[int | None, Doc | None]:
        """(head of the moods change stream, the replicator's checkpoint document)."""
        head = await anyio.to_thread.run_sync(self.head_row)
        assert self.store is not None
        return head, await self.store.load_checkpoint()

    def head_row(self) -> int | None:
        """The last change-log row of `moods`, read from the embedded server's SQLite file.

        Not through a change stream of our own: the embedded server numbers its cursors from
        1000 again after every restart, so a stream of ours could answer the replicator's
        stale cursor id (bug report in the soak notes) and the soak would disturb what it
        measures."""
        path = self.mongo.data_dir / f"{DB_NAME}.db"
        if not path.exists():
            return None
        try:
            with contextlib.closing(
                sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
            ) as db:
                row = db.execute(
                    "SELECT COALESCE(MAX(id), 0) FROM _neosqlite_changestream"
                    " WHERE collection_name = ?",
                    (NAMES.moods,),
                ).fetchone()
        except sqlite3.Error:
            return None
        return int(row[0]) if row and row[0] is not None else None

    async def monitor(self) -> None:
        """Every second: the replicator's lag, in changes; restarts a replicator that died."""
        while True:
            if self.mongo_up.is_set():
                try:
                    head, checkpoint = await self.positions()
                except PyMongoError:
                    head, checkpoint = None, None
                mark = rowid(checkpoint.get("token")) if checkpoint else None
                if head is not None:
                    if head != self.head:
                        self.head, self.head_changed_at = head, now()
                    if mark is not None:
                        self.lag = max(0, head - mark)
                        self.stats.max_lag = max(self.stats.max_lag, self.lag)
                if mark is not None and mark != self.mark:
                    self.mark, self.mark_changed_at = mark, now()
            rep = self.replicator
            if rep is not None and rep.alive() and not rep.expected_down:
                await self.watchdog(rep)
            if (
                rep is not None
                and rep.child is not None
                and not rep.expected_down
                and not rep.alive()
            ):
                code = rep.child.proc.returncode
                context = self.context()
                exit_at = round(now() - self.stats.started, 1)
                self.stats.unexpected_exits.append({"t": exit_at, "code": code, "when": context})
                self.log("replicator_exited_unexpectedly", code=code, when=context)
                rep.child.stop()
                rep.start()  # as a supervisor would
            await anyio.sleep(1.0)

    def context(self) -> str:
        if self.fault_now:
            return f"during {self.fault_now}"
        if self.last_fault:
            return f"{now() - self.last_fault[1]:.1f}s after {self.last_fault[0]}"
        return "no fault yet"

    async def watchdog(self, rep: ReplicatorProcess) -> None:
        """A replicator that is up but whose checkpoint has not moved for `STALL_SECONDS` while
        changes wait (outside faults) is stalled: reported, then restarted as a liveness probe
        would, so that the soak goes on."""
        if self.fault_now or self.lag is None or self.lag <= STALL_LAG:
            return
        quiet_since = max(
            self.mark_changed_at, rep.started_at, self.last_fault[1] if self.last_fault else 0.0
        )
        if now() - quiet_since < STALL_SECONDS:
            return
        stall = {
            "t": round(now() - self.stats.started, 1),
            "lag": self.lag,
            "checkpoint": f"nx:{self.mark}",
            "stalled_s": round(now() - quiet_since, 1),
            "when": self.context(),
            "pid": rep.child.pid if rep.child else None,
        }
        self.stats.stalls.append(stall)
        self.log("replicator_stalled", **stall)
        rep.kill9()
        rep.start()

    async def progress(self) -> None:
        while True:
            await anyio.sleep(30)
            s = self.stats
            print(
                f"[{now() - s.started:>6.0f}s] ops={sum(s.ops.values())} writes={s.writes} "
                f"faults={sum(s.faults.values())} bad={sum(s.bad.values())} lag={self.lag} "
                f"max_lag={s.max_lag} fault={self.fault_now or '-'}",
                flush=True,
            )

    async def wait_lag(self, below: int) -> None:
        while self.lag is None or self.lag > below:  # noqa: ASYNC110 - a polled value
            await anyio.sleep(0.5)

    # -- faults -----------------------------------------------------------------------------

    async def faults(self, until: float, load: Load) -> None:
        bag: list[str] = []
        while self.opts.faults:
            wait = self.rng.uniform(self.opts.fault_min, self.opts.fault_max)
            if now() + wait >= until:
                return
            await anyio.sleep(wait)
            with anyio.move_on_after(120):
                await self.wait_lag(LAG_BEFORE_FAULT)
            if not bag:
                bag = list(self.opts.faults)
                self.rng.shuffle(bag)
            kind = bag.pop()
            self.fault_now = kind
            began = now()
            await getattr(self, f"_fault_{kind}")(load)
            self.stats.faults[kind] += 1
            self.stats.fault_seconds[kind] = self.stats.fault_seconds.get(kind, 0.0) + now() - began
            self.fault_now = None
            self.last_fault = (kind, now())

    async def _fault_kill_replicator(self, load: Load) -> None:
        assert self.replicator is not None
        timed = ""
        if self.rng.random() < 0.5:
            # Right after a burst (nuke / un-nuke / purge), while it is being applied.
            with anyio.move_on_after(30):
                await load.bulk_done.wait()
                await anyio.sleep(self.rng.uniform(0.0, 1.5))
                timed = "after a bulk write"
        self.replicator.kill9()
        down = self.rng.uniform(1, 10)
        self.log("fault_kill_replicator", down_s=round(down, 1), lag=self.lag, timing=timed)
        await anyio.sleep(down)
        self.replicator.start()

    async def _fault_restart_pds(self, load: Load) -> None:
        await anyio.to_thread.run_sync(self.pds.pause)
        planned = self.rng.uniform(5, 60)
        self.log("fault_pds_down", planned_s=round(planned, 1), lag=self.lag)
        began = now()
        while now() - began < planned:
            if self.lag is not None and self.lag > LAG_CUT:
                self.log("pds_outage_cut_short", lag=self.lag)
                break
            await anyio.sleep(0.5)
        await anyio.to_thread.run_sync(self.pds.resume)
        self.log("pds_up", down_s=round(now() - began, 1))

    async def _fault_restart_mongo(self, load: Load) -> None:
        port = self.mongo.port
        self.mongo_up = anyio.Event()
        await anyio.to_thread.run_sync(self.mongo.stop)
        down = self.rng.uniform(2, 10)
        self.log("fault_mongo_down", down_s=round(down, 1), lag=self.lag)
        await anyio.sleep(down)
        await anyio.to_thread.run_sync(self.mongo.start)
        if self.mongo.port != port:
            raise SoakError(f"MongoDB came back on port {self.mongo.port}, not {port}")
        self.mongo_up.set()
        self.log("mongo_up")

    # -- the run ----------------------------------------------------------------------------

    async def snapshot(self) -> None:
        """Copy the replicator's code: every restart runs the same code, however the working
        tree changes meanwhile (others edit it); the summary names the revision."""
        code = self.dir / "code"
        shutil.rmtree(code, ignore_errors=True)
        ignore = shutil.ignore_patterns("node_modules", "__pycache__", "*.pyc")
        shutil.copytree(REPO / "replicator", code / "replicator", ignore=ignore)
        shutil.copytree(REPO / "lexicons", code / "lexicons", ignore=ignore)
        digest = hashlib.sha256()
        for path in sorted(code.rglob("*")):
            if path.is_file():
                digest.update(str(path.relative_to(code)).encode() + b"\0" + path.read_bytes())
        check = await anyio.run_process(
            [sys.executable, "-c", "import replicator, replicator.cli; print(replicator.__file__)"],
            env=self.env(),
            cwd=self.dir,
            check=False,
        )
        where = check.stdout.decode().strip()
        if check.returncode != 0 or not where.startswith(str(code)):
            raise SoakError(f"the code snapshot does not import: {check.stderr.decode()[-800:]}")
        head = await anyio.run_process(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], check=False
        )
        dirty = await anyio.run_process(
            ["git", "-C", str(REPO), "status", "--porcelain", "--", "replicator", "lexicons"],
            check=False,
        )
        self.code = {
            "git_head": head.stdout.decode().strip() or None,
            "uncommitted_files": [line[3:] for line in dirty.stdout.decode().splitlines()],
            "sha256": digest.hexdigest()[:16],
        }
        self.log("code_snapshot", **self.code)

    async def setup(self) -> None:
        await self.snapshot()
        await anyio.to_thread.run_sync(self.mongo.start)
        self.mongo_up.set()
        await anyio.to_thread.run_sync(self.pds.start)
        self.log("stack_up", mongo=self.mongo.uri, pds=self.pds.url, dir=str(self.dir))
        self.client = AsyncMongoClient(self.mongo.uri, tz_aware=True, serverSelectionTimeoutMS=2000)
        self.store = Store(self.client, DB_NAME, NAMES)
        n, without = self.opts.users, min(self.opts.without_account, self.opts.users)
        for i in range(n):
            self.users.append(
                await seed_user(
                    self.store,
                    self.pds.url,
                    f"soak{i:02d}{secrets.token_hex(2)}",
                    with_account=i >= without,
                    admin_password=self.pds.admin_password,
                )
            )
        self.log("users_seeded", users=n, without_account=without)
        self.replicator = ReplicatorProcess(
            self.env(), self.dir / "replicator.log", self.stats, self.log
        )
        self.replicator.start()
        deadline = now() + 60
        while await self.store.load_checkpoint() is None:
            if now() > deadline or not self.replicator.alive():
                raise SoakError(f"the replicator made no first checkpoint; see {self.dir}")
            await anyio.sleep(0.2)
        head, _ = await self.positions()
        self.stats.head_start = head

    async def drive(self) -> None:
        assert self.store is not None
        until = now() + self.opts.minutes * 60
        load = Load(
            self.moods,
            self.users,
            self.rng,
            self.stats,
            self.log,
            rate=self.opts.rate,
            lag=lambda: self.lag,
            mongo_up=lambda: self.mongo_up,
        )
        self.stats.started = now()
        async with anyio.create_task_group() as tg:
            tg.start_soon(self.monitor)
            tg.start_soon(self.progress)
            async with anyio.create_task_group() as work:
                work.start_soon(load.run, until)
                work.start_soon(self.faults, until, load)
            self.load_seconds = now() - self.stats.started
            self.log("load_stopped", ops=sum(self.stats.ops.values()))
            self.caught_up_after = await self.catch_up()
            tg.cancel_scope.cancel()

    async def catch_up(self, limit: float = 300) -> float | None:
        """Until the checkpoint is at the head, fresh, and the head still for 10 s."""
        assert self.store is not None
        began = now()
        while now() - began < limit:
            checkpoint = await self.store.load_checkpoint()
            fresh = checkpoint is not None and time.time() - float(checkpoint["saved_at"]) < 15
            if fresh and self.lag == 0 and now() - self.head_changed_at >= 10:
                self.log("caught_up", after_s=round(now() - began, 1))
                return now() - began
            await anyio.sleep(1)
        self.log("not_caught_up", lag=self.lag)
        return None

    async def compare(self) -> dict[str, Any]:
        """Independently of the replicator: Mongo's live valid moods vs the PDS listing."""
        assert self.store is not None
        expected_total = records_total = skipped = 0
        lost: list[dict[str, Any]] = []
        duplicated: list[dict[str, Any]] = []
        mismatched: list[dict[str, Any]] = []
        wrong_rkey: list[dict[str, Any]] = []
        async with httpx.AsyncClient(timeout=30) as http:
            for user in self.users:
                docs = [d async for d in self.moods.find({"user": user.sub})]
                want = {str(d["_id"]): d for d in docs if valid_live(d)}
                if user.did is None:
                    skipped += len(want)
                    continue
                expected_total += len(want)
                have = await listed_records(http, self.pds.url, user.did)
                records_total += len(have)
                by_ref: dict[str, list[str]] = {}
                for rkey, value in have.items():
                    ref = value.get("ref")
                    by_ref.setdefault(ref if isinstance(ref, str) else "?", []).append(rkey)
                for ref, doc in want.items():
                    rkeys = by_ref.get(ref, [])
                    if not rkeys:
                        lost.append({"user": user.sub, "did": user.did, "ref": ref})
                        continue
                    value = have[rkeys[0]]
                    if value.get("mood") != doc["mood"] or value.get("when") != iso(doc["when"]):
                        mismatched.append({"did": user.did, "ref": ref, "rkey": rkeys[0]})
                    doc_rkey = (doc.get("atproto") or {}).get("rkey")
                    if len(rkeys) == 1 and doc_rkey != rkeys[0]:
                        wrong_rkey.append(
                            {"did": user.did, "ref": ref, "rkey": rkeys[0], "doc_rkey": doc_rkey}
                        )
                for ref, rkeys in by_ref.items():
                    extra = rkeys[1:] if ref in want else rkeys
                    for rkey in extra:
                        duplicated.append(
                            {
                                "did": user.did,
                                "ref": ref,
                                "rkey": rkey,
                                "kind": "duplicate" if ref in want else "orphan",
                            }
                        )
        for item in lost[:20] + duplicated[:20]:
            item["ledger"] = await self.ledger_entry(item["ref"])
            item["doc"] = await self.doc_summary(item["ref"])
        return {
            "expected": expected_total,
            "records": records_total,
            "no_account_moods": skipped,
            "lost": lost,
            "duplicated": duplicated,
            "mismatched": mismatched,
            "wrong_rkey": wrong_rkey,
        }

    async def ledger_entry(self, ref: str) -> Doc | None:
        assert self.store is not None
        return await self.store.ledger.find_one({"_id": ref})

    async def doc_summary(self, ref: str) -> Doc | None:
        if not ObjectId.is_valid(ref):
            return None
        doc = await self.moods.find_one({"_id": ObjectId(ref)})
        if doc is None:
            return None
        return {k: (v if k != "mood" or not isinstance(v, str) else v[:40]) for k, v in doc.items()}

    async def audit(self) -> dict[str, Any]:
        with anyio.fail_after(600):
            proc = await anyio.run_process(
                [sys.executable, "-m", "replicator.cli", "audit", "--json"],
                env=self.env(),
                cwd=self.dir,
                check=False,
            )
        try:
            report: dict[str, Any] = json.loads(proc.stdout)
        except ValueError:
            report = {"in_sync": False, "error": proc.stderr.decode(errors="replace")[-2000:]}
        report["exit_code"] = proc.returncode
        return report

    async def run(self) -> dict[str, Any]:
        await self.setup()
        await self.drive()
        comparison = await self.compare()
        if comparison["lost"] or comparison["duplicated"] or comparison["mismatched"]:
            # Give parked work (retried every minute) its chance, then look again.
            self.log(
                "not_converged_yet",
                lost=len(comparison["lost"]),
                duplicated=len(comparison["duplicated"]),
            )
            deadline = now() + 180
            while now() < deadline:
                await anyio.sleep(15)
                comparison = await self.compare()
                if not (comparison["lost"] or comparison["duplicated"] or comparison["mismatched"]):
                    break
        audit = await self.audit()
        assert self.replicator is not None
        sigterm_code = self.replicator.stop()
        head, _ = await self.positions()
        return self.summary(comparison, audit, sigterm_code, head)

    def summary(
        self,
        comparison: dict[str, Any],
        audit: dict[str, Any],
        sigterm: int | None,
        head: int | None,
    ) -> dict[str, Any]:
        s = self.stats
        events = (head - s.head_start) if head is not None and s.head_start is not None else None
        lost, dup = len(comparison["lost"]), len(comparison["duplicated"])
        ok = (
            lost == 0 and dup == 0 and not comparison["mismatched"] and audit.get("in_sync") is True
        )
        return {
            "result": "PASS" if ok else "FAIL",
            "seed": self.opts.seed,
            "minutes": self.opts.minutes,
            "users": len(self.users),
            "users_without_account": sum(1 for u in self.users if not u.has_account),
            "load_seconds": round(self.load_seconds, 1),
            "caught_up_after_seconds": (
                round(self.caught_up_after, 1) if self.caught_up_after is not None else None
            ),
            "operations": dict(s.ops),
            "operations_total": sum(s.ops.values()),
            "events": s.writes,
            "change_stream_events": events,
            "faults": dict(s.faults),
            "faults_total": sum(s.faults.values()),
            "fault_seconds": {k: round(v, 1) for k, v in s.fault_seconds.items()},
            "bad_documents": sum(s.bad.values()),
            "bad_documents_by_kind": dict(s.bad),
            "mongo_retries": s.mongo_retries,
            "load_errors": dict(s.load_errors),
            "load_paused_seconds": round(s.throttled_seconds, 1),
            "max_lag_changes": s.max_lag,
            "replicator_starts": s.replicator_starts,
            "replicator_unexpected_exits": s.unexpected_exits,
            "replicator_stalls": s.stalls,
            "replicator_sigterm_exit_code": sigterm,
            "replicator_log": log_levels(self.dir / "replicator.log"),
            "expected_records": comparison["expected"],
            "records": comparison["records"],
            "no_account_moods": comparison["no_account_moods"],
            "lost": lost,
            "duplicated": dup,
            "mismatched": len(comparison["mismatched"]),
            "wrong_rkey": len(comparison["wrong_rkey"]),
            "audit_in_sync": audit.get("in_sync"),
            "audit_exit_code": audit.get("exit_code"),
            "audit_divergences": audit.get("divergences"),
            "audit_dead_letters": audit.get("dead_letters"),
            "audit_invalid_moods": audit.get("invalid_moods"),
            "examples": {
                k: comparison[k][:20]
                for k in ("lost", "duplicated", "mismatched", "wrong_rkey")
                if comparison[k]
            },
            "audit_examples": audit.get("examples") or [],
            "code": self.code,
            "directory": str(self.dir),
        }

    async def stop(self) -> None:
        with anyio.CancelScope(shield=True):
            if self.replicator is not None:
                self.replicator.stop()
            if self.client is not None:
                await self.client.close()
            await anyio.to_thread.run_sync(self.pds.stop)
            await anyio.to_thread.run_sync(self.mongo.stop)


def valid_live(doc: Mapping[str, Any]) -> bool:
    """A mood that must have exactly one record (if its user has an account)."""
    mood, when = doc.get("mood"), doc.get("when")
    return (
        isinstance(doc.get("_id"), ObjectId)
        and not doc.get("deleted")
        and isinstance(doc.get("user"), str)
        and isinstance(mood, str)
        and bool(mood.strip())
        and len(mood.encode()) <= MAX_MOOD_BYTES
        and isinstance(when, datetime)
    )


def iso(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"


def normalise(message: str) -> str:
    """A log message without its particulars, so that alike lines count together."""
    message = re.sub(r"'[^']*'", "'…'", message)
    message = re.sub(r"\b[0-9a-f]{24}\b|did:plc:[a-z0-9]+|\d+(\.\d+)?", "#", message)
    return message.strip()[:140]


def log_levels(path: Path) -> dict[str, Any]:
    """The replicator's JSON log: lines by level, and the most frequent messages."""
    levels: Counter[str] = Counter()
    messages: Counter[str] = Counter()
    other: Counter[str] = Counter()
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return {}
    for line in lines:
        try:
            record = json.loads(line)["record"]
        except (ValueError, KeyError, TypeError):
            if line.strip():
                other[normalise(line)] += 1
            continue
        level = record["level"]["name"]
        levels[level] += 1
        messages[f"{level}: {normalise(record['message'])}"] += 1
    return {
        "by_level": dict(levels),
        "top": dict(messages.most_common(8)),
        "non_json_lines": sum(other.values()),
        "non_json_examples": dict(other.most_common(3)),
    }


def print_summary(out: dict[str, Any]) -> None:
    def kv(d: Mapping[str, Any] | None) -> str:
        return ", ".join(f"{k}={v}" for k, v in (d or {}).items()) or "-"

    print("\n=== soak summary ===")
    print(f"result:            {out['result']}  (seed {out['seed']}, {out['minutes']} min)")
    print(
        f"duration:          load {out['load_seconds']}s, caught up after "
        f"{out['caught_up_after_seconds']}s"
    )
    print(f"users:             {out['users']} ({out['users_without_account']} without account)")
    print(f"operations:        {out['operations_total']} ({kv(out['operations'])})")
    print(
        f"events:            {out['events']} documents written by the load; "
        f"{out['change_stream_events']} change-stream events in all"
    )
    print(f"faults injected:   {out['faults_total']} ({kv(out['faults'])})")
    print(f"fault seconds:     {kv(out['fault_seconds'])}")
    print(f"bad documents:     {out['bad_documents']} ({kv(out['bad_documents_by_kind'])})")
    print(f"mongo retries:     {out['mongo_retries']}  load errors: {kv(out['load_errors'])}")
    print(
        f"load paused:       {out['load_paused_seconds']}s (max lag {out['max_lag_changes']} "
        "changes)"
    )
    exits, stalls = out["replicator_unexpected_exits"], out["replicator_stalls"]
    print(
        f"replicator:        {out['replicator_starts']} starts; {len(exits)} unexpected exits, "
        f"{len(stalls)} stalls (restarted by the watchdog); SIGTERM exit code "
        f"{out['replicator_sigterm_exit_code']}"
    )
    for item in exits:
        print(f"                   exit: {json.dumps(item)}")
    for item in stalls:
        print(f"                   stall: {json.dumps(item)}")
    rlog = out["replicator_log"]
    print(
        f"replicator log:    {kv(rlog.get('by_level'))}; "
        f"{rlog.get('non_json_lines', 0)} lines not JSON {kv(rlog.get('non_json_examples'))}"
    )
    for message, count in (out["replicator_log"].get("top") or {}).items():
        print(f"                   {count:>5} x {message}")
    print(
        f"records:           {out['records']} on the PDS, {out['expected_records']} expected "
        f"({out['no_account_moods']} moods of users without account)"
    )
    print(f"lost:              {out['lost']}")
    print(f"duplicated:        {out['duplicated']}")
    print(f"mismatched:        {out['mismatched']}  wrong rkey: {out['wrong_rkey']}")
    print(
        f"audit:             in_sync={out['audit_in_sync']} exit={out['audit_exit_code']} "
        f"divergences: {kv(out['audit_divergences'])}; dead letters "
        f"{out['audit_dead_letters']}, invalid moods {out['audit_invalid_moods']}"
    )
    for kind, items in out["examples"].items():
        print(f"{kind} (first {len(items)}):")
        for item in items:
            print(f"  {json.dumps(item, default=str)}")
    if out["audit_examples"]:
        print("audit examples:")
        for item in out["audit_examples"]:
            print(f"  {json.dumps(item, default=str)}")
    print(f"logs:              {out['directory']}")


def parse_args(argv: list[str] | None = None) -> Options:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--minutes", type=float, default=30.0, help="load duration (default 30)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    p.add_argument("--users", type=int, default=30, help="users (default 30)")
    p.add_argument(
        "--without-account",
        type=int,
        default=4,
        help="of which without an ATProto account (default 4)",
    )
    p.add_argument("--rate", type=float, default=7.0, help="operations per second (default 7)")
    p.add_argument(
        "--fault-interval",
        type=float,
        nargs=2,
        default=(45.0, 120.0),
        metavar=("MIN", "MAX"),
        help="seconds between faults (default 45 120)",
    )
    p.add_argument(
        "--faults",
        default=",".join(FAULTS),
        help=f"comma-separated fault kinds to inject (default {','.join(FAULTS)}; '' for none)",
    )
    p.add_argument("--json", type=Path, help="also write the summary to this file")
    p.add_argument("--dir", type=Path, help="work directory (default: a new temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the work directory after a PASS")
    p.add_argument("-v", "--verbose", action="store_true", help="print every fault as it happens")
    a = p.parse_args(argv)
    seed = a.seed if a.seed is not None else secrets.randbelow(10**6)
    faults = tuple(f for f in a.faults.split(",") if f)
    if unknown := set(faults) - set(FAULTS):
        p.error(f"unknown fault kinds: {', '.join(sorted(unknown))}")
    return Options(
        a.minutes,
        seed,
        a.users,
        a.without_account,
        a.rate,
        a.fault_interval[0],
        a.fault_interval[1],
        faults,
        a.json,
        a.dir,
        a.keep,
        a.verbose,
    )


async def amain(opts: Options) -> int:
    workdir = opts.directory or Path(tempfile.mkdtemp(prefix="replicator-soak-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(
        f"soak: seed {opts.seed}, {opts.minutes} min, {opts.users} users, work dir {workdir}",
        flush=True,
    )
    soak = Soak(opts, workdir)
    out: dict[str, Any] | None = None
    failure = ""
    try:
        async with anyio.create_task_group() as tg:

            async def on_signal() -> None:
                with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    async for signum in signals:
                        print(f"\n{signal.Signals(signum).name}: stopping", flush=True)
                        tg.cancel_scope.cancel()
                        return

            tg.start_soon(on_signal)
            try:
                out = await soak.run()
            except SoakError as exc:
                failure = str(exc)
            tg.cancel_scope.cancel()
    finally:
        await soak.stop()
    if failure:
        print(f"soak could not run: {failure}; logs in {workdir}", file=sys.stderr)
        return 2
    if out is None:
        print(f"interrupted; logs in {workdir}")
        return 130
    print_summary(out)
    if opts.json_path:
        opts.json_path.write_text(json.dumps(out, indent=2, default=str) + "\n")
    if out["result"] == "PASS" and not opts.keep and opts.directory is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if out["result"] == "PASS" else 1


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    try:
        return anyio.run(amain, opts)
    except SoakError as exc:
        print(f"soak could not run: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
