"""Deterministic simulation of the apply path (issue 11, requirement 6).

The real stream loop, applier, planner and writer run against in-memory fakes with a real
replica set's and the reference PDS's semantics (tests/sim/); a process is killed at seeded
awaits on Mongo or the PDS (before the operation, or after it and before its answer) and
restarted over the same persistent state. Checked at every step: no record of a mood whose
delete was applied comes back while the mood is dead. Checked after convergence: every repo
equals the desired state. A failure names its seed and the command that replays it.

`SEEDS` schedules run in CI, spread over the machine's cores (each seed is its own process
and event loop: nothing is shared, so the split changes nothing).
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import subprocess
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from loguru import logger

from replicator import apply as apply_module
from replicator.model import State
from replicator.pds import batches
from replicator.writer import RepoWriter

from .sim import fake_store
from .sim.scheduler import Mode, Trigger
from .sim.world import SITES, Result, simulate

SEEDS = 1000
BLOCK = 100
ROOT = Path(__file__).resolve().parent.parent
# The world the per-site tests use: every optional behaviour on, so each site is reached.
RICH: dict[str, Any] = {
    "prune_rate": 0.01, "bad_docs": True, "deactivations": True, "token_ttl": 30.0,
    "downtime_mutations": 6, "account_recheck_seconds": 1.0, "erasures": True,
}  # fmt: skip
SITE_SEARCH = 150  # seeds tried until the aimed-at crash fires
# Where the search starts for a site few schedules reach (a delete of a mood whose `_id` is
# not an ObjectId; credentials an operator restored during an erasure): only to keep CI fast,
# the search goes on from there.
SITE_HINTS = {"forget_dead_letter": 80, "cancel_erasure": 157}


def replay_command(seed: int, crash_at: str | None = None) -> str:
    extra = f" SIM_CRASH_AT={crash_at}" if crash_at else ""
    return f"SIM_SEED={seed}{extra} .venv/bin/pytest tests/test_simulation.py -k replay -s"


@dataclass(frozen=True)
class Verdict:
    """What the parent needs of a schedule run elsewhere (a `Result` without its logs)."""

    seed: int
    ok: bool
    summary: str
    crashes: tuple[tuple[str, str], ...]
    features: frozenset[str]
    sites: frozenset[str]


def _verdict(result: Result) -> Verdict:
    lines = [*(f"VIOLATION {v}" for v in result.violations), *result.problems]
    summary = "; ".join(lines[:4]) + (f" (+{len(lines) - 4} more)" if len(lines) > 4 else "")
    return Verdict(result.seed, result.ok, summary, tuple(result.crashes),
                   frozenset(result.features()), frozenset(result.sites_called))  # fmt: skip


def _one(seed: int) -> Verdict:
    logger.remove()  # the core logs every crash and retry: not the test's output
    try:
        return _verdict(simulate(seed))
    except Exception as exc:  # a schedule that raises is a failure with its seed
        return Verdict(seed, False, f"raised {type(exc).__name__}: {exc}", (), frozenset(),
                       frozenset())  # fmt: skip


@cache
def _verdicts(seeds: range) -> tuple[Verdict, ...]:
    workers = min(len(seeds), os.cpu_count() or 1)
    if workers <= 1:
        return tuple(map(_one, seeds))
    # spawn, not fork: a fork of the test process (threads of earlier tests, loguru's lock, the
    # session stack's SIGTERM handler) can hang a worker or let it stop the parent's servers.
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        return tuple(pool.map(_one, seeds, chunksize=5))


def _report(failed: Iterable[Verdict], total: int) -> str:
    failed = list(failed)
    lines = [f"{len(failed)} of {total} schedules failed:"]
    lines += [f"  seed {v.seed}: {v.summary}" for v in failed[:10]]
    lines.append(f"replay: {replay_command(failed[0].seed)}")
    return "\n".join(lines)


@pytest.mark.parametrize("block", range(SEEDS // BLOCK))
def test_seeded_schedules(block: int) -> None:
    seeds = range(block * BLOCK, (block + 1) * BLOCK)
    verdicts = _verdicts(seeds)
    failed = [v for v in verdicts if not v.ok]
    assert not failed, _report(failed, len(seeds))


def test_the_schedules_exercise_what_they_claim() -> None:
    """The sweep is only as good as what it reaches: each behaviour the fakes model shows up
    in the first block, crashes of both kinds happen, and every await the core makes on a
    fake is one `test_a_crash_at_every_await` aims at."""
    seen: set[str] = set()
    awaited: set[str] = set()
    for verdict in _verdicts(range(BLOCK)):
        seen |= verdict.features
        awaited |= verdict.sites
    assert awaited <= set(SITES), f"awaits no crash test aims at: {sorted(awaited - set(SITES))}"
    wanted = {
        "history lost when opening", "history lost while reading", "recovery finished",
        "cursor dropped", "pre-images on", "pre-images off", "crash before", "crash after",
        "write refused for good", "account parked", "account released", "session refreshed",
        "applyWrites", "listing", "dead letter", "nuke", "un-nuke", "purge", "replace",
        "bad document", "account given", "account deactivated", "erasure",
        "erasure, users first", "erasure, atproto unset", "erasure, account deleted before",
        "erasure, session expired", "erasure, no credential", "user forgotten",
    }  # fmt: skip
    assert wanted <= seen, f"never exercised: {sorted(wanted - seen)}"


def test_the_sweep_reaches_the_rare_erasures() -> None:
    """An erased user whom no credential can clean any more is parked `erased`, and either of
    the operator's answers (the account deleted with the admin password, or the credentials
    restored in `users` and the user erased again) ends it: rare, so looked for across every
    CI seed."""
    seen: set[str] = set()
    for block in range(SEEDS // BLOCK):
        for verdict in _verdicts(range(block * BLOCK, (block + 1) * BLOCK)):
            seen |= verdict.features
    assert {"operator rescue", "operator restore"} <= seen


def _parse_crash_at(spec: str) -> Trigger:
    site, _, mode = spec.rpartition(":")
    assert mode in ("before", "after") and site in SITES, f"SIM_CRASH_AT={spec!r}"
    return Trigger(mode, site=site)  # type: ignore[arg-type]


def test_replay() -> None:
    """Replays one schedule, printing its options and step log (run with -s)."""
    seed = os.environ.get("SIM_SEED")
    if not seed:
        pytest.skip("set SIM_SEED=<seed> (a failing schedule prints the full command)")
    spec = os.environ.get("SIM_CRASH_AT")
    crash_at = (_parse_crash_at(spec),) if spec else ()
    logger.remove()
    result = simulate(int(seed), crash_at=crash_at, overrides=RICH if spec else None)
    print(result.options)
    print("\n".join(result.log[-int(os.environ.get("SIM_TAIL", "400")) :]))
    assert result.ok, _verdict(result).summary


@pytest.mark.parametrize("mode", ["before", "after"])
@pytest.mark.parametrize("site", SITES)
def test_a_crash_at_every_await(site: str, mode: Mode) -> None:
    """Aim a crash at the first call of each site: the first seed whose schedule reaches it
    must crash there and still converge, safely."""
    logger.remove()
    start = SITE_HINTS.get(site, 0)
    for seed in range(start, start + SITE_SEARCH):
        result = simulate(seed, crash_at=(Trigger(mode, site=site),), overrides=RICH)
        assert result.ok, (
            f"seed {seed}, crash at {site} ({mode}): {_verdict(result).summary}\n"
            f"replay: {replay_command(seed, f'{site}:{mode}')}"
        )
        if (site, mode) in result.crashes:
            return
    pytest.fail(f"no schedule of seeds {start}..{start + SITE_SEARCH - 1} reached {site}")


def test_same_seed_same_steps() -> None:
    """Everything comes from the seed: two runs take the same steps, crash at the same
    places and leave the same writes on the PDS; another seed does not."""
    logger.remove()
    crashed = [r for r in map(simulate, range(40)) if r.crashes and r.pds_log][:3]
    assert len(crashed) == 3, "the first seeds should include schedules with crashes"
    for first in crashed:
        again = simulate(first.seed)
        assert again.log == first.log, f"seed {first.seed} took other steps the second time"
        assert again.pds_log == first.pds_log
    assert len({r.digest() for r in crashed}) == 3


def test_steps_do_not_depend_on_the_hash_seed() -> None:
    """A replay in another process (another PYTHONHASHSEED: another set order) takes the
    same steps: nothing in the trajectory depends on the iteration order of a set."""
    logger.remove()
    seed = next(r for r in map(simulate, range(40)) if len(r.crashes) >= 2).seed
    code = ("from loguru import logger; logger.remove(); from tests.sim.world import "
            f"simulate; print(simulate({seed}).digest())")  # fmt: skip
    digests = {simulate(seed).digest()}
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                             capture_output=True, text=True, check=True)  # fmt: skip
        digests.add(out.stdout.strip().splitlines()[-1])
    assert len(digests) == 1, f"seed {seed} took other steps in another process"


# -- the checks have teeth: known bugs put back are found --------------------------------------


def _old_chunks(self: apply_module.Applier, writes: list[Any]) -> list[Any]:
    """Before a154d14: every write of a user into `applyWrites`, known to exist or not."""
    return batches(writes) if self.writer.batch else [[w] for w in writes]


def _first_failing(seeds: Iterable[int]) -> Iterator[Result]:
    for seed in seeds:
        result = simulate(seed)
        if not result.ok:
            yield result


async def _old_apply_writes(self: RepoWriter, body: dict[str, Any], token: str) -> dict[str, Any]:
    """Before 17c51b8: a 500 from `applyWrites` is transient like any other, retried."""
    return await self.outbound.write("com.atproto.repo.applyWrites", body, token)


def test_finds_the_apply_writes_livelock(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the old batching and the old answer to a 500, a crash between the intents and
    the PDS call leaves moods that never converge (the reference PDS answers the batch with
    500; it was retried, parked and sent again, forever)."""
    logger.remove()
    monkeypatch.setattr(apply_module.Applier, "_chunks", _old_chunks)
    monkeypatch.setattr(RepoWriter, "_apply_writes", _old_apply_writes)
    found = next(_first_failing(range(400)), None)
    assert found is not None, "the bug is back in but no schedule of 400 finds it"
    assert "no convergence" in found.problems[0], found.problems[:3]


def test_finds_intents_left_pending(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the old `parked_ids` (pending intents never retried), a crash during work done
    after the checkpoint leaves moods pending forever."""
    logger.remove()

    def old_due(entry: dict[str, Any], now: float) -> bool:
        return entry.get("state") != "pending" and float(entry.get("retry_at") or 0) <= now

    monkeypatch.setattr(fake_store, "_due", old_due)
    # Rare (about one schedule in a thousand): the kill must fall between the intents and the
    # settle of work done after the checkpoint, e.g. the reconcile of an account that is back.
    # Seeds 2921 and 2927 of 0..5356 do that today (1608 and 1957 did, before the world had
    # erasures and the directory's refresher). If the model changes, find new ones with this
    # bug put back and the same search.
    found = next(_first_failing((2921, 2927)), None)
    assert found is not None, "the bug is back in but its pinned schedules no longer find it"
    assert any("pending" in p for p in found.problems), found.problems[:3]


def test_finds_a_resurrection(monkeypatch: pytest.MonkeyPatch) -> None:
    """A store that serves each mood as it first read it (a stale cache) makes the replicator
    put back a record it deleted: the step check must see it, at the step it happens."""
    logger.remove()
    real = fake_store.FakeStore.moods_by_id
    seen: dict[Any, dict[str, Any]] = {}

    async def stale(self: fake_store.FakeStore, ids: Any) -> dict[Any, dict[str, Any]]:
        fresh = await real(self, ids)
        for key, doc in fresh.items():
            seen.setdefault((self.scheduler, key), doc)
        return {k: seen[(self.scheduler, k)] for k in fresh}

    monkeypatch.setattr(fake_store.FakeStore, "moods_by_id", stale)
    found = next((r for r in map(simulate, range(200)) if r.violations), None)
    assert found is not None, "a stale read is in but no schedule of 200 resurrects a record"
    assert "brings back mood" in found.violations[0]


def _old_erasure(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before issue 16: a user gone from `users` is a user with no account. Nothing of theirs
    is deleted, and their moods' entries say `absent` (no confirmation asked)."""
    from replicator import plan as plan_module

    async def not_erased(self: Any, sub: str, *facts: Any) -> None:
        return None

    real = plan_module.plan_mood

    def unconfirmed(*args: Any, **kw: Any) -> Any:
        mood = real(*args, **kw)
        if mood.entry.state is State.STRANDED:
            mood.entry = dataclasses.replace(mood.entry, state=State.ABSENT)
        return mood

    monkeypatch.setattr(apply_module.Applier, "_erased", not_erased)
    monkeypatch.setattr(plan_module, "plan_mood", unconfirmed)


def test_finds_erased_users_records_left_public(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the old treatment of an erased user put back, the sweep finds their records left
    on the PDS, the ledger saying `absent` while the PDS holds them, and replicator_* still
    naming them."""
    logger.remove()
    _old_erasure(monkeypatch)
    found = [r for r in map(simulate, range(300)) if not r.ok]
    text = "\n".join(line for r in found for line in (*r.violations, *r.problems))
    assert "was erased but" in text, text[:2000]
    assert "the ledger says mood" in text and "absent" in text, text[:2000]
    assert "names erased" in text, text[:2000]
