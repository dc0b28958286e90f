"""The DID directory is advisory: it never holds a write (issue 17, part 1).

Against the real stack, with `REPLICATOR_PLC_URL` pointing at a directory that hangs (accepts
connections, never answers), one that refuses connections, and one that answers after 5 s:
a burst over several users is mirrored all the same, at the PDS's pace; the replicator says
once that the directory is unreachable (one WARNING, not one per DID), says when it is back
(one INFO), stays ready, exports `replicator_directory_up`; an account whose document names
another PDS is parked once the directory answers; `check` reports the directory.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import quote, unquote

import pytest
from loguru import logger

from replicator import metrics
from replicator.config import Settings
from replicator.health import Monitor
from replicator.runtime import Runtime, open_runtime
from replicator_dev.devstack.procs import free_port
from replicator_dev.devstack.seed import SeededUser, insert_mood
from replicator_dev.devstack.stack import LocalStack

from .conftest import Users, env_for, with_settings
from .harness import eventually, records, running
from .test_check import run_check

pytestmark = pytest.mark.anyio
PER_USER = 20
USERS = 5
UNREACHABLE = "DID directory"  # the start of the one WARNING and the one INFO


@dataclass
class Directory:
    """A PLC directory on loopback that forwards to the dev PLC: `mode` "hang" (the request
    is read and never answered), "slow" (answered after `delay` s) or "answer"; the DIDs in
    `moved` get a document naming another PDS."""

    upstream: str
    mode: str = "answer"
    delay: float = 5.0
    moved: set[str] = field(default_factory=set)
    served: list[str] = field(default_factory=list)
    url: str = ""

    def answer(self, path: str) -> tuple[int, bytes]:
        if self.mode == "hang":
            time.sleep(3600)
        if self.mode == "slow":
            time.sleep(self.delay)
        did = unquote(path.lstrip("/"))
        self.served.append(did)
        with urllib.request.urlopen(f"{self.upstream}/{quote(did)}", timeout=10) as up:
            doc = json.load(up)
        if did in self.moved:
            for service in doc.get("service", []):
                if str(service.get("id", "")).endswith("#atproto_pds"):
                    service["serviceEndpoint"] = "https://elsewhere.example"
        return 200, json.dumps(doc).encode()


@contextmanager
def directory(upstream: str, mode: str) -> Iterator[Directory]:
    plc = Directory(upstream.rstrip("/"), mode)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            try:
                status, body = plc.answer(self.path)
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            except OSError:  # the client gave up (timed out) first
                return

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                              daemon=True)  # fmt: skip
    thread.start()
    plc.url = f"http://127.0.0.1:{server.server_port}"
    try:
        yield plc
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def warnings() -> Iterator[list[str]]:
    seen: list[str] = []
    sink = logger.add(lambda m: seen.append(f"{m.record['level'].name} {m.record['message']}"),
                      level="INFO")  # fmt: skip
    try:
        yield seen
    finally:
        logger.remove(sink)


async def burst(rt: Runtime, people: list[SeededUser]) -> float:
    """`PER_USER` moods for each; seconds until every one is on the PDS."""
    started = time.monotonic()
    for i in range(PER_USER):
        for who in people:
            await insert_mood(rt.store, who.sub, f"burst {i}")

    async def all_there() -> bool:
        for who in people:
            if len(await records(rt.settings.pds_url, who.did or "")) != PER_USER:
                return False
        return True

    await eventually(all_there, 60, "the burst mirrored while the directory does not answer")
    return time.monotonic() - started


def said(lines: list[str], level: str) -> list[str]:
    return [line for line in lines if line.startswith(level) and UNREACHABLE in line]


@pytest.mark.parametrize("mode", ["hang", "refuse"])
async def test_a_dead_directory_costs_the_writes_nothing(
    stack: LocalStack, settings: Settings, users: Users, mode: str
) -> None:
    assert stack.plc_url
    people = [await users.make() for _ in range(USERS)]
    with directory(stack.plc_url, "hang") as plc, warnings() as lines:
        url = plc.url if mode == "hang" else f"http://127.0.0.1:{free_port()}"
        async with open_runtime(with_settings(settings, plc_url=url)) as rt, running(rt) as rep:
            seconds = await burst(rt, people)
            assert rt.directory is not None
            await eventually(lambda: _down(rt), 30, "the directory seen as unreachable")
            monitor = Monitor(rt, rep)
            monitor.bind()
            assert metrics.REGISTRY.get_sample_value("replicator_directory_up") == 0.0
            _, detail = monitor.readiness()
            assert detail["checks"]["stream_open"] and detail["checks"]["checkpoint_fresh"]
    assert len(said(lines, "WARNING")) == 1, said(lines, "WARNING")
    assert not [line for line in lines if "could not resolve" in line]
    print(f"\n{mode}: {USERS * PER_USER} moods mirrored in {seconds:.1f}s")


async def _down(rt: Runtime) -> bool:
    return rt.directory is not None and rt.directory.up is False


async def test_a_slow_directory_costs_the_writes_nothing_and_moves_are_seen(
    stack: LocalStack, settings: Settings, users: Users
) -> None:
    """Answers take 5 s: the writes do not wait for them; once the document of a moved account
    has come, that account's writes are parked."""
    assert stack.plc_url
    people = [await users.make() for _ in range(USERS)]
    mover = await users.make()
    assert mover.did
    with directory(stack.plc_url, "slow") as plc, warnings() as lines:
        plc.moved.add(mover.did)
        async with open_runtime(with_settings(settings, plc_url=plc.url)) as rt, running(rt):
            seconds = await burst(rt, people)
            assert rt.directory is not None
            rt.directory.endpoint(mover.did)  # its first write would ask for it

            async def fetched() -> bool:
                return rt.directory is not None and rt.directory.endpoint(mover.did) is not None

            await eventually(fetched, 30, "the mover's document fetched, slowly")
            ids = [await insert_mood(rt.store, mover.sub, f"after the move {i}") for i in range(2)]

            async def parked() -> bool:
                entries = await rt.store.ledger_by_id(ids)
                return len(entries) == 2 and all(
                    "account moved" in (e.reason or "") for e in entries.values()
                )

            await eventually(parked, 30, "the moved account parked")
            assert await records(rt.settings.pds_url, mover.did) == {}
    assert said(lines, "WARNING") == []  # slow is not unreachable
    print(f"\nslow: {USERS * PER_USER} moods mirrored in {seconds:.1f}s")


async def test_a_directory_back_after_an_outage_is_said_once_and_moves_are_seen(
    stack: LocalStack, settings: Settings, users: Users
) -> None:
    assert stack.plc_url
    people = [await users.make() for _ in range(2)]
    mover = await users.make()
    assert mover.did
    with directory(stack.plc_url, "hang") as plc, warnings() as lines:
        plc.moved.add(mover.did)
        async with open_runtime(with_settings(settings, plc_url=plc.url)) as rt, running(rt):
            await burst(rt, people)
            await eventually(lambda: _down(rt), 30, "the directory seen as unreachable")
            assert rt.directory is not None
            rt.directory.endpoint(mover.did)
            plc.mode = "answer"  # back: the next probe is answered (backoff: 5 s, 10 s...)

            async def back() -> bool:
                return rt.directory is not None and rt.directory.up is True

            await eventually(back, 60, "the directory seen as back")
            await eventually(lambda: _known(rt, mover), 30, "the mover's document fetched")
            ids = [await insert_mood(rt.store, mover.sub, "after the move")]

            async def parked() -> bool:
                entries = await rt.store.ledger_by_id(ids)
                return bool(entries) and "account moved" in (entries[ids[0]].reason or "")

            await eventually(parked, 30, "the moved account parked")
    assert len(said(lines, "WARNING")) == 1, said(lines, "WARNING")
    assert len(said(lines, "INFO")) == 1, said(lines, "INFO")


async def _known(rt: Runtime, who: SeededUser) -> bool:
    return rt.directory is not None and rt.directory.endpoint(who.did or "") is not None


async def test_check_reports_an_unreachable_directory_as_a_warning(
    settings: Settings, users: Users, rt: Runtime
) -> None:
    await users.make()
    refused = f"http://127.0.0.1:{free_port()}"
    got = run_check(env_for(with_settings(settings, plc_url=refused)), "--outage-hours", "0")
    line = got.checks["did directory"]
    assert line["status"] == "warn", line
    assert "writes on" in line["detail"] and "REPLICATOR_PLC_URL" in line["fix"]
    ok = run_check(env_for(settings), "--outage-hours", "0").checks["did directory"]
    assert ok["status"] == "ok", ok


def test_a_refusing_port_refuses() -> None:
    """The 'refuse' directory really refuses (nothing listens there)."""
    port = free_port()
    with socket.socket() as sock, pytest.raises(ConnectionRefusedError):
        sock.connect(("127.0.0.1", port))


async def test_a_directory_without_the_accounts_is_one_check_warning_and_no_log_line(
    settings: Settings, users: Users, rt: Runtime
) -> None:
    """A directory that answers 404 for every DID (the public one, asked about the dev PLC's
    accounts; here the PDS, which has no such path) is an answer, not an outage: nothing is
    logged, the DID counts as unknown, and `check` says which setting to look at."""
    import httpx

    from replicator.identity import Directory as Real

    who = await users.make()
    wrong = settings.pds_url
    with warnings() as seen:
        async with httpx.AsyncClient() as http:
            assert await Real(http, wrong).fetch(who.did or "") is None
    assert seen == []
    got = run_check(env_for(with_settings(settings, plc_url=wrong)), "--outage-hours", "0")
    line = got.checks["did directory"]
    assert line["status"] == "warn" and "has no document" in line["detail"], line
    assert "REPLICATOR_PLC_URL" in line["fix"]
