"""Smoke tests: the local stack is made of real servers, and leaves nothing behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from atproto import AsyncClient, models

from replicator import tid
from replicator.recordtypes.mood import NSID as MOOD_COLLECTION
from replicator.store import Store, connect
from replicator_dev.devstack.procs import port_open
from replicator_dev.devstack.stack import LocalStack

from .conftest import Users
from .harness import latest_rev

pytestmark = pytest.mark.anyio

RECORD = {
    "$type": MOOD_COLLECTION,
    "mood": "smoke",
    "when": "2026-01-01T00:00:00.000Z",
    "ref": "0" * 24,
}


async def test_insert_arrives_as_change_event(store: Store) -> None:
    stream = await store.docs.watch(full_document="updateLookup", max_await_time_ms=200)
    try:
        result = await store.docs.insert_one(
            {"user": "auth0|x", "mood": "hi", "when": datetime.now(UTC)}
        )
        change = None
        deadline = time.monotonic() + 10
        while change is None and time.monotonic() < deadline:
            change = await stream.try_next()
        assert change is not None, "no change event within 10 s"
        assert change["operationType"] == "insert"
        assert change["documentKey"]["_id"] == result.inserted_id
    finally:
        await stream.close()


async def test_sdk_put_with_fixed_tid_is_listed_back(stack: LocalStack, users: Users) -> None:
    user = await users.make()
    client = AsyncClient(base_url=stack.pds_url)
    await client.login(user.handle, user.password, fetch_bsky_profile=False)
    rkey = tid.encode(1_700_000_000_000_000 << 10)
    await client.com.atproto.repo.put_record(
        models.ComAtprotoRepoPutRecord.Data(
            repo=user.did, collection=MOOD_COLLECTION, rkey=rkey, record=RECORD
        )
    )
    listed = await client.com.atproto.repo.list_records(
        models.ComAtprotoRepoListRecords.Params(repo=user.did, collection=MOOD_COLLECTION)
    )
    assert [r.uri.rsplit("/", 1)[-1] for r in listed.records] == [rkey]
    assert listed.records[0].value["mood"] == "smoke"


async def test_wrong_password_is_rejected(stack: LocalStack, users: Users) -> None:
    user = await users.make()
    async with httpx.AsyncClient() as http:
        resp = await http.post(
            f"{stack.pds_url}/xrpc/com.atproto.server.createSession",
            json={"identifier": user.did, "password": "not-the-password"},
        )
    assert resp.status_code == 401
    assert resp.json()["error"] == "AuthenticationRequired"


async def test_identical_put_makes_no_new_commit(stack: LocalStack, users: Users) -> None:
    user = await users.make()
    client = AsyncClient(base_url=stack.pds_url)
    await client.login(user.handle, user.password, fetch_bsky_profile=False)
    data = models.ComAtprotoRepoPutRecord.Data(
        repo=user.did, collection=MOOD_COLLECTION, rkey="3kaaaaaaaaaa2", record=RECORD
    )
    await client.com.atproto.repo.put_record(data)
    rev = await latest_rev(stack.pds_url, user.did)
    again = await client.com.atproto.repo.put_record(data)
    assert again.commit is None
    assert await latest_rev(stack.pds_url, user.did) == rev


def test_replica_set_change_stream_in_docker(replica_set_uri: str) -> None:
    """Where Docker exists: the same smoke check against a real single-node replica set."""
    import pymongo

    client = pymongo.MongoClient(replica_set_uri)
    moods = client["smoke"]["moods"]
    with moods.watch(max_await_time_ms=500) as stream:
        inserted = moods.insert_one({"user": "auth0|x", "mood": "hi"}).inserted_id
        change = stream.try_next() or stream.try_next() or stream.try_next()
    assert change is not None and change["documentKey"]["_id"] == inserted


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes.
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"


def _wait_gone(pids: list[int], timeout: float = 15) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = [p for p in pids if _alive(p)]
        if not left:
            return []
        time.sleep(0.1)
    return [p for p in pids if _alive(p)]


def test_children_die_with_a_killed_parent(tmp_path: Path) -> None:
    """kill -9 of the process that started the stack leaves no orphan server."""
    script = textwrap.dedent(
        f"""
        import sys, time
        from pathlib import Path
        from replicator_dev.devstack.servers import EmbeddedMongo
        m = EmbeddedMongo(Path({str(tmp_path)!r}) / "mongo").start()
        print(m.child.pid, m.port, flush=True)
        time.sleep(600)
        """
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    child_pid, port = map(int, parent.stdout.readline().split())
    assert port_open("127.0.0.1", port)
    parent.kill()
    parent.wait(10)
    assert _wait_gone([child_pid]) == []


def test_dev_ctrl_c_stops_everything(tmp_path: Path) -> None:
    """`replicator dev` starts the stack, seeds, prints the one-liner; Ctrl-C leaves nothing."""
    env = dict(os.environ, REPLICATOR_STATE_DIR=str(tmp_path / "state"))
    env.pop("MONGODB_CONNECTION_STRING", None)
    env.pop("PDS_URL", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "replicator.cli", "dev"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        seen: list[str] = []
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            seen.append(line)
            if "no checkpoint" in line or "replicator starting" in line:
                break
        out = "".join(seen)
        assert "listRecords" in out and "insert_one" in out, out
        env_file = tmp_path / "state" / "dev.env"
        exports = env_file.read_text()
        for name in ("MONGODB_CONNECTION_STRING", "MONGODB_NAME", "PDS_URL", "REPLICATOR_PLC_URL",
                     "PDS_ADMIN_PASSWORD"):  # fmt: skip
            assert f"export {name}=" in exports and f"export {name}=" in out, (name, out)
        assert "database  aesthetic_dev" in out
        # A second one beside it: one line, not a WiredTiger traceback.
        second = subprocess.run([sys.executable, "-m", "replicator.cli", "dev"], env=env,
                                capture_output=True, text=True, timeout=60)  # fmt: skip
        assert second.returncode == 1, second.stderr
        assert len(second.stderr.strip().splitlines()) == 1, second.stderr
        assert "another `replicator dev` is running" in second.stderr
        children = [
            int(p) for p in subprocess.run(
                ["pgrep", "-P", str(proc.pid)], capture_output=True, text=True, check=False
            ).stdout.split()
        ]  # fmt: skip
        assert len(children) >= 2, f"expected MongoDB and PDS children, got {children}"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
        assert _wait_gone(children) == [], "servers left running after Ctrl-C"
    finally:  # a failure must not leave the stack running behind the test run
        if proc.poll() is None:
            proc.kill()  # its servers die with it (PR_SET_PDEATHSIG)
            proc.wait(10)


async def test_store_round_trip_uses_tz_aware_dates(store: Store) -> None:
    when = datetime(2025, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
    result = await store.docs.insert_one({"user": "auth0|x", "mood": "x", "when": when})
    doc = await store.docs.find_one({"_id": result.inserted_id})
    assert doc is not None and doc["when"] == when


__all__ = ["connect"]


def test_a_forked_child_does_not_stop_the_parents_servers(stack: LocalStack) -> None:
    """A multiprocessing worker forked from a process that owns a stack inherits its SIGTERM
    handler and atexit hook; a worker's SIGTERM (Pool.terminate after a timeout) once took the
    test session's MongoDB and PDS down with it."""
    assert stack.mongo is not None and stack.pds is not None, "needs the embedded servers"
    child = os.fork()
    if child == 0:  # pragma: no cover - the child only waits for its signal
        try:
            time.sleep(30)
        except SystemExit as exc:  # the inherited handler's exit: never back into pytest
            os._exit(exc.code if isinstance(exc.code, int) else 1)
        os._exit(0)
    time.sleep(0.2)
    os.kill(child, signal.SIGTERM)
    _, status = os.waitpid(child, 0)
    assert os.WEXITSTATUS(status) == 128 + signal.SIGTERM, "the stack's handler did not run"
    time.sleep(0.5)
    assert stack.mongo.child is not None and stack.mongo.child.alive()
    assert stack.pds.child is not None and stack.pds.child.alive()


def test_dev_keeps_its_ports_from_its_env_file(tmp_path: Path) -> None:
    from replicator_dev.devstack.dev import _last_ports

    env = tmp_path / "dev.env"
    env.write_text(
        "export MONGODB_CONNECTION_STRING='mongodb://127.0.0.1:41001/?directConnection=true'\n"
        "export MONGODB_NAME=aesthetic_dev\nexport PDS_URL=http://localhost:41002\n"
        "export REPLICATOR_PLC_URL=http://localhost:41003\n"
        "export REPLICATOR_HTTP_ADDR=127.0.0.1:41004\n"
    )
    assert _last_ports(env) == {"mongo": 41001, "pds": 41002, "plc": 41003, "http": 41004}
    assert _last_ports(tmp_path / "missing.env") == {}


def test_npm_ci_shows_its_progress(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The 2-minute install says how far it is: packages unpacked of the lockfile's (the
    per-OS optional ones not counted), every 15 s when stderr is a log, and when done."""
    from replicator_dev.devstack import node

    lock = {"packages": {"": {}, "node_modules/a": {}, "node_modules/b": {},
                         "node_modules/mac-only": {"optional": True}}}  # fmt: skip
    (tmp_path / "package-lock.json").write_text(json.dumps(lock))
    (tmp_path / "node_modules" / "a").mkdir(parents=True)
    monkeypatch.setattr(node, "PDS_DIR", tmp_path)
    monkeypatch.setattr(node, "_last_progress", [0.0])
    node._required_packages.cache_clear()
    try:
        for elapsed in (0.5, 5.0, 16.0, 20.0):
            node._progress(elapsed)
        (tmp_path / "node_modules" / "b").mkdir()
        node._progress(21.0, done=True)
    finally:
        node._required_packages.cache_clear()
    assert capsys.readouterr().err.splitlines() == [
        "  npm ci: 1 of 2 packages, 16s",
        "  npm ci: 2 of 2 packages, 21s, done",
    ]
