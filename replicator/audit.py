"""Audit: prove Mongo and the PDS agree, user by user, from the PDS's own listing.

It plans each user exactly as the backfill would (a dry run of the one apply path), so "in
sync" means "the backfill would write nothing". `--fix` repairs through that same path and
audits again: the exit code reflects the state after the repair.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from . import metrics
from .apply import Applier
from .backfill import reconcile_until_stable
from .model import State
from .outcome import Counts, Outcome
from .plan import Finding
from .store import Store

DIVERGENCES = ("missing", "mismatch", "duplicate", "orphan", "stale", "erased")


@dataclass
class AuditReport:
    users: int = 0
    outcome: Outcome = field(default_factory=Outcome)
    diverged_users: list[str] = field(default_factory=list)
    dead_letters: int = 0
    repairs: Counter[str] = field(default_factory=Counter)
    fixed: bool = False
    before_fix: dict[str, Any] | None = None
    # (a whole audit) the moods of no user (no usable `user`), which no user's audit covers
    moods_without_user: int = 0
    invalid_without_user: int = 0

    @property
    def divergences(self) -> Counter[str]:
        kinds: Counter[str] = Counter(f.kind for f in self.outcome.findings)
        found: Counter[str] = Counter({k: kinds[k] for k in DIVERGENCES})
        found["ledger_out_of_date"] = self.outcome.counts.ledger_out_of_date
        return found

    @property
    def in_sync(self) -> bool:
        return sum(self.divergences.values()) == 0

    def summary(self, *, examples: int = 20) -> dict[str, Any]:
        c = self.outcome.counts
        should_exist = c.desired[State.PRESENT]
        broken = {
            f.mood_id for f in self.outcome.findings
            if f.kind in ("missing", "mismatch", "duplicate") and f.mood_id is not None
        }  # fmt: skip
        in_sync = should_exist - len(broken)
        invalid = [f for f in self.outcome.findings if f.kind == "invalid"]
        out: dict[str, Any] = {
            "in_sync": self.in_sync,
            "users": self.users,
            "users_with_account": c.users_with_account,
            "moods": c.total + self.moods_without_user,
            **({"by_type": dict(c.documents)} if len(c.documents) > 1 else {}),
            "records": c.records_listed,
            "in_sync_percent": round(100.0 * in_sync / should_exist, 2) if should_exist else 100.0,
            "divergences": dict(self.divergences),
            "invalid": len(invalid) + self.invalid_without_user,
            "invalid_reasons": dict(Counter(f.detail for f in invalid)),
            "no_account": c.desired[State.SKIPPED],
            "dead_letters": self.dead_letters,
            "diverged_users": self.diverged_users[:examples],
            "examples": [_finding(f) for f in self.outcome.findings
                         if f.kind in DIVERGENCES][:examples],
        }  # fmt: skip
        if self.fixed:
            out["repairs"] = dict(self.repairs)
            out["before_fix"] = self.before_fix
        return out


def _finding(f: Finding) -> dict[str, Any]:
    return {"kind": f.kind, "did": f.did, "rkey": f.rkey,
            "mood_id": str(f.mood_id) if f.mood_id else None, "detail": f.detail}  # fmt: skip


async def audit_users(
    store: Store, dry: Applier, users: Sequence[str], *, whole: bool = False
) -> AuditReport:
    """`whole`: every user is audited, so the invalid moods of no user (no usable `user`)
    are counted too (from the dead-letter queue, which reports them): the same `invalid` as
    `status` and `dlq list` give."""
    report = AuditReport(users=len(users))
    if whole:
        for view in store.views:
            report.moods_without_user += await view.moods_without_user()
            report.invalid_without_user += await view.invalid_without_user()
    for sub in users:
        outcome = await dry.reconcile_user(sub, fix=True)
        report.outcome.merge(outcome)
        if (
            any(f.kind in DIVERGENCES for f in outcome.findings)
            or outcome.counts.ledger_out_of_date
        ):
            report.diverged_users.append(sub)
    report.dead_letters = sum([await view.dead_letter_count() for view in store.views])
    return report


async def audit(
    store: Store,
    dry: Applier,
    live: Applier,
    users: Sequence[str],
    *,
    fix: bool = False,
    whole: bool = False,
) -> AuditReport:
    """`dry` plans without writing; `live` repairs (only with `fix`)."""
    report = await audit_users(store, dry, users, whole=whole)
    if not fix or report.in_sync:
        return report
    before = report.summary()
    done = Counts()
    for sub in report.diverged_users:
        done.add((await reconcile_until_stable(live, [sub], fix=True)).counts)
    metrics.observe_repairs(done.sent)
    repairs = Counter({"put": done.sent.put, "delete": done.sent.delete,
                       "delete_orphan": done.sent.delete_orphan, "adopted": done.adopted,
                       "parked": done.parked})  # fmt: skip
    await metrics.flush_stats(store)  # launch figures: `status` shows the repairs made
    after = await audit_users(store, dry, users, whole=whole)
    after.fixed, after.repairs, after.before_fix = True, repairs, before
    return after
