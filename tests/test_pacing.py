"""Pacing and batching: write budgets, the global rate, applyWrites batch limits (pure logic)."""

from __future__ import annotations

import time

import pytest

from replicator.budget import Budgets, cost
from replicator.model import Write
from replicator.ratelimit import TokenBucket
from replicator.recordtypes import MOOD


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def test_costs_follow_the_pds_points() -> None:
    writes = [Write("put", "d", "a", exists=False), Write("put", "d", "b", exists=True),
              Write("delete", "d", "c")]  # fmt: skip
    assert cost(writes) == 3 + 2 + 1


def test_unknown_account_is_never_held_back() -> None:
    assert Budgets().reserve("did:plc:x", 300) == 0.0


def test_budget_is_spent_then_waits_for_the_reset() -> None:
    clock = Clock()
    budgets = Budgets(clock)
    budgets.observe("did:a", {"ratelimit-remaining": "10", "ratelimit-reset": str(clock.now + 600)})
    assert budgets.reserve("did:a", 6) == 0.0
    assert budgets.reserve("did:a", 6) == pytest.approx(600)  # 4 left: not enough
    assert budgets.reserve("did:b", 6) == 0.0  # other accounts are not affected
    clock.now += 601
    assert budgets.reserve("did:a", 6) == 0.0  # a new window


def test_reset_as_a_delta_in_seconds() -> None:
    clock = Clock()
    budgets = Budgets(clock)
    budgets.observe("did:a", {"ratelimit-remaining": "0", "ratelimit-reset": "30"})
    assert budgets.reserve("did:a", 1) == pytest.approx(30)


def test_answers_without_headers_change_nothing() -> None:
    budgets = Budgets()
    budgets.observe("did:a", {"content-type": "application/json"})
    assert budgets.reserve("did:a", 1000) == 0.0


@pytest.mark.anyio
async def test_token_bucket_holds_the_global_rate() -> None:
    bucket = TokenBucket(rate=50, burst=5)
    started = time.monotonic()
    for _ in range(30):
        await bucket.take(1)
    elapsed = time.monotonic() - started
    assert elapsed >= (30 - 5) / 50 * 0.9  # 25 tokens beyond the burst at 50/s
    assert bucket.waited > 0


def test_bucket_rejects_a_non_positive_rate() -> None:
    with pytest.raises(ValueError, match="positive"):
        TokenBucket(0)


def test_apply_writes_batches_hold_200_ops_and_stay_under_the_body_limit() -> None:
    from replicator.pds import APPLY_WRITES_MAX, MAX_BODY_BYTES, batches

    small = [Write("delete", "d", f"k{i}") for i in range(450)]
    assert [len(b) for b in batches(small)] == [200, 200, 50]
    record = {"$type": "computer.aesthetic.mood", "mood": "\u0001" * 5000, "when": "x", "ref": "r"}
    big = [Write("put", "d", f"k{i}", record=record, exists=False) for i in range(100)]
    parts = batches(big)
    assert sum(len(b) for b in parts) == 100 and len(parts) > 1
    import orjson

    from replicator.pds import write_op

    for part in parts:
        assert len(part) <= APPLY_WRITES_MAX
        assert sum(len(orjson.dumps(write_op(w, MOOD.nsid))) for w in part) <= MAX_BODY_BYTES
