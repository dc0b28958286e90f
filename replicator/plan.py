"""Desired state vs what the PDS holds → the writes that make them equal. Pure.

Two sources tell what the PDS holds: the ledger (cheap, used for every change event) and, when
given, a full listing of the user's collection (used by backfill, audit, history-loss recovery
and the purge sweep), which also finds duplicates and orphans the ledger cannot know about.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

from bson import ObjectId

from .desired import DOCUMENT_DELETED
from .model import Account, Desired, LedgerEntry, Location, RemoteRecord, State, Write

FindingKind = Literal[
    "missing",
    "mismatch",
    "duplicate",
    "orphan",
    "stale",
    "invalid",
    "skipped",
    "parked",
    "erased",
]


@dataclass(frozen=True)
class Finding:
    """A divergence between Mongo and the PDS, for reports."""

    kind: FindingKind
    did: str | None
    rkey: str | None
    mood_id: ObjectId | None
    detail: str = ""


@dataclass
class MoodPlan:
    """What to do for one mood; `entry` is stored only once every write has succeeded."""

    mood_id: ObjectId
    desired: Desired
    writes: list[Write]
    entry: LedgerEntry
    writeback: str | None = None  # rkey to `$set` as `atproto.rkey` on the document
    findings: list[Finding] = field(default_factory=list)
    adopted: bool = False  # a record already on the PDS now known to the ledger

    @property
    def changes_ledger(self) -> bool:
        return bool(self.writes)


@dataclass
class UserPlan:
    user: str | None
    account: Account | None
    moods: list[MoodPlan]
    sweep: list[Write] = field(default_factory=list)  # orphans and duplicates no mood claims
    findings: list[Finding] = field(default_factory=list)

    @property
    def writes(self) -> list[Write]:
        return [w for m in self.moods for w in m.writes] + self.sweep


class RemoteIndex:
    """A user's listed records, by rkey and by the mood they point to (`ref` or `mongoId`)."""

    def __init__(self, records: Iterable[RemoteRecord]) -> None:
        self.by_rkey: dict[str, RemoteRecord] = {}
        self.by_ref: dict[str, list[str]] = defaultdict(list)
        for record in records:
            self.by_rkey[record.rkey] = record
            if record.ref is not None:
                self.by_ref[record.ref].append(record.rkey)
        for rkeys in self.by_ref.values():
            rkeys.sort()  # TIDs sort by time: the first is the oldest


def choose_rkey(
    desired: Desired,
    entry: LedgerEntry | None,
    remote: RemoteIndex | None,
    derive: Callable[[ObjectId], str],
) -> str:
    """The document's permalink wins; then what the ledger or the PDS already has; then a TID
    derived from the ObjectId, so a retry anywhere lands on the same key."""
    if desired.doc_rkey:
        return desired.doc_rkey
    if entry is not None and entry.rkey:
        return entry.rkey
    if remote is not None:
        found = remote.by_ref.get(str(desired.mood_id))
        if found:
            return found[0]
    return derive(desired.mood_id)


def _held(
    mood_id: ObjectId,
    entry: LedgerEntry | None,
    account: Account | None,
    remote: RemoteIndex | None,
) -> list[Location]:
    """Every location where a record of this mood may be. A listing is the truth about the
    account's own repo; what the ledger knows of other repos (a DID the user no longer has)
    stays known, so audit keeps reporting it."""
    known = list(entry.held) if entry is not None else []
    if remote is None or account is None:
        return known
    listed = [(account.did, rkey) for rkey in remote.by_ref.get(str(mood_id), [])]
    return listed + [loc for loc in known if loc[0] != account.did]


def plan_mood(
    desired: Desired,
    entry: LedgerEntry | None,
    account: Account | None,
    remote: RemoteIndex | None,
    derive: Callable[[ObjectId], str],
    *,
    fix: bool = True,
    owner: str | None = None,
) -> MoodPlan:
    """`owner`: whose the mood is when neither its document nor the ledger says (a deleted
    mood the ledger never knew, named by the event's pre-image)."""
    mood_id = desired.mood_id
    did = account.did if account else (entry.did if entry else None)
    held = _held(mood_id, entry, account, remote)
    user = desired.user or (entry.user if entry else None) or owner
    findings: list[Finding] = []
    # Only the account's own repo can be written with its credentials: a record left in a
    # repo of a DID the user no longer has (or of a user with no account now) is reported and
    # stays in `held`, never written to.
    writable = [h for h in held if account is not None and h[0] == account.did]
    stranded = [h for h in held if h not in writable]
    for h_did, h_rkey in stranded:
        findings.append(Finding("stale", h_did, h_rkey, mood_id, "another DID's repo"))

    if desired.state is State.PRESENT and account is not None:
        assert desired.record is not None
        rkey = choose_rkey(desired, entry, remote, derive)
        target = (account.did, rkey)
        cid: str | None = None
        exists: bool | None
        ours = False  # the listing shows this mood's own record at the rkey
        if remote is not None:
            # Whatever the listing shows at the rkey is what a put replaces, and what its
            # `swapRecord` must name: even a record of another mood (the permalink wins).
            current = remote.by_rkey.get(rkey)
            exists = current is not None
            ours = current is not None and current.ref == str(mood_id)
            in_sync = ours and current is not None and current.value == desired.record
            cid = current.cid if current is not None else None
            if not ours:
                findings.append(Finding("missing", account.did, rkey, mood_id))
            elif not in_sync:
                findings.append(Finding("mismatch", account.did, rkey, mood_id))
        elif entry is not None and entry.sure and entry.held == (target,):
            exists, cid, in_sync = True, entry.cid, entry.hash == desired.hash
        else:
            # In flight or parked (it may be there), or known not to be.
            exists, in_sync = (None if target in writable else False), False
        writes: list[Write] = []
        if not in_sync:
            writes.append(
                Write("put", account.did, rkey, mood_id, desired.record, exists, "desired", cid)
            )
        kept = [target]
        for other in writable:
            if other == target:
                continue
            findings.append(Finding("duplicate", other[0], other[1], mood_id))
            if fix or remote is None:
                listed = True if remote is not None else None  # else only "may be there"
                writes.append(Write("delete", other[0], other[1], mood_id, exists=listed,
                                    why="duplicate"))  # fmt: skip
            else:
                kept.append(other)
        new_entry = LedgerEntry(
            mood_id, user, State.PRESENT, account.did, rkey, desired.hash,
            cid if in_sync else None, held=tuple(kept + stranded),
        )  # fmt: skip
        writeback = rkey if desired.doc_rkey != rkey else None
        adopted = ours and (entry is None or entry.state is not State.PRESENT or entry.rkey != rkey)
        return MoodPlan(mood_id, desired, writes, new_entry, writeback, findings, adopted)

    if desired.state is State.INVALID:
        # Keep whatever the PDS has: a bad edit must not destroy the user's record.
        findings.append(Finding("invalid", did, None, mood_id, desired.reason or ""))
        k_did, k_rkey = (entry.did, entry.rkey) if entry is not None else (did, None)
        sure = entry is not None and entry.sure and bool(held)
        k_hash = entry.hash if entry is not None and sure else None
        k_cid = entry.cid if entry is not None and sure else None
        if remote is not None and writable:  # the listing is the truth about what it holds
            k_did, k_rkey = writable[0]
            k_cid = remote.by_rkey[k_rkey].cid or "unknown"
        new_entry = LedgerEntry(
            mood_id, user, State.INVALID, k_did, k_rkey, k_hash, k_cid, desired.reason,
            held=tuple(held),
        )  # fmt: skip
        return MoodPlan(mood_id, desired, [], new_entry, None, findings)

    # ABSENT (deleted/nuked) or SKIPPED (no account): no record may exist.
    state = State.ABSENT if desired.state is State.ABSENT else State.SKIPPED
    if state is State.SKIPPED:
        findings.append(Finding("skipped", None, None, mood_id, desired.reason or "no account"))
    writes = []
    for h_did, h_rkey in writable:
        findings.append(Finding("stale", h_did, h_rkey, mood_id, desired.reason or ""))
        cid = remote.by_rkey[h_rkey].cid if remote is not None else _cid_at(entry, h_did, h_rkey)
        # Known to exist when listed or when the ledger is sure of it; a location an intent
        # added ("may be there") is not: `exists` None keeps it out of an `applyWrites`.
        known = True if remote is not None or _sure_at(entry, h_did, h_rkey) else None
        writes.append(Write("delete", h_did, h_rkey, mood_id, exists=known, why="not desired",
                            cid=cid))  # fmt: skip
    keep_rkey = (
        desired.doc_rkey or (entry.rkey if entry else None) or (held[0][1] if held else None)
    )
    if stranded:  # not gone: no write of ours can confirm it, so never `absent`
        state = State.STRANDED
    new_entry = LedgerEntry(
        mood_id, user, state, did, keep_rkey, None, None, desired.reason, held=tuple(stranded)
    )
    if account is None:  # (with an account, a replayed purge needs the owner: its sweep)
        new_entry = new_entry.settled(desired.reason == DOCUMENT_DELETED)
    return MoodPlan(mood_id, desired, writes, new_entry, None, findings)


def _sure_at(entry: LedgerEntry | None, did: str, rkey: str) -> bool:
    """The ledger knows the record at (did, rkey) exists: written there after the PDS said so."""
    return entry is not None and entry.sure and entry.held == ((did, rkey),)


def _cid_at(entry: LedgerEntry | None, did: str, rkey: str) -> str | None:
    return entry.cid if _sure_at(entry, did, rkey) and entry is not None else None


def plan_user(
    user: str | None,
    account: Account | None,
    desired: Sequence[Desired],
    ledger: Mapping[ObjectId, LedgerEntry],
    derive: Callable[[ObjectId], str],
    *,
    remote: Sequence[RemoteRecord] | None = None,
    whole_user: bool = False,
    fix: bool = True,
) -> UserPlan:
    """Plan one user's moods. With `remote` and `whole_user`, every listed record that no live
    mood claims is an orphan (deleted when `fix`), so the collection ends up exactly desired."""
    index = RemoteIndex(remote) if remote is not None else None
    moods = [
        plan_mood(d, ledger.get(d.mood_id), account, index, derive, fix=fix, owner=user)
        for d in desired
    ]
    plan = UserPlan(user, account, moods)
    if index is not None and whole_user and account is not None:
        planned = {str(d.mood_id) for d in desired}
        claimed = {w.rkey for m in moods for w in m.writes} | {
            m.entry.rkey for m in moods if m.entry.state is State.PRESENT and m.entry.rkey
        }
        for rkey, record in sorted(index.by_rkey.items()):
            if rkey in claimed or record.ref in planned:
                continue
            plan.findings.append(Finding("orphan", account.did, rkey, None, record.ref or ""))
            if fix:
                plan.sweep.append(Write("delete", account.did, rkey, exists=True, why="orphan"))
    return plan


def salt_collisions(
    plan: UserPlan,
    ledger: Mapping[ObjectId, LedgerEntry],
    owners: Mapping[str, ObjectId | None],
    derive: Callable[[ObjectId, int], str],
) -> tuple[UserPlan, set[str]]:
    """Give a new mood whose derived TID is already another mood's record the next salt.

    `owners` says which mood's ledger entry holds each rkey in this repo (None: nobody) for
    the rkeys looked up so far. Returns the salted plan and the rkeys it still needs owners
    for: look those up and call again (one lookup for the whole plan; a collision, which is
    rare, costs one more per salt tried)."""
    if plan.account is None:
        return plan, set()
    unknown: set[str] = set()
    claimed: dict[str, ObjectId] = {}
    moods = list(plan.moods)
    for i, mood in enumerate(moods):
        put = next((w for w in mood.writes if w.action == "put"), None)
        if put is None or mood.desired.doc_rkey or mood.mood_id in ledger:
            continue
        salt, rkey = 0, put.rkey
        while True:
            if rkey not in owners and rkey not in claimed:
                unknown.add(rkey)
                break
            owner = claimed.get(rkey) or owners.get(rkey)
            if owner is None or owner == mood.mood_id:
                break
            salt += 1
            rkey = derive(mood.mood_id, salt)
        claimed[rkey] = mood.mood_id
        if rkey != put.rkey:
            writes = [replace(w, rkey=rkey) if w is put else w for w in mood.writes]
            entry = replace(mood.entry, rkey=rkey, held=((plan.account.did, rkey),))
            moods[i] = replace(mood, writes=writes, entry=entry, writeback=rkey)
    return replace(plan, moods=moods), unknown
