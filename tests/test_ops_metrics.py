"""Metrics, /healthz, /readyz and `status` against the real local stack, in-process."""

from __future__ import annotations

import functools
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import anyio
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from replicator import health
from replicator.commands.status import gather
from replicator.config import Settings
from replicator.model import State
from replicator.runtime import Runtime, open_runtime
from replicator.stream import Replicator
from replicator_dev.devstack.seed import insert_mood

from .conftest import Users
from .harness import eventually, records

pytestmark = pytest.mark.anyio


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(text: str, name: str, **labels: str) -> float:
    return samples(text).get((name, frozenset(labels.items())), 0.0)


@asynccontextmanager
async def serving(
    settings: Settings, **changes: Any
) -> AsyncIterator[tuple[Runtime, Replicator, str, anyio.Event]]:
    """A runtime, its replicator (not started) and the monitor + HTTP server on a free port."""
    settings = replace(settings, http_addr="127.0.0.1:0", **changes)
    async with open_runtime(settings, lease=True) as rt, anyio.create_task_group() as tg:
        replicator = rt.replicator()
        server = await tg.start(functools.partial(health.serve, interval=0.2), rt, replicator)
        assert server is not None
        stop = anyio.Event()
        try:
            yield rt, replicator, f"http://127.0.0.1:{server.port}", stop
        finally:
            stop.set()
            tg.cancel_scope.cancel()


async def get(url: str) -> httpx.Response:
    async with httpx.AsyncClient(timeout=10) as http:
        return await http.get(url)


async def test_health_ready_metrics_and_status_follow_the_replicator(
    settings: Settings, rt: Runtime, users: Users
) -> None:
    user = await users.make()
    assert user.did is not None
    async with serving(settings) as (_rt, replicator, url, stop):
        # Alive at once; not ready before the stream is open.
        assert (await get(f"{url}/healthz")).status_code == 200
        not_ready = await get(f"{url}/readyz")
        assert not_ready.status_code == 503
        assert not_ready.json()["checks"]["stream_open"] is False
        assert (await get(f"{url}/nope")).status_code == 404

        before = (await get(f"{url}/metrics")).text
        async with anyio.create_task_group() as tg:
            tg.start_soon(replicator.run, stop)

            async def ready() -> bool:
                return (await get(f"{url}/readyz")).status_code == 200

            await eventually(ready, 30, "/readyz 200")
            detail = (await get(f"{url}/readyz")).json()
            assert detail["checks"] == {
                "stream_open": True,
                "checkpoint_fresh": True,
                "pds_reachable": True,
            }
            mood_id = await insert_mood(rt.store, user.sub, "metrics ✨", when=datetime.now(UTC))

            async def mirrored() -> bool:
                entries = await rt.store.ledger_by_id([mood_id])
                return mood_id in entries and entries[mood_id].state is State.PRESENT

            await eventually(mirrored, 30, "mood mirrored")
            assert len(await records(settings.pds_url, user.did)) == 1

            async def counted() -> bool:
                text = (await get(f"{url}/metrics")).text
                labels = {"operation": "put", "outcome": "ok"}
                put = value(text, "replicator_events_total", **labels)
                return put >= value(before, "replicator_events_total", **labels) + 1

            await eventually(counted, 10, "put counted")
            text = (await get(f"{url}/metrics")).text
            put_calls = value(
                text,
                "replicator_pds_requests_total",
                method="com.atproto.repo.putRecord",
                status="200",
            )
            assert put_calls >= 1
            assert value(text, "replicator_stream_open") == 1
            assert "_created" not in text  # no creation-time series beside each counter
            for reason in ("rate_limited", "server_error", "no_answer"):  # there before use
                assert f'replicator_pds_retries_total{{reason="{reason}"}}' in text
            for operation in ("put", "delete", "delete_orphan"):
                assert f'replicator_repairs_total{{operation="{operation}"}}' in text
            assert value(text, "replicator_ready") == 1
            assert value(text, "replicator_pds_up") == 1
            assert value(text, "replicator_apply_duration_seconds_count") >= 1
            assert value(text, "replicator_sync_latency_seconds_count") >= 1
            assert value(text, "replicator_open_sessions") >= 1
            assert 0 <= value(text, "replicator_checkpoint_age_seconds") < 60
            assert value(text, "replicator_last_event_timestamp_seconds") > time.time() - 600
            assert value(text, "replicator_info", version=metrics_version(text), mode="live") == 1

            async def ledger_gauge() -> bool:
                text = (await get(f"{url}/metrics")).text
                return value(text, "replicator_ledger_entries", state="present") >= 1

            await eventually(ledger_gauge, 10, "ledger gauge refreshed")
            # Quiet again: caught up, so the lag is 0 however old the last event gets.
            await eventually(lambda: _idle(replicator), 10, "stream idle")
            assert value((await get(f"{url}/metrics")).text, "replicator_lag_seconds") == 0

            # `status` sees the live process through the stats it flushes.
            async def flushed() -> bool:  # a flush made once caught up: lag 0
                report = await gather(rt.store, settings.pds_url)
                return bool(
                    report["launch"]["synced"] >= 1
                    and report["replicator"]
                    and report["lag_seconds"] == 0
                )

            await eventually(flushed, 25, "stats flushed")
            report = await gather(rt.store, settings.pds_url)
            assert report["replicator"]["fresh"] is True
            assert report["replicator"]["stream_open"] is True
            assert report["lag_seconds"] == 0
            assert report["lease"]["held"] is True
            assert report["checkpoint"]["saved_at"] is not None
            assert report["pds"]["reachable"] is True
            launch = report["launch"]
            assert launch["users_with_account"] == 1
            assert launch["moods"] == 1
            assert launch["records"] == 1
            assert launch["success_rate"] == 1.0
            assert launch["failed"] == 0
            assert launch["latency_avg_seconds"] is not None
            assert launch["latency_p99_seconds"] is not None
            stop.set()
    # Stopped: the final flush says so, and the lease is released.
    report = await gather(rt.store)
    assert report["replicator"]["running"] is False
    assert report["replicator"]["fresh"] is False
    assert report["lease"]["held"] is False
    assert report["pds"] is None


def metrics_version(text: str) -> str:
    for (name, labels), _ in samples(text).items():
        if name == "replicator_info":
            return dict(labels)["version"]
    raise AssertionError("replicator_info not exported")


async def _idle(replicator: Replicator) -> bool:
    return replicator.idle


async def test_readyz_fails_when_the_pds_is_unreachable(settings: Settings) -> None:
    dead_pds = replace(settings, pds_url="http://127.0.0.1:9")  # discard port: nothing listens
    async with (
        serving(dead_pds) as (_rt, replicator, url, stop),
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(replicator.run, stop)
        await eventually(lambda: _open(replicator), 30, "stream open")

        async def pds_check_failed() -> bool:
            body = (await get(f"{url}/readyz")).json()
            return bool(body["checks"]["stream_open"] and not body["checks"]["pds_reachable"])

        await eventually(pds_check_failed, 10, "readiness reports the PDS")
        response = await get(f"{url}/readyz")
        assert response.status_code == 503
        assert "pds_error" in response.json()
        text = (await get(f"{url}/metrics")).text
        assert value(text, "replicator_pds_up") == 0
        assert value(text, "replicator_ready") == 0
        stop.set()


async def _open(replicator: Replicator) -> bool:
    return replicator.stream_open


async def test_dry_run_writes_nothing_and_keeps_its_own_checkpoint(
    settings: Settings, rt: Runtime, users: Users
) -> None:
    user = await users.make()
    assert user.did is not None
    real_before = await rt.store.load_checkpoint()
    async with serving(settings, dry_run=True) as (run_rt, replicator, url, stop):
        assert run_rt.store.checkpoint_name.endswith(":dry-run")
        assert replicator.lease is None  # a shadow never blocks the real replicator
        before = (await get(f"{url}/metrics")).text
        async with anyio.create_task_group() as tg:
            tg.start_soon(replicator.run, stop)
            await eventually(lambda: _open(replicator), 30, "stream open")
            mood_id = await insert_mood(rt.store, user.sub, "shadow", when=datetime.now(UTC))

            async def would_put() -> bool:
                text = (await get(f"{url}/metrics")).text
                now = value(text, "replicator_events_total", operation="put", outcome="dry_run")
                was = value(before, "replicator_events_total", operation="put", outcome="dry_run")
                return now >= was + 1

            await eventually(would_put, 30, "a put counted as dry_run")
            assert (await get(f"{url}/readyz")).json()["dry_run"] is True
            stop.set()
    assert await records(settings.pds_url, user.did) == {}
    assert await rt.store.ledger_by_id([mood_id]) == {}
    doc = await rt.store.docs.find_one({"_id": mood_id})
    assert doc is not None and "atproto" not in doc  # no write-back either
    assert await rt.store.load_checkpoint() == real_before  # the real position never moved
    shadow = await rt.store.state.find_one({"_id": f"{rt.store.checkpoint_name}:dry-run"})
    assert shadow is not None and shadow["token"]
    report = await gather(rt.store)
    assert report["shadow_checkpoint"] is not None
    assert report["launch"]["synced"] == 0  # shadow figures are kept apart


async def test_allowlist_skips_and_records_others_for_a_later_backfill(
    settings: Settings, rt: Runtime, users: Users
) -> None:
    enabled, other = await users.make(), await users.make()
    assert enabled.did is not None and other.did is not None
    handle = "@" + enabled.handle.split(".")[0]
    async with serving(settings, only_users=(handle,)) as (run_rt, replicator, _url, stop):
        assert run_rt.applier.only_users == frozenset({enabled.sub})
        async with anyio.create_task_group() as tg:
            tg.start_soon(replicator.run, stop)
            await eventually(lambda: _open(replicator), 30, "stream open")
            now = datetime.now(UTC)
            mine = await insert_mood(rt.store, enabled.sub, "enabled user", when=now)
            theirs = await insert_mood(rt.store, other.sub, "not yet", when=now)

            async def settled() -> bool:
                entries = await rt.store.ledger_by_id([mine, theirs])
                return mine in entries and theirs in entries

            await eventually(settled, 30, "both moods in the ledger")
            stop.set()
    entries = await rt.store.ledger_by_id([mine, theirs])
    assert entries[mine].state is State.PRESENT
    assert (entries[theirs].state, entries[theirs].reason) == (State.SKIPPED, "not enabled")
    assert len(await records(settings.pds_url, enabled.did)) == 1
    assert await records(settings.pds_url, other.did) == {}
    # Enabled later: the backfill path (everyone, no allowlist) mirrors the skipped mood.
    await rt.applier.reconcile_user(other.sub)
    assert len(await records(settings.pds_url, other.did)) == 1
    assert (await rt.store.ledger_by_id([theirs]))[theirs].state is State.PRESENT


async def test_allowlist_with_an_unknown_handle_refuses_to_start(settings: Settings) -> None:
    from replicator.rollout import UnknownUser

    with pytest.raises(UnknownUser, match="@nobody-here"):
        async with open_runtime(replace(settings, only_users=("@nobody-here",))):
            pass


async def test_a_taken_port_does_not_stop_the_replicator(settings: Settings) -> None:
    async with serving(settings) as (_rt, _replicator, url, _stop):
        port = int(url.rsplit(":", 1)[1])
        taken = replace(settings, http_addr=f"127.0.0.1:{port}")
        async with open_runtime(taken) as rt2, anyio.create_task_group() as tg:
            server = await tg.start(health.serve, rt2, rt2.replicator())
            assert server is None  # logged, and the replicator goes on without endpoints
            tg.cancel_scope.cancel()
