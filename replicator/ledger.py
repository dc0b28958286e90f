"""What the ledger says of a mood before its writes are sent, and after. Pure.

The invariant (docs/architecture.md): the replicator never sends a write that its ledger could
not find. Before any PDS call, each mood with writes gets an *intent*: state `pending`, and
`held` extended with every location the writes touch. A crash anywhere after that leaves an
entry that every later decision treats as "may be on the PDS", so a mood deleted meanwhile
has its record deleted at that location (deletes are idempotent). After the calls, `settle`
turns the intent into what is now known: `present`/`absent` where every write succeeded,
`parked` (still holding every location that may have a record) where not.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Literal

from bson import ObjectId

from .desired import record_cid
from .model import LedgerEntry, Location, State, Write
from .plan import MoodPlan

FailureKind = Literal["gone", "unavailable", "auth", "budget", "stuck", "swap", "erased"]
SentKey = tuple[str, str, str]  # (action, did, rkey)


def sent_key(write: Write) -> SentKey:
    return (write.action, write.did, write.rkey)


@dataclass(frozen=True)
class Failure:
    """Why a lane stopped before all its writes were sent."""

    kind: FailureKind
    reason: str
    retry_in: float | None = None  # None: the default backoff for the mood's attempts


@dataclass
class LaneResult:
    """What one user's lane got done: CIDs of the writes the PDS took, the moods whose own
    write it refused, and the failure that stopped the lane, if one did."""

    sent: dict[SentKey, str | None] = field(default_factory=dict)
    refused: dict[ObjectId, str] = field(default_factory=dict)
    failure: Failure | None = None


def _union(*groups: tuple[Location, ...] | list[Location]) -> tuple[Location, ...]:
    return tuple(dict.fromkeys(loc for group in groups for loc in group))


def intent(mood: MoodPlan, before: LedgerEntry | None, generation: int | None) -> LedgerEntry:
    """The entry written before the mood's writes are sent. A put's record's CID is known
    already (`record_cid`): kept, unused while pending (`LedgerEntry.sure` is False), so
    that its outcome differs from the intent by its state alone."""
    touched = [(w.did, w.rkey) for w in mood.writes]
    put = next((w for w in mood.writes if w.action == "put" and w.record is not None), None)
    return replace(
        mood.entry,
        state=State.PENDING,
        cid=record_cid(put.record) if put is not None and put.record is not None else None,
        reason=None,
        attempts=before.attempts if before is not None else 0,
        retry_at=None,
        held=_union(before.held if before is not None else (), touched, mood.entry.held),
        generation=generation,
    )


def backoff(attempts: int, failure: FailureKind | None) -> float:
    """Seconds before parked work is tried again: quick for a PDS that was merely slow,
    slower for refusals that a person has to fix."""
    if failure == "stuck":
        return float(min(600.0, 10.0 * 2 ** (attempts - 1)))
    if failure == "swap":
        return 0.0
    return float(min(3600.0, 30.0 * 2 ** (attempts - 1)))


def settle(
    mood: MoodPlan,
    pending: LedgerEntry,
    result: LaneResult,
    *,
    generation: int | None,
    now: float,
) -> tuple[LedgerEntry, str | None]:
    """The entry once the lane is done, and the reason it is parked (None if it is not)."""
    keys = [sent_key(w) for w in mood.writes]
    put = next((w for w in mood.writes if w.action == "put"), None)
    if all(k in result.sent for k in keys):
        entry = mood.entry
        if put is not None and entry.state is State.PRESENT:
            entry = replace(entry, cid=result.sent[sent_key(put)])
        return replace(entry, attempts=0, retry_at=None, generation=generation), None
    failure = result.failure
    deleted = {(w.did, w.rkey) for w in mood.writes if w.action == "delete"
               and sent_key(w) in result.sent}  # fmt: skip
    held = tuple(h for h in pending.held if h not in deleted)
    if failure is not None and failure.kind == "gone":
        # A deleted account's repo, and every record in it, is gone: its deletes are done;
        # its puts cannot be, and are parked.
        repo = mood.writes[0].did
        if put is None:
            held = tuple(h for h in mood.entry.held if h[0] != repo)
            return replace(mood.entry, held=held, generation=generation), None
        held = tuple(h for h in held if h[0] != repo)
    reason = result.refused.get(mood.mood_id) or (failure.reason if failure else "not sent")
    put_done = put is not None and sent_key(put) in result.sent
    attempts = pending.attempts + 1
    kind = None if mood.mood_id in result.refused else (failure.kind if failure else None)
    wait = failure.retry_in if failure is not None and failure.retry_in is not None else None
    parked = replace(
        pending,
        state=State.PARKED,
        hash=pending.hash if put_done else None,
        cid=result.sent.get(sent_key(put)) if put is not None and put_done else None,
        reason=reason,
        attempts=attempts,
        retry_at=now + (wait if wait is not None and kind != "swap" else backoff(attempts, kind)),
        held=held,
        generation=generation,
    )
    return parked, reason


def parked_without_sending(
    mood: MoodPlan,
    before: LedgerEntry | None,
    reason: str,
    retry_at: float,
    generation: int | None,
) -> LedgerEntry:
    """Work that was never sent (the account is parked): what the PDS holds is unchanged."""
    held = before.held if before is not None else ()
    return replace(
        mood.entry,
        state=State.PARKED,
        hash=before.hash if before is not None and held else None,
        cid=before.cid if before is not None and held else None,
        reason=reason,
        attempts=(before.attempts if before is not None else 0) + 1,
        retry_at=retry_at,
        held=held,
        generation=generation,
    )


def changed(before: LedgerEntry | None, after: LedgerEntry) -> bool:
    """Worth writing: anything but the attempt counter and the generation differs."""
    if before is None:
        return True
    if after.cid is None and before.cid is not None and after.hash == before.hash:
        after = replace(after, cid=before.cid)
    same = replace(before, attempts=0, generation=None) == replace(
        after, attempts=0, generation=None
    )
    return not same


def intents_for(
    moods: list[MoodPlan], before: Mapping[ObjectId, LedgerEntry], generation: int | None
) -> dict[ObjectId, LedgerEntry]:
    return {m.mood_id: intent(m, before.get(m.mood_id), generation) for m in moods if m.writes}
