"""The one apply path: read current state, plan against the ledger (or the PDS), write, record.

Change events, the backfill, `audit --fix`, history-loss recovery and the retry of parked work
all come through here, so they cannot disagree about what a mood's record should be.
Documents are read directly by `_id` when an event arrives (never taken from the event), so a
replayed or out-of-date event converges on the current state instead of an old one.
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import anyio
import orjson
from bson import ObjectId
from loguru import logger

from . import metrics, tid
from .desired import bad_id_reason, desired_state, valid_user
from .model import Account, Desired, LedgerEntry, State
from .pds import AuthFailed, XrpcError
from .plan import Finding, MoodPlan, UserPlan, plan_user
from .rollout import NOT_ENABLED
from .store import Store
from .writer import AccountGone, RepoWriter


@dataclass
class Pending:
    """What a batch's lanes have applied and still has to be recorded in Mongo."""

    entries: list[LedgerEntry] = field(default_factory=list)
    writebacks: dict[ObjectId, str] = field(default_factory=dict)
    fixed: list[ObjectId] = field(default_factory=list)

    async def flush(self, store: Store) -> None:
        await store.save_entries(self.entries)
        await store.write_back_many(self.writebacks)
        await store.clear_dead_letters(self.fixed)
        self.entries, self.writebacks, self.fixed = [], {}, []


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
        concurrency: int = 8,
        dry_run: bool = False,
        only_users: frozenset[str] | None = None,
    ) -> None:
        self.store = store
        self.writer = writer
        self.dry_run = dry_run
        self.only_users = only_users
        self._limiter = anyio.CapacityLimiter(max(1, concurrency))

    # -- entry points -----------------------------------------------------------------------

    async def apply_ids(self, ids: Sequence[ObjectId]) -> Outcome:
        """Bring these moods to their desired state, trusting the ledger for what the PDS holds."""
        ids = list(dict.fromkeys(ids))
        docs = await self.store.moods_by_id(ids)
        ledger = await self.store.ledger_by_id(ids)
        by_user: dict[str | None, list[ObjectId]] = {}
        for mood_id in ids:
            doc, entry = docs.get(mood_id), ledger.get(mood_id)
            user = _user_of(doc) if doc is not None else (entry.user if entry else None)
            by_user.setdefault(user, []).append(mood_id)
        accounts = await self.store.accounts(u for u in by_user if u)
        outcome = Outcome()
        purged: set[str] = set()
        pending = Pending()

        async def lane(user: str | None, mood_ids: list[ObjectId]) -> None:
            account = accounts.get(user) if user else None
            desired = [
                desired_state(i, docs.get(i), has_account=account is not None) for i in mood_ids
            ]
            async with self._limiter:
                started = time.monotonic()
                result = await self._plan_and_apply(
                    user, account, desired, ledger, remote=None, pending=pending
                )
            metrics.observe_apply(result, time.monotonic() - started)
            outcome.merge(result)
            if user and account and any(d.state is State.ABSENT for d in desired):
                purged.add(user)

        async with anyio.create_task_group() as tg:
            for user, mood_ids in by_user.items():
                tg.start_soon(lane, user, mood_ids)
        await pending.flush(self.store)
        # A user with no live mood left (purged or nuked) must end with an empty collection,
        # including records the ledger never knew (made by the old inline writer).
        for user in sorted(purged):
            if not await self.store.user_has_live_moods(user):
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
        if account is not None:
            try:
                remote = await self.writer.pds.list_records(account.did)
            except XrpcError as exc:
                if not exc.account_gone:
                    raise
                remote = []  # the repo is gone: nothing to delete, puts get parked
        async with self._limiter:
            started = time.monotonic()
            result = await self._plan_and_apply(
                sub, account, desired, ledger, remote=remote, whole_user=True, fix=fix
            )
        metrics.observe_apply(result, time.monotonic() - started)
        result.snapshot = snapshot
        return result

    async def retry_parked(self) -> Outcome:
        ids = await self.store.parked_ids()
        return await self.apply_ids(ids) if ids else Outcome()

    # -- the core of it ---------------------------------------------------------------------

    async def _plan_and_apply(
        self,
        user: str | None,
        account: Account | None,
        desired: list[Desired],
        ledger: dict[ObjectId, LedgerEntry],
        *,
        remote: Any,
        whole_user: bool = False,
        fix: bool = True,
        pending: Pending | None = None,
    ) -> Outcome:
        outcome = Outcome()
        if user:
            outcome.users.add(user)
        if self.only_users is not None and user not in self.only_users:
            outcome.counts["not_enabled"] += len(desired)
            if not self.dry_run:  # recorded, so that a backfill mirrors them once enabled
                await self.store.save_entries([
                    LedgerEntry(d.mood_id, user, State.SKIPPED, reason=NOT_ENABLED)
                    for d in desired if d.mood_id not in ledger and d.state is not State.ABSENT
                ])  # fmt: skip
            return outcome
        plan = plan_user(
            user, account, desired, ledger, tid.from_object_id,
            remote=remote, whole_user=whole_user, fix=fix,
        )  # fmt: skip
        if account is not None:
            await self._avoid_collisions(plan, account, ledger, remote)
        for mood in plan.moods:
            outcome.findings.extend(mood.findings)
        outcome.findings.extend(plan.findings)
        if remote is not None:
            outcome.counts["records_listed"] += len(remote)
            outcome.counts["users_with_account"] += account is not None
        outcome.counts["ledger_out_of_date"] += sum(
            _entry_changed(ledger.get(m.mood_id), m.entry) for m in plan.moods
        )
        if self.dry_run:
            self._count(outcome, plan, applied=False)
            return outcome
        writes = plan.writes
        try:
            if writes:
                if account is None:
                    raise AccountGone(user or "?")
                cids = await self.writer.apply(account, writes)
                plan = _with_cids(plan, cids)
        except AccountGone:
            self._account_gone(plan)
        except AuthFailed as exc:
            reason = f"PDS refused the account's password ({exc.error or exc.status})"
            await self._park(plan, reason, ledger, outcome)
            return outcome
        except XrpcError as exc:
            if exc.budget_exhausted:
                wait = exc.retry_after or 60.0
                reason = f"PDS write budget exhausted for this account; retry in {wait:.0f}s"
                await self._park(plan, reason, ledger, outcome, retry_in=wait)
                return outcome
            if exc.transient:
                raise
            await self._apply_one_by_one(plan, account, outcome, ledger, pending)
            return outcome
        await self._record(plan, ledger, pending)
        self._count(outcome, plan, applied=True)
        return outcome

    async def _avoid_collisions(
        self, plan: UserPlan, account: Account, ledger: dict[ObjectId, LedgerEntry], remote: Any
    ) -> None:
        """A derived TID already used by another mood's record gets the next salt. One query
        for the whole plan; a collision (rare) costs one more per salt tried."""
        fresh = [
            (i, mood, put)
            for i, mood in enumerate(plan.moods)
            if (put := next((w for w in mood.writes if w.action == "put"), None)) is not None
            and not mood.desired.doc_rkey
            and mood.mood_id not in ledger
        ]
        if not fresh:
            return
        owners = await self.store.rkey_owners(account.did, [put.rkey for _, _, put in fresh])
        claimed: dict[str, ObjectId] = {}
        for i, mood, put in fresh:
            salt, rkey = 0, put.rkey
            while (owner := claimed.get(rkey) or owners.get(rkey)) not in (None, mood.mood_id):
                salt += 1
                rkey = tid.from_object_id(mood.mood_id, salt)
                logger.bind(mood_id=str(mood.mood_id), did=account.did).warning(
                    "rkey collision with mood {}: salted to {}", owner, rkey
                )
                owners.update(await self.store.rkey_owners(account.did, [rkey]))
            claimed[rkey] = mood.mood_id
            if rkey != put.rkey:
                writes = [replace(w, rkey=rkey) if w is put else w for w in mood.writes]
                plan.moods[i] = replace(
                    mood, writes=writes, entry=replace(mood.entry, rkey=rkey), writeback=rkey
                )

    async def _apply_one_by_one(
        self,
        plan: UserPlan,
        account: Account | None,
        outcome: Outcome,
        before: dict[ObjectId, LedgerEntry],
        pending: Pending | None = None,
    ) -> None:
        """A write the PDS refuses for good parks its mood only; the user's other moods flow."""
        assert account is not None
        done: list[MoodPlan] = []
        for mood in plan.moods:
            try:
                cids = await self.writer.apply(account, mood.writes)
            except XrpcError as exc:
                if exc.transient:
                    raise
                reason = f"PDS refused the write: {exc}"
                await self._park(UserPlan(plan.user, account, [mood]), reason, before, outcome)
                continue
            done.append(_with_cids(UserPlan(plan.user, account, [mood]), cids).moods[0])
        if plan.sweep:
            await self.writer.apply(account, plan.sweep)
        applied = UserPlan(plan.user, account, done, plan.sweep)
        await self._record(applied, before, pending)  # also clears fixed moods' dead letters
        self._count(outcome, applied, applied=True)

    def _account_gone(self, plan: UserPlan) -> None:
        """Deletes on a vanished account are done; puts cannot be, so they are parked."""
        for i, mood in enumerate(plan.moods):
            if any(w.action == "put" for w in mood.writes):
                plan.moods[i] = replace(
                    mood,
                    writes=[],
                    writeback=None,
                    entry=replace(
                        mood.entry, state=State.PARKED, hash=None, reason="account gone from PDS"
                    ),
                )
            else:
                plan.moods[i] = replace(mood, writes=[])
        plan.sweep = []

    async def _park(
        self,
        plan: UserPlan,
        reason: str,
        before: dict[ObjectId, LedgerEntry],
        outcome: Outcome,
        *,
        retry_in: float | None = None,
    ) -> None:
        """Set aside work that cannot be done now: dead-lettered, retried later with backoff
        (or when the server said), while the stream and every other user go on."""
        entries = []
        did = plan.account.did if plan.account else None
        for mood in plan.moods:
            if not mood.writes:
                continue
            previous = before.get(mood.mood_id)
            attempts = (previous.attempts if previous else 0) + 1
            delay = retry_in if retry_in is not None else min(3600.0, 30.0 * 2 ** (attempts - 1))
            # What the PDS holds is unchanged: keep the previous location and content hash.
            kept = previous if previous is not None and previous.on_pds else None
            entries.append(
                replace(
                    mood.entry, state=State.PARKED, reason=reason, attempts=attempts,
                    retry_at=time.time() + delay,
                    did=kept.did if kept else mood.entry.did,
                    rkey=kept.rkey if kept else mood.entry.rkey,
                    hash=kept.hash if kept else None, cid=kept.cid if kept else None,
                )
            )  # fmt: skip
            await self.store.dead_letter(mood.mood_id, plan.user, did, reason)
            logger.bind(mood_id=str(mood.mood_id), did=did).warning("parked: {}", reason)
            outcome.counts["parked"] += 1
            outcome.findings.append(Finding("parked", did, None, mood.mood_id, reason))
        await self.store.save_entries(entries)

    async def _record(
        self,
        plan: UserPlan,
        before: dict[ObjectId, LedgerEntry],
        pending: Pending | None = None,
    ) -> None:
        """Ledger entries, write-backs and cleared dead letters of applied work; into `pending`
        when given (one bulk write per batch instead of one per user)."""
        own = pending if pending is not None else Pending()
        own.entries += [
            m.entry for m in plan.moods if _entry_changed(before.get(m.mood_id), m.entry)
        ]
        own.writebacks.update({m.mood_id: m.writeback for m in plan.moods if m.writeback})
        invalid = [m for m in plan.moods if m.entry.state is State.INVALID]
        for mood in invalid:
            before_entry = before.get(mood.mood_id)
            if before_entry is None or before_entry.reason != mood.entry.reason:
                # The user's DID even when no record was ever made: whose repo it is for.
                did = mood.entry.did or (plan.account.did if plan.account else None)
                await self.store.dead_letter(
                    mood.mood_id, plan.user, did, mood.entry.reason or "invalid"
                )
                logger.bind(mood_id=str(mood.mood_id), did=did).warning(
                    "invalid mood: {}", mood.entry.reason
                )
        own.fixed += [
            m.mood_id
            for m in plan.moods
            if m.entry.state is not State.INVALID
            and before.get(m.mood_id) is not None
            and before[m.mood_id].state in (State.INVALID, State.PARKED)
        ]
        if pending is None:
            await own.flush(self.store)

    @staticmethod
    def _count(outcome: Outcome, plan: UserPlan, *, applied: bool) -> None:
        prefix = "" if applied else "would_"
        for mood in plan.moods:
            outcome.counts["moods"] += 1
            outcome.counts[f"mood_{mood.desired.state.value}"] += 1
            outcome.counts["adopted"] += mood.adopted
            puts = sum(1 for w in mood.writes if w.action == "put")
            deletes = sum(1 for w in mood.writes if w.action == "delete")
            outcome.counts[f"{prefix}put"] += puts
            outcome.counts[f"{prefix}delete"] += deletes
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


def _entry_changed(before: LedgerEntry | None, after: LedgerEntry) -> bool:
    if before is None:
        return True
    if after.cid is None and before.cid is not None and after.hash == before.hash:
        after = replace(after, cid=before.cid)
    return replace(before, attempts=0) != replace(after, attempts=0)


def _with_cids(plan: UserPlan, cids: dict[str, str | None]) -> UserPlan:
    moods = []
    for mood in plan.moods:
        if mood.entry.state is State.PRESENT and mood.entry.rkey in cids:
            mood = replace(mood, entry=replace(mood.entry, cid=cids[mood.entry.rkey]))
        moods.append(mood)
    return UserPlan(plan.user, plan.account, moods, plan.sweep, plan.findings)
