"""Soak test: minutes of mixed load on `moods` while the replicator, the PDS and MongoDB fail.

    python scripts/soak.py --minutes 30 [--seed N] [--users 30] [--json FILE]

It starts its own stack in a fresh directory (SecantusDB, a single-node replica set, and the
reference PDS, started directly so they can be restarted), seeds users (most with an ATProto
account, a few without), runs two `replicator run` processes (a leader and a standby, both with
a short lease), and drives a steady mix of inserts, edits, nukes, un-nukes, purges and bad
documents. One fault at a time, at random intervals, it kills the leader with SIGKILL
(restarted 1-10 s later), restarts the PDS (down 5-60 s), restarts MongoDB (down 2-10 s; the
load retries what failed), pauses the leader with SIGSTOP past its lease while the load nukes
and purges (the standby takes over; SIGCONT then), or deactivates an account for 10-60 s while
the load goes on for that user. At the end it lets the replicator catch up, runs
`replicator audit --json`, and compares Mongo with the PDS on its own: every live, non-deleted,
valid mood of a user with an account must have exactly one record (`lost`: none;
`duplicated`: more than one), and no record may exist of a deleted, nuked or purged mood, or of
no mood (`orphaned`). Exit 0 iff lost, duplicated and orphaned are 0, no record differs from
its mood, every account is active again and the audit is in sync; 1 otherwise; 2 if the soak
itself could not run.

How far behind the replicator is comes from what any replica set shows: the soak tails
`local.oplog.rs` for the namespace of `moods` (newest change, its wall time) and compares it
with the checkpoint's `last_event_at` (the wall time of the newest change applied).

A replicator process that exits on its own is restarted (as a supervisor would) and reported;
a leader that stays up while its checkpoint does not move for `STALL_SECONDS` although changes
wait (outside faults) is reported as stalled and restarted (as a liveness probe would).
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import hashlib
import json
import os
import random
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import anyio
import httpx
from anyio.abc import TaskGroup
from bson import ObjectId, Timestamp
from pymongo import AsyncMongoClient, CursorType, MongoClient
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import BulkWriteError, ConnectionFailure, DuplicateKeyError, PyMongoError

from replicator.model import State
from replicator.store import Names, Store
from replicator_dev.devstack.observe import listed_records
from replicator_dev.devstack.procs import Child, free_port
from replicator_dev.devstack.seed import SeededUser, seed_user
from replicator_dev.devstack.servers import EmbeddedMongo, LocalPDS

Doc = dict[str, Any]
T = TypeVar("T")

DB_NAME = "soak"
REPO = Path(__file__).resolve().parent.parent
NAMES = Names()
MOODS_NS = f"{DB_NAME}.{NAMES.moods}"
LEASE_ID = f"lease:{NAMES.moods}"  # replicator.runtime.lease_name
MOOD_NSID = "computer.aesthetic.mood"
MAX_MOOD_BYTES = 5000  # lexicons/computer/aesthetic/mood.json, maxLength (UTF-8 bytes)
WALL_EPSILON = 0.0005  # wall times are milliseconds; the checkpoint's are float seconds
# A leader is stalled when changes wait and its checkpoint has not moved for this long,
# outside faults (a PDS outage holds it back legitimately).
STALL_SECONDS = 90.0
STALL_LAG = 5
CONVERGE_WAIT = 240.0  # after the catch-up: parked work and re-checked accounts settle

OPS = {"insert": 50, "edit": 26, "nuke": 4, "unnuke": 4, "purge": 1, "bad": 6}
BAD_KINDS = (
    "mood_missing",
    "mood_not_string",
    "mood_too_long",
    "when_string",
    "user_missing",
    "string_id",
)
FAULTS = (
    "kill_replicator",
    "restart_pds",
    "restart_mongo",
    "pause_leader",
    "deactivate_account",
)
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


def owner_pid(lease: Mapping[str, Any] | None) -> int | None:
    """The lease's owner is `host:pid:random` (replicator.lease.owner_id)."""
    owner = lease.get("owner") if lease else None
    match = re.search(r":(\d+):[0-9a-f]+$", owner) if isinstance(owner, str) else None
    return int(match.group(1)) if match else None


@dataclass
class Stats:
    started: float = field(default_factory=now)
    ops: Counter[str] = field(default_factory=Counter)
    bad: Counter[str] = field(default_factory=Counter)
    writes: int = 0  # documents written by the load (inserted, modified, deleted)
    faults: Counter[str] = field(default_factory=Counter)
    fault_seconds: dict[str, float] = field(default_factory=dict)
    fault_reports: list[dict[str, Any]] = field(default_factory=list)
    mongo_retries: int = 0  # load operations retried because MongoDB was down
    load_errors: Counter[str] = field(default_factory=Counter)
    max_lag_changes: int = 0
    max_lag_seconds: float = 0.0
    replicator_starts: int = 0
    exits: list[dict[str, Any]] = field(default_factory=list)  # exits on their own
    stalls: list[dict[str, Any]] = field(default_factory=list)
    takeovers: int = 0  # lease generations after the first


class Timeline:
    """`soak.log`: one JSON line per fault, restart and takeover, for the evidence."""

    def __init__(self, path: Path, verbose: bool) -> None:
        self.path = path
        self.verbose = verbose
        self.t0 = now()

    def elapsed(self) -> float:
        """Seconds since the soak began, as `t` in every line."""
        return round(now() - self.t0, 1)

    def __call__(self, event: str, **data: Any) -> None:
        line = {
            "t": self.elapsed(),
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
    """`python -m replicator.cli run`, as production runs it; its log is appended to (both
    processes share `replicator.log`; each JSON line names its process id)."""

    def __init__(
        self, name: str, env: dict[str, str], log_path: Path, stats: Stats, log: Timeline
    ) -> None:
        self.name = name
        self.env = {**env, "REPLICATOR_HTTP_ADDR": f"127.0.0.1:{free_port()}"}
        self.log_path = log_path
        self.stats = stats
        self.timeline = log
        self.child: Child | None = None
        self.expected_down = False
        self.stopped = False  # SIGSTOP'd
        self.started_at = now()
        # Set by the paused-leader fault from SIGCONT on: an exit on its own is its outcome.
        self.pause_report: dict[str, Any] | None = None

    @property
    def pid(self) -> int | None:
        return self.child.pid if self.child is not None else None

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
        self.stopped = False
        self.timeline("replicator_started", name=self.name, pid=self.child.pid)

    def alive(self) -> bool:
        return self.child is not None and self.child.alive()

    def kill9(self) -> None:
        assert self.child is not None
        self.expected_down = True
        self.child.kill()

    def sigstop(self) -> None:
        assert self.child is not None
        os.killpg(self.child.pid, signal.SIGSTOP)
        self.stopped = True

    def sigcont(self) -> None:
        if self.child is not None and self.stopped:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.child.pid, signal.SIGCONT)
        self.stopped = False

    def stop(self) -> int | None:
        """SIGTERM (SIGKILL after 20 s, with the evidence of a hang first); the exit code."""
        if self.child is None:
            return None
        self.expected_down = True
        self.sigcont()
        if self.child.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.child.pid, signal.SIGTERM)
            try:
                self.child.proc.wait(20)
            except subprocess.TimeoutExpired:
                found = self.evidence("still running 20 s after SIGTERM")
                self.stats.stalls.append({"kind": "no exit after SIGTERM", **found})
                self.timeline("replicator_hung", **found)
        self.child.stop(timeout=5)
        return self.child.proc.returncode

    def evidence(self, why: str) -> dict[str, Any]:
        """What a process that looks hung shows: `/healthz`, `/readyz`, its gauges and the
        stacks of its threads (py-spy), written to `hung-<pid>-<n>.txt` beside the logs."""
        pid = self.pid
        out: dict[str, Any] = {"name": self.name, "pid": pid, "why": why}
        parts = [f"{why}\n"]
        base = f"http://{self.env['REPLICATOR_HTTP_ADDR']}"
        for path in ("/healthz", "/readyz", "/metrics"):
            try:
                with urllib.request.urlopen(base + path, timeout=3) as resp:  # noqa: S310
                    body = resp.read().decode(errors="replace")
            except OSError as exc:
                body = getattr(exc, "read", lambda: b"")().decode(errors="replace") or repr(exc)
            if path == "/metrics":
                body = "\n".join(
                    line for line in body.splitlines() if line.startswith("replicator_")
                )
            else:
                out[path.strip("/")] = body[:300]
            parts.append(f"== {path}\n{body}\n")
        spy = Path(sys.executable).parent / "py-spy"
        if spy.exists() and pid is not None:
            try:
                dump = subprocess.run(
                    [str(spy), "dump", "--pid", str(pid)], capture_output=True, timeout=30
                )
                parts.append(f"== py-spy dump\n{dump.stdout.decode(errors='replace')}"
                             f"{dump.stderr.decode(errors='replace')}\n")  # fmt: skip
            except (OSError, subprocess.TimeoutExpired) as exc:
                parts.append(f"== py-spy dump failed: {exc!r}\n")
        # Its TCP connections (to MongoDB, the PDS), and what the server is still doing.
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            ss = subprocess.run(["ss", "-tnpi"], capture_output=True, timeout=10, text=True)
            mine = [line for line in ss.stdout.splitlines() if f"pid={pid}," in line]
            parts.append("== ss -tnpi (this process)\n" + "\n".join(mine) + "\n")
        with contextlib.suppress(PyMongoError):
            uri = self.env["MONGODB_CONNECTION_STRING"]
            client: MongoClient[Doc] = MongoClient(uri, serverSelectionTimeoutMS=3000)
            with client:
                ops = client.admin.command("currentOp", {"$all": True})
            parts.append(f"== currentOp\n{json.dumps(ops, default=str, indent=1)[:20000]}\n")
        n = len(list(self.log_path.parent.glob(f"hung-{pid}-*.txt")))
        where = self.log_path.parent / f"hung-{pid}-{n}.txt"
        where.write_text("".join(parts))
        out["file"] = where.name
        return out


class OplogTail:
    """The changes of `moods` as the replica set's oplog shows them: a tailable cursor on
    `local.oplog.rs` for the soak's namespace. Counts them, and keeps the wall times of those
    the checkpoint has not reached yet (`pending`)."""

    def __init__(
        self, client: AsyncMongoClient[Doc], mongo_up: Callable[[], anyio.Event], log: Timeline
    ) -> None:
        self.client = client
        self.mongo_up = mongo_up
        self.log = log
        self.count = 0
        self.newest: float | None = None  # wall time of the newest change, epoch seconds
        self.newest_seen_at = now()
        self.last_ts: Timestamp | None = None
        self.walls: list[float] = []
        self.reopened = 0

    def add(self, entry: Mapping[str, Any]) -> None:
        ts, wall = entry.get("ts"), entry.get("wall")
        if isinstance(ts, Timestamp):
            if self.last_ts is not None and ts <= self.last_ts:
                return  # seen before a reopen
            self.last_ts = ts
        if isinstance(wall, datetime):
            seconds = (wall if wall.tzinfo else wall.replace(tzinfo=UTC)).timestamp()
        elif isinstance(ts, Timestamp):
            seconds = float(ts.time)
        else:
            return
        self.count += 1
        bisect.insort(self.walls, seconds)
        if self.newest is None or seconds > self.newest:
            self.newest = seconds
        self.newest_seen_at = now()

    def pending(self, applied: float | None) -> int:
        """Changes newer than the checkpoint's `last_event_at`."""
        if applied is None:
            return len(self.walls)
        return len(self.walls) - bisect.bisect_right(self.walls, applied + WALL_EPSILON)

    def lag_seconds(self, applied: float | None) -> float:
        if self.newest is None or not self.pending(applied):
            return 0.0
        oldest = self.walls[0] if applied is None else applied
        return max(0.0, self.newest - oldest)

    def prune(self, applied: float | None) -> None:
        if applied is not None:
            del self.walls[: bisect.bisect_right(self.walls, applied + WALL_EPSILON)]

    async def run(self) -> None:
        oplog = self.client.local["oplog.rs"]
        while True:
            await self.mongo_up().wait()
            query: Doc = {"ns": MOODS_NS}
            if self.last_ts is not None:
                query["ts"] = {"$gt": self.last_ts}
            try:
                cursor = oplog.find(
                    query, {"ts": 1, "wall": 1}, cursor_type=CursorType.TAILABLE_AWAIT
                ).max_await_time_ms(1000)
                while cursor.alive:
                    try:
                        self.add(await cursor.next())
                    except StopAsyncIteration:
                        continue
                await cursor.close()
            except PyMongoError as exc:
                self.reopened += 1
                if self.mongo_up().is_set():
                    self.log("oplog_tail_error", error=f"{type(exc).__name__}: {exc}")
            await anyio.sleep(0.5)  # a cursor on no entry yet dies at once: look again


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
    """One task doing operations at `rate`/s, sequentially; Mongo outages are waited out.
    Faults run operations of their own through `do` and `burst` (one operation at a time)."""

    def __init__(
        self,
        moods: AsyncCollection[Doc],
        users: list[SeededUser],
        rng: random.Random,
        stats: Stats,
        log: Timeline,
        *,
        rate: float,
        mongo_up: Callable[[], anyio.Event],
    ) -> None:
        self.moods = moods
        self.users = users
        self.rng = rng
        self.stats = stats
        self.log = log
        self.rate = rate
        self.mongo_up = mongo_up
        self.ids: dict[str, list[ObjectId]] = {u.sub: [] for u in users}
        self.nuked: set[str] = set()
        self.lock = anyio.Lock()
        self.bulk_done = anyio.Event()  # set after each nuke/un-nuke/purge (for timed faults)

    async def run(self, until: float) -> None:
        kinds, weights = list(OPS), list(OPS.values())
        while now() < until:
            started = now()
            kind = self.rng.choices(kinds, weights)[0]
            await self.do(kind)
            pause = self.rng.uniform(0.5, 1.5) / self.rate - (now() - started)
            if pause > 0:
                await anyio.sleep(pause)

    async def do(self, kind: str, user: SeededUser | None = None) -> str | None:
        """One operation (for `user`, else a random one); the kind done, or None."""
        async with self.lock:
            try:
                done: str | None = await getattr(self, f"_op_{kind}")(user)
            except SoakError:
                raise
            except PyMongoError as exc:
                self.stats.load_errors[f"{kind}: {type(exc).__name__}"] += 1
                self.log("load_error", op=kind, error=f"{type(exc).__name__}: {exc}")
                return None
        if done:
            self.stats.ops[done] += 1
        return done

    async def burst(self, users: list[SeededUser], n: int) -> list[ObjectId]:
        """`n` inserts over `users` in one `insert_many` (one batch for the replicator)."""
        owners = [users[i % len(users)] for i in range(n)]
        ids = [ObjectId() for _ in range(n)]
        docs: list[Doc] = [
            {
                "_id": ids[i],
                "user": owners[i].sub,
                "mood": mood_text(self.rng),
                "when": mood_when(self.rng),
            }
            for i in range(n)
        ]

        async def once() -> None:
            try:
                await self.moods.insert_many([dict(d) for d in docs], ordered=False)
            except BulkWriteError as exc:  # an earlier attempt got through: duplicates only
                if any(e.get("code") != 11000 for e in exc.details.get("writeErrors", [])):
                    raise

        async with self.lock:
            await self._retry("burst", once)
            for owner, oid in zip(owners, ids, strict=True):
                self.ids[owner.sub].append(oid)
        self.stats.writes += n
        self.stats.ops["burst"] += 1
        return ids

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

    async def _op_insert(self, user: SeededUser | None = None) -> str:
        user = user or self._user()
        assert user is not None
        oid = ObjectId()
        await self._insert(
            {"_id": oid, "user": user.sub, "mood": mood_text(self.rng), "when": mood_when(self.rng)}
        )
        self.ids[user.sub].append(oid)
        return "insert"

    async def _op_edit(self, user: SeededUser | None = None) -> str | None:
        user = user or self._user(with_moods=True)
        if user is None or not self.ids[user.sub]:
            return await self._op_insert(user)
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

    async def _op_nuke(self, user: SeededUser | None = None) -> str | None:
        if user is None:
            pool = [u for u in self.users if self.ids[u.sub] and u.sub not in self.nuked]
            if not pool:
                return None
            user = self.rng.choice(pool)
        who = user
        res = await self._retry(
            "nuke",
            lambda: self.moods.update_many({"user": who.sub}, {"$set": {"deleted": True}}),
        )
        self.nuked.add(user.sub)
        self.stats.writes += res.modified_count
        self._bulk()
        return "nuke"

    async def _op_unnuke(self, user: SeededUser | None = None) -> str | None:
        if user is None:
            pool = [u for u in self.users if u.sub in self.nuked]
            if not pool:
                return None
            user = self.rng.choice(pool)
        who = user
        res = await self._retry(
            "unnuke",
            lambda: self.moods.update_many({"user": who.sub}, {"$set": {"deleted": False}}),
        )
        self.nuked.discard(user.sub)
        self.stats.writes += res.modified_count
        self._bulk()
        return "unnuke"

    async def _op_purge(self, user: SeededUser | None = None) -> str | None:
        user = user or self._user(with_moods=True)
        if user is None:
            return None
        who = user
        res = await self._retry("purge", lambda: self.moods.delete_many({"user": who.sub}))
        self.ids[user.sub] = []
        self.nuked.discard(user.sub)
        self.stats.writes += res.deleted_count
        self._bulk()
        return "purge"

    async def _op_bad(self, user: SeededUser | None = None) -> str:
        user = user or self.rng.choice([u for u in self.users if u.has_account] or self.users)
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
        return "bad"

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
    lease_seconds: float
    json_path: Path | None
    directory: Path | None
    keep: bool
    verbose: bool


@dataclass
class UserCheck:
    """One user's moods against their repo (`compare_user`)."""

    expected: int = 0
    records: int = 0
    skipped: int = 0
    lost: list[dict[str, Any]] = field(default_factory=list)
    duplicated: list[dict[str, Any]] = field(default_factory=list)
    orphaned: list[dict[str, Any]] = field(default_factory=list)
    mismatched: list[dict[str, Any]] = field(default_factory=list)
    wrong_rkey: list[dict[str, Any]] = field(default_factory=list)
    unlistable: str | None = None  # why the repo could not be listed

    @property
    def clean(self) -> bool:
        return not (
            self.lost or self.duplicated or self.orphaned or self.mismatched or self.unlistable
        )


class Soak:
    def __init__(self, opts: Options, workdir: Path) -> None:
        self.opts = opts
        self.dir = workdir
        self.rng = random.Random(opts.seed)
        self.stats = Stats()
        self.log = Timeline(workdir / "soak.log", opts.verbose)
        self.mongo = EmbeddedMongo(workdir / "mongo")
        self.pds = LocalPDS(workdir / "pds")
        self.replicators: list[ReplicatorProcess] = []
        self.client: AsyncMongoClient[Doc] | None = None
        self.store: Store | None = None
        self.tail: OplogTail | None = None
        self.users: list[SeededUser] = []
        self.lag: int | None = None  # changes newer than the checkpoint
        self.lag_s: float | None = None
        self.mark: float | None = None  # the checkpoint's last_event_at, and when it moved
        self.mark_changed_at = now()
        self.lease: Doc | None = None
        self.lease_changed_at = now()
        self.deposed: dict[int, tuple[float, int]] = {}  # pid -> (deadline, log offset)
        self.mongo_up = anyio.Event()  # replaced by an unset one while MongoDB is down
        self.fault_now: str | None = None
        self.last_fault: tuple[str, float] | None = None
        self.deactivated: dict[str, str] = {}  # did -> sub, while the fault holds it
        self.load_seconds = 0.0
        self.code: dict[str, Any] = {}
        self.caught_up_after: float | None = None
        self.comparison: dict[str, Any] = {}

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
            REPLICATOR_PLC_URL=self.pds.plc_url,
            REPLICATOR_MOODS_COLLECTION=NAMES.moods,
            REPLICATOR_USERS_COLLECTION=NAMES.users,
            REPLICATOR_HANDLES_COLLECTION=NAMES.handles,
            REPLICATOR_LEASE_SECONDS=str(self.opts.lease_seconds),
            REPLICATOR_LOG_LEVEL="INFO",
            REPLICATOR_LOG_FORMAT="json",
        )
        return env

    def by_pid(self, pid: int | None) -> ReplicatorProcess | None:
        for rep in self.replicators:
            if pid is not None and rep.pid == pid and rep.alive():
                return rep
        return None

    def leader(self) -> ReplicatorProcess | None:
        """The process holding the lease (as last read by the monitor)."""
        return self.by_pid(owner_pid(self.lease))

    async def read_lease(self) -> Doc | None:
        assert self.store is not None
        return await self.store.state.find_one({"_id": LEASE_ID})

    async def wait_leader(self, within: float) -> ReplicatorProcess | None:
        deadline = now() + within
        while now() < deadline:
            with contextlib.suppress(PyMongoError):
                self.lease = await self.read_lease()
            rep = self.leader()
            if rep is not None and not rep.stopped:
                return rep
            await anyio.sleep(0.3)
        return None

    async def monitor(self) -> None:
        """Every second: the replicator's lag and the lease; restarts a process that died."""
        assert self.store is not None and self.tail is not None
        while True:
            if self.mongo_up.is_set():
                try:
                    checkpoint = await self.store.load_checkpoint()
                    lease = await self.read_lease()
                except PyMongoError:
                    checkpoint = lease = None
                if lease is not None:
                    if self.lease is None or lease.get("generation") != self.lease.get(
                        "generation"
                    ):
                        if self.lease is not None:
                            self.stats.takeovers += 1
                            self.note_deposed(self.lease, lease)
                        self.lease_changed_at = now()
                        self.log(
                            "lease_holder",
                            generation=lease.get("generation"),
                            pid=owner_pid(lease),
                            name=getattr(self.by_pid(owner_pid(lease)), "name", None),
                        )
                    self.lease = lease
                if checkpoint is not None:
                    mark = checkpoint.get("last_event_at")
                    mark = float(mark) if isinstance(mark, (int, float)) else None
                    if mark != self.mark:
                        self.mark, self.mark_changed_at = mark, now()
                    self.lag = self.tail.pending(mark)
                    self.lag_s = self.tail.lag_seconds(mark)
                    self.tail.prune(mark)
                    self.stats.max_lag_changes = max(self.stats.max_lag_changes, self.lag)
                    self.stats.max_lag_seconds = max(self.stats.max_lag_seconds, self.lag_s)
            for rep in self.replicators:
                if rep.child is not None and not rep.expected_down and not rep.alive():
                    self.on_exit(rep)
            await self.check_deposed()
            leader = self.leader()
            if not self.fault_now:
                await self.watchdog(leader)
            await anyio.sleep(1.0)

    def deposed_grace(self) -> float:
        return 3 * self.opts.lease_seconds + 15

    def note_deposed(self, old: Doc, new: Doc) -> None:
        """The lease moved on: its former holder, if it lives, must say within a while that
        it stopped (exit 5, or "waiting for the lease again")."""
        rep = self.by_pid(owner_pid(old))
        if rep is not None and rep.pid != owner_pid(new) and rep.pid is not None:
            offset = rep.log_path.stat().st_size if rep.log_path.exists() else 0
            self.deposed[rep.pid] = (now() + self.deposed_grace(), offset)

    async def check_deposed(self) -> None:
        """A former leader that neither exits nor says it waits for the lease again is hung
        (it will not take over either): reported with its evidence, then restarted, as a
        liveness probe would."""
        for pid, (deadline, offset) in list(self.deposed.items()):
            rep = self.by_pid(pid)
            if rep is None:
                del self.deposed[pid]  # exited: on_exit notes it
                continue
            if rep.stopped:  # paused by a fault: the clock starts at SIGCONT
                self.deposed[pid] = (now() + self.deposed_grace(), offset)
                continue
            said = own_lines(rep.log_path, offset, pid)
            if any("waiting" in m or "taken over" in m for m in said):
                del self.deposed[pid]
                continue
            if now() < deadline or not self.mongo_up.is_set():
                continue
            del self.deposed[pid]
            found = await anyio.to_thread.run_sync(
                rep.evidence, f"lease taken over, nothing said for {self.deposed_grace():.0f}s"
            )
            stall = {"kind": "deposed leader silent", "t": self.log.elapsed(),
                     "when": self.context(), "said": said[-5:], **found}  # fmt: skip
            self.stats.stalls.append(stall)
            self.log("replicator_hung", **stall)
            rep.kill9()
            rep.start()

    def on_exit(self, rep: ReplicatorProcess) -> None:
        """A process exited on its own: noted, and restarted as a supervisor would (it comes
        back as the standby while the other holds the lease). Any exit but 5 (lease lost) is
        unexpected."""
        assert rep.child is not None
        code = rep.child.proc.returncode
        item = {
            "t": self.log.elapsed(),
            "name": rep.name,
            "pid": rep.pid,
            "code": code,
            "when": self.context(),
            # Exit 5: the other process holds the lease now (after a pause, or when renewals
            # failed while MongoDB was down); the supervisor brings it back as the standby.
            "expected": code == 5,
        }
        if rep.pause_report is not None:
            # The paused leader's own outcome (lease lost: exit 5).
            rep.pause_report["exit_code"] = code
            rep.pause_report["exited_after_sigcont_s"] = round(
                now() - rep.pause_report.pop("_continued_at", now()), 1
            )
            rep.pause_report["restarted_as_standby"] = True
            item["when"] = "after its pause past the lease"
            rep.pause_report = None
        self.stats.exits.append(item)
        self.log("replicator_exited", **item)
        rep.child.stop()
        rep.start()

    def context(self) -> str:
        if self.fault_now:
            return f"during {self.fault_now}"
        if self.last_fault:
            return f"{now() - self.last_fault[1]:.1f}s after {self.last_fault[0]}"
        return "no fault yet"

    async def watchdog(self, leader: ReplicatorProcess | None) -> None:
        """A leader that is up but whose checkpoint has not moved for `STALL_SECONDS` while
        changes wait (outside faults) is stalled: reported, then restarted as a liveness probe
        would, so that the soak goes on. With no live leader for as long, both are."""
        if self.lag is None or self.lag <= STALL_LAG:
            return
        quiet_since = max(
            self.mark_changed_at,
            self.lease_changed_at,
            self.last_fault[1] if self.last_fault else 0.0,
            leader.started_at if leader else 0.0,
        )
        if now() - quiet_since < STALL_SECONDS:
            return
        stall = {
            "kind": "checkpoint still",
            "t": self.log.elapsed(),
            "lag_changes": self.lag,
            "lag_s": round(self.lag_s or 0.0, 1),
            "checkpoint_last_event_at": self.mark,
            "stalled_s": round(now() - quiet_since, 1),
            "when": self.context(),
            "leader_pid": leader.pid if leader else None,
            "lease_owner_pid": owner_pid(self.lease),
        }
        self.stats.stalls.append(stall)
        self.log("replicator_stalled", **stall)
        for rep in [leader] if leader else [r for r in self.replicators if r.alive()]:
            rep.kill9()
            rep.start()
        self.mark_changed_at = now()

    async def progress(self) -> None:
        while True:
            await anyio.sleep(30)
            s = self.stats
            leader = self.leader()
            print(
                f"[{now() - s.started:>6.0f}s] ops={sum(s.ops.values())} writes={s.writes} "
                f"faults={sum(s.faults.values())} bad={sum(s.bad.values())} lag={self.lag} "
                f"({self.lag_s or 0:.1f}s) max_lag={s.max_lag_changes} "
                f"leader={leader.name if leader else '-'} fault={self.fault_now or '-'}",
                flush=True,
            )

    # -- faults -----------------------------------------------------------------------------

    async def faults(self, until: float, load: Load, watchers: TaskGroup) -> None:
        bag: list[str] = []
        while self.opts.faults:
            wait = self.rng.uniform(self.opts.fault_min, self.opts.fault_max)
            if now() + wait >= until:
                return
            await anyio.sleep(wait)
            if not bag:
                bag = list(self.opts.faults)
                self.rng.shuffle(bag)
            kind = bag.pop()
            self.fault_now = kind
            began = now()
            report: dict[str, Any] = {"kind": kind, "t": self.log.elapsed()}
            self.stats.fault_reports.append(report)
            await getattr(self, f"_fault_{kind}")(load, report, watchers)
            report["seconds"] = round(now() - began, 1)
            self.stats.faults[kind] += 1
            self.stats.fault_seconds[kind] = self.stats.fault_seconds.get(kind, 0.0) + now() - began
            self.fault_now = None
            self.last_fault = (kind, now())

    async def _after_bulk(self, load: Load, report: dict[str, Any]) -> None:
        """Right after a burst (nuke / un-nuke / purge), while it is being applied."""
        with anyio.move_on_after(30):
            await load.bulk_done.wait()
            await anyio.sleep(self.rng.uniform(0.0, 1.5))
            report["timing"] = "after a bulk write"

    async def _fault_kill_replicator(
        self, load: Load, report: dict[str, Any], _: TaskGroup
    ) -> None:
        report["timing"] = "any time"
        if self.rng.random() < 0.5:
            await self._after_bulk(load, report)
        leader = await self.wait_leader(30)
        if leader is None:
            report["outcome"] = "skipped: no leader"
            self.log("fault_kill_replicator_skipped", reason="no leader")
            return
        report.update(name=leader.name, pid=leader.pid, lag_changes=self.lag)
        leader.kill9()
        down = self.rng.uniform(1, 10)
        report["down_s"] = round(down, 1)
        self.log("fault_kill_replicator", **report)
        await anyio.sleep(down)
        leader.start()
        after = await self.wait_leader(30)
        report["leader_after"] = after.name if after else None

    async def _fault_restart_pds(self, load: Load, report: dict[str, Any], _: TaskGroup) -> None:
        await anyio.to_thread.run_sync(self.pds.pause)
        down = self.rng.uniform(5, 60)
        report.update(down_s=round(down, 1), lag_changes=self.lag)
        self.log("fault_pds_down", down_s=round(down, 1), lag=self.lag)
        await anyio.sleep(down)
        await anyio.to_thread.run_sync(self.pds.resume)
        self.log("pds_up")

    async def _fault_restart_mongo(self, load: Load, report: dict[str, Any], _: TaskGroup) -> None:
        port = self.mongo.port
        before = await self.wait_leader(10)
        report["leader_before"] = before.name if before else None
        report["generation_before"] = (self.lease or {}).get("generation")
        self.mongo_up = anyio.Event()
        await anyio.to_thread.run_sync(self.mongo.stop)
        down = self.rng.uniform(2, 10)
        report.update(down_s=round(down, 1), lag_changes=self.lag)
        self.log("fault_mongo_down", down_s=round(down, 1), lag=self.lag)
        await anyio.sleep(down)
        await anyio.to_thread.run_sync(self.mongo.start)
        if self.mongo.port != port:
            raise SoakError(f"MongoDB came back on port {self.mongo.port}, not {port}")
        self.mongo_up.set()
        self.log("mongo_up")
        # The leader's renewals failed while MongoDB was down: it may keep the lease or the
        # standby may take it over once MongoDB is back (a lease's time after that).
        await anyio.sleep(self.opts.lease_seconds + 2)
        after = await self.wait_leader(30)
        report["generation_after"] = (self.lease or {}).get("generation")
        report["leader_after"] = after.name if after else None

    async def _fault_pause_leader(self, load: Load, report: dict[str, Any], _: TaskGroup) -> None:
        """SIGSTOP the leader with work in flight, past its lease, while the load nukes and
        purges; the standby must take over; then SIGCONT, and see what the old leader does."""
        assert self.store is not None
        leader = await self.wait_leader(30)
        standby = next((r for r in self.replicators if r is not leader), None)
        if leader is None or standby is None:
            report["outcome"] = "skipped: no leader"
            self.log("fault_pause_leader_skipped", reason="no leader")
            return
        lease = self.opts.lease_seconds
        generation = (self.lease or {}).get("generation")
        timing = self.rng.choice(
            ["after a burst of inserts", "after a bulk write", "before a nuke"]
        )
        with_account = [u for u in self.users if u.has_account]
        victims: list[SeededUser] = []
        if timing == "after a burst of inserts":
            victims = self.rng.sample(
                with_account, k=min(len(with_account), self.rng.randint(1, 4))
            )
            n = self.rng.randint(20, 150)
            await load.burst(victims, n)
            report["burst_inserts"] = n
            # Stop it once its intents for the burst are written (before its PDS calls end).
            with anyio.move_on_after(5), contextlib.suppress(PyMongoError):
                pending = {"state": State.PENDING.value}
                while True:
                    if await self.store.ledger.count_documents(pending, limit=1):
                        break
                    await anyio.sleep(0.05)
        elif timing == "after a bulk write":
            await self._after_bulk(load, report)
        report.update(
            leader=leader.name, pid=leader.pid, generation=generation, timing=timing,
            standby=standby.name, standby_pid=standby.pid,
            lag_changes_at_stop=self.lag,
        )  # fmt: skip
        with contextlib.suppress(PyMongoError):
            report["intents_pending_at_stop"] = await self.store.ledger.count_documents(
                {"state": State.PENDING.value}
            )
        leader.sigstop()
        stopped_at = now()
        hold = lease + self.rng.uniform(2, 5)
        self.log("fault_leader_paused", pid=leader.pid, hold_s=round(hold, 1), timing=timing)
        # Meanwhile the app nukes and purges: the paused process's in-flight writes are stale.
        during: list[str] = []
        pool = [u for u in with_account if load.ids[u.sub]] or with_account
        extra = self.rng.sample(pool, k=min(len(pool), self.rng.randint(1, 3)))
        for user in dict.fromkeys([*victims, *extra]):
            kind = "purge" if self.rng.random() < 0.3 else "nuke"
            if await load.do(kind, user):
                during.append(f"{kind} {user.handle}")
        report["during_pause"] = during
        took_over: float | None = None
        while now() - stopped_at < hold or (took_over is None and now() - stopped_at < hold + 20):
            with contextlib.suppress(PyMongoError):
                doc = await self.read_lease()
                if took_over is None and doc and doc.get("generation") != generation:
                    took_over = now() - stopped_at
                    report["new_holder_pid"] = owner_pid(doc)
                    report["generation_after"] = doc.get("generation")
            await anyio.sleep(0.2)
        report["stopped_s"] = round(now() - stopped_at, 1)
        report["took_over_after_s"] = round(took_over, 1) if took_over is not None else None
        if took_over is None and standby.alive():
            found = await anyio.to_thread.run_sync(
                standby.evidence, f"did not take over a lease paused for {report['stopped_s']}s"
            )
            stall = {"kind": "standby did not take over", "t": self.log.elapsed(), **found}
            self.stats.stalls.append(stall)
            self.log("replicator_hung", **stall)
            report["standby_evidence"] = found["file"]
        offset = leader.log_path.stat().st_size if leader.log_path.exists() else 0
        report["_continued_at"] = now()
        leader.pause_report = report
        leader.sigcont()
        self.log("fault_leader_continued", pid=leader.pid, took_over_after_s=took_over)
        # What the old leader does now: exit 5 (the monitor restarts it as a standby), or
        # drop its batch and wait for the lease again.
        pid = leader.pid
        outcome = None
        deadline = now() + 3 * lease + 15
        while now() < deadline and leader.pause_report is not None:
            said = own_lines(leader.log_path, offset, pid)
            if any("waiting for the lease again" in m for m in said):
                outcome = "abandoned its batch, waits for the lease again (standby)"
                break
            await anyio.sleep(0.5)
        if leader.pause_report is None:
            outcome = f"exited {report.get('exit_code')}, restarted as a standby"
        leader.pause_report = None
        report.pop("_continued_at", None)
        if outcome is None:
            outcome = "still running, said nothing" if leader.alive() else "gone"
        report["outcome"] = outcome
        report["old_leader_said"] = own_lines(leader.log_path, offset, pid)[:6]
        after = await self.wait_leader(30)
        report["leader_after"] = after.name if after else None
        self.log("fault_pause_leader_done", **{k: v for k, v in report.items() if k != "t"})

    async def _fault_deactivate_account(
        self, load: Load, report: dict[str, Any], watchers: TaskGroup
    ) -> None:
        """Deactivate one account with its own token, keep the load going for that user, then
        activate it again (no body at all); note when its repo is back in sync."""
        assert self.store is not None
        pool = [u for u in self.users if u.has_account]
        busy = [u for u in pool if load.ids[u.sub]]
        user = self.rng.choice(busy or pool)
        users = self.store.users
        doc = await load._retry("users", lambda: users.find_one({"_id": user.sub}))
        atproto = (doc or {}).get("atproto") or {}
        did, password = atproto.get("did"), atproto.get("password")
        if not isinstance(did, str) or not isinstance(password, str):
            raise SoakError(f"users doc of {user.sub} has no did/password")
        hold = self.rng.uniform(10, 60)
        report.update(user=user.handle, did=did, moods=len(load.ids[user.sub]),
                      planned_s=round(hold, 1))  # fmt: skip
        async with httpx.AsyncClient(base_url=f"{self.pds.url}/xrpc/", timeout=30) as http:
            await account_call(http, "deactivateAccount", did, password)
            self.deactivated[did] = user.sub
            began = now()
            status = await repo_status(http, did)
            report["status_while"] = status.get("status")
            self.log("fault_account_deactivated", user=user.handle, did=did, hold_s=round(hold, 1))
            done: Counter[str] = Counter()
            kinds = ["insert"] * 4 + ["edit"] * 2 + ["nuke", "unnuke", "insert"]
            while now() - began < hold:
                kind = "purge" if self.rng.random() < 0.05 else self.rng.choice(kinds)
                if got := await load.do(kind, user):
                    done[got] += 1
                await anyio.sleep(self.rng.uniform(0.5, 3.0))
            with contextlib.suppress(PyMongoError):
                report["parked_by_replicator"] = await self.parked_account(did) is not None
            await account_call(http, "activateAccount", did, password)
            self.deactivated.pop(did, None)
            status = await repo_status(http, did)
            if not status.get("active"):
                raise SoakError(f"{did} still not active after activateAccount: {status}")
        report["ops_while_deactivated"] = dict(done)
        report["deactivated_s"] = round(now() - began, 1)
        self.log("fault_account_activated", user=user.handle, did=did,
                 deactivated_s=report["deactivated_s"], ops=dict(done))  # fmt: skip
        watchers.start_soon(self.watch_convergence, user, report)

    async def watch_convergence(self, user: SeededUser, report: dict[str, Any]) -> None:
        """After an activation: when the replicator let go of the account (its entry in
        `replicator_accounts` gone: re-checked, then reconciled) and when the user's repo was
        first seen equal to their moods (later if the replicator is behind)."""
        activated = now()
        report["released_after_s"] = report["converged_after_s"] = None
        async with httpx.AsyncClient(timeout=30) as http:
            while now() - activated < 600:
                await anyio.sleep(3)
                with contextlib.suppress(PyMongoError, httpx.HTTPError):
                    if not self.mongo_up.is_set():
                        continue
                    assert user.did is not None
                    if report["released_after_s"] is None and not await self.parked_account(
                        user.did
                    ):
                        report["released_after_s"] = round(now() - activated, 1)
                    if (
                        report["converged_after_s"] is None
                        and (await self.compare_user(http, user)).clean
                    ):
                        report["converged_after_s"] = round(now() - activated, 1)
                    if None not in (report["released_after_s"], report["converged_after_s"]):
                        self.log("account_converged", user=user.handle,
                                 released_after_s=report["released_after_s"],
                                 in_sync_after_s=report["converged_after_s"])  # fmt: skip
                        return

    async def parked_account(self, did: str) -> Doc | None:
        """The replicator's own record of an account it cannot write (accounts.py)."""
        assert self.store is not None
        return await self.store.db[NAMES.accounts].find_one({"_id": did})

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
        self.tail = OplogTail(self.client, lambda: self.mongo_up, self.log)
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
        log_path = self.dir / "replicator.log"
        env = self.env()
        self.replicators = [
            ReplicatorProcess(name, env, log_path, self.stats, self.log) for name in ("r1", "r2")
        ]
        first, second = self.replicators
        first.start()
        deadline = now() + 60
        while await self.store.load_checkpoint() is None:
            if now() > deadline or not first.alive():
                raise SoakError(f"the replicator made no first checkpoint; see {self.dir}")
            await anyio.sleep(0.2)
        second.start()  # the standby

    async def drive(self) -> None:
        assert self.store is not None and self.tail is not None
        until = now() + self.opts.minutes * 60
        load = Load(
            self.moods,
            self.users,
            self.rng,
            self.stats,
            self.log,
            rate=self.opts.rate,
            mongo_up=lambda: self.mongo_up,
        )
        self.stats.started = now()
        async with anyio.create_task_group() as tg:
            tg.start_soon(self.tail.run)
            tg.start_soon(self.monitor)
            tg.start_soon(self.progress)
            async with anyio.create_task_group() as work:
                work.start_soon(load.run, until)
                work.start_soon(self.faults, until, load, tg)
            self.load_seconds = now() - self.stats.started
            self.log("load_stopped", ops=sum(self.stats.ops.values()))
            self.caught_up_after = await self.catch_up()
            comparison = await self.compare()
            if not comparison["clean"]:
                # Give parked work and re-checked accounts their chance, then look again.
                self.log("not_converged_yet", **comparison["counts"])
                deadline = now() + CONVERGE_WAIT
                while now() < deadline:
                    await anyio.sleep(15)
                    comparison = await self.compare()
                    if comparison["clean"]:
                        break
            self.comparison = comparison
            tg.cancel_scope.cancel()

    async def catch_up(self, limit: float = 300) -> float | None:
        """Until no change is newer than the checkpoint, it is fresh, and the oplog of `moods`
        has been still for 10 s."""
        assert self.store is not None and self.tail is not None
        began = now()
        while now() - began < limit:
            checkpoint = await self.store.load_checkpoint()
            fresh = checkpoint is not None and time.time() - float(checkpoint["saved_at"]) < 15
            if fresh and self.lag == 0 and now() - self.tail.newest_seen_at >= 10:
                self.log("caught_up", after_s=round(now() - began, 1))
                return now() - began
            await anyio.sleep(1)
        self.log("not_caught_up", lag=self.lag, lag_s=self.lag_s)
        return None

    async def listing(
        self, http: httpx.AsyncClient, did: str, wait: float
    ) -> tuple[dict[str, dict[str, Any]] | None, str | None]:
        """The repo's records; a deactivated repo cannot be listed: wait until it is active."""
        deadline = now() + wait
        while True:
            try:
                status = await repo_status(http, did, base=self.pds.url)
                if status.get("active"):
                    return await listed_records(http, self.pds.url, did), None
                why = f"account {status.get('status') or 'inactive'}"
            except httpx.HTTPError as exc:
                why = f"{type(exc).__name__}: {exc}"
            if now() >= deadline:
                return None, why
            await anyio.sleep(2)

    async def compare_user(
        self, http: httpx.AsyncClient, user: SeededUser, wait: float = 0.0
    ) -> UserCheck:
        """Independently of the replicator: one user's moods in Mongo vs their repo."""
        out = UserCheck()
        docs = {str(d["_id"]): d async for d in self.moods.find({"user": user.sub})}
        want = {ref: d for ref, d in docs.items() if valid_live(d)}
        if user.did is None:
            out.skipped = len(want)
            return out
        out.expected = len(want)
        have, why = await self.listing(http, user.did, wait)
        if have is None:
            out.unlistable = why
            return out
        out.records = len(have)
        by_ref: dict[str, list[str]] = {}
        for rkey, value in have.items():
            ref = value.get("ref")
            by_ref.setdefault(ref if isinstance(ref, str) else "?", []).append(rkey)
        for ref, doc in want.items():
            rkeys = sorted(by_ref.get(ref, []))
            if not rkeys:
                out.lost.append({"user": user.sub, "did": user.did, "ref": ref})
                continue
            doc_rkey = (doc.get("atproto") or {}).get("rkey")
            keep = doc_rkey if doc_rkey in rkeys else rkeys[0]
            value = have[keep]
            if value.get("mood") != doc["mood"] or value.get("when") != iso(doc["when"]):
                out.mismatched.append({"did": user.did, "ref": ref, "rkey": keep})
            if doc_rkey != keep:
                out.wrong_rkey.append(
                    {"did": user.did, "ref": ref, "rkey": keep, "doc_rkey": doc_rkey}
                )
            for rkey in rkeys:
                if rkey != keep:
                    out.duplicated.append(
                        {"did": user.did, "ref": ref, "rkey": rkey, "kept_rkey": keep}
                    )
        for ref, rkeys in by_ref.items():
            if ref in want:
                continue
            reason = await self.orphan_reason(ref, docs.get(ref))
            for rkey in rkeys:
                out.orphaned.append({"did": user.did, "ref": ref, "rkey": rkey, "why": reason})
        return out

    async def orphan_reason(self, ref: str, doc: Doc | None) -> str:
        if doc is not None:
            return "mood nuked" if doc.get("deleted") else "mood not valid"
        if ref == "?" or not ObjectId.is_valid(ref):
            return "no mood (no ref)"
        other = await self.moods.find_one({"_id": ObjectId(ref)}, {"user": 1})
        return "another user's mood" if other is not None else "mood purged or never existed"

    async def compare(self) -> dict[str, Any]:
        """Every user; a repo that cannot be listed (deactivated) is waited for."""
        assert self.store is not None
        total = UserCheck()
        unlistable: list[dict[str, Any]] = []
        async with httpx.AsyncClient(timeout=30) as http:
            for user in self.users:
                one = await self.compare_user(http, user, wait=120.0)
                total.expected += one.expected
                total.records += one.records
                total.skipped += one.skipped
                for kind in ("lost", "duplicated", "orphaned", "mismatched", "wrong_rkey"):
                    getattr(total, kind).extend(getattr(one, kind))
                if one.unlistable:
                    unlistable.append({"did": user.did, "why": one.unlistable})
            inactive = []
            for user in self.users:
                if user.did is None:
                    continue
                with contextlib.suppress(httpx.HTTPError):
                    status = await repo_status(http, user.did, base=self.pds.url)
                    if not status.get("active"):
                        inactive.append({"did": user.did, "status": status.get("status")})
        for item in total.lost[:20] + total.duplicated[:20] + total.orphaned[:20]:
            item["ledger"] = await self.ledger_entry(item["ref"])
            item["doc"] = await self.doc_summary(item["ref"])
        counts = {
            "lost": len(total.lost),
            "duplicated": len(total.duplicated),
            "orphaned": len(total.orphaned),
            "mismatched": len(total.mismatched),
            "unlistable": len(unlistable),
            "inactive": len(inactive),
        }
        return {
            "clean": not any(counts.values()),
            "counts": counts,
            "expected": total.expected,
            "records": total.records,
            "no_account_moods": total.skipped,
            "lost": total.lost,
            "duplicated": total.duplicated,
            "orphaned": total.orphaned,
            "mismatched": total.mismatched,
            "wrong_rkey": total.wrong_rkey,
            "unlistable": unlistable,
            "inactive_accounts": inactive,
        }

    async def ledger_entry(self, ref: str) -> Doc | None:
        assert self.store is not None
        if ObjectId.is_valid(ref):
            found = await self.store.ledger.find_one({"_id": ObjectId(ref)})
            if found is not None:
                return found
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
        comparison = self.comparison
        audit = await self.audit()
        codes = {rep.name: rep.stop() for rep in self.replicators}
        return self.summary(comparison, audit, codes)

    def summary(
        self, comparison: dict[str, Any], audit: dict[str, Any], sigterm: dict[str, int | None]
    ) -> dict[str, Any]:
        s = self.stats
        counts = comparison["counts"]
        ok = comparison["clean"] and audit.get("in_sync") is True
        unexpected = [e for e in s.exits if not e["expected"]]
        return {
            "result": "PASS" if ok else "FAIL",
            "seed": self.opts.seed,
            "minutes": self.opts.minutes,
            "users": len(self.users),
            "users_without_account": sum(1 for u in self.users if not u.has_account),
            "lease_seconds": self.opts.lease_seconds,
            "load_seconds": round(self.load_seconds, 1),
            "caught_up_after_seconds": (
                round(self.caught_up_after, 1) if self.caught_up_after is not None else None
            ),
            "operations": dict(s.ops),
            "operations_total": sum(s.ops.values()),
            "events": s.writes,
            "change_stream_events": self.tail.count if self.tail else None,
            "faults": dict(s.faults),
            "faults_total": sum(s.faults.values()),
            "fault_seconds": {k: round(v, 1) for k, v in s.fault_seconds.items()},
            "fault_reports": s.fault_reports,
            "bad_documents": sum(s.bad.values()),
            "bad_documents_by_kind": dict(s.bad),
            "mongo_retries": s.mongo_retries,
            "load_errors": dict(s.load_errors),
            "max_lag_changes": s.max_lag_changes,
            "max_lag_seconds": round(s.max_lag_seconds, 1),
            "replicator_starts": s.replicator_starts,
            "lease_takeovers": s.takeovers,
            "replicator_exits": s.exits,
            "replicator_unexpected_exits": unexpected,
            "replicator_stalls": s.stalls,
            "replicator_sigterm_exit_codes": sigterm,
            "replicator_log": log_levels(self.dir / "replicator.log"),
            "expected_records": comparison["expected"],
            "records": comparison["records"],
            "no_account_moods": comparison["no_account_moods"],
            "lost": counts["lost"],
            "duplicated": counts["duplicated"],
            "orphaned": counts["orphaned"],
            "mismatched": counts["mismatched"],
            "wrong_rkey": len(comparison["wrong_rkey"]),
            "unlistable_repos": comparison["unlistable"],
            "inactive_accounts": comparison["inactive_accounts"],
            "audit_in_sync": audit.get("in_sync"),
            "audit_exit_code": audit.get("exit_code"),
            "audit_divergences": audit.get("divergences"),
            "audit_dead_letters": audit.get("dead_letters"),
            "audit_invalid_moods": audit.get("invalid_moods"),
            "audit_error": audit.get("error"),
            "examples": {
                k: comparison[k][:20]
                for k in ("lost", "duplicated", "orphaned", "mismatched", "wrong_rkey")
                if comparison[k]
            },
            "audit_examples": audit.get("examples") or [],
            "code": self.code,
            "directory": str(self.dir),
        }

    async def stop(self) -> None:
        with anyio.CancelScope(shield=True):
            for rep in self.replicators:
                rep.stop()
            if self.client is not None:
                await self.client.close()
            await anyio.to_thread.run_sync(self.pds.stop)
            await anyio.to_thread.run_sync(self.mongo.stop)


async def account_call(http: httpx.AsyncClient, method: str, did: str, password: str) -> None:
    """`com.atproto.server.<method>` with the account's own access token (createSession with
    the password from `users`). deactivateAccount takes a JSON body (`{}`); activateAccount
    takes none at all (the PDS refuses one, even `{}`). Retried a few times."""
    last = ""
    for attempt in range(5):
        try:
            session = await http.post(
                "com.atproto.server.createSession", json={"identifier": did, "password": password}
            )
            session.raise_for_status()
            headers = {"authorization": f"Bearer {session.json()['accessJwt']}"}
            if method == "deactivateAccount":
                resp = await http.post(f"com.atproto.server.{method}", json={}, headers=headers)
            else:
                resp = await http.post(f"com.atproto.server.{method}", headers=headers)
            if resp.status_code == 200:
                return
            last = f"HTTP {resp.status_code}: {resp.text[:300]}"
        except httpx.HTTPError as exc:
            last = f"{type(exc).__name__}: {exc}"
        await anyio.sleep(1 + attempt)
    raise SoakError(f"{method} of {did} failed: {last}")


async def repo_status(http: httpx.AsyncClient, did: str, base: str = "") -> dict[str, Any]:
    url = (
        f"{base}/xrpc/com.atproto.sync.getRepoStatus" if base else "com.atproto.sync.getRepoStatus"
    )
    resp = await http.get(url, params={"did": did})
    resp.raise_for_status()
    return dict(resp.json())


def own_lines(path: Path, offset: int, pid: int | None) -> list[str]:
    """Messages of process `pid` in the shared JSON log, from byte `offset` on."""
    out: list[str] = []
    try:
        with path.open("rb") as f:
            f.seek(offset)
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return out
    for line in lines:
        try:
            record = json.loads(line)["record"]
        except (ValueError, KeyError, TypeError):
            continue
        if record.get("process", {}).get("id") == pid:
            out.append(f"{record['level']['name']}: {record['message'][:200]}")
    return out


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


def describe_fault(report: Mapping[str, Any]) -> str:
    skip = {"kind", "t", "seconds", "old_leader_said"}
    detail = ", ".join(f"{k}={v}" for k, v in report.items() if k not in skip)
    return f"t={report.get('t')}s {report['kind']} ({report.get('seconds')}s): {detail}"


def print_summary(out: dict[str, Any]) -> None:
    def kv(d: Mapping[str, Any] | None) -> str:
        return ", ".join(f"{k}={v}" for k, v in (d or {}).items()) or "-"

    print("\n=== soak summary ===")
    print(f"result:            {out['result']}  (seed {out['seed']}, {out['minutes']} min)")
    caught = out["caught_up_after_seconds"]
    print(
        f"duration:          load {out['load_seconds']}s, "
        + (f"caught up after {caught}s" if caught is not None else "never caught up")
    )
    print(f"users:             {out['users']} ({out['users_without_account']} without account)")
    print(f"operations:        {out['operations_total']} ({kv(out['operations'])})")
    print(
        f"events:            {out['events']} documents written by the load; "
        f"{out['change_stream_events']} changes of moods in the oplog (write-backs included)"
    )
    print(f"faults injected:   {out['faults_total']} ({kv(out['faults'])})")
    print(f"fault seconds:     {kv(out['fault_seconds'])}")
    for report in out["fault_reports"]:
        print(f"                   {describe_fault(report)}")
    print(f"bad documents:     {out['bad_documents']} ({kv(out['bad_documents_by_kind'])})")
    print(f"mongo retries:     {out['mongo_retries']}  load errors: {kv(out['load_errors'])}")
    print(
        f"max lag:           {out['max_lag_changes']} changes, {out['max_lag_seconds']}s "
        "(newest change of moods vs the checkpoint's last_event_at)"
    )
    exits, stalls = out["replicator_exits"], out["replicator_stalls"]
    print(
        f"replicator:        2 processes (lease {out['lease_seconds']}s), "
        f"{out['replicator_starts']} starts, {out['lease_takeovers']} takeovers; "
        f"{len(exits)} exits on their own ({len(out['replicator_unexpected_exits'])} "
        f"unexpected), {len(stalls)} stalls or hangs (evidence, restart); SIGTERM exit codes "
        f"{kv(out['replicator_sigterm_exit_codes'])}"
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
    print(f"orphaned:          {out['orphaned']}")
    print(f"mismatched:        {out['mismatched']}  wrong rkey: {out['wrong_rkey']}")
    print(
        f"accounts:          {len(out['inactive_accounts'])} not active at the end, "
        f"{len(out['unlistable_repos'])} repos could not be listed"
    )
    print(
        f"audit:             in_sync={out['audit_in_sync']} exit={out['audit_exit_code']} "
        f"divergences: {kv(out['audit_divergences'])}; dead letters "
        f"{out['audit_dead_letters']}, invalid moods {out['audit_invalid_moods']}"
    )
    if out.get("audit_error"):
        print(f"audit error:       {out['audit_error']}")
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
    p.add_argument(
        "--lease-seconds",
        type=float,
        default=3.0,
        help="REPLICATOR_LEASE_SECONDS of both replicator processes (default 3)",
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
    if a.users - a.without_account < 1 and "deactivate_account" in faults:
        p.error("deactivate_account needs a user with an account")
    return Options(
        a.minutes,
        seed,
        a.users,
        a.without_account,
        a.rate,
        a.fault_interval[0],
        a.fault_interval[1],
        faults,
        a.lease_seconds,
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
