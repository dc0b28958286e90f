"""Desired state vs what the PDS holds → the writes that make them equal. Pure.

Two sources tell what the PDS holds: the ledger (cheap, used for every change event) and, when
given, a full listing of the user's collection (used by backfill, audit, history-loss recovery
and the purge sweep), which also finds duplicates and orphans the ledger cannot know about.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from bson import ObjectId

from .model import Account, Desired, LedgerEntry, RemoteRecord, State, Write

FindingKind = Literal[
    "missing", "mismatch", "duplicate", "orphan", "stale", "invalid", "skipped", "parked"
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


def plan_mood(
    desired: Desired,
    entry: LedgerEntry | None,
    account: Account | None,
    remote: RemoteIndex | None,
    derive: Callable[[ObjectId], str],
    *,
    fix: bool = True,
) -> MoodPlan:
    mood_id = desired.mood_id
    did = account.did if account else (entry.did if entry else None)
    # Where the PDS holds this mood's record(s) now.
    held: list[tuple[str, str]] = []  # (did, rkey)
    if remote is not None and did is not None:
        held = [(did, rkey) for rkey in remote.by_ref.get(str(mood_id), [])]
    elif entry is not None and entry.on_pds and entry.did and entry.rkey:
        held = [(entry.did, entry.rkey)]
    user = desired.user or (entry.user if entry else None)
    findings: list[Finding] = []
    if account is not None:
        # Only the account's own repo can be written with its credentials: a record left in
        # a repo of a DID the user no longer has is reported, not written to.
        for h_did, h_rkey in held:
            if h_did != account.did:
                findings.append(Finding("stale", h_did, h_rkey, mood_id, "another DID's repo"))
        held = [h for h in held if h[0] == account.did]

    if desired.state is State.PRESENT and account is not None:
        assert desired.record is not None
        rkey = choose_rkey(desired, entry, remote, derive)
        target = (account.did, rkey)
        if remote is not None:
            current = remote.by_rkey.get(rkey)
            exists = current is not None and current.ref == str(mood_id)
            in_sync = exists and current is not None and current.value == desired.record
            if not exists:
                findings.append(Finding("missing", account.did, rkey, mood_id))
            elif not in_sync:
                findings.append(Finding("mismatch", account.did, rkey, mood_id))
        else:
            exists = bool(held) and held[0] == target
            in_sync = exists and entry is not None and entry.hash == desired.hash
        writes: list[Write] = []
        if not in_sync:
            writes.append(
                Write("put", account.did, rkey, mood_id, desired.record, exists, "desired")
            )
        for other in held:
            if other == target:
                continue
            findings.append(Finding("duplicate", other[0], other[1], mood_id))
            if fix or remote is None:
                writes.append(Write("delete", other[0], other[1], mood_id, why="duplicate"))
        cid = entry.cid if entry is not None and in_sync else None
        if remote is not None and in_sync:
            cid = remote.by_rkey[rkey].cid
        new_entry = LedgerEntry(mood_id, user, State.PRESENT, account.did, rkey, desired.hash, cid)
        writeback = rkey if desired.doc_rkey != rkey else None
        adopted = (
            remote is not None
            and exists
            and (entry is None or entry.state is not State.PRESENT or entry.rkey != rkey)
        )
        return MoodPlan(mood_id, desired, writes, new_entry, writeback, findings, adopted)

    if desired.state is State.INVALID:
        # Keep whatever the PDS has: a bad edit must not destroy the user's record.
        findings.append(Finding("invalid", did, None, mood_id, desired.reason or ""))
        kept = entry if entry is not None else LedgerEntry(mood_id, user, State.INVALID)
        k_did, k_rkey, k_hash, k_cid = kept.did, kept.rkey, kept.hash, kept.cid
        if not kept.on_pds:
            k_hash = k_cid = None
        if remote is not None and held:  # the listing is the truth about what the PDS has
            k_did, k_rkey = held[0]
            k_cid = remote.by_rkey[k_rkey].cid or "unknown"
        new_entry = LedgerEntry(
            mood_id, user, State.INVALID, k_did, k_rkey, k_hash, k_cid, desired.reason
        )
        return MoodPlan(mood_id, desired, [], new_entry, None, findings)

    # ABSENT (deleted/nuked) or SKIPPED (no account): no record may exist.
    state = State.SKIPPED if desired.state is State.SKIPPED else State.ABSENT
    if desired.state is State.PRESENT:  # present but no account
        state = State.SKIPPED
    if state is State.SKIPPED:
        findings.append(Finding("skipped", None, None, mood_id, desired.reason or "no account"))
    writes = []
    for h_did, h_rkey in held:
        findings.append(Finding("stale", h_did, h_rkey, mood_id, desired.reason or ""))
        writes.append(Write("delete", h_did, h_rkey, mood_id, exists=True, why="not desired"))
    keep_rkey = (
        desired.doc_rkey or (entry.rkey if entry else None) or (held[0][1] if held else None)
    )
    new_entry = LedgerEntry(mood_id, user, state, did, keep_rkey, None, None, desired.reason)
    return MoodPlan(mood_id, desired, writes, new_entry, None, findings)


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
    moods = [plan_mood(d, ledger.get(d.mood_id), account, index, derive, fix=fix) for d in desired]
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
