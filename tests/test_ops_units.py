"""Pure pieces of the operations code: outcome labels, quantiles, figures, addresses, output."""

from __future__ import annotations

import time
from collections import Counter
from types import SimpleNamespace
from typing import Any

import pytest

from replicator import health, metrics
from replicator.commands.status import render
from replicator.model import State
from replicator.outcome import Counts, Outcome, Writes
from replicator.rollout import split_users


@pytest.mark.parametrize(
    ("counts", "labels"),
    [
        (Counts(sent=Writes(put=1)), ("put", "ok")),
        (Counts(sent=Writes(delete_orphan=1)), ("delete_orphan", "ok")),
        (Counts(would=Writes(put=1)), ("put", "dry_run")),
        (Counts(parked=1), ("write", "failed")),
        (Counts(unchanged=Counter({State.PARKED: 1})), ("none", "failed")),
        (Counts(unchanged=Counter({State.INVALID: 1})), ("none", "invalid")),
        (Counts(unchanged=Counter({State.PRESENT: 1})), ("none", "unchanged")),
        (Counts(unchanged=Counter({State.SKIPPED: 1})), ("none", "skipped")),
        (Counts(not_enabled=1), ("none", "not_enabled")),
        (Counts(desired=Counter({State.PRESENT: 1})), None),  # descriptive: not events
        (Counts(records_listed=1), None),
    ],
)
def test_outcome_counts_map_to_a_small_fixed_label_set(
    counts: Counts, labels: tuple[str, str] | None
) -> None:
    assert metrics.events(counts) == ([(*labels, 1)] if labels else [])


def test_quantile_interpolates_like_histogram_quantile() -> None:
    bounds = [1.0, 2.0, 5.0]
    assert metrics.quantile(0.99, bounds, {}) is None
    assert metrics.quantile(0.5, bounds, {"0": 10}) == pytest.approx(0.5)
    assert metrics.quantile(0.99, bounds, {"0": 50, "2": 50}) == pytest.approx(4.94)
    assert metrics.quantile(0.99, bounds, {"0": 1, "3": 99}) == 5.0  # +Inf: highest bound


def test_sync_figures_from_a_stats_document() -> None:
    stats = {
        "events": {"put:ok": 95, "delete:ok": 3, "write:failed": 1, "none:invalid": 1,
                   "none:unchanged": 500, "put:dry_run": 7},
        "latency": {"count": 4, "sum": 6.0, "buckets": {"1": 2, "2": 2}},
        "latency_bounds": [0.5, 1.0, 2.0],
        "repairs": {"put": 2, "delete_orphan": 1},
    }  # fmt: skip
    figures = metrics.sync_figures(stats)
    assert figures["synced"] == 98
    assert figures["failed"] == 2
    assert figures["success_rate"] == pytest.approx(0.98)
    assert figures["latency_avg_seconds"] == 1.5
    assert figures["latency_p99_seconds"] == pytest.approx(1.98)
    assert figures["repairs"] == 3
    assert metrics.sync_figures(None)["success_rate"] is None


class FailingState:
    async def update_one(self, *args: Any, **kw: Any) -> None:
        raise RuntimeError("mongo down")


class RecordingState:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    async def update_one(self, *args: Any, **kw: Any) -> None:
        self.calls.append(args)


@pytest.mark.anyio
async def test_stats_deltas_survive_a_failed_flush() -> None:
    names = SimpleNamespace(moods="moods")
    metrics.discard_pending()
    counts = Counts(sent=Writes(put=2), parked=1, documents=Counter({"mood": 3}))
    metrics.observe_apply(Outcome(counts=counts), 0.01)
    metrics.observe_batch(2, time.time() - 1.5)
    with pytest.raises(RuntimeError):
        await metrics.flush_stats(SimpleNamespace(state=FailingState(), names=names), live={})  # type: ignore[arg-type]
    ok = RecordingState()
    await metrics.flush_stats(SimpleNamespace(state=ok, names=names), live={"pid": 1})  # type: ignore[arg-type]
    ((query, update),) = ok.calls
    assert query == {"_id": "stats:moods"}
    assert update["$inc"]["events.put:ok"] == 2
    assert update["$inc"]["events.write:failed"] == 1
    assert "events.none:moods" not in update["$inc"]
    assert update["$inc"]["latency.count"] == 2
    assert update["$inc"]["latency.buckets.2"] == 2  # 1.5 s is in (1, 2]
    assert update["$set"]["live"]["pid"] == 1


def test_a_retry_note_is_redacted() -> None:
    class Exc:
        status = 503
        retry_after = None

        def __str__(self) -> str:
            return "upstream said password=hunter2"

    metrics.observe_retry(Exc())  # type: ignore[arg-type]
    assert metrics._pending.last_error is not None
    assert "hunter2" not in metrics._pending.last_error[1]


@pytest.mark.parametrize(
    ("addr", "parsed"),
    [
        ("127.0.0.1:9464", ("127.0.0.1", 9464)),
        (":9464", ("0.0.0.0", 9464)),
        ("[::1]:9000", ("::1", 9000)),
        ("off", None),
        ("", None),
    ],
)
def test_http_addr(addr: str, parsed: tuple[str, int] | None) -> None:
    assert health.parse_addr(addr) == parsed


@pytest.mark.parametrize("addr", ["localhost", "host:port", "1.2.3.4:70000"])
def test_bad_http_addr(addr: str) -> None:
    with pytest.raises(ValueError):
        health.parse_addr(addr)


def test_allowlist_entries_from_flags_and_the_environment() -> None:
    assert split_users(["auth0|a,@jeffrey", "auth0|b  @jeffrey", ""]) == (
        "auth0|a",
        "@jeffrey",
        "auth0|b",
    )


def test_monitor_lag_is_zero_when_caught_up_and_grows_when_behind() -> None:
    """Lag is measured from the oldest change read and not yet applied."""
    replicator = SimpleNamespace(
        oldest_unapplied_at=None, last_checkpoint_at=None, stream_open=True
    )
    settings = SimpleNamespace(heartbeat_seconds=5.0, dry_run=False)
    monitor = health.Monitor(SimpleNamespace(settings=settings), replicator)  # type: ignore[arg-type]
    assert monitor.lag() == 0.0
    replicator.oldest_unapplied_at = time.time() - 90
    assert 89 < monitor.lag() < 100
    replicator.oldest_unapplied_at = None  # the batch applied: caught up
    assert monitor.lag() == 0.0
    assert monitor.checkpoint_max_age == 60.0
    replicator.last_checkpoint_at = time.monotonic() - 61
    ready, detail = monitor.readiness()
    assert not ready and detail["checks"]["checkpoint_fresh"] is False


def test_status_text_names_every_section() -> None:
    report = {
        "at": "2026-11-28T10:00:00Z", "db": "aesthetic", "collection": "moods",
        "checkpoint": {"saved_at": "2026-11-28T09:59:58Z", "age_seconds": 2.0,
                       "last_event_at": "2026-11-28T09:59:50Z", "events_applied": 12},
        "shadow_checkpoint": None,
        "replicator": {"fresh": True, "mode": "live", "pid": 7, "host": "h", "stream_open": True,
                       "ready": True},
        "lag_seconds": 0.0,
        "lease": {"held": True, "owner": "h:7:abc", "generation": 3, "expires_in_seconds": 12.0},
        "ledger": {"absent": 1, "present": 10},
        "dead_letters": {"count": 1, "invalid": 1, "failed": 0,
                         "latest": {"mood_id": "66", "reason": "invalid: too long"}},
        "last_error": {"at": "2026-11-28T09:00:00Z", "source": "dead letter", "message": "x"},
        "pds": {"url": "http://pds", "reachable": True},
        "erasures": {"done": 3, "under_way": 1},
        "counters": {"flushed_at": "2026-11-28T09:59:53Z", "age_seconds": 7.0,
                     "flush_interval_seconds": 10.0},
        "launch": {"users_with_account": 2, "moods": 11, "records": 10, "invalid": 1,
                   "no_account": 0,
                   "success_rate": 0.9, "synced": 9, "failed": 1, "latency_avg_seconds": 0.5,
                   "latency_p99_seconds": 1.2, "repairs": 0},
    }  # fmt: skip
    text = render(report)
    for part in ("checkpoint    saved", "running (live) pid 7", "lag 0.00s", "held by h:7:abc",
                 "absent 1, present 10",
                 "dead letters  1 (1 invalid, 0 failed); latest: 66 invalid: too long",
                 "[dead letter] x", "reachable", "90.00% (9 synced, 1 failed)",
                 "avg 0.50s, p99 1.20s", "repairs made                   0",
                 "lag 0.00s (as of 7s ago)", "counters flushed 7s ago, every 10s",
                 "erasures      3 done (users forgotten), 1 under way"):  # fmt: skip
        assert part in text
    never = render({**report, "counters": {"flushed_at": None, "age_seconds": None,
                                           "flush_interval_seconds": 10.0}})  # fmt: skip
    assert "no counters flushed yet" in never


@pytest.mark.anyio
async def test_repairs_from_a_command_are_flushed_without_a_live_view() -> None:
    metrics.discard_pending()
    metrics.observe_repairs(Writes(put=2, delete=0, delete_orphan=1))
    state = RecordingState()
    await metrics.flush_stats(SimpleNamespace(state=state, names=SimpleNamespace(moods="m")))  # type: ignore[arg-type]
    ((_query, update),) = state.calls
    assert update["$inc"] == {"repairs.put": 2, "repairs.delete_orphan": 1}
    assert "live" not in update["$set"]
