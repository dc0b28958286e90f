"""What an apply did: typed counts and the divergences it saw.

One value read by the stream's log line, the metrics, backfill, audit and the commands, so
a figure that is renamed is renamed everywhere (mypy sees each reader), never read as zero.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, fields, replace
from typing import Any

from .model import State
from .plan import Finding


@dataclass
class Writes:
    """PDS writes, by kind: those sent (`Counts.sent`) or that a dry run would send."""

    put: int = 0  # created + updated (+ puts whose target may or may not exist)
    created: int = 0
    updated: int = 0
    delete: int = 0  # records of documents
    delete_orphan: int = 0  # records no document claims (duplicates, orphans)

    @property
    def deleted(self) -> int:
        return self.delete + self.delete_orphan


@dataclass
class Counts:
    documents: Counter[str] = field(default_factory=Counter)  # by record type
    desired: Counter[State] = field(default_factory=Counter)  # what each document wants
    unchanged: Counter[State] = field(default_factory=Counter)  # nothing to write: by state
    sent: Writes = field(default_factory=Writes)
    would: Writes = field(default_factory=Writes)  # a dry run's
    adopted: int = 0  # a record already on the PDS, now known to the ledger
    parked: int = 0  # documents whose writes are parked
    not_enabled: int = 0  # documents of users outside `--only-user`
    ledger_out_of_date: int = 0
    write_back_failed: int = 0
    records_listed: int = 0
    users_with_account: int = 0
    erasures: int = 0  # users erased and forgotten
    erasures_unfinished: int = 0

    def add(self, other: Counts) -> None:
        for f in fields(self):
            _add(self, other, f.name)

    def writes(self) -> Counts:
        """What another pass over the same documents adds to the figures: its writes (and
        what they parked or erased), not the documents, states and listings again."""
        return Counts(sent=replace(self.sent), would=replace(self.would), adopted=self.adopted,
                      parked=self.parked, write_back_failed=self.write_back_failed,
                      erasures=self.erasures)  # fmt: skip

    @property
    def total(self) -> int:
        """Documents of every type."""
        return sum(self.documents.values())


def _add(into: Any, other: Any, name: str) -> None:
    mine, theirs = getattr(into, name), getattr(other, name)
    if isinstance(mine, Counter):
        mine.update(theirs)
    elif isinstance(mine, Writes):
        for f in fields(mine):
            _add(mine, theirs, f.name)
    else:
        setattr(into, name, mine + theirs)


@dataclass
class Outcome:
    """What an apply did, counted; `findings` are the divergences it saw (for audit/backfill);
    `snapshots`: `apply.fingerprint` of each user's documents, as a reconcile read them
    (set by `reconcile_users` alone: not merged)."""

    counts: Counts = field(default_factory=Counts)
    findings: list[Finding] = field(default_factory=list)
    users: set[str] = field(default_factory=set)
    snapshots: dict[str, str] = field(default_factory=dict)

    def merge(self, other: Outcome) -> None:
        self.counts.add(other.counts)
        self.findings.extend(other.findings)
        self.users |= other.users
