"""What every part of the benchmark shares: sizes, seeded users, databases, the replicator as a
child process, a firehose watcher (when a record became visible on the PDS) and CPU accounting
(where the machine's two cores went during a scenario)."""

from __future__ import annotations

import math
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import anyio
import httpx
import libipld
import orjson
from anyio.abc import Process, TaskStatus
from bson import ObjectId
from pymongo import AsyncMongoClient
from pymongo.errors import AutoReconnect

from replicator.config import Settings
from replicator.recordtypes.mood import NSID as MOOD_COLLECTION
from replicator.sessions import Session
from replicator.store import Doc, Names, Store

from ..devstack.procs import free_port
from ..devstack.seed import seed_user
from ..devstack.servers import EmbeddedMongo
from ..devstack.stack import LocalStack
from .probe import ENV as PROBE_ENV
from .shape import Call, read_calls

__all__ = ["BENCH_NAMES", "MB", "BenchUser", "Ctx", "Doc", "Firehose", "Sizes"]

BENCH_NAMES = Names()
MB = 1024 * 1024


@dataclass(frozen=True)
class Sizes:
    """How much work each measurement does. `quick` is about ten times smaller."""

    users: int = 200
    burst: int = 10_000
    purge_users: int = 10
    purge: int = 5_000
    backfill: int = 10_000
    lag_rate: float = 50.0
    lag_seconds: float = 60.0
    backlog: int = 100_000
    backlog_seconds: float = 300.0  # drain at most this long, then report how far it got
    core: int = 20_000
    core_seconds: float = 120.0  # at most; events/s is then over what was applied by then
    capacity_seconds: float = 20.0
    single_concurrency: int = 32
    batch_concurrency: int = 4
    old_seconds: float = 20.0
    old_max: int = 500
    concurrency: int | None = None  # the replicator's --concurrency (None: its default)
    batch_size: int | None = None  # the replicator's --batch-size (None: its default)

    @classmethod
    def build(cls, *, quick: bool = False, moods: int | None = None, **given: Any) -> Sizes:
        """`moods` sets the burst and the backfill (purge half, backlog 10x, core 2x); any
        other field can be given by name; None keeps the default."""
        base = cls.quick() if quick else cls()
        changes = {k: v for k, v in given.items() if v is not None}
        if moods is not None:
            derived = {"burst": moods, "backfill": moods, "backlog": moods * 10,
                       "core": moods * 2, "purge": max(base.purge_users, moods // 2)}  # fmt: skip
            changes = {**derived, **changes}
        return replace(base, **changes)

    @classmethod
    def quick(cls) -> Sizes:
        return cls(users=20, burst=1_000, purge=500, backfill=1_000, lag_seconds=10.0,
                   backlog=10_000, backlog_seconds=60.0, core=2_000, core_seconds=60.0,
                   capacity_seconds=4.0,
                   old_seconds=4.0, old_max=50)  # fmt: skip

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


# -- users ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchUser:
    sub: str
    name: str
    did: str
    password: str = field(repr=False)
    session: Session | None = field(default=None, repr=False)

    @property
    def handle(self) -> str:
        return f"{self.name}.test"

    def user_doc(self) -> Doc:
        atproto = {"did": self.did, "handle": self.handle, "password": self.password}
        return {"_id": self.sub, "code": self.name, "atproto": atproto}


async def seed_users(
    seed_store: Store,
    pds_url: str,
    count: int,
    *,
    prefix: str,
    admin_password: str | None,
    concurrency: int = 4,
) -> list[BenchUser]:
    """`count` production-shaped users with PDS accounts (created `concurrency` at a time),
    each logged in once: the session is what a running sidecar already holds."""
    out: list[BenchUser | None] = [None] * count
    limiter = anyio.CapacityLimiter(concurrency)

    async with httpx.AsyncClient(base_url=f"{pds_url.rstrip('/')}/xrpc/", timeout=60) as http:

        async def one(i: int) -> None:
            async with limiter:
                name = f"{prefix}{i:04d}"
                seeded = await seed_user(seed_store, pds_url, name, admin_password=admin_password)
                assert seeded.did is not None and seeded.password is not None
                resp = await http.post(
                    "com.atproto.server.createSession",
                    json={"identifier": seeded.did, "password": seeded.password},
                )
                resp.raise_for_status()
                body = resp.json()
                session = Session(body["accessJwt"], body["refreshJwt"])
                out[i] = BenchUser(seeded.sub, name, seeded.did, seeded.password, session)

        async with anyio.create_task_group() as tg:
            for i in range(count):
                tg.start_soon(one, i)
    return [u for u in out if u is not None]


def fake_users(count: int, prefix: str) -> list[BenchUser]:
    """Users with made-up DIDs, for the core measurements, which never reach a PDS."""
    return [
        BenchUser(
            f"auth0|{secrets.token_hex(12)}",
            f"{prefix}{i:04d}",
            f"did:plc:{secrets.token_hex(12)}",
            secrets.token_urlsafe(12),
        )
        for i in range(count)
    ]


async def prepare_db(
    client: AsyncMongoClient[Doc], db_name: str, users: Sequence[BenchUser]
) -> Store:
    """A scenario's own database: the users, their handles and their warm sessions."""
    for attempt in range(3):  # a server still busy with the last scenario may drop us once
        try:
            await client.drop_database(db_name)
            break
        except AutoReconnect:
            if attempt == 2:
                raise
            await anyio.sleep(5)
    store = Store(client, db_name, BENCH_NAMES)
    await store.ensure_indexes()
    if users:
        await store.users.insert_many([u.user_doc() for u in users])
        await store.handles.insert_many([{"_id": u.sub, "handle": u.name} for u in users])
    for user in users:
        if user.session is not None:
            await store.save_session(user.did, user.session)
    return store


def mood_docs(users: Sequence[BenchUser], count: int, *, label: str) -> list[Doc]:
    """`count` moods spread round-robin over `users`; ids made here, so rkeys are known."""
    now = datetime.now(UTC)
    return [
        {
            "_id": ObjectId(),
            "user": users[i % len(users)].sub,
            "mood": f"{label} mood {i} ✨",
            "when": now,
        }
        for i in range(count)
    ]


async def insert_docs(store: Store, docs: Sequence[Doc], chunk: int = 500) -> float:
    """insert_many in chunks; returns the seconds it took."""
    started = time.monotonic()
    for i in range(0, len(docs), chunk):
        await store.docs.insert_many(list(docs[i : i + chunk]), ordered=False)
    return time.monotonic() - started


async def wait_until(
    check: Callable[[], Awaitable[bool]], *, within: float, what: str, every: float = 0.1
) -> None:
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not reached within {within:.0f}s")
        await anyio.sleep(every)


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


# -- the PDS firehose: when a record became visible ------------------------------------------


class Firehose:
    """`com.atproto.sync.subscribeRepos` of the PDS: the moment each mood record's commit is
    sequenced, which is when any client (an AppView) can see it."""

    def __init__(self, pds_url: str, collection: str = MOOD_COLLECTION) -> None:
        scheme, _, rest = pds_url.rstrip("/").partition("://")
        self.url = (
            f"{'wss' if scheme == 'https' else 'ws'}://{rest}/xrpc/com.atproto.sync.subscribeRepos"
        )
        self.prefix = f"{collection}/"
        self.created: dict[str, float] = {}  # rkey → monotonic time first seen
        self.deleted: dict[str, float] = {}
        self.commits = 0
        self.ops = 0

    def reset(self) -> None:
        self.created.clear()
        self.deleted.clear()
        self.commits = self.ops = 0

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        from websockets.asyncio.client import connect

        async with connect(self.url, max_size=None, ping_interval=None) as ws:
            task_status.started()
            async for frame in ws:
                now = time.monotonic()
                if not isinstance(frame, bytes):
                    continue
                parts = libipld.decode_dag_cbor_multi(frame)
                if len(parts) != 2 or parts[0].get("t") != "#commit":
                    continue
                mine = False
                for op in parts[1].get("ops") or []:
                    path = op.get("path") or ""
                    if not path.startswith(self.prefix):
                        continue
                    mine = True
                    self.ops += 1
                    rkey = path[len(self.prefix) :]
                    if op.get("action") == "delete":
                        self.deleted.setdefault(rkey, now)
                    else:
                        self.created.setdefault(rkey, now)
                self.commits += mine


# -- CPU accounting ----------------------------------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK")


def _proc_table() -> dict[int, tuple[int, float]]:
    """pid → (ppid, cpu seconds) for every process."""
    table: dict[int, tuple[int, float]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                raw = fh.read().decode(errors="replace")
        except OSError:
            continue
        fields = raw[raw.rfind(")") + 2 :].split()
        table[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / _TICK)
    return table


def _busy_seconds() -> float:
    with open("/proc/stat") as fh:
        values = [int(v) for v in fh.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return (sum(values[:8]) - idle) / _TICK


@dataclass
class CpuSnapshot:
    at: float
    busy: float
    by_name: dict[str, float]


class CpuMeter:
    """CPU seconds of named process trees (the PDS, MongoDB, the replicator, the bench itself)
    and of everything else on the machine (other engineers' tests: the noise)."""

    def __init__(self, pids: Mapping[str, int | None]) -> None:
        self.pids = {k: v for k, v in pids.items() if v}

    def add(self, name: str, pid: int | None) -> None:
        if pid:
            self.pids[name] = pid

    def remove(self, name: str) -> None:
        self.pids.pop(name, None)

    def snapshot(self) -> CpuSnapshot:
        table = _proc_table()
        children: dict[int, list[int]] = {}
        for pid, (ppid, _) in table.items():
            children.setdefault(ppid, []).append(pid)
        roots = set(self.pids.values())
        by_name: dict[str, float] = {}
        for name, root in self.pids.items():
            total, todo = 0.0, [root]
            while todo:
                pid = todo.pop()
                if pid in table:
                    total += table[pid][1]
                # Another named tree (the bench's children: servers, replicator) is its own.
                todo.extend(c for c in children.get(pid, []) if c not in roots)
            by_name[name] = total
        return CpuSnapshot(time.monotonic(), _busy_seconds(), by_name)

    @staticmethod
    def between(
        start: CpuSnapshot, end: CpuSnapshot, extra: Mapping[str, float] | None = None
    ) -> dict[str, float]:
        """Average cores used per process tree over the interval (1.0 = one core busy);
        `extra`: CPU seconds of processes that ended meanwhile (from their rusage)."""
        wall = max(1e-9, end.at - start.at)
        seconds = {
            name: end.by_name[name] - start.by_name[name]
            for name in end.by_name
            if name in start.by_name
        }
        seconds.update(extra or {})
        out = {name: round(value / wall, 2) for name, value in seconds.items()}
        ours = sum(seconds.values())
        out["other"] = round(max(0.0, (end.busy - start.busy) - ours) / wall, 2)
        out["machine"] = round((end.busy - start.busy) / wall, 2)
        return out


# -- the replicator as a child process ------------------------------------------------------


def replicator_env(
    mongodb_uri: str,
    db_name: str,
    pds_url: str,
    names: Names,
    sizes: Sizes,
    plc_url: str | None = None,
) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REPLICATOR_")}
    env.update(
        MONGODB_CONNECTION_STRING=mongodb_uri,
        MONGODB_NAME=db_name,
        PDS_URL=pds_url,
        REPLICATOR_MOODS_COLLECTION=names.moods,
        REPLICATOR_USERS_COLLECTION=names.users,
        REPLICATOR_HANDLES_COLLECTION=names.handles,
        REPLICATOR_LOG_FORMAT="text",
        # Its own /metrics port: another engineer's replicator may hold the default one.
        REPLICATOR_HTTP_ADDR=f"127.0.0.1:{free_port()}",
    )
    if plc_url:
        # The PLC the users' DIDs live in: the account gate resolves every DID it writes to.
        env["REPLICATOR_PLC_URL"] = plc_url
    if sizes.concurrency is not None:
        env["REPLICATOR_CONCURRENCY"] = str(sizes.concurrency)
    if sizes.batch_size is not None:
        env["REPLICATOR_BATCH_SIZE"] = str(sizes.batch_size)
    return env


def _open_log(path: Path) -> IO[bytes]:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.open("ab")


def read_status_kb(pid: int, key: str) -> int | None:
    """`VmHWM` (peak RSS), `VmRSS`... of a live process, in KiB."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(f"{key}:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class ReplicatorProcess:
    """`python -m replicator.cli <args>`, optionally under pyinstrument, logging to a file;
    with `probe_to`, through `replicator_dev.bench.probe`, which records its PDS calls there."""

    def __init__(
        self,
        env: Mapping[str, str],
        log_path: Path,
        *,
        args: Sequence[str] = ("run",),
        profile_to: Path | None = None,
        stdout_path: Path | None = None,
        probe_to: Path | None = None,
    ) -> None:
        self.env = dict(env)
        self.log_path = log_path
        self.args = list(args)
        self.profile_to = profile_to
        self.stdout_path = stdout_path
        self.probe_to = probe_to
        if probe_to is not None:
            probe_to.unlink(missing_ok=True)
            self.env[PROBE_ENV] = str(probe_to)
        self._out: IO[bytes] | None = None
        self.proc: Process | None = None
        self._log: IO[bytes] | None = None

    @property
    def argv(self) -> list[str]:
        module = "replicator_dev.bench.probe" if self.probe_to is not None else "replicator.cli"
        if self.profile_to is not None:
            return [sys.executable, "-m", "pyinstrument", "-r", "pyisession",
                    "-o", str(self.profile_to), "-m", module, *self.args]  # fmt: skip
        return [sys.executable, "-m", module, *self.args]

    def calls(self) -> list[Call]:
        """The PDS calls the probe recorded (empty without one)."""
        return read_calls(self.probe_to) if self.probe_to is not None else []

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    async def start(self) -> ReplicatorProcess:
        self._log = _open_log(self.log_path)
        if self.stdout_path is not None:
            self._out = _open_log(self.stdout_path)
        self.proc = await anyio.open_process(
            self.argv, stdin=subprocess.DEVNULL, stdout=self._out or self._log,
            stderr=self._log, env=self.env,
        )  # fmt: skip
        return self

    async def wait(self) -> int:
        assert self.proc is not None
        code = await self.proc.wait()
        self._close_files()
        return code

    def _close_files(self) -> None:
        for fh in (self._log, self._out):
            if fh is not None and not fh.closed:
                fh.close()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    def peak_rss_kb(self) -> int | None:
        return read_status_kb(self.pid, "VmHWM") if self.pid else None

    def rss_kb(self) -> int | None:
        return read_status_kb(self.pid, "VmRSS") if self.pid else None

    async def stop(self, grace: float = 60.0) -> int | None:
        """SIGTERM (the replicator finishes its batch and saves its checkpoint), then kill."""
        if self.proc is None:
            return None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            with anyio.move_on_after(grace):
                await self.proc.wait()
            if self.proc.returncode is None:
                self.proc.kill()
                await self.proc.wait()
        await self.proc.aclose()
        self._close_files()
        return self.proc.returncode


async def wait_stream_open(store: Store, proc: ReplicatorProcess, within: float = 60.0) -> None:
    """A replicator started without a checkpoint saves one as soon as its stream is open."""

    async def is_open() -> bool:
        if not proc.alive():
            raise RuntimeError(f"the replicator exited early; see {proc.log_path}")
        return await store.load_checkpoint() is not None

    await wait_until(is_open, within=within, what="replicator change stream open", every=0.1)


def rkeys_of(ids: Iterable[ObjectId]) -> list[str]:
    from replicator.tid import from_object_id

    return [from_object_id(i) for i in ids]


def dumps(value: Any) -> bytes:
    return orjson.dumps(value, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS)


# -- what a scenario needs -------------------------------------------------------------------


@dataclass
class Ctx:
    """One bench run: where the servers are, the seeded users, the sizes, where files go."""

    mongodb_uri: str
    pds_url: str
    client: AsyncMongoClient[Doc]
    sizes: Sizes
    run_id: str
    work_dir: Path
    plc_url: str | None = None
    users: list[BenchUser] = field(default_factory=list)
    purge_users: list[BenchUser] = field(default_factory=list)
    server_pids: dict[str, int | None] = field(default_factory=dict)
    profile_dir: Path | None = None
    say: Callable[[str], None] = print
    databases: list[str] = field(default_factory=list)

    def db(self, scenario: str) -> str:
        name = f"bench_{self.run_id}_{scenario}"
        if name not in self.databases:
            self.databases.append(name)
        return name

    def meter(self, **extra: int | None) -> CpuMeter:
        return CpuMeter({**self.server_pids, "bench": os.getpid(), **extra})

    def env(self, db_name: str) -> dict[str, str]:
        return replicator_env(self.mongodb_uri, db_name, self.pds_url, BENCH_NAMES, self.sizes,
                              self.plc_url)  # fmt: skip

    def settings(self, db_name: str, pds_url: str | None = None) -> Settings:
        """For the replicator in this process (the backfill's setup, the core)."""
        extra: dict[str, Any] = {}
        if self.sizes.concurrency is not None:
            extra["concurrency"] = self.sizes.concurrency
        if self.sizes.batch_size is not None:
            extra["batch_size"] = self.sizes.batch_size
        if self.plc_url:
            extra["plc_url"] = self.plc_url
        return Settings(self.mongodb_uri, db_name, pds_url or self.pds_url, BENCH_NAMES,
                        http_addr="off", **extra)  # fmt: skip

    def replicator(
        self,
        db_name: str,
        scenario: str,
        *,
        args: Sequence[str] = ("run",),
        profile: bool = False,
        probe: bool = False,
        stdout_path: Path | None = None,
        null_pds: bool = False,
    ) -> ReplicatorProcess:
        """`replicator <args>` on the scenario's database; `probe`: its PDS calls recorded
        (`<scenario>-calls.jsonl`), for the scenario's commit shape; `null_pds`: every PDS
        call answered at once, in the process (the MongoDB ceiling of the same work)."""
        profile_to = None
        if profile and self.profile_dir is not None:
            profile_to = self.profile_dir / f"{scenario}-replicator.pyisession"
        probe_to = self.work_dir / f"{scenario}-calls.jsonl" if probe else None
        env = self.env(db_name)
        if null_pds:
            env["BENCH_NULL_PDS"] = "1"  # replicator_dev.bench.probe's NULL_PDS_ENV
        return ReplicatorProcess(
            env, self.work_dir / f"{scenario}-replicator.log", args=args,
            profile_to=profile_to, stdout_path=stdout_path, probe_to=probe_to,
        )  # fmt: skip


# -- the bench's own stack ---------------------------------------------------------------------


def oplog_entries(sizes: Sizes) -> int:
    """Oplog entries the embedded server keeps (its default, 100,000, is a count, where a real
    replica set's oplog is sized in bytes: hours of writes). A backlog is read while the
    replicator adds about three entries per mood (intent, outcome, write-back) after it, so
    the bench keeps ten per mood of its largest backlog, and never fewer than the default."""
    return max(100_000, 10 * max(sizes.backlog, sizes.core) + 100_000)


@dataclass
class BenchStack(LocalStack):
    """`LocalStack`, with the embedded MongoDB started with `mongo_args`."""

    mongo_args: tuple[str, ...] = ()

    def start(self) -> BenchStack:
        if self.mongodb_uri is None:
            self.mongo = EmbeddedMongo(self.state / "mongo", extra_args=self.mongo_args)
            try:
                self.mongo.start()
            except BaseException:
                self.mongo.stop()
                raise
            self.mongodb_uri = self.mongo.uri
        super().start()  # the PDS (MongoDB is there now) and the stop-on-signal handlers
        return self
