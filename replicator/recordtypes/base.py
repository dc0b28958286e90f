"""A record type: what the core needs to know of one collection mirrored into one lexicon.

A declaration, not code: the core (desired state, planner, ledger, apply, the stream,
backfill, audit, erasure, dead letters, status, metrics) is written once and reads it.
Adding a type is a module with one of these (docs/architecture.md, "Adding a record type").
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from bson import ObjectId

Record = dict[str, Any]
Document = Mapping[str, Any]


def _never(_: Document) -> str | None:
    return None


@dataclass(frozen=True)
class RecordType:
    """`build` maps a live document to its record (the `$type` included, `ref` the `_id` in
    hex) or raises `fields.InvalidDocument`; the core then checks it against the lexicon of
    `nsid` (the limits come from that file) and hashes it. It must be pure and deterministic:
    the same document always makes the same bytes (the ledger compares hashes, the PDS skips
    a write whose CID is unchanged).

    `deleted`: why the document is soft-deleted (its record must go, and comes back under the
    same rkey when it is live again), or None. `foreign`: why the document is not ours (never
    mirrored, its write-back location never written), or None. `owner`: the field naming the
    user (an Auth0 sub); `ownerless` says what a document without a usable one is: `invalid`
    (a dead letter) or `skip` (not mirrored, by design). `write_back`: the subdocument whose
    `rkey` holds the record's rkey, read as the document's permalink and written back.
    `fingerprint`: the fields a concurrent writer could change (a reconcile notices them).
    `sources`: record field → the document field it comes from, where the names differ (a
    lexicon refusal then names both: `title (headline): longer than ...`).
    `suffix`: appended to the replicator's own collections of this type (ledger, dead
    letters); the first type keeps the names it had before types existed.
    """

    name: str
    collection: str
    nsid: str
    build: Callable[[Document, ObjectId], Record]
    deleted: Callable[[Document], str | None]
    fingerprint: tuple[str, ...]
    foreign: Callable[[Document], str | None] = _never
    owner: str = "user"
    ownerless: Literal["invalid", "skip"] = "invalid"
    write_back: str = "atproto"
    sources: Mapping[str, str] = field(default_factory=dict)
    suffix: str = ""

    def __repr__(self) -> str:
        return f"RecordType({self.name!r})"
