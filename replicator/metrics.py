"""Prometheus metrics: one registry, the metric objects, and the small functions the core calls.

The core never touches a metric object directly: it calls `observe_apply`, `observe_batch`,
`observe_pds_request` and `observe_retry`, which keep the label sets small and fixed (no DIDs,
no subs, nothing secret: a label value is only ever an NSID, an HTTP status, an outcome or a
ledger state). Gauges that describe live state (lag, checkpoint age, open sessions) are read
when scraped, from the objects `replicator.health.Monitor` binds.

The same observations are also accumulated as deltas and added (`$inc`) to a document in
`replicator_state` by `flush_stats`, so `replicator status` can show launch figures (sync
success rate, latency, failures) that survive restarts and need no access to this process.
"""

from __future__ import annotations

import math
import time
from collections import Counter as Tally
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
)
from prometheus_client.process_collector import ProcessCollector

from .logs import redact
from .model import State
from .outcome import Counts, Outcome, Writes

if TYPE_CHECKING:  # the core imports this module: no runtime import back into it
    from .pds import XrpcError
    from .store import Store

disable_created_metrics()  # type: ignore[no-untyped-call]  # no `*_created` series
REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)  # memory, CPU, open fds: for "is it leaking"

# Buckets: one user's apply is a few ms (nothing to write) to seconds (an applyWrites of 200);
# the end-to-end sync latency is measured against the cluster time, which has 1 s resolution.
APPLY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
SYNC_BUCKETS = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0, 3600.0)

EVENTS = Counter(
    "replicator_events_total",
    "Moods applied, by what the PDS needed (put, delete, delete_orphan, write, none) and how "
    "it went (ok, failed, invalid, unchanged, skipped, stranded, not_enabled, dry_run).",
    ["operation", "outcome"],
    registry=REGISTRY,
)
APPLY_SECONDS = Histogram(
    "replicator_apply_duration_seconds",
    "Time to apply one user's share of a batch: plan, PDS writes, ledger.",
    buckets=APPLY_BUCKETS,
    registry=REGISTRY,
)
SYNC_SECONDS = Histogram(
    "replicator_sync_latency_seconds",
    "From a change's cluster time in MongoDB to its batch being applied, per change event.",
    buckets=SYNC_BUCKETS,
    registry=REGISTRY,
)
STREAM_EVENTS = Counter(
    "replicator_stream_events_total",
    "Change events of mood documents applied from the change stream.",
    registry=REGISTRY,
)
LAG = Gauge(
    "replicator_lag_seconds",
    "Now minus the cluster time of the last applied event; 0 when the last read of the "
    "stream found nothing waiting.",
    registry=REGISTRY,
)
LAST_EVENT = Gauge(
    "replicator_last_event_timestamp_seconds",
    "Cluster time of the last applied change event (epoch seconds; 0 before the first).",
    registry=REGISTRY,
)
CHECKPOINT_AGE = Gauge(
    "replicator_checkpoint_age_seconds",
    "Seconds since the resume token was last saved (since start, before the first save).",
    registry=REGISTRY,
)
STREAM_OPEN = Gauge(
    "replicator_stream_open", "1 while the change stream is open.", registry=REGISTRY
)
READY = Gauge(
    "replicator_ready",
    "1 when /readyz passes: stream open, checkpoint fresh, PDS reachable.",
    registry=REGISTRY,
)
PDS_UP = Gauge("replicator_pds_up", "1 if the last PDS health probe succeeded.", registry=REGISTRY)
DIRECTORY_UP = Gauge(
    "replicator_directory_up",
    "0 while the DID directory (REPLICATOR_PLC_URL) does not answer, else 1. Advisory: writes "
    "go on meanwhile, to each account's last known PDS (else PDS_URL).",
    registry=REGISTRY,
)
PDS_REQUESTS = Counter(
    "replicator_pds_requests_total",
    "PDS XRPC calls by method (NSID) and HTTP status (0: no answer).",
    ["method", "status"],
    registry=REGISTRY,
)
RETRIES = Counter(
    "replicator_pds_retries_total",
    "PDS calls retried, by reason (rate_limited, server_error, no_answer).",
    ["reason"],
    registry=REGISTRY,
)
RATE_LIMIT_WAIT = Counter(
    "replicator_rate_limit_wait_seconds",
    "Seconds spent waiting on rate limits: the PDS's Retry-After (pds) or our own write "
    "budget, --rate (budget).",
    ["source"],
    registry=REGISTRY,
)
DEAD_LETTERS = Gauge(
    "replicator_dead_letters", "Documents in the dead-letter collection.", registry=REGISTRY
)
OPEN_SESSIONS = Gauge(
    "replicator_open_sessions", "PDS sessions held in memory (one per account).", registry=REGISTRY
)
LEDGER = Gauge(
    "replicator_ledger_entries",
    "Ledger entries by state (present, absent, skipped, invalid, parked).",
    ["state"],
    registry=REGISTRY,
)
PARKED_ACCOUNTS = Gauge(
    "replicator_parked_accounts",
    "Accounts whose writes are parked until they can be written again, by reason: "
    "deactivated, takendown, suspended (the PDS says so), moved (the DID document names "
    "another PDS), erased (the app erased the user and no credential the replicator kept "
    "works: their records are still public until an operator acts), unavailable (any other).",
    ["reason"],
    registry=REGISTRY,
)
PARKED_REASONS = ("deactivated", "takendown", "suspended", "moved", "erased", "unavailable")
ERASURES = Counter(
    "replicator_erasures_total",
    "Erased users whose records the PDS confirmed gone, after which the replicator forgot them.",
    registry=REGISTRY,
)
REPAIRS = Counter(
    "replicator_repairs_total",
    "Writes made to repair a divergence found by a reconciliation (audit --fix), by operation.",
    ["operation"],
    registry=REGISTRY,
)
INFO = Info("replicator", "Version and mode (live or dry-run).", registry=REGISTRY)
RETRY_REASONS = ("rate_limited", "server_error", "no_answer")
REPAIR_OPERATIONS = ("put", "delete", "delete_orphan")
for _reason in RETRY_REASONS:  # exported at 0 from the start: rate() and alerts need a series
    RETRIES.labels(_reason)
for _operation in REPAIR_OPERATIONS:
    REPAIRS.labels(_operation)

# Outcomes that count as a failed sync (the alert's and the launch figures' numerator).
FAILED_OUTCOMES = ("failed", "invalid")
SYNCED_OUTCOMES = ("ok",)


# A document with nothing to write, by its entry's state → the outcome label. `parked` with
# no write: the account is gone from the PDS, its puts cannot be done.
_UNCHANGED = {State.PRESENT: "unchanged", State.ABSENT: "unchanged", State.PARKED: "failed"}


def events(counts: Counts) -> list[tuple[str, str, int]]:
    """(operation, outcome, n) of what an apply did, from the small fixed label set; what
    describes rather than counts (documents, records listed...) is no event."""
    out = [(op, "ok", getattr(counts.sent, op)) for op in REPAIR_OPERATIONS]
    out += [(op, "dry_run", getattr(counts.would, op)) for op in REPAIR_OPERATIONS]
    out += [("write", "failed", counts.parked), ("none", "not_enabled", counts.not_enabled)]
    out += [("none", _UNCHANGED.get(s, s.value), n) for s, n in counts.unchanged.items()]
    return [(op, result, n) for op, result, n in out if n > 0]


# -- what the core calls ----------------------------------------------------------------------


class _Pending:
    """Deltas not yet added to the stats document (see `flush_stats`)."""

    def __init__(self) -> None:
        self.events: Tally[str] = Tally()
        self.repairs: Tally[str] = Tally()
        self.latency_count = 0
        self.latency_sum = 0.0
        self.latency_buckets: Tally[int] = Tally()
        self.last_error: tuple[float, str] | None = None

    def empty(self) -> bool:
        return not (self.events or self.repairs or self.latency_count or self.last_error)


_pending = _Pending()


def observe_apply(outcome: Outcome, seconds: float) -> None:
    """After one user's moods were planned and applied (every path: events, parked retries,
    backfill, recovery)."""
    APPLY_SECONDS.observe(seconds)
    for operation, result, n in events(outcome.counts):
        EVENTS.labels(operation, result).inc(n)
        _pending.events[f"{operation}:{result}"] += n


def observe_batch(n_ids: int, last_event_at: float | None) -> None:
    """The stream's `on_batch`: `n_ids` change events applied, the newest of cluster time
    `last_event_at`. Its sync latency is counted for every event of the batch."""
    if n_ids <= 0:
        return
    STREAM_EVENTS.inc(n_ids)
    if last_event_at is None or not math.isfinite(last_event_at):
        return
    latency = max(0.0, time.time() - last_event_at)
    for _ in range(n_ids):
        SYNC_SECONDS.observe(latency)
    _pending.latency_count += n_ids
    _pending.latency_sum += latency * n_ids
    _pending.latency_buckets[_bucket_index(latency)] += n_ids


def observe_pds_request(nsid: str, status: int) -> None:
    """`Pds(on_request=...)`: every XRPC call, status 0 when nothing answered."""
    PDS_REQUESTS.labels(nsid, str(status)).inc()


def observe_retry(exc: XrpcError) -> None:
    """`Pds(on_retry=...)`: a transient failure about to be retried."""
    if exc.status == 429:
        RETRIES.labels("rate_limited").inc()
        if exc.retry_after:
            RATE_LIMIT_WAIT.labels("pds").inc(exc.retry_after)
    elif exc.status == 0:
        RETRIES.labels("no_answer").inc()
    else:
        RETRIES.labels("server_error").inc()
    note_error(str(exc))


def observe_repairs(writes: Writes) -> None:
    """For `audit --fix`: the writes that repaired divergences. Kept apart from a backfill's
    writes, which are the first mirror, not repairs."""
    for key in REPAIR_OPERATIONS:
        n = int(getattr(writes, key))
        if n > 0:
            REPAIRS.labels(key).inc(n)
            _pending.repairs[key] += n


def parked_reason(kind: str, reason: str) -> str:
    """A parked account's reason as a label value: one of `PARKED_REASONS`, never a host."""
    if kind in ("moved", "erased"):
        return kind
    for word in PARKED_REASONS[:3]:
        if f"account {word} " in reason:
            return word
    return "unavailable"


def observe_parked_accounts(parked: Iterable[tuple[str, str]]) -> None:
    """(kind, reason) of every parked account, as `replicator_accounts` holds them."""
    counts = Tally(parked_reason(kind, reason) for kind, reason in parked)
    for label in PARKED_REASONS:
        PARKED_ACCOUNTS.labels(label).set(counts.get(label, 0))


def observe_erasure() -> None:
    """An erased user's records confirmed gone, and the user forgotten."""
    ERASURES.inc()


def note_error(message: str) -> None:
    """The most recent error, for `replicator status` (redacted: it is shown to operators)."""
    _pending.last_error = (time.time(), redact(message)[:500])


def _bucket_index(value: float) -> int:
    for i, bound in enumerate(SYNC_BUCKETS):
        if value <= bound:
            return i
    return len(SYNC_BUCKETS)  # +Inf


# -- persisted figures (for `replicator status`) ----------------------------------------------


def stats_id(moods: str, *, dry_run: bool = False) -> str:
    return f"stats:{moods}" + (":dry-run" if dry_run else "")


async def flush_stats(
    store: Store, *, dry_run: bool = False, live: Mapping[str, Any] | None = None
) -> None:
    """Add the pending deltas to the stats document and, from `replicator run`, its live view
    (`live`: lag, stream state, pid...). A command (e.g. `audit --fix` after
    `observe_repairs`) flushes without `live`. On failure the deltas are kept for next time."""
    global _pending
    pending, _pending = _pending, _Pending()
    inc: dict[str, float] = {}
    for key, n in pending.events.items():
        inc[f"events.{key}"] = n
    for key, n in pending.repairs.items():
        inc[f"repairs.{key}"] = n
    if pending.latency_count:
        inc["latency.count"] = pending.latency_count
        inc["latency.sum"] = pending.latency_sum
        for i, n in pending.latency_buckets.items():
            inc[f"latency.buckets.{i}"] = n
    now = time.time()
    fields: dict[str, Any] = {"latency_bounds": list(SYNC_BUCKETS), "flushed_at": now}
    if live is not None:
        fields["live"] = {**live, "flushed_at": now}
    if pending.last_error:
        fields["last_error"] = {"at": pending.last_error[0], "message": pending.last_error[1]}
    update: dict[str, Any] = {"$set": fields}
    if inc:
        update["$inc"] = inc
    try:
        await store.state.update_one(
            {"_id": stats_id(store.names.moods, dry_run=dry_run)}, update, upsert=True
        )
    except BaseException:
        _merge(pending)
        raise


def discard_pending() -> None:
    """Forget deltas observed before a `run` started: they belong to no replicator run (a
    test session, a command that shares the process)."""
    global _pending
    _pending = _Pending()


def _merge(old: _Pending) -> None:
    _pending.events.update(old.events)
    _pending.repairs.update(old.repairs)
    _pending.latency_count += old.latency_count
    _pending.latency_sum += old.latency_sum
    _pending.latency_buckets.update(old.latency_buckets)
    if _pending.last_error is None:
        _pending.last_error = old.last_error


def quantile(q: float, bounds: Iterable[float], buckets: Mapping[str, Any]) -> float | None:
    """`histogram_quantile` over persisted (non-cumulative) bucket counts: linear within the
    bucket, the highest finite bound for the +Inf bucket. None without observations."""
    edges = list(bounds)
    counts = [int(buckets.get(str(i), 0)) for i in range(len(edges) + 1)]
    total = sum(counts)
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for i, n in enumerate(counts):
        if n and seen + n >= rank:
            if i == len(edges):
                return edges[-1]
            lower = edges[i - 1] if i else 0.0
            return lower + (edges[i] - lower) * (rank - seen) / n
        seen += n
    return edges[-1]


def sync_figures(stats: Mapping[str, Any] | None) -> dict[str, Any]:
    """Launch figures from the stats document: success rate, failures, latency avg and p99."""
    stats = stats or {}
    events: Tally[str] = Tally()
    for key, n in (stats.get("events") or {}).items():
        events[key.split(":", 1)[1] if ":" in key else key] += int(n)
    synced = sum(events[o] for o in SYNCED_OUTCOMES)
    failed = sum(events[o] for o in FAILED_OUTCOMES)
    latency = stats.get("latency") or {}
    count = int(latency.get("count", 0))
    bounds = stats.get("latency_bounds") or list(SYNC_BUCKETS)
    p99 = quantile(0.99, bounds, latency.get("buckets") or {})
    return {
        "synced": synced,
        "failed": failed,
        "failed_by_outcome": {o: events[o] for o in FAILED_OUTCOMES},
        "success_rate": round(synced / (synced + failed), 6) if synced + failed else None,
        "latency_avg_seconds": round(float(latency.get("sum", 0.0)) / count, 3) if count else None,
        "latency_p99_seconds": round(p99, 3) if p99 is not None else None,
        "latency_samples": count,
        "repairs": sum(int(n) for n in (stats.get("repairs") or {}).values()),
        "repairs_by_operation": {k: int(n) for k, n in (stats.get("repairs") or {}).items()},
    }
