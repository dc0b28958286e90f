"""`replicator run` with its HTTP endpoints and `replicator status`, as processes."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from replicator.runtime import Runtime
from replicator_dev.devstack.procs import free_port
from replicator_dev.devstack.seed import insert_mood

from .conftest import Users, env_for
from .harness import eventually

pytestmark = pytest.mark.anyio


def cli(rt: Runtime, *args: str, **env: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "replicator.cli", *args],
        env=env_for(rt.settings, **env),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_run_serves_probes_and_status_reads_it(
    rt: Runtime, users: Users, tmp_path: Any
) -> None:
    user = await users.make()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = (tmp_path / "run.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "replicator.cli", "run", "--http-addr", f"127.0.0.1:{port}"],
        env=env_for(rt.settings, REPLICATOR_LOG_FORMAT="json"),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        async with httpx.AsyncClient(timeout=5) as http:

            async def ready() -> bool:
                try:
                    return (await http.get(f"{url}/readyz")).status_code == 200
                except httpx.TransportError:
                    return False

            # The monitor probes the PDS every 10 s: ready within one round.
            await eventually(ready, 60, "/readyz 200")
            assert (await http.get(f"{url}/healthz")).json() == {"alive": True}
            await insert_mood(rt.store, user.sub, "from a process", when=datetime.now(UTC))

            async def put_counted() -> bool:
                text = (await http.get(f"{url}/metrics")).text
                return 'replicator_events_total{operation="put",outcome="ok"} 1.0' in text

            await eventually(put_counted, 30, "put counted in /metrics")

        async def live_in_status() -> bool:
            out = cli(rt, "status", "--json")
            assert out.returncode == 0, out.stderr
            report = json.loads(out.stdout)
            return bool(report["replicator"] and report["launch"]["synced"] >= 1)

        await eventually(live_in_status, 30, "status sees the running replicator")
        report = json.loads(cli(rt, "status", "--json").stdout)
        assert report["replicator"]["fresh"] is True
        assert report["lease"]["held"] is True
        assert report["ledger"] == {"present": 1}
        text = cli(rt, "status")
        assert text.returncode == 0
        assert "running (live)" in text.stdout
        assert "lease         held by" in text.stdout
        assert "sync success rate              100.00%" in text.stdout
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
        log.close()
    assert code == 0
    lines = (tmp_path / "run.log").read_text().splitlines()
    assert lines and all(json.loads(line)["record"] for line in lines)  # JSON lines only
    after = json.loads(cli(rt, "status", "--json").stdout)
    assert after["replicator"]["running"] is False
    assert after["lease"]["held"] is False
    assert "not running" in cli(rt, "status").stdout


async def test_status_on_an_empty_database_and_without_mongo(rt: Runtime) -> None:
    wrong = cli(rt, "status")  # no `moods` at all: a wrong MONGODB_NAME, most likely
    assert wrong.returncode == 2
    assert "has no 'moods' collection" in wrong.stderr and "--empty-ok" in wrong.stderr
    assert cli(rt, "status", "--empty-ok").returncode == 0
    await rt.store.db.create_collection(rt.store.names.moods)  # the app's, still empty
    out = cli(rt, "status")
    assert out.returncode == 0, out.stderr
    assert "checkpoint    none" in out.stdout
    assert "never reported" in out.stdout
    report = json.loads(cli(rt, "status", "--json").stdout)
    assert report["checkpoint"] is None and report["lease"] is None
    assert report["launch"]["success_rate"] is None
    down = cli(
        rt,
        "status",
        MONGODB_CONNECTION_STRING=f"mongodb://user:s3cret@127.0.0.1:{free_port()}/"
        "?directConnection=true&serverSelectionTimeoutMS=500",
    )
    assert down.returncode == 1
    assert "s3cret" not in down.stderr + down.stdout
