"""The values the core passes around: accounts, ledger entries, desired records, writes.

The same for every record type: an entry or a plan knows its type by the store it comes
from (`Store.of`), a write by the lane that sends it (`RecordType.nsid`)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any, Literal

from bson import ObjectId

Record = dict[str, Any]


class State(StrEnum):
    """What the ledger knows about a mood's record on the PDS."""

    PRESENT = "present"  # the PDS holds the record (did, rkey) with this content hash
    PENDING = "pending"  # a write is (or was) in flight: the record may or may not be there
    ABSENT = "absent"  # no record anywhere, as the PDS confirmed; rkey kept for an un-nuke
    SKIPPED = "skipped"  # no record by policy: the user has no ATProto account / not enabled
    INVALID = "invalid"  # the document cannot become a valid record (reason says why)
    PARKED = "parked"  # could not be applied now (e.g. wrong password); retried later
    # No record is wanted, but one may remain in a repo the user's credentials no longer
    # reach (a DID they had before): `held` says where; audit reports it as stale. Never
    # `absent`: the ledger says a record is gone only once the PDS confirmed it.
    STRANDED = "stranded"


Location = tuple[str, str]  # (did, rkey): where a record of a mood may be


@dataclass(frozen=True)
class Account:
    """Credentials for one repo. `erased`: the user left `users` (or lost `atproto`); this is
    their last DID with the last credentials seen, good only for deleting their records."""

    sub: str
    did: str
    handle: str | None
    password: str = field(repr=False)
    erased: bool = False


@dataclass(frozen=True)
class LedgerEntry:
    """What the ledger knows of one mood's record.

    `did`/`rkey` is the mood's address (kept after a delete, so an un-nuke restores the same
    permalink). `held` is every location where a record of this mood may exist right now: a
    superset of the truth, never less. A write is recorded in `held` (state `pending`) before
    it is sent, so no record can exist that the ledger could not find; it shrinks only once a
    delete has succeeded or a listing has shown the truth. `generation` is the lease
    generation of the process that wrote the entry: an older one never overwrites it.
    """

    mood_id: ObjectId
    user: str | None
    state: State
    did: str | None = None
    rkey: str | None = None
    hash: str | None = None
    cid: str | None = None
    reason: str | None = None
    attempts: int = 0
    retry_at: float | None = None  # parked work is retried from then on (epoch seconds)
    held: tuple[Location, ...] = ()
    generation: int | None = None

    def __post_init__(self) -> None:
        if self.state is State.PRESENT and not self.held and self.did and self.rkey:
            object.__setattr__(self, "held", ((self.did, self.rkey),))

    def settled(self, deleted: bool) -> LedgerEntry:
        """As kept once done, by a user with no account. An entry that holds nothing keeps no
        owner (user, DID) where nothing of it is left to find: its document deleted, or no
        record wanted at all (`skipped`: the document names its owner, the ledger need not).
        An erased user must not stay named by it: their erasure may go unseen (`atproto`
        unset while the `users` stream's history was lost, no DID of theirs known, and
        documents the app left behind, as its older endpoint leaves news posts)."""
        nothing = not self.held and (
            self.state is State.SKIPPED or (deleted and self.state is State.ABSENT)
        )
        return replace(self, user=None, did=None) if nothing else self

    @property
    def on_pds(self) -> bool:
        """A record of this mood may exist somewhere."""
        return bool(self.held)

    @property
    def sure(self) -> bool:
        """`hash`/`cid` say what the PDS holds at (did, rkey): the entry was written after
        the PDS answered (an invalid edit keeps the content it had), not before."""
        return self.state in (State.PRESENT, State.INVALID) and self.hash is not None


@dataclass(frozen=True)
class Desired:
    """What the PDS should hold for one mood, derived from its document alone."""

    mood_id: ObjectId
    user: str | None
    state: State
    record: Record | None = None
    hash: str | None = None
    doc_rkey: str | None = None  # the document's own `atproto.rkey`, when valid
    reason: str | None = None


@dataclass(frozen=True)
class RemoteRecord:
    rkey: str
    cid: str | None
    value: Record

    @property
    def ref(self) -> str | None:
        ref = self.value.get("ref", self.value.get("mongoId"))
        return ref if isinstance(ref, str) else None


@dataclass(frozen=True)
class Write:
    action: Literal["put", "delete"]
    did: str
    rkey: str
    mood_id: ObjectId | None = None  # None: an orphan or duplicate no mood claims
    record: Record | None = None
    exists: bool | None = None  # known to be on the PDS (update) or not (create); None: unknown
    why: str = ""
    cid: str | None = None  # the CID the ledger knows at this location (for `swapRecord`)

    @property
    def swap(self) -> tuple[bool, str | None]:
        """(send `swapRecord`?, its value): the CID the record must have, None for "must not
        exist". Nothing is sent where the ledger is unsure (after a crash, say)."""
        if self.action == "put" and self.exists is False:
            return True, None
        if self.exists is not False and self.cid is not None:
            return True, self.cid
        return False, None
