"""One seeded schedule: the world, its processes, the driver, the verdict.

`simulate(seed)` draws everything from `random.Random(seed)`: the world's options (users,
pre-images, batch sizes, PDS faults, oplog pruning, ...), the application's mutations and
when they happen, and when processes are killed. It then runs the real `Replicator`,
`Applier`, planner and `RepoWriter` (wired as `runtime.open_runtime` wires them, over the
fakes), restarting a fresh process over the same persistent fakes after every crash, with
the application still writing while it is down. Once the application is done and the world
is quiet (every event applied and checkpointed, nothing pending or parked), the process is
stopped; one last process without crashes runs to quiet again; then the PDS is compared with
the desired state. The safety property is checked inside the fake PDS at every step.
"""

from __future__ import annotations

import functools
import hashlib
import random
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import anyio
import httpx
import stamina
import stamina.instrumentation
from bson import ObjectId

from replicator.accounts import AccountGate
from replicator.apply import Applier
from replicator.desired import desired_state
from replicator.identity import Directory
from replicator.lease import Fence
from replicator.model import State
from replicator.outbound import Outbound
from replicator.pds import Pds
from replicator.recordtypes import MOOD, NEWS
from replicator.sessions import SessionPool
from replicator.stream import Replicator
from replicator.writer import RepoWriter

from .app import POSTS, App
from .checks import SIM_TYPES, Safety, canonical, divergences, remembered
from .fake_mongo import MongoState, position_of
from .fake_pds import REFUSED, Applied, PdsState, Record, pds_handler, plc_handler
from .fake_store import FakeStore
from .loop import SimLoop
from .scheduler import Clock, Crash, Mode, Process, Scheduler, Trigger

PLC_URL = "https://plc.sim.test"
MAX_STEPS = 60_000
SETTLE_STEPS = 6_000  # after the app is done: steps allowed to reach quiet
MAX_PROCESSES = 40
# stamina's attempts in testing mode (no waits). The sidecar retries transient PDS errors
# without bound; a hundred in a row is as good as forever for the blips the fake PDS injects.
RETRY_ATTEMPTS = 100
SITES = (
    "moods_by_id", "ledger_by_id", "accounts", "moods_of_user",
    "dead_letter_many", "ledger_of_user", "parked_ids", "save_entries", "rkey_owners",
    "write_back_many", "clear_dead_letters", "forget_dead_letter", "watch_docs", "watch_users",
    "load_checkpoint", "save_checkpoint", "clear_checkpoint_marks", "users_in_scope",
    "user_of_mood", "load_run", "start_run", "finish_run", "users_done", "user_done",
    "parked_accounts", "save_parked_account", "release_account", "load_session",
    "save_session", "getMore:moods", "getMore:users", "pds:com.atproto.server.createSession",
    "pds:com.atproto.server.refreshSession", "pds:com.atproto.repo.putRecord",
    "pds:com.atproto.repo.deleteRecord", "pds:com.atproto.repo.applyWrites",
    "pds:com.atproto.repo.listRecords", "pds:com.atproto.sync.getRepoStatus", "plc:resolve",
    "users_gone", "credentials_of", "begin_erasure", "pending_erasures", "forgotten",
    "forget_user", "cancel_erasure", "clear_dead_letters_but",
)  # fmt: skip


@dataclass(frozen=True)
class Options:
    """A world, drawn from the seed."""

    users_with_account: int
    users_without_account: int
    preimages: bool
    batch_size: int
    concurrency: int
    heartbeat_seconds: float
    parked_retry_seconds: float
    mutations: int
    mutation_rate: float  # chance per step that the app writes (one document)
    downtime_mutations: int  # at most, between a crash and the restart
    prune_rate: float  # chance per step that the oplog is truncated near its head
    cursor_kill_rate: float
    pds_fault_rate: float
    token_ttl: float | None
    bad_docs: bool  # invalid documents, string ids, records the PDS refuses
    deactivations: bool  # accounts deactivated on the PDS for a while
    erasures: bool  # users erased by the app, in every order (app.py, `App.erase`)
    account_recheck_seconds: float
    triggers: tuple[Trigger, ...]
    news: bool = False  # news posts too: the second record type, in the same stream

    @classmethod
    def draw(cls, rng: random.Random) -> Options:
        mutations = rng.randint(4, 40)
        crashes = rng.choices((0, 1, 2, 3, 4, 6), (1, 3, 3, 2, 2, 1))[0]
        triggers = []
        modes: tuple[Mode, Mode] = ("before", "after")
        for _ in range(crashes):
            mode = rng.choice(modes)
            if rng.random() < 0.5:
                triggers.append(Trigger(mode, step=rng.randint(1, 10 * mutations)))
            else:
                triggers.append(Trigger(mode, site=rng.choice(SITES), nth=rng.randint(1, 3)))
        return cls(
            users_with_account=rng.randint(1, 4),
            users_without_account=rng.choice((0, 0, 1, 2)),
            preimages=rng.random() < 0.5,
            batch_size=rng.choice((1, 2, 3, 5, 8, 50, 2000)),
            concurrency=rng.choice((1, 2, 8)),
            heartbeat_seconds=rng.choice((0.5, 5.0)),
            parked_retry_seconds=rng.choice((2.0, 10.0, 60.0)),
            mutations=mutations,
            mutation_rate=rng.choice((0.05, 0.2, 0.5)),
            downtime_mutations=rng.choice((0, 2, 6)),
            prune_rate=rng.choice((0.0, 0.0, 0.0, 0.002, 0.01)),
            cursor_kill_rate=rng.choice((0.0, 0.0, 0.02)),
            pds_fault_rate=rng.choice((0.0, 0.0, 0.03, 0.1)),
            token_ttl=rng.choice((None, None, 30.0)),
            bad_docs=rng.random() < 0.3,
            deactivations=rng.random() < 0.2,
            erasures=rng.random() < 0.3,
            account_recheck_seconds=rng.choice((1.0, 30.0)),
            triggers=tuple(triggers),
        )


@dataclass
class Result:
    seed: int
    options: Options
    steps: int
    processes: int
    crashes: list[tuple[str, str]]
    violations: list[str]
    problems: list[str]
    log: list[str]
    pds_log: list[Any]
    sites_called: set[str] = field(default_factory=set)

    @property
    def ok(self) -> bool:
        return not self.violations and not self.problems

    def digest(self) -> str:
        """Of the step log and the PDS's applied writes: equal for equal trajectories."""
        text = "\n".join(self.log) + "\n" + "\n".join(map(repr, self.pds_log))
        return hashlib.sha256(text.encode()).hexdigest()

    def features(self) -> set[str]:
        """What this schedule exercised (the tests check that the sweep covers each)."""
        text = "\n".join(self.log)
        found = {name for name, needle in _FEATURES.items() if needle in text}
        found |= {f"crash {mode}" for _, mode in self.crashes}
        found.add("pre-images on" if self.options.preimages else "pre-images off")
        found |= {name for name, site in _SITE_FEATURES.items() if site in self.sites_called}
        return found


_FEATURES = {
    "history lost when opening": "history lost: watch moods",
    "history lost while reading": "history lost: getMore moods",
    "cursor dropped": "cursor dropped: moods",
    "write refused for good": "content policy",
    "applyWrites refused with 500": "500: ",
    "nuke": "app nuke", "un-nuke": "app unnuke", "purge": "app purge",
    "replace": "app replace", "bad document": "app insert bad", "account given": "app account",
    "account deactivated": "app deactivate", "erasure": "app erase ",
    "erasure, users first": "users_first,", "erasure, atproto unset": "unset_atproto,",
    "erasure, account deleted before": "account deleted_before",
    "erasure, session expired": "credentials session_expired",
    "erasure, no credential": "credentials neither", "operator rescue": "operator deletes",
    "operator restore": "operator restores", "news post": "app post ",
    "news post dead": "app post dead", "news post live again": "app post live",
    "news erased": "app erase post",
}  # fmt: skip
_SITE_FEATURES = {
    "recovery finished": "finish_run", "account parked": "save_parked_account",
    "account released": "release_account", "session refreshed":
    "pds:com.atproto.server.refreshSession", "applyWrites": "pds:com.atproto.repo.applyWrites",
    "listing": "pds:com.atproto.repo.listRecords", "dead letter": "dead_letter_many",
    "user forgotten": "forget_user",
}  # fmt: skip


@dataclass
class Incarnation:
    proc: Process
    store: FakeStore
    replicator: Replicator
    directory: Directory  # its refresher runs beside the replicator, as `open_runtime` runs it
    clients: list[httpx.AsyncClient]


class World:
    def __init__(
        self,
        seed: int,
        *,
        crash_at: tuple[Trigger, ...] = (),
        overrides: Mapping[str, Any] | None = None,
    ) -> None:
        """`crash_at`: crashes on top of the seed's own; `overrides`: `Options` fields to
        force (both for the tests that aim at one site; a failure replays with the same)."""
        root = random.Random(seed)
        self.seed = seed
        options = Options.draw(random.Random(root.getrandbits(64)))
        options = replace(options, **(overrides or {}))
        self.options = replace(options, triggers=crash_at + options.triggers)
        self.app_rng = random.Random(root.getrandbits(64))
        self.fault_rng = random.Random(root.getrandbits(64))
        self.world_rng = random.Random(root.getrandbits(64))
        # Drawn after the others: a world without news is the one it was before news.
        news_rng = random.Random(root.getrandbits(64))
        if not overrides or "news" not in overrides:
            self.options = replace(self.options, news=news_rng.random() < 0.35)
        self.clock = Clock()
        self.scheduler = Scheduler(self.clock, list(self.options.triggers), self._on_step)
        self.mongo = MongoState(
            self.clock, preimages=self.options.preimages, on_write=self._on_mongo_write
        )
        self.pds = PdsState(token_ttl=self.options.token_ttl,
                            fault_rate=self.options.pds_fault_rate,
                            on_change=self._on_pds_change)  # fmt: skip
        self.history: dict[str, set[bytes]] = {}  # every record each mood has wanted
        self.app = App(self.mongo, self.pds, self.app_rng, bad_docs=self.options.bad_docs,
                       deactivations=self.options.deactivations,
                       erasures=self.options.erasures,
                       news_rng=news_rng if self.options.news else None)  # fmt: skip
        self.safety = Safety(
            self.mongo, self.pds, erased=self.app.erased_subs, accounts=self.app.dids
        )
        self.budget = self.options.mutations
        self.pending: Iterator[str] | None = None
        self.current: Incarnation | None = None
        self.stop: anyio.Event | None = None
        self.processes = 0
        self.done_at: int | None = None  # the step at which the app finished
        self.final = False
        self.gave_up = False

    # -- the world between steps -----------------------------------------------------------

    def _on_pds_change(self, applied: Applied, record: Record | None) -> None:
        self.safety.on_pds_change(applied, record)

    def _on_mongo_write(
        self, collection: str, op: str, key: Any, before: dict[str, Any] | None,
        after: dict[str, Any] | None,
    ) -> None:  # fmt: skip
        self.safety.on_mongo_write(collection, op, key, before, after)
        rtype = {t.collection: t.rtype for t in SIM_TYPES}.get(collection)
        if rtype is not None and after is not None and isinstance(key, ObjectId):
            want = desired_state(rtype, key, after, has_account=True)
            if want.record is not None:
                self.history.setdefault(str(key), set()).add(canonical(want.record))

    def _started(self) -> bool:
        """Moods are written only once the replicator has a position (before that, a first
        start begins at "now" by design, and the backfill's job is what came earlier)."""
        doc = self.mongo.coll("replicator_state").get("checkpoint:moods")
        return doc is not None and "token" in doc

    def _mutate(self) -> None:
        if self.pending is None:
            if self.budget <= 0:
                if self.app.inactive():  # the app's last act: every account active again
                    self.pending = self.app.reactivate(self.app.users[0])
                else:
                    return
            else:
                self.budget -= 1
                self.pending = self.app.pick()
        line = next(self.pending, None)
        if line is None:
            self.pending = None
            if self.budget > 0:
                self._mutate()
            return
        self.scheduler.note(f"app {line}")

    def _on_step(self, step: int, site: str) -> None:
        settling = self.done_at is not None and step - self.done_at > SETTLE_STEPS
        if (step > MAX_STEPS or settling) and self.current is not None:
            self.current.proc.dead = True  # abandoned: the verdict is "no convergence"
            self.gave_up = True
            raise Crash("step limit")
        rng = self.world_rng
        if self._started() and not self.app_done:
            # A multi-document write in progress moves on faster than new ones start.
            rate = self.options.mutation_rate if self.pending is None else 0.5
            if rng.random() < rate:
                self._mutate()
        if self.options.prune_rate and rng.random() < self.options.prune_rate:
            self._prune()
        self._rescue()
        if self.app_done and self.done_at is None:
            self.done_at = step
        if self.stop is not None and self._quiet():
            self.stop.set()

    def _rescue(self) -> None:
        """The operator answers the `erased` alert: an erased user the replicator parked
        because no credential works has their account deleted with the admin password, or
        their credentials restored and, once the replicator took them, is erased again."""
        parked = self.mongo.coll("replicator_accounts")
        for user in self.app.users:
            if user.erased is None or user.did is None:
                continue
            if user.rescued == "restored":
                doc = self.mongo.coll("replicator_state").get("checkpoint:users") or {}
                seen = "token" in doc and position_of(doc["token"]) >= user.restored_at
                if seen and user.did not in parked:
                    self.scheduler.note(self.app.erase_again(user))
                continue
            if user.rescued or parked.get(user.did, {}).get("kind") != "erased":
                continue
            if user.erased[2] != "neither":
                self.safety.violations.append(
                    f"{user.handle} parked `erased` although a credential works "
                    f"({user.erased[2]}, account {user.erased[1]})"
                )
            self.scheduler.note(self.app.rescue(user))

    def _prune(self) -> None:
        floor = self.mongo.position - self.world_rng.randint(0, 8)
        if floor > self.mongo.floor:
            self.mongo.prune(floor)
            self.scheduler.note(f"prune oplog below {self.mongo.floor}")

    @property
    def app_done(self) -> bool:
        return self.budget <= 0 and self.pending is None and not self.app.inactive()

    def _idle_wait(self) -> float:
        """How long an empty getMore of the moods stream waits: the server's max await, or,
        once only parked work and backoffs are left, long enough to reach them soon."""
        return 0.25 if not self.app_done else 10.0

    def _kill_cursor(self) -> bool:
        return bool(self.options.cursor_kill_rate) and (
            self.world_rng.random() < self.options.cursor_kill_rate
        )

    def _quiet(self) -> bool:
        return self.app_done and not self.unquiet()

    def unquiet(self) -> list[str]:
        """What keeps the world from being quiet: the app is not done, events are not all
        applied and checkpointed, or ledger entries wait (pending or parked)."""
        out = []
        if not self.app_done:
            out.append("the app is still writing")
        if self.current is None:
            out.append("no process")
        elif not self.current.replicator.stream_open or not self.current.replicator.idle:
            out.append("the replicator is not idle on an open stream")
        for name, collection in (("checkpoint:moods", "moods"), ("checkpoint:users", "users")):
            doc = self.mongo.coll("replicator_state").get(name) or {}
            for mark in ("recovery", "invalidated"):
                if doc.get(mark):
                    out.append(f"{name} is marked {mark}")
            last = max(self.mongo.last_event(c) for c in (collection, POSTS))
            if last and ("token" not in doc or position_of(doc["token"]) < last):
                out.append(f"{name} is behind the last {collection} event ({last})")
        waiting = (State.PENDING.value, State.PARKED.value)
        for d in (d for t in SIM_TYPES for d in self.mongo.coll(t.ledger).values()):
            if d.get("state") in waiting and not self._refused_for_good(d):
                out.append(f"ledger {d['_id']} {d['state']} ({d.get('reason')}, retry at "
                           f"{d.get('retry_at')}, attempts {d.get('attempts')})")  # fmt: skip
        for d in self.mongo.coll("replicator_accounts").values():
            out.append(f"account {d['_id']} parked ({d.get('reason')})")
        for d in self.mongo.coll("replicator_erasures").values():
            if "sub" in d:
                out.append(f"the erasure of {d['sub']} is not finished")
        out += [f"the operator has yet to erase {u.handle} again" for u in self.app.users
                if u.rescued == "restored"]  # fmt: skip
        return out

    def _refused_for_good(self, entry: dict[str, Any]) -> bool:
        """Parked because this PDS refuses the mood's current record, which it always will."""
        doc = self.mongo.coll("moods").get(ObjectId(entry["_id"]))
        return (
            entry.get("state") == State.PARKED.value
            and str(entry.get("reason", "")).startswith("PDS refused the write")
            and doc is not None
            and REFUSED in str(doc.get("mood"))
        )

    # -- processes -------------------------------------------------------------------------

    def spawn(self, *, crashable: bool) -> Incarnation:
        """A fresh `replicator run` over the same fakes, wired as `open_runtime` wires it."""
        self.processes += 1
        proc = Process(self.processes, crashable=crashable)
        o = self.options
        fence = Fence(None)  # no lease document: the generation `current_generation` reads
        rtypes = (MOOD, NEWS) if o.news else (MOOD,)
        store = FakeStore(self.mongo, self.scheduler, proc, fence=fence, rtypes=rtypes,
                          kill_cursor=self._kill_cursor, idle_wait=self._idle_wait)  # fmt: skip
        http = httpx.AsyncClient(
            transport=httpx.MockTransport(
                pds_handler(self.pds, self.scheduler, proc, self.fault_rng)
            )
        )
        plc = httpx.AsyncClient(
            transport=httpx.MockTransport(plc_handler(self.pds.url, self.scheduler, proc))
        )
        pds = Pds(self.pds.url, http=http, retry_timeout=None)
        core = store  # the same Protocols as the real adapter (replicator.ports)
        sessions = SessionPool(pds, core)
        writer = RepoWriter(sessions, Outbound(pds, fence))
        directory = Directory(plc, PLC_URL, clock=self.clock.monotonic)
        gate = AccountGate(core, pds, self.pds.url, directory,
                           recheck_seconds=o.account_recheck_seconds,
                           clock=self.clock.time)  # fmt: skip
        applier = Applier(core, writer, pds, gate=gate, concurrency=o.concurrency,
                          clock=self.clock.time)  # fmt: skip
        replicator = Replicator(
            core, applier, batch_size=o.batch_size, max_batch_ms=250,
            heartbeat_seconds=o.heartbeat_seconds, parked_retry_seconds=o.parked_retry_seconds,
            on_history_lost="reconcile", clock=self.clock.monotonic,
        )  # fmt: skip
        self.scheduler.note(f"start p{proc.number}{'' if crashable else ' (no crashes)'}")
        return Incarnation(proc, store, replicator, directory, [http, plc])

    async def run_process(self, inc: Incarnation) -> bool:
        """Until it is stopped (True) or killed (False)."""
        self.current = inc
        self.stop = anyio.Event()
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(inc.directory.run)
                await inc.replicator.run(self.stop)
                tg.cancel_scope.cancel()
        except BaseException as exc:
            if not _only_crashes(exc):
                raise
            return False
        finally:
            self.current = None
            for client in inc.clients:
                await client.aclose()
        return not inc.proc.dead  # dead: killed at its very end, a stop that raced the crash

    def downtime(self) -> None:
        """Between a crash and the restart: time passes, the app goes on, the oplog may be
        truncated past where the dead process stood."""
        self.clock.advance(self.world_rng.uniform(0.5, 20.0))
        for _ in range(self.world_rng.randint(0, self.options.downtime_mutations)):
            if self._started() and not self.app_done:
                self._mutate()
        if self.options.prune_rate and self.world_rng.random() < 0.5:
            self._prune()

    async def run(self) -> Result:
        for _ in range(self.options.users_with_account):
            self.app.add_user(with_account=True)
        for _ in range(self.options.users_without_account):
            self.app.add_user(with_account=False)
        self.mongo.coll("moods")
        problems: list[str] = []
        while True:
            if self.processes >= MAX_PROCESSES:
                problems.append(f"more than {MAX_PROCESSES} processes")
                break
            if await self.run_process(self.spawn(crashable=True)):
                break
            if self.gave_up:
                problems.append(f"no convergence within {SETTLE_STEPS} steps of the app's "
                                f"last write ({MAX_STEPS} in all)")  # fmt: skip
                problems += self.unquiet()
                break
            self.downtime()
        if not problems:
            self.final = True
            self.done_at = self.scheduler.step  # its own allowance to reach quiet
            self.scheduler.triggers.clear()
            if not await self.run_process(self.spawn(crashable=False)):
                problems.append("the last process (no crashes) did not reach quiet")
                problems += self.unquiet()
        if not problems:
            problems = divergences(self.app, self.pds, self.history)
            problems += remembered(self.mongo, self.app)
        return Result(
            self.seed, self.options, self.scheduler.step, self.processes,
            list(self.scheduler.crashed_at), list(self.safety.violations), problems,
            self.scheduler.log, list(self.pds.log), set(self.scheduler.sites_called),
        )  # fmt: skip


def _only_crashes(exc: BaseException) -> bool:
    """A kill -9 unwinds as `Crash` (and the cancellations it causes), nothing else."""
    if isinstance(exc, BaseExceptionGroup):
        return all(_only_crashes(e) for e in exc.exceptions)
    return isinstance(exc, Crash | anyio.get_cancelled_exc_class())


def simulate(
    seed: int,
    *,
    crash_at: tuple[Trigger, ...] = (),
    overrides: Mapping[str, Any] | None = None,
) -> Result:
    """Run one schedule to its verdict (fresh event loop; nothing shared with other seeds)."""
    world = World(seed, crash_at=crash_at, overrides=overrides)

    async def main() -> Result:
        stamina.instrumentation.set_on_retry_hooks([])  # as `logs.configure` does
        stamina.set_testing(True, attempts=RETRY_ATTEMPTS)
        try:
            return await world.run()  # a livelock ends at MAX_STEPS, a deadlock raises
        finally:
            stamina.set_testing(False)

    # Timers (`move_on_after`, the lane deadline) run on simulated time: see loop.py.
    factory = functools.partial(SimLoop, world.clock)
    return anyio.run(main, backend_options={"loop_factory": factory})
