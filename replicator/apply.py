"""The one apply path: read current state, plan against the ledger (or the PDS), write, record.

Change events, the backfill, `audit --fix`, history-loss recovery and the retry of parked work
all come through here, so they cannot disagree about what a mood's record should be.
Documents are read directly by `_id` when an event arrives (never taken from the event), so a
replayed or out-of-date event converges on the current state instead of an old one.

A batch goes: plan every user (pure) → write the intents (one bulk write) → send each user's
writes in its own lane, concurrently → as lanes finish, a chunk at a time: write the rkeys
back, then record the outcome → reconcile the users that need the full listing (a purge, a
delete the ledger never knew, a record someone else changed). One record type at a time:
the store's view of that type (`Store.of`). Decisions about a failed call are one `except`
each.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import anyio
import orjson
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from bson import ObjectId
from loguru import logger

from . import crashpoints, metrics, tid
from .accounts import AccountGate
from .config import Settings
from .desired import DOCUMENT_DELETED, bad_id_reason, desired_state, valid_user
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
from .model import Account, Desired, LedgerEntry, RemoteRecord, State, Write
from .outcome import Outcome
from .pds import Pds, batches
from .plan import Finding, UserPlan, plan_user, salt_collisions
from .ports import CoreStore
from .recordtypes import RecordType
from .rollout import NOT_ENABLED
from .store import Letter, Written, sub_hash
from .tasks import task_group
from .writer import RepoWriter


class Applier:
    def __init__(
        self,
        store: CoreStore,
        writer: RepoWriter,
        pds: Pds,
        *,
        gate: AccountGate | None = None,
        concurrency: int = Settings.concurrency,
        dry_run: bool = Settings.dry_run,
        only_users: frozenset[str] | None = None,
        lane_deadline: float = Settings.lane_deadline,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.writer = writer
        self.pds = pds  # reads: listings, account status (writes go through `writer`)
        self.gate = gate
        self.dry_run = dry_run
        self.only_users = only_users
        self.lane_deadline = lane_deadline
        self._clock = clock
        self._limiter = anyio.CapacityLimiter(max(1, concurrency))

    # -- entry points -----------------------------------------------------------------------

    async def apply_ids(
        self,
        ids: Sequence[ObjectId],
        owners: Mapping[ObjectId, str] | None = None,
        rtype: RecordType | None = None,
    ) -> Outcome:
        """Bring these documents of `rtype` (the store's first type if None) to their desired
        state, trusting the ledger for what the PDS holds. `owners`: the user of a deleted
        document, when the event's pre-image says."""
        view = self.store.of(rtype) if rtype is not None else self.store
        ids = list(dict.fromkeys(ids))
        docs = await view.moods_by_id(ids)
        ledger = await view.ledger_by_id(ids)
        by_user: dict[str | None, list[ObjectId]] = {}
        unknown_deletes: set[str] = set()
        for mood_id in ids:
            doc, entry = docs.get(mood_id), ledger.get(mood_id)
            user = valid_user(doc.get(view.rtype.owner)) if doc is not None else (
                entry.user if entry else None
            )  # fmt: skip
            if user is None and doc is None and owners and (hint := owners.get(mood_id)):
                user = hint  # deleted before the ledger ever knew it: its records may not be
                unknown_deletes.add(hint)
            by_user.setdefault(user, []).append(mood_id)
        accounts = await self.store.accounts(u for u in by_user if u)
        erased, forgotten = await self._erasures(
            {u for u in by_user if u and accounts.get(u) is None}, ledger.values(), unknown_deletes
        )
        plans = []
        for user, mood_ids in by_user.items():
            if user in erased or user in forgotten:
                continue  # erased below, or erased already: nothing is recorded under them
            account = accounts.get(user) if user else None
            desired = [
                desired_state(view.rtype, i, docs.get(i), has_account=account is not None)
                for i in mood_ids
            ]
            plans.append(plan_user(user, account, desired, ledger, tid.from_object_id))
        outcome, again = await self._execute(view, plans, ledger)
        # A user whose moods were deleted or nuked is reconciled against the listing: records
        # the ledger never knew (the old inline writer's) go too, so a purged user ends with an
        # empty collection. Decided from the batch, not from what the user has now: a replay
        # after a crash must sweep even if the user posted again meanwhile.
        again |= {
            plan.user for plan in plans
            if plan.user and plan.account
            and any(m.desired.state is State.ABSENT for m in plan.moods)
        }  # fmt: skip
        sweep = sorted(again | {u for u in unknown_deletes if accounts.get(u)})
        if sweep:
            outcome.merge(await self.reconcile_users(sweep, fix=True))
        if erased:  # after the sweeps: one user's erasure is one reconcile
            outcome.merge(await self.reconcile_users(sorted(erased), fix=True))
        return outcome

    async def reconcile_user(self, sub: str, *, fix: bool = True) -> Outcome:
        """Compare every mood of the user, the ledger and the full listing of the repo."""
        return await self.reconcile_users([sub], fix=fix)

    async def reconcile_users(self, subs: Sequence[str], *, fix: bool = True) -> Outcome:
        """`reconcile_user` for several users at once (the backfill's groups, the recovery's,
        the sweeps after a batch), every type mirrored: their documents, ledger entries and
        accounts read in one query each, their repos listed side by side, their writes
        recorded together. Users the app erased are erased (every type) first.
        `Outcome.snapshots` has what each user's documents were when read (`fingerprint`)."""
        subs = list(dict.fromkeys(subs))
        views = self.store.views
        reads = [await view.moods_of_users(subs) for view in views]
        ledgers = [await view.ledger_of_users(subs) for view in views]
        for view, read, ledger in zip(views, reads, ledgers, strict=True):
            await _ownerless_entries(view, read, ledger)
        accounts = await self.store.accounts(subs)
        # Whether the users without an account were erased: one query each for them all
        # (most users of a deployment may have no account), not several per user.
        without = [s for s in subs if accounts.get(s) is None]
        gone = await self.store.users_gone(without)
        begun = await self.store.pending_erasures() if gone else {}
        forgotten = await self.store.forgotten(without)
        outcome = Outcome()
        live: list[str] = []
        for sub in subs:
            outcome.snapshots[sub] = fingerprint(views, [r.get(sub, []) for r in reads])
            if accounts.get(sub) is None:
                theirs = [ledger.get(sub, {}) for ledger in ledgers]
                credentials = await self._erased(sub, theirs, gone, begun, sub in forgotten)
                if credentials is not None:
                    outcome.merge(await self._erase(sub, credentials, theirs))
                    continue
                if sub in forgotten:
                    continue  # erased and forgotten: nothing is recorded under them
            live.append(sub)
        for view, read, ledger in zip(views, reads, ledgers, strict=True):
            if live:
                outcome.merge(await self._reconcile(view, live, accounts, read, ledger, fix=fix))
        return outcome

    async def _reconcile(
        self,
        view: CoreStore,
        subs: Sequence[str],
        accounts: Mapping[str, Account | None],
        reads: Mapping[str, list[dict[str, Any]]],
        ledgers: Mapping[str, dict[ObjectId, LedgerEntry]],
        *,
        fix: bool,
    ) -> Outcome:
        """One type's part of `reconcile_users`: plans against each repo's listing."""
        rtype = view.rtype
        listed = [a for s in subs if (a := accounts.get(s)) is not None]
        listings = await self._listings(listed, rtype)
        outcome = Outcome()
        plans: list[UserPlan] = []
        before: dict[ObjectId, LedgerEntry] = {}
        for sub in subs:
            read, ledger, account = reads.get(sub, []), ledgers.get(sub, {}), accounts.get(sub)
            docs: dict[ObjectId, dict[str, Any]] = {}
            for d in read:
                if isinstance(d["_id"], ObjectId):
                    docs[d["_id"]] = d
                    continue
                # Cannot be mirrored: reported as the stream reports it; a document all the
                # same: counted.
                reason = bad_id_reason(d["_id"], rtype)
                if not self.dry_run:
                    await view.dead_letter(d["_id"], sub, None, reason, "invalid")
                outcome.counts.documents[rtype.name] += 1
                outcome.findings.append(Finding("invalid", None, None, None, reason))
            if account is None and not self.dry_run:
                # Letters of documents gone for good (their delete event lost, say): what may
                # still name a user with no account, erased where no event said so.
                await view.clear_dead_letters_but(sub, [*(d["_id"] for d in read), *ledger])
            ids = list(dict.fromkeys([*docs, *ledger]))
            desired = [
                desired_state(rtype, i, docs.get(i), has_account=account is not None) for i in ids
            ]
            remote = listings.get(account.did) if account is not None else None
            plans.append(plan_user(
                sub, account, desired, ledger, tid.from_object_id,
                remote=remote, whole_user=remote is not None, fix=fix,
            ))  # fmt: skip
            before.update(ledger)
            if remote is not None:
                outcome.counts.records_listed += len(remote)
                outcome.counts.users_with_account += 1
        if plans:
            done, _ = await self._execute(view, plans, before, sweeping=True)
            outcome.merge(done)
        return outcome

    async def fingerprints(self, subs: Sequence[str]) -> dict[str, str]:
        """What each user's documents are now, as `Outcome.snapshots` has them."""
        views = self.store.views
        reads = [await v.moods_of_users(subs, v.rtype.fingerprint) for v in views]
        return {sub: fingerprint(views, [r.get(sub, []) for r in reads]) for sub in subs}

    async def _listings(
        self, accounts: Sequence[Account], rtype: RecordType
    ) -> dict[str, list[RemoteRecord] | None]:
        """Each account's listing (`_listing`), side by side, as many at once as lanes."""
        found: dict[str, list[RemoteRecord] | None] = {}

        async def one(account: Account) -> None:
            async with self._limiter:
                found[account.did] = await self._listing(account, rtype)

        async with task_group() as tg:
            for account in accounts:
                tg.start_soon(one, account)
        return found

    async def _listing(self, account: Account, rtype: RecordType) -> list[RemoteRecord] | None:
        """Every record of the type's collection in the account's repo: the truth a reconcile
        plans against. None when it cannot be read now (the account is parked); [] when the
        repo is gone."""
        if self.gate is not None and await self.gate.blocked(account) is not None:
            return None
        try:
            return await self.pds.list_records(account.did, rtype.nsid)
        except AccountGone:
            return []  # the repo is gone: nothing to delete, puts get parked
        except AccountUnavailable as exc:
            if self.gate is not None:
                await self.gate.park(account, "unavailable", exc.reason)
            return None

    # -- erasure ------------------------------------------------------------------------------

    async def erase_user(self, sub: str) -> Outcome:
        """The app erased this user (the `users` stream saw it): noted durably first, so the
        erasure is finished even if no DID of theirs is known and the process dies."""
        if not self.dry_run:
            await self.store.begin_erasure(sub, ())
        return await self.reconcile_user(sub)

    async def _pending_erasures(self) -> Outcome:
        """Erasures a crash interrupted (no event is left to replay them) are finished; one
        whose user has `atproto` again (credentials restored) is not an erasure any more."""
        outcome = Outcome()
        pending = await self.store.pending_erasures()
        gone = await self.store.users_gone(pending)
        for sub, dids in sorted(pending.items()):
            if sub not in gone:
                await self.store.cancel_erasure(sub)
            elif self.gate is None or not dids or not await self.gate.all_parked(dids):
                outcome.merge(await self.reconcile_user(sub))
        return outcome

    async def _erasures(
        self, without_account: set[str], entries: Iterable[LedgerEntry], deleted: set[str]
    ) -> tuple[set[str], set[str]]:
        """Of the users of a batch that `users` gives no account: those erased and forgotten
        already (nothing is recorded under them again), and those the app is erasing (a DID
        of theirs is known, or their document is gone): erased by a reconcile after the
        batch. `deleted`: owners of deleted moods the ledger never knew (pre-images)."""
        if not without_account:
            return set(), set()
        forgotten = await self.store.forgotten(without_account)
        rest = without_account - forgotten
        known = {e.user for e in entries if e.user in rest and (e.did or e.held)}
        gone = await self.store.users_gone(known | (deleted & rest))
        return {u for u, document_gone in gone.items() if u in known or document_gone}, forgotten

    async def _erased(
        self,
        sub: str,
        ledgers: Sequence[Mapping[ObjectId, LedgerEntry]],
        gone: Mapping[str, bool],
        pending: Mapping[str, Sequence[str]],
        forgotten: bool,
    ) -> dict[str, str | None] | None:
        """None if the app did not erase this user (their document has `atproto`; or it has
        none and no DID of theirs was ever known; or they are forgotten already). Else their
        DIDs, the last first, each with the last password seen for it: {} when their document
        is gone but no repo of theirs is known (what was recorded of them is forgotten).
        `gone`, `pending`, `forgotten`: as `Store.users_gone`, `pending_erasures`,
        `forgotten` say of them."""
        if sub not in gone:
            return None
        kept = await self.store.credentials_of(sub)
        begun = pending.get(sub)
        entries = [e for ledger in ledgers for e in ledger.values()]
        held = (d for e in entries for d in (e.did, *(h[0] for h in e.held)))
        known = {d: kept.get(d) for d in dict.fromkeys([*kept, *held, *(begun or ())]) if d}
        if known or begun is not None:
            return known
        if gone[sub] and (entries or not forgotten):
            return {}
        return None

    async def _erase(
        self,
        sub: str,
        credentials: Mapping[str, str | None],
        ledgers: Sequence[Mapping[ObjectId, LedgerEntry]],
    ) -> Outcome:
        """Delete every record of an erased user, in each repo of theirs, with the last
        credentials that still work; forget them once the PDS confirmed it: each repo listed
        and every record in it deleted, or the repo gone. Otherwise nothing is marked done:
        what is left stays in the ledger (and the user parked, when no credential works).
        Every type is erased before anything is forgotten: the credentials serve them all."""
        outcome = Outcome()
        outcome.users.add(sub)
        if not self.dry_run and credentials:
            await self.store.begin_erasure(sub, credentials.keys())
        confirmed = True
        views = self.store.views
        theirs = list(ledgers)
        for did, password in credentials.items():
            account = Account(sub, did, None, password or "", erased=True)
            for i, view in enumerate(views):
                ledger = dict(theirs[i])
                remote = await self._listing(account, view.rtype)
                desired = [Desired(m, sub, State.ABSENT, reason=ERASED) for m in ledger]
                plan = plan_user(
                    sub, account, desired, ledger, tid.from_object_id,
                    remote=remote, whole_user=remote is not None, fix=True,
                )  # fmt: skip
                done, _ = await self._execute(view, [_as_erasure(plan)], ledger, sweeping=True)
                outcome.merge(done)
                outcome.counts.records_listed += len(remote or ())
                confirmed = confirmed and remote is not None and not done.counts.parked
                theirs[i] = await view.ledger_of_user(sub)
        if self.dry_run:
            return outcome
        if not confirmed or any(e.held for ledger in theirs for e in ledger.values()):
            outcome.counts.erasures_unfinished += 1
            return outcome
        deleted = outcome.counts.sent.deleted
        crashpoints.hit("forget")
        await self.store.forget_user(sub, credentials.keys(), deleted)
        for did in credentials:  # what this process holds in memory goes too
            self.writer.forget(did)
            if self.gate is not None:
                self.gate.forget(did)
        outcome.counts.erasures += 1
        metrics.observe_erasure()
        logger.info("an erased user's records are gone ({} deleted, {} repo(s)); nothing of "
                    "them is kept but sha256(sub) {}", deleted, len(credentials),
                    sub_hash(sub)[:16])  # fmt: skip
        return outcome

    async def retry_parked(self) -> Outcome:
        outcome = Outcome()
        for view in self.store.views:
            if ids := await view.parked_ids():
                outcome.merge(await self.apply_ids(ids, rtype=view.rtype))
        return outcome

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
            if not self.dry_run:
                outcome.merge(await self._pending_erasures())
        return outcome

    # -- the core of it ---------------------------------------------------------------------

    async def _execute(
        self,
        view: CoreStore,
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
                outcome.counts.not_enabled += len(plan.moods)
                skipped += [
                    LedgerEntry(m.mood_id, plan.user, State.SKIPPED, reason=NOT_ENABLED)
                    for m in plan.moods
                    if m.mood_id not in before and m.desired.state is not State.ABSENT
                ]
                continue
            live.append(plan)
        outcome.counts.ledger_out_of_date += sum(
            changed(before.get(m.mood_id), m.entry) for p in live for m in p.moods
        )
        if self.dry_run:
            for plan in live:
                _count(outcome, plan, view.rtype, applied=False)
            metrics.observe_apply(outcome, time.monotonic() - started)
            return outcome, set()
        generation = view.fence.generation
        live = await self._salted(view, live, before, whole=sweeping)
        blocked = await self._blocked(live)
        sending = [p for p in live if p.writes and p.account and p.account.did not in blocked]
        pending = intents_for([m for p in sending for m in p.moods], before, generation)
        written = await view.save_entries(
            [*skipped, *pending.values()], fresh=pending.keys() - before
        )
        if pending:
            crashpoints.hit("intent")
        record = _Record(view, generation, before, pending, blocked, written, sweeping)
        done, send = _lanes_done(len(sending))

        async def lane(plan: UserPlan) -> None:
            async with self._limiter:
                result = await self._lane(plan, view.rtype, sweeping=sweeping)
            await send.send((plan, result))

        async def lanes() -> None:
            async with send, task_group() as inner:
                for plan in sending:
                    inner.start_soon(lane, plan)

        # What the PDS took is recorded while other lanes still wait on it: a chunk of moods
        # at a time, as their lanes finish (the MongoDB writes overlap the PDS's).
        sent = {id(p) for p in sending}
        ready: list[tuple[UserPlan, LaneResult | None]] = [
            (p, None) for p in live if id(p) not in sent
        ]
        moods = sum(len(p.moods) for p, _ in ready)
        async with task_group() as tg, done:
            tg.start_soon(lanes)
            async for plan, result in done:
                ready.append((plan, result))
                moods += len(plan.moods)
                if moods >= FLUSH_MOODS:
                    await self._flush(record, ready, outcome)
                    ready, moods = [], 0
            await self._flush(record, ready, outcome)
        outcome.counts.parked += len(record.parked)
        await self._report(view, live, before, record, outcome)
        metrics.observe_apply(outcome, time.monotonic() - started)
        return outcome, record.again

    async def _flush(
        self,
        record: _Record,
        ready: Sequence[tuple[UserPlan, LaneResult | None]],
        outcome: Outcome,
    ) -> None:
        """The outcome of these users' writes into the ledger, their rkeys written back first:
        until then a crash leaves them pending, and a pending intent is finished by whoever
        comes next (a replay, or the retry of stale intents when the work came after the
        checkpoint). Settled first, an entry would say "done" for a document still without
        its permalink."""
        entries: list[LedgerEntry] = []
        writebacks: dict[ObjectId, str] = {}
        now = self._clock()
        for plan, result in ready:
            got, backs = record.outcome_of(plan, result, now, outcome)
            entries += got
            writebacks |= backs
        if not entries and not writebacks:
            return
        record.failed |= await record.view.write_back_many(writebacks)
        if writebacks:
            crashpoints.hit("write_back")
        await record.view.save_entries(entries, since=record.written)
        if record.pending:
            crashpoints.hit("ledger")
        record.entries += entries

    async def _blocked(self, plans: list[UserPlan]) -> dict[str, str]:
        """Accounts with writes to send that cannot be written now (did → reason)."""
        blocked: dict[str, str] = {}
        for plan in plans:
            if plan.account is not None and plan.writes and self.gate is not None:
                reason = await self.gate.blocked(plan.account)
                if reason is not None:
                    blocked[plan.account.did] = reason
        return blocked

    async def _salted(
        self,
        view: CoreStore,
        plans: list[UserPlan],
        ledger: Mapping[ObjectId, LedgerEntry],
        *,
        whole: bool,
    ) -> list[UserPlan]:
        """Derived TIDs already used by another mood's record get the next salt. The rkeys of
        every plan are looked up together: one query a batch (one more a salt tried). With
        `whole` the ledger holds every entry of these users (a reconcile read them all):
        what it does not name in their repos has no owner, and nothing is looked up."""
        owners: dict[str, dict[str, ObjectId | None]] = {}  # did → rkey → owner
        if whole:
            for entry in ledger.values():
                if entry.did is not None and entry.rkey is not None:
                    owners.setdefault(entry.did, {})[entry.rkey] = entry.mood_id
        out = list(plans)
        while True:
            unknown: set[tuple[str, str]] = set()
            for i, plan in enumerate(plans):
                if plan.account is None:
                    continue
                known = owners.setdefault(plan.account.did, {})
                out[i], missing = salt_collisions(plan, ledger, known, tid.from_object_id)
                unknown |= {(plan.account.did, rkey) for rkey in missing}
            if not unknown:
                break
            found = {} if whole else await view.rkey_owners(unknown)
            for did, rkey in unknown:
                owners[did][rkey] = found.get((did, rkey))
        for plan, salted in zip(plans, out, strict=True):
            for before, after in zip(plan.moods, salted.moods, strict=True):
                if after.entry.rkey != before.entry.rkey:
                    logger.bind(mood_id=str(after.mood_id), did=after.entry.did).warning(
                        "rkey collision at {}: salted to {}", before.entry.rkey, after.entry.rkey
                    )
        return out

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

    async def _lane(self, plan: UserPlan, rtype: RecordType, *, sweeping: bool) -> LaneResult:
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
                        result.sent.update(await self._send(account, chunk, rtype))
                    except Rejected as exc:
                        if len(chunk) > 1:
                            await self._one_by_one(account, chunk, rtype, result)
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
                result.failure = await self._refused(account, why)
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

    async def _refused(self, account: Account, why: str) -> Failure:
        """A login refused. For an erased user that means no credential works any more: done
        only if the account is gone too; otherwise the user is parked `erased` (their records
        still public) until an operator acts (docs/runbook.md)."""
        if not account.erased:
            return Failure("auth", why)
        try:
            await self.pds.repo_status(account.did)
        except AccountGone:
            return Failure("gone", "account gone from PDS")
        reason = f"erased, but no credential works any more ({why}): records still public"
        if self.gate is not None:
            await self.gate.park(account, "erased", reason)
        return Failure("erased", reason, 3600.0)

    async def _one_by_one(
        self, account: Account, chunk: Sequence[Write], rtype: RecordType, result: LaneResult
    ) -> None:
        for write in chunk:
            try:
                result.sent.update(await self._send(account, [write], rtype))
            except Rejected as exc:
                _refuse(result, write, exc)

    async def _send(
        self, account: Account, writes: Sequence[Write], rtype: RecordType
    ) -> dict[Any, str | None]:
        cids = await self.writer.send(account, writes, rtype.nsid)
        return {_key(w): cids.get(w.rkey) for w in writes}

    async def _report(
        self,
        view: CoreStore,
        plans: list[UserPlan],
        before: dict[ObjectId, LedgerEntry],
        record: _Record,
        outcome: Outcome,
    ) -> None:
        """Dead letters: invalid documents, parked work, failed write-backs; cleared for moods
        that are fine again."""
        entries, parked, failed = record.entries, record.parked, record.failed
        by_id = {e.mood_id: e for e in entries}
        user_of = {m.mood_id: p for p in plans for m in p.moods}
        letters: list[Letter] = []
        for plan, mood_id, reason in parked:
            did = plan.account.did if plan.account else None
            letters.append((mood_id, plan.user, did, reason, "failed"))
            logger.bind(mood_id=str(mood_id), did=did).warning("parked: {}", reason)
            outcome.findings.append(Finding("parked", did, None, mood_id, reason))
        for mood_id, reason in failed.items():
            plan = user_of[mood_id]
            did = plan.account.did if plan.account else None
            letters.append((mood_id, plan.user, did, reason, "failed"))
            logger.bind(mood_id=str(mood_id), did=did).error("{}", reason)
            outcome.counts.write_back_failed += 1
        fixed = []
        for mood_id, entry in by_id.items():
            prior = before.get(mood_id)
            if entry.state is State.INVALID:
                if prior is None or prior.reason != entry.reason:
                    plan = user_of[mood_id]
                    # The user's DID even when no record was ever made: whose repo it is for.
                    did = entry.did or (plan.account.did if plan.account else None)
                    letters.append((mood_id, plan.user, did, entry.reason or "", "invalid"))
                    logger.bind(mood_id=str(mood_id), did=did).warning(
                        "invalid {}: {}", view.rtype.name, entry.reason
                    )
            elif (
                entry.state is not State.PARKED
                and mood_id not in failed
                and prior is not None
                and prior.state in (State.INVALID, State.PARKED)
            ):
                fixed.append(mood_id)
        await view.dead_letter_many(letters)
        await view.clear_dead_letters(fixed)


ERASED = "user erased"
FLUSH_MOODS = 100  # the outcomes of this many moods are recorded together, as lanes finish

LaneDone = tuple[UserPlan, LaneResult]


def _lanes_done(
    lanes: int,
) -> tuple[MemoryObjectReceiveStream[LaneDone], MemoryObjectSendStream[LaneDone]]:
    send, receive = anyio.create_memory_object_stream[LaneDone](max(1, lanes))
    return receive, send


@dataclass
class _Record:
    """One `_execute`'s outcomes, recorded chunk by chunk as its lanes finish."""

    view: CoreStore
    generation: int | None
    before: Mapping[ObjectId, LedgerEntry]
    pending: Mapping[ObjectId, LedgerEntry]
    blocked: Mapping[str, str]
    written: Written
    sweeping: bool
    entries: list[LedgerEntry] = field(default_factory=list)
    parked: list[tuple[UserPlan, ObjectId, str]] = field(default_factory=list)
    failed: dict[ObjectId, str] = field(default_factory=dict)
    again: set[str] = field(default_factory=set)

    def outcome_of(
        self, plan: UserPlan, result: LaneResult | None, now: float, outcome: Outcome
    ) -> tuple[list[LedgerEntry], dict[ObjectId, str]]:
        """The entries to store for one user's plan and the rkeys to write back; the moods
        parked and the users to reconcile again are noted; the outcome counted."""
        failure = result.failure if result is not None else None
        if failure is not None:
            if failure.kind == "swap" and plan.user and not self.sweeping:
                self.again.add(plan.user)
            logger.bind(did=plan.account.did if plan.account else None).warning(
                "a user's writes stopped: {}", failure.reason
            )
        entries: list[LedgerEntry] = []
        writebacks: dict[ObjectId, str] = {}
        done = []
        for mood in plan.moods:
            prior = self.before.get(mood.mood_id)
            reason: str | None = None
            if not mood.writes:
                entry = replace(mood.entry, generation=self.generation)
            elif result is None:  # the account is parked: nothing was sent
                assert plan.account is not None
                reason = self.blocked[plan.account.did]
                entry = parked_without_sending(mood, prior, reason, now + 3600, self.generation)
            else:
                entry, reason = settle(
                    mood, self.pending[mood.mood_id], result, generation=self.generation, now=now
                )
            if changed(prior, entry) or mood.writes:
                entries.append(entry)
            if reason is not None:
                self.parked.append((plan, mood.mood_id, reason))
                continue
            if mood.writeback:
                writebacks[mood.mood_id] = mood.writeback
            done.append(mood)
        _count(outcome, replace(plan, moods=done), self.view.rtype, applied=True)
        return entries, writebacks


async def _ownerless_entries(
    view: CoreStore,
    reads: Mapping[str, list[dict[str, Any]]],
    ledgers: dict[str, dict[ObjectId, LedgerEntry]],
) -> None:
    """Adds to each user's ledger the entries of their documents that name no owner (a
    skipped entry that holds nothing: `LedgerEntry.settled`), which a read by user misses:
    one more query, for those documents only (none where every document has its entry)."""
    missing = {
        d["_id"]: sub
        for sub, docs in reads.items()
        for d in docs
        if isinstance(d["_id"], ObjectId) and d["_id"] not in ledgers.get(sub, {})
    }
    if missing:
        for doc_id, entry in (await view.ledger_by_id(list(missing))).items():
            ledgers.setdefault(missing[doc_id], {})[doc_id] = entry


def _as_erasure(plan: UserPlan) -> UserPlan:
    """What an erasure finds in the repo it is erasing is reported as such: records of a user
    who is gone. (Those in their other repos are found by those repos' own passes.)"""
    did = plan.account.did if plan.account else None

    def ours(findings: list[Finding]) -> list[Finding]:
        return [replace(f, kind="erased") for f in findings if f.did == did]

    moods = [replace(m, findings=ours(m.findings)) for m in plan.moods]
    return replace(plan, moods=moods, findings=ours(plan.findings))


def _refuse(result: LaneResult, write: Write, exc: Exception) -> None:
    if write.mood_id is not None:
        result.refused[write.mood_id] = f"PDS refused the write: {exc}"
    else:
        logger.bind(did=write.did).warning("PDS refused deleting orphan {}: {}", write.rkey, exc)


def _count(outcome: Outcome, plan: UserPlan, rtype: RecordType, *, applied: bool) -> None:
    c = outcome.counts
    writes = c.sent if applied else c.would
    for mood in plan.moods:
        # A document is one that exists: an entry whose document is gone is not one any more.
        c.documents[rtype.name] += mood.desired.reason != DOCUMENT_DELETED
        c.desired[mood.desired.state] += 1
        c.adopted += mood.adopted
        puts = [w for w in mood.writes if w.action == "put"]
        writes.put += len(puts)
        writes.updated += sum(1 for w in puts if w.exists is not False)
        writes.created += sum(1 for w in puts if w.exists is False)
        writes.delete += sum(1 for w in mood.writes if w.action == "delete")
        if not mood.writes:
            c.unchanged[mood.entry.state] += 1
    writes.delete_orphan += len(plan.sweep)


def fingerprint(views: Sequence[CoreStore], docs: Sequence[Sequence[Mapping[str, Any]]]) -> str:
    """What a concurrent writer could change in a user's documents of each type (our own
    write-back aside): the type's `fingerprint` fields and the `_id`s."""
    items = [
        (view.rtype.name, str(d["_id"]), *(repr(d.get(f)) for f in view.rtype.fingerprint))
        for view, group in zip(views, docs, strict=True)
        for d in group
    ]
    return hashlib.sha256(orjson.dumps(items)).hexdigest()
