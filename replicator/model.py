"""The values the core passes around: accounts, ledger entries, desired records, writes."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal

from bson import ObjectId

Record = dict[str, Any]


class State(StrEnum):
    """What the ledger knows about a mood's record on the PDS."""

    PRESENT = "present"  # the PDS holds the record (did, rkey) with this content hash
    ABSENT = "absent"  # no record: the mood is deleted or gone; rkey kept for an un-nuke
    SKIPPED = "skipped"  # no record by policy: the user has no ATProto account / not enabled
    INVALID = "invalid"  # the document cannot become a valid record (reason says why)
    PARKED = "parked"  # could not be applied now (e.g. wrong password); retried later


@dataclass(frozen=True)
class Account:
    sub: str
    did: str
    handle: str | None
    password: str = field(repr=False)


@dataclass(frozen=True)
class LedgerEntry:
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

    @property
    def on_pds(self) -> bool:
        return self.state is State.PRESENT or (
            self.state in (State.INVALID, State.PARKED)
            and self.rkey is not None
            and (self.hash is not None or self.cid is not None)
        )


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
