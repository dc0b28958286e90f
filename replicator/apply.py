"""The one apply path: read current state, plan against the ledger (or the PDS), write, record.

Change events, the backfill, `audit --fix`, history-loss recovery and the retry of parked work
all come through here, so they cannot disagree about what a mood's record should be.
Documents are read directly by `_id` when an event arrives (never taken from the event), so a
replayed or out-of-date event converges on the current state instead of an old one.

A batch goes: plan every user (pure) → write the intents (one bulk write) → send each user's
writes in its own lane, concurrently → record the outcome (one bulk write) → write the rkeys
back → reconcile the users that need the full listing (a purge, a delete the ledger never
knew, a record someone else changed). Decisions about a failed call are one `except` each.
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import anyio
import orjson
from bson import ObjectId
from loguru import logger

from . import crashpoints, metrics, tid
from .accounts import AccountGate
from .desired import bad_id_reason, desired_state, valid_user
from .errors import (
    AccountGone,
    AccountUnavailable,
    AuthFailed,
    InvalidSwap,
    RateLimited,
    Rejected,
    Transient,
)
from .ledger import Failure, LaneResult, changed, intents_for, parked_without_sending, settle
from .ledger import sent_key as _key
from .model import Account, LedgerEntry, State, Write
from .pds import batches
from .plan import Finding, UserPlan, plan_user, salt_collisions
from .rollout import NOT_ENABLED
from .store import Store
from .writer import RepoWriter

LANE_DEADLINE = 60.0


@dataclass
class Outcome:
    """What an apply did, counted; `findings` are the divergences it saw (for audit/backfill)."""

    counts: Counter[str] = field(default_factory=Counter)
    findings: list[Finding] = field(default_factory=list)
    users: set[str] = field(default_factory=set)
    snapshot: str | None = None  # `docs_fingerprint` of the documents a reconcile read

    def merge(self, other: Outcome) -> None:
        self.counts.update(other.counts)
        self.findings.extend(other.findings)
        self.users |= other.users


class Applier:
    def __init__(
        self,
        store: Store,
        writer: RepoWriter,
        *,
        gate: AccountGate | None = None,
        concurrency: int = 8,
        dry_run: bool = False,
        only_users: frozenset[str] | None = None,
        lane_deadline: float = LANE_DEADLINE,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.writer = writer
        self.gate = gate
        self.dry_run = dry_run
        self.only_users = only_users
        self.lane_deadline = lane_deadline
        self._clock = clock
        self._limiter = anyio.CapacityLimiter(max(1, concurrency))

    # -- entry points -----------------------------------------------------------------------

    async def apply_ids(
        self, ids: Sequence[ObjectId], owners: Mapping[ObjectId, str] | None = None
    ) -> Outcome:
        """Bring these moods to their desired state, trusting the ledger for what the PDS
        holds. `owners`: the user of a deleted mood, when the event's pre-image says."""
        ids = list(dict.fromkeys(ids))
        docs = await self.store.moods_by_id(ids)
        ledger = await self.store.ledger_by_id(ids)
        by_user: dict[str | None, list[ObjectId]] = {}
        unknown_deletes: set[str] = set()
        for mood_id in ids:
            doc, entry = docs.get(mood_id), ledger.get(mood_id)
            user = _user_of(doc) if doc is not None else (entry.user if entry else None)
            if user is None and doc is None and owners and (hint := owners.get(mood_id)):
                user = hint  # deleted before the ledger ever knew it: its records may not be
                unknown_deletes.add(hint)
            by_user.setdefault(user, []).append(mood_id)
        accounts = await self.store.accounts(u for u in by_user if u)
        plans = []
        for user, mood_ids in by_user.items():
            account = accounts.get(user) if user else None
            desired = [
                desired_state(i, docs.get(i), has_account=account is not None) for i in mood_ids
            ]
            plans.append(plan_user(user, account, desired, ledger, tid.from_object_id))
        outcome, again = await self._execute(plans, ledger)
        # A user whose moods were deleted or nuked is reconciled against the listing: records
        # the ledger never knew (the old inline writer's) go too, so a purged user ends with an
        # empty collection. Decided from the batch, not from what the user has now: a replay
        # after a crash must sweep even if the user posted again meanwhile.
        again |= {
            plan.user for plan in plans
            if plan.user and plan.account
            and any(m.desired.state is State.ABSENT for m in plan.moods)
        }  # fmt: skip
        for user in sorted(again | {u for u in unknown_deletes if accounts.get(u)}):
            outcome.merge(await self.reconcile_user(user, fix=True))
        return outcome

    async def reconcile_user(self, sub: str, *, fix: bool = True) -> Outcome:
        """Compare every mood of the user, the ledger and the full listing of the repo."""
        docs: dict[ObjectId, dict[str, Any]] = {}
        read = await self.store.moods_of_user(sub)
        snapshot = docs_fingerprint(read)
        for d in read:
            if isinstance(d["_id"], ObjectId):
                docs[d["_id"]] = d
            elif not self.dry_run:  # cannot be mirrored: reported as the stream reports it
                await self.store.dead_letter(d["_id"], sub, None, bad_id_reason(d["_id"]))
        ledger = await self.store.ledger_of_user(sub)
        account = (await self.store.accounts([sub]))[sub]
        ids = list(dict.fromkeys([*docs, *ledger]))
        desired = [desired_state(i, docs.get(i), has_account=account is not None) for i in ids]
        remote = None
        blocked = await self.gate.blocked(account) if account and self.gate else None
        if account is not None and blocked is None:
            try:
                remote = await self.writer.pds.list_records(account.did)
            except AccountGone:
                remote = []  # the repo is gone: nothing to delete, puts get parked
            except AccountUnavailable as exc:
                if self.gate is not None:
                    await self.gate.park(account, "unavailable", exc.reason)
        plan = plan_user(
            sub, account, desired, ledger, tid.from_object_id,
            remote=remote, whole_user=remote is not None, fix=fix,
        )  # fmt: skip
        outcome, _ = await self._execute([plan], ledger, sweeping=True)
        if remote is not None:
            outcome.counts["records_listed"] += len(remote)
            outcome.counts["users_with_account"] += 1
        outcome.snapshot = snapshot
        return outcome

    async def retry_parked(self) -> Outcome:
        ids = await self.store.parked_ids()
        return await self.apply_ids(ids) if ids else Outcome()

    async def maintain(self, *, retry_parked: bool = True) -> Outcome:
        """Between batches: accounts writable again are reconciled against the full listing
        (no one has to run anything); parked work that is due is tried again."""
        outcome = Outcome()
        if self.gate is not None and not self.dry_run:
            for parked in await self.gate.due():
                if await self.gate.recheck(parked):
                    outcome.merge(await self.reconcile_user(parked.sub))
        if retry_parked:
            outcome.merge(await self.retry_parked())
        return outcome

    # -- the core of it ---------------------------------------------------------------------

    async def _execute(
        self,
        plans: list[UserPlan],
        before: dict[ObjectId, LedgerEntry],
        *,
        sweeping: bool = False,
    ) -> tuple[Outcome, set[str]]:
        """Plans → intents → lanes → outcome in the ledger → write-backs. Returns what was done
        and the users whose records someone else changed (to reconcile from the listing)."""
        started = time.monotonic()
        outcome = Outcome()
        live: list[UserPlan] = []
        skipped: list[LedgerEntry] = []
        for plan in plans:
            if plan.user:
                outcome.users.add(plan.user)
            for mood in plan.moods:
                outcome.findings.extend(mood.findings)
            outcome.findings.extend(plan.findings)
            if self.only_users is not None and plan.user not in self.only_users:
                outcome.counts["not_enabled"] += len(plan.moods)
                skipped += [
                    LedgerEntry(m.mood_id, plan.user, State.SKIPPED, reason=NOT_ENABLED)
                    for m in plan.moods
                    if m.mood_id not in before and m.desired.state is not State.ABSENT
                ]
                continue
            live.append(plan)
        outcome.counts["ledger_out_of_date"] += sum(
            changed(before.get(m.mood_id), m.entry) for p in live for m in p.moods
        )
        if self.dry_run:
            for plan in live:
                _count(outcome, plan, applied=False)
            metrics.observe_apply(outcome, time.monotonic() - started)
            return outcome, set()
        generation = self.store.fence.generation
        live = [await self._salted(plan, before) for plan in live]
        blocked = await self._blocked(live)
        sending = [p for p in live if p.writes and p.account and p.account.did not in blocked]
        pending = intents_for([m for p in sending for m in p.moods], before, generation)
        await self.store.save_entries([*skipped, *pending.values()], fresh=pending.keys() - before)
        if pending:
            crashpoints.hit("intent")
        results: dict[int, LaneResult] = {}

        async def lane(plan: UserPlan) -> None:
            async with self._limiter:
                results[id(plan)] = await self._lane(plan, sweeping=sweeping)

        async with anyio.create_task_group() as tg:
            for plan in sending:
                tg.start_soon(lane, plan)

        now = self._clock()
        entries: list[LedgerEntry] = []
        writebacks: dict[ObjectId, str] = {}
        parked: list[tuple[UserPlan, ObjectId, str]] = []
        again: set[str] = set()
        for plan in live:
            result = results.get(id(plan))
            failure = result.failure if result is not None else None
            if failure is not None:
                if failure.kind == "swap" and plan.user and not sweeping:
                    again.add(plan.user)
                logger.bind(did=plan.account.did if plan.account else None).warning(
                    "a user's writes stopped: {}", failure.reason
                )
            done = []
            for mood in plan.moods:
                prior = before.get(mood.mood_id)
                reason: str | None = None
                if not mood.writes:
                    entry = replace(mood.entry, generation=generation)
                elif result is None:  # the account is parked: nothing was sent
                    assert plan.account is not None
                    reason = blocked[plan.account.did]
                    entry = parked_without_sending(mood, prior, reason, now + 3600, generation)
                else:
                    entry, reason = settle(
                        mood, pending[mood.mood_id], result, generation=generation, now=now
                    )
                if changed(prior, entry) or mood.writes:
                    entries.append(entry)
                if reason is not None:
                    parked.append((plan, mood.mood_id, reason))
                    continue
                if mood.writeback:
                    writebacks[mood.mood_id] = mood.writeback
                done.append(mood)
            _count(outcome, replace(plan, moods=done), applied=True)
        outcome.counts["parked"] += len(parked)
        # The rkeys are written back before the intents settle: until then a crash leaves them
        # pending, and a pending intent is finished by whoever comes next (a replay, or the
        # retry of stale intents when the work came after the checkpoint). Settled first, an
        # entry would say "done" for a document still without its permalink.
        failed = await self.store.write_back_many(writebacks)
        if writebacks:
            crashpoints.hit("write_back")
        await self.store.save_entries(entries)
        if pending:
            crashpoints.hit("ledger")
        await self._report(live, before, entries, parked, failed, outcome)
        metrics.observe_apply(outcome, time.monotonic() - started)
        return outcome, again

    async def _blocked(self, plans: list[UserPlan]) -> dict[str, str]:
        """Accounts with writes to send that cannot be written now (did → reason)."""
        blocked: dict[str, str] = {}
        for plan in plans:
            if plan.account is not None and plan.writes and self.gate is not None:
                reason = await self.gate.blocked(plan.account)
                if reason is not None:
                    blocked[plan.account.did] = reason
        return blocked

    async def _salted(self, plan: UserPlan, ledger: Mapping[ObjectId, LedgerEntry]) -> UserPlan:
        """Derived TIDs already used by another mood's record get the next salt."""
        if plan.account is None:
            return plan
        owners: dict[str, ObjectId | None] = {}
        while True:
            salted, unknown = salt_collisions(plan, ledger, owners, tid.from_object_id)
            if not unknown:
                break
            found = await self.store.rkey_owners(plan.account.did, sorted(unknown))
            owners.update({rkey: found.get(rkey) for rkey in unknown})
        for before, after in zip(plan.moods, salted.moods, strict=True):
            if after.entry.rkey != before.entry.rkey:
                logger.bind(mood_id=str(after.mood_id), did=plan.account.did).warning(
                    "rkey collision at {}: salted to {}", before.entry.rkey, after.entry.rkey
                )
        return salted

    def _chunks(self, writes: list[Write]) -> list[Sequence[Write]]:
        """`applyWrites` only for writes whose target is known to exist or not; one whose
        target only may exist (`exists` None: an intent a crash left) goes alone, as
        `putRecord`/`deleteRecord`, which need not know. The reference PDS fails a whole
        `applyWrites` with HTTP 500 when an `#update` or `#delete` finds no record: retried,
        parked and retried again, such a batch would never get through."""
        if not self.writer.batch:
            return [[w] for w in writes]
        chunks: list[Sequence[Write]] = []
        known: list[Write] = []
        for write in writes:
            if write.exists is not None:
                known.append(write)
                continue
            chunks += batches(known) if known else []
            chunks.append([write])
            known = []
        return chunks + (batches(known) if known else [])

    async def _lane(self, plan: UserPlan, *, sweeping: bool) -> LaneResult:
        """Send one user's writes. A refused `applyWrites` is retried one write at a time,
        once; a lane that cannot get through within the deadline is parked, and the batch,
        the checkpoint and the other users move on."""
        account = plan.account
        assert account is not None
        result = LaneResult()
        with anyio.move_on_after(self.lane_deadline) as scope:
            try:
                for chunk in self._chunks(plan.writes):
                    try:
                        result.sent.update(await self._send(account, chunk))
                    except Rejected as exc:
                        if len(chunk) > 1:
                            await self._one_by_one(account, chunk, result)
                        else:
                            _refuse(result, chunk[0], exc)
                    if sweeping:
                        crashpoints.hit("sweep")
            except AccountGone:
                result.failure = Failure("gone", "account gone from PDS")
            except AccountUnavailable as exc:
                if self.gate is not None:
                    await self.gate.park(account, "unavailable", exc.reason)
                result.failure = Failure("unavailable", exc.reason, 3600.0)
            except AuthFailed as exc:
                why = f"PDS refused the account's password ({exc.error or exc.status})"
                result.failure = Failure("auth", why)
            except RateLimited as exc:
                wait = exc.retry_after or 60.0
                why = f"PDS write budget exhausted for this account; retry in {wait:.0f}s"
                result.failure = Failure("budget", why, wait)
            except InvalidSwap:
                result.failure = Failure("swap", "the record changed on the PDS: re-reading it")
            except Transient as exc:  # retries ran out (commands bound them; the sidecar not)
                result.failure = Failure("stuck", f"PDS unavailable: {exc}")
        if scope.cancelled_caught:
            why = f"PDS did not take this account's writes within {self.lane_deadline:.0f}s"
            result.failure = Failure("stuck", why)
        return result

    async def _one_by_one(
        self, account: Account, chunk: Sequence[Write], result: LaneResult
    ) -> None:
        for write in chunk:
            try:
                result.sent.update(await self._send(account, [write]))
            except Rejected as exc:
                _refuse(result, write, exc)

    async def _send(self, account: Account, writes: Sequence[Write]) -> dict[Any, str | None]:
        cids = await self.writer.send(account, writes)
        return {_key(w): cids.get(w.rkey) for w in writes}

    async def _report(
        self,
        plans: list[UserPlan],
        before: dict[ObjectId, LedgerEntry],
        entries: list[LedgerEntry],
        parked: list[tuple[UserPlan, ObjectId, str]],
        failed: Mapping[ObjectId, str],
        outcome: Outcome,
    ) -> None:
        """Dead letters: invalid documents, parked work, failed write-backs; cleared for moods
        that are fine again."""
        by_id = {e.mood_id: e for e in entries}
        user_of = {m.mood_id: p for p in plans for m in p.moods}
        letters: list[tuple[Any, str | None, str | None, str]] = []
        for plan, mood_id, reason in parked:
            did = plan.account.did if plan.account else None
            letters.append((mood_id, plan.user, did, reason))
            logger.bind(mood_id=str(mood_id), did=did).warning("parked: {}", reason)
            outcome.findings.append(Finding("parked", did, None, mood_id, reason))
        for mood_id, reason in failed.items():
            plan = user_of[mood_id]
            did = plan.account.did if plan.account else None
            letters.append((mood_id, plan.user, did, reason))
            logger.bind(mood_id=str(mood_id), did=did).error("{}", reason)
            outcome.counts["write_back_failed"] += 1
        fixed = []
        for mood_id, entry in by_id.items():
            prior = before.get(mood_id)
            if entry.state is State.INVALID:
                if prior is None or prior.reason != entry.reason:
                    plan = user_of[mood_id]
                    # The user's DID even when no record was ever made: whose repo it is for.
                    did = entry.did or (plan.account.did if plan.account else None)
                    letters.append((mood_id, plan.user, did, entry.reason or ""))
                    logger.bind(mood_id=str(mood_id), did=did).warning(
                        "invalid mood: {}", entry.reason
                    )
            elif (
                entry.state is not State.PARKED
                and mood_id not in failed
                and prior is not None
                and prior.state in (State.INVALID, State.PARKED)
            ):
                fixed.append(mood_id)
        await self.store.dead_letter_many(letters)
        await self.store.clear_dead_letters(fixed)


def _refuse(result: LaneResult, write: Write, exc: Exception) -> None:
    if write.mood_id is not None:
        result.refused[write.mood_id] = f"PDS refused the write: {exc}"
    else:
        logger.bind(did=write.did).warning("PDS refused deleting orphan {}: {}", write.rkey, exc)


def _count(outcome: Outcome, plan: UserPlan, *, applied: bool) -> None:
    prefix = "" if applied else "would_"
    for mood in plan.moods:
        outcome.counts["moods"] += 1
        outcome.counts[f"mood_{mood.desired.state.value}"] += 1
        outcome.counts["adopted"] += mood.adopted
        outcome.counts[f"{prefix}put"] += sum(1 for w in mood.writes if w.action == "put")
        outcome.counts[f"{prefix}delete"] += sum(1 for w in mood.writes if w.action == "delete")
        if not mood.writes:
            outcome.counts[f"unchanged_{mood.entry.state.value}"] += 1
    outcome.counts[f"{prefix}delete_orphan"] += len(plan.sweep)


def docs_fingerprint(docs: Sequence[Mapping[str, Any]]) -> str:
    """What a concurrent writer could change in a user's moods (our own write-back aside)."""
    items = [
        (str(d["_id"]), repr(d.get("mood")), repr(d.get("when")), repr(d.get("deleted")))
        for d in docs
    ]
    return hashlib.sha256(orjson.dumps(items)).hexdigest()


def _user_of(doc: dict[str, Any]) -> str | None:
    return valid_user(doc.get("user"))  # not a usable sub: no lane of its own, no lookup
