"""The first hour in production (issue 13, parts 1, 3 and 5), through the real entry point.

A configuration or connection error is one line that names what failed and what to check,
with the documented exit code, no traceback (unless `--debug`) and never the password; a bad
URL is refused before anything is contacted. `--no-create-indexes` leaves the app's index
alone and says how to create it. And the small things: no ` {}` on text log lines, `dev` on a
free metrics port without a backfill hint, whole `--help` summaries, the age of `status`'s
counters. Unreachable servers are a closed port on 127.0.0.1 and a name under `.invalid`.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from loguru import logger
from pymongo.errors import (
    ConfigurationError,
    DuplicateKeyError,
    InvalidURI,
    OperationFailure,
    PyMongoError,
)

from replicator import health, logs, metrics
from replicator.cli import main
from replicator.config import Settings
from replicator.errors import ConfigError, OperatorError, Unavailable
from replicator.runtime import Runtime
from replicator.store import Store, create_index_command, mongo_problem
from replicator_dev.devstack.procs import free_port
from replicator_dev.devstack.seed import insert_mood

from .conftest import Users, env_for
from .harness import eventually, records, running

REPLICATOR = str(Path(sys.executable).parent / "replicator")  # the installed entry point
SECRET = "s3cret-Pa55"
FAST = "serverSelectionTimeoutMS=300"
pytestmark = pytest.mark.anyio  # a closed port fails at once; the timeout bounds it


def replicator(
    *args: str, env: dict[str, str], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [REPLICATOR, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def bare_env(**values: str) -> dict[str, str]:
    """The process environment without any of the replicator's own settings."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("REPLICATOR_", "MONGODB_", "PDS_"))}  # fmt: skip
    env.update(values)
    return env


def one_error_line(out: subprocess.CompletedProcess[str], command: str) -> str:
    """The error line of `command`: exactly one, and no traceback or secret anywhere."""
    everything = out.stdout + out.stderr
    assert "Traceback" not in everything, everything
    assert SECRET not in everything, everything
    lines = [line for line in out.stderr.splitlines() if line.startswith(f"replicator {command}:")]
    assert len(lines) == 1, out.stderr
    others = [line for line in out.stderr.splitlines() if line not in lines]  # progress, INFO
    assert not [line for line in others if re.search(r"rror|File \"|WARNING|CRITICAL", line)]
    return lines[0]


# -- 1. configuration and connection errors -------------------------------------------------


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (("run", "--http-addr", "off"), 1),
        (("status",), 1),
        (("status", "--json"), 1),
        (("audit",), 2),
        (("backfill",), 2),
        (("dlq", "list"), 2),
        (("dlq", "retry", "--all"), 2),
        (("dev", "--no-run"), 1),
        (("bench", "--quick", "--only", "core"), 1),
    ],
)
def test_an_unreachable_mongodb_is_one_line_with_the_documented_exit(
    args: tuple[str, ...], code: int
) -> None:
    port = free_port()
    env = bare_env(
        MONGODB_CONNECTION_STRING=f"mongodb://app:{SECRET}@127.0.0.1:{port}/?{FAST}",
        PDS_URL=f"http://127.0.0.1:{free_port()}",
        PDS_ADMIN_PASSWORD=SECRET,  # echoed nowhere either
    )
    started = time.monotonic()
    out = replicator(*args, env=env)
    assert out.returncode == code, out.stderr
    line = one_error_line(out, args[0])
    assert f"MongoDB mongodb://app:***@127.0.0.1:{port}/" in line
    assert "Connect call failed" in line and "check the host and port" in line
    assert time.monotonic() - started < 20  # the URI's selection timeout is honoured


def test_with_json_logs_the_error_is_a_json_line_too() -> None:
    env = bare_env(
        MONGODB_CONNECTION_STRING=f"mongodb://app:{SECRET}@127.0.0.1:{free_port()}/?{FAST}",
        PDS_URL="https://pds.example",
        REPLICATOR_LOG_FORMAT="json",
    )
    out = replicator("run", "--http-addr", "off", env=env)
    assert out.returncode == 1
    assert SECRET not in out.stderr and "Traceback" not in out.stderr
    records = [json.loads(line)["record"] for line in out.stderr.splitlines()]
    (error,) = [r for r in records if r["level"]["name"] == "CRITICAL"]
    assert error["message"].startswith("replicator run: MongoDB mongodb://app:***@127.0.0.1:")


def test_an_srv_uri_whose_name_does_not_resolve(settings: Settings) -> None:
    env = bare_env(MONGODB_CONNECTION_STRING=f"mongodb+srv://app:{SECRET}@nothing.invalid/",
                   PDS_URL=settings.pds_url)  # fmt: skip
    out = replicator("run", "--http-addr", "off", env=env)
    assert out.returncode == 1, out.stderr
    line = one_error_line(out, "run")
    assert "mongodb+srv://app:***@nothing.invalid/" in line
    assert "_mongodb._tcp.nothing.invalid" in line and "check the host name" in line


@pytest.mark.parametrize(
    ("args", "setting", "value", "named"),
    [
        (("run",), "PDS_URL", "pds.example", "PDS_URL (--pds-url) 'pds.example'"),
        (("run",), "PDS_URL", "https://", "PDS_URL (--pds-url) 'https://'"),
        (("backfill",), "PDS_URL", "https://pds.example:port", "PDS_URL"),
        (("audit",), "REPLICATOR_PLC_URL", "plc.directory", "REPLICATOR_PLC_URL (--plc-url)"),
        (("status",), "PDS_URL", "ftp://pds.example", "PDS_URL (--pds-url) 'ftp://pds.example'"),
        (("run",), "MONGODB_CONNECTION_STRING", f"app:{SECRET}@db.example:27017",
         "MONGODB_CONNECTION_STRING (--mongodb-uri) 'app:***@db.example:27017'"),
        (("dlq", "list"), "MONGODB_CONNECTION_STRING", "localhost:27017", "mongodb://"),
        (("dev",), "PDS_URL", "pds.example", "PDS_URL 'pds.example'"),
        (("lexicon", "publish"), "PDS_URL", "pds.example", "PDS_URL (--pds-url)"),
    ],
)  # fmt: skip
def test_a_bad_url_is_a_usage_error_before_anything_is_contacted(
    args: tuple[str, ...], setting: str, value: str, named: str
) -> None:
    env = bare_env(
        MONGODB_CONNECTION_STRING=f"mongodb://app:{SECRET}@127.0.0.1:{free_port()}/?{FAST}",
        PDS_URL="https://pds.example",
        REPLICATOR_LEXICON_IDENTIFIER="lexicons.test",
        REPLICATOR_LEXICON_PASSWORD=SECRET,
        REPLICATOR_STATE_DIR="/nonexistent/never-created",
    )
    env[setting] = value
    out = replicator(*args, env=env)
    assert out.returncode == 2, out.stderr
    line = one_error_line(out, args[0])
    assert named in line and "is not a URL with a scheme" in line
    assert "MongoDB" not in line  # refused before any connection was tried


@pytest.mark.parametrize(
    ("value", "example"),
    [
        ("localhost:2583", "'http://localhost:2583'"),
        ("127.0.0.1:2583/", "'http://127.0.0.1:2583/'"),
        ("[::1]:2583", "'http://[::1]:2583'"),
        ("pds.example", "'https://pds.example'"),
        ("localhost.example.com", "'https://localhost.example.com'"),
    ],
)
def test_the_no_scheme_hint_suggests_http_for_this_machine(value: str, example: str) -> None:
    """A dev PDS on this machine speaks plain http; a hint of https there would fail too."""
    from replicator.config import check_url

    with pytest.raises(ConfigError, match=re.escape(f"e.g. {example}")):
        check_url("PDS_URL", value)


def test_a_bad_metrics_address_is_a_usage_error() -> None:
    env = bare_env(MONGODB_CONNECTION_STRING="mongodb://127.0.0.1:1/", PDS_URL="https://pds")
    out = replicator("run", "--http-addr", "localhost", env=env)
    assert out.returncode == 2
    line = one_error_line(out, "run")
    assert line == "replicator run: REPLICATOR_HTTP_ADDR (--http-addr): not host:port: 'localhost'"


def test_a_missing_setting_is_one_usage_line() -> None:
    env = bare_env(MONGODB_CONNECTION_STRING="mongodb://127.0.0.1:1/")
    out = replicator("run", env=env)
    assert out.returncode == 2
    assert one_error_line(out, "run") == "replicator run: set PDS_URL or --pds-url"


@pytest.mark.parametrize("how", ["--debug", "REPLICATOR_LOG_LEVEL=DEBUG"])
def test_debug_shows_the_traceback_still_without_the_password(how: str) -> None:
    env = bare_env(
        MONGODB_CONNECTION_STRING=f"mongodb://app:{SECRET}@127.0.0.1:{free_port()}/?{FAST}"
    )
    args = ["status"]
    if how == "--debug":
        args.insert(0, how)
    else:
        env["REPLICATOR_LOG_LEVEL"] = "DEBUG"
    out = replicator(*args, env=env)
    assert out.returncode == 1
    assert "Traceback" in out.stderr and "ServerSelectionTimeoutError" in out.stderr
    assert SECRET not in out.stderr + out.stdout
    assert out.stderr.splitlines()[-1].startswith("replicator status: MongoDB mongodb://app:***@")


@pytest.mark.parametrize("args", [("backfill",), ("audit",), ("dlq", "retry", "--all")])
async def test_a_command_that_needs_the_pds_fails_at_once_when_it_does_not_answer(
    rt: Runtime, args: tuple[str, ...]
) -> None:
    """Rather than after retrying every user's calls for two minutes (the sidecar waits)."""
    await rt.store.docs.create_index("user")  # the app's collection, as a deployment has it
    pds = f"http://127.0.0.1:{free_port()}"
    out = replicator(*args, env=env_for(rt.settings, PDS_URL=pds))
    assert out.returncode == 2, out.stderr
    line = one_error_line(out, args[0])
    assert line.startswith(f"replicator {args[0]}: PDS {pds}: _health: no answer")
    assert "check PDS_URL" in line


@pytest.mark.parametrize(
    ("error", "kind", "says"),
    [
        (OperationFailure("Authentication failed.", 18), Unavailable, "authentication failed"),
        (OperationFailure("bad auth : Authentication failed.", 8000), Unavailable,
         "check the user name and password"),
        (OperationFailure("not authorized on aesthetic to execute command { find: ... }", 13,
                          {"errmsg": "not authorized on aesthetic to execute command find"}),
         Unavailable, "not authorized on aesthetic to execute command find: grant this user"),
        (InvalidURI("Username and password must be escaped"), ConfigError,
         "MONGODB_CONNECTION_STRING (--mongodb-uri): Username and password must be escaped"),
        (ConfigurationError("Unknown option fooMS"), ConfigError, "check the URI's options"),
    ],
)  # fmt: skip
def test_refused_credentials_and_privileges_name_what_to_check(
    error: PyMongoError, kind: type[OperatorError], says: str
) -> None:
    """The server-side refusals the local server cannot produce (it has no users), decided
    from the driver's errors; other errors (a duplicate key: a bug or a race) stay as they are."""
    uri = f"mongodb://app:{SECRET}@db.example:27017/aesthetic"
    problem = mongo_problem(error, uri)
    assert isinstance(problem, kind)
    assert says in str(problem) and SECRET not in str(problem)
    assert mongo_problem(DuplicateKeyError("E11000 duplicate key", 11000), uri) is None
    assert mongo_problem(OperationFailure("Unrecognized pipeline stage", 40324), uri) is None


async def test_an_unreachable_pds_at_start_is_a_warning_in_the_log(
    rt: Runtime, tmp_path: Path
) -> None:
    pds = f"http://127.0.0.1:{free_port()}"
    log = tmp_path / "run.log"
    with log.open("w") as sink:
        proc = subprocess.Popen(
            [REPLICATOR, "run", "--http-addr", "off"],
            env=env_for(rt.settings, PDS_URL=pds), stdout=sink, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        with anyio.move_on_after(30):
            while "unreachable" not in log.read_text():  # noqa: ASYNC110 - another process
                await anyio.sleep(0.2)
        await anyio.sleep(health.DEFAULT_INTERVAL + 1)  # the next probe round does not repeat it
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    warnings = [line for line in log.read_text().splitlines() if "unreachable" in line]
    assert len(warnings) == 1, log.read_text()
    assert "WARNING" in warnings[0] and pds in warnings[0] and "check PDS_URL" in warnings[0]


# -- 3. --no-create-indexes -------------------------------------------------------------------


def user_index(indexes: dict[str, Any]) -> bool:
    return any(list(dict(i["key"]))[:1] == ["user"] for i in indexes.values())


async def test_no_create_indexes_leaves_the_app_index_and_says_how_to_create_it(
    rt: Runtime, users: Users, store: Store
) -> None:
    user = await users.make(with_account=False)
    await store.docs.insert_one({"user": user.sub, "mood": "x", "when": datetime.now(UTC)})
    command = create_index_command(rt.settings.db_name, "moods", {"user": 1})
    assert command == (
        f'db.getSiblingDB("{rt.settings.db_name}").getCollection("moods")'
        '.createIndex({"user": 1})'
    )

    def backfill(*args: str, **env: str) -> str:
        out = replicator("backfill", "--json", *args, env=env_for(rt.settings, **env))
        assert out.returncode == 0, out.stderr
        return out.stderr

    for args, env in ((("--no-create-indexes",), {}), ((), {"REPLICATOR_CREATE_INDEXES": "false"})):
        err = backfill(*args, **env)
        (warning,) = [line for line in err.splitlines() if "index" in line]
        assert "WARNING" in warning and "is missing (--no-create-indexes)" in warning
        assert f"`{command}`" in warning
        assert not user_index(await store.docs.index_information())

    err = backfill()  # the default creates it, and says so
    (warning,) = [line for line in err.splitlines() if "index" in line]
    assert "WARNING" in warning and "was missing and is created" in warning and command in warning
    assert user_index(await store.docs.index_information())
    assert "index" not in backfill()  # present now: nothing to say


# -- 5. the small ones ------------------------------------------------------------------------


@pytest.fixture
def restore_logs() -> Iterator[None]:
    yield
    logs.setup()


def test_text_log_lines_end_with_the_message_when_nothing_is_bound(
    restore_logs: None, capsys: pytest.CaptureFixture[str]
) -> None:
    logs.setup(fmt="text")  # here: capsys's stderr is the test call's own
    logger.info("nothing bound here")
    logger.bind(did="did:plc:abc").warning("one thing bound")
    err = capsys.readouterr().err
    plain, bound = err.splitlines()
    assert plain.endswith("INFO     nothing bound here")
    assert bound.endswith("one thing bound {'did': 'did:plc:abc'}")


def test_top_level_help_shows_each_summary_whole() -> None:
    out = replicator("--help", env=bare_env(COLUMNS="80"))
    assert out.returncode == 0
    section = out.stdout.split("Commands:", 1)[1]
    assert "..." not in section
    flat = " ".join(section.split())
    for name, command in main.commands.items():
        first = " ".join((command.help or "").split("\n\n")[0].split())
        sentence = re.split(r"(?<=\.)\s+(?=[^a-z])", first)[0]
        assert f"{name} {sentence}" in flat, (name, sentence)


async def test_status_says_how_old_its_counters_are(rt: Runtime, store: Store) -> None:
    await store.db.create_collection(store.names.moods)
    env = env_for(rt.settings)
    never = replicator("status", "--json", env=env)
    assert json.loads(never.stdout)["counters"]["age_seconds"] is None
    assert "no counters flushed yet" in replicator("status", env=env).stdout

    await metrics.flush_stats(store)  # what a running replicator does every 10 s
    fresh = json.loads(replicator("status", "--json", env=env).stdout)["counters"]
    assert fresh["flushed_at"] is not None and 0 <= fresh["age_seconds"] < 10
    assert fresh["flush_interval_seconds"] == 10.0

    stats = {"_id": metrics.stats_id(store.names.moods)}
    await store.state.update_one(stats, {"$set": {"flushed_at": time.time() - 42}})
    old = json.loads(replicator("status", "--json", env=env).stdout)["counters"]
    assert 42 <= old["age_seconds"] < 52
    text = replicator("status", env=env).stdout
    assert re.search(r"launch +\(counters flushed 4\ds ago, every 10s while", text), text


def test_dev_picks_a_free_metrics_port_and_gives_no_backfill_hint(tmp_path: Path) -> None:
    """With 9464 taken, `dev` serves its metrics elsewhere, prints where, and after seeding
    (mirrored already) says nothing about a backfill."""
    held = socket.socket()
    try:
        held.bind(("127.0.0.1", 9464))
        held.listen()
    except OSError:
        pass  # taken already: the case under test all the same
    env = bare_env(REPLICATOR_STATE_DIR=str(tmp_path / "state"))
    proc = subprocess.Popen(
        [REPLICATOR, "dev"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    seen: list[str] = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            seen.append(line)
            if "metrics and health on" in line:
                break
        out = "".join(seen)
        banner = re.search(r"metrics   http://127\.0\.0\.1:(\d+)/metrics", out)
        assert banner, out
        port = int(banner.group(1))
        assert port != 9464
        assert f"metrics and health on http://127.0.0.1:{port}/" in out
        assert httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).status_code == 200
        deadline = time.monotonic() + 60  # the stream is open: a first-start hint came before
        while time.monotonic() < deadline:
            ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).json()
            if ready["checks"]["stream_open"]:
                break
            time.sleep(0.2)
        assert ready["checks"]["stream_open"], ready
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0
        assert "backfill" not in out + rest, out + rest
    finally:
        held.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


# -- issue 18: a database without `moods` -----------------------------------------------------


@pytest.mark.parametrize("args", [("audit",), ("backfill",), ("status",), ("dlq", "list")])
async def test_a_database_without_moods_is_refused_and_nothing_is_created(
    rt: Runtime, users: Users, args: tuple[str, ...]
) -> None:
    """MONGODB_NAME left at its default while the data is in another database: not "in sync,
    0 users" but one line naming the databases that have a `moods` collection, exit 2, and
    nothing created where the data is not."""
    await insert_mood(rt.store, (await users.make()).sub, "the data is here")
    empty = f"{rt.settings.db_name}_wrong"
    out = replicator(*args, env=env_for(rt.settings, MONGODB_NAME=empty))
    assert out.returncode == 2, out.stderr
    line = one_error_line(out, args[0])
    assert f"database {empty!r} has no 'moods' collection: check MONGODB_NAME" in line
    assert rt.settings.db_name in line  # where the moods are
    assert empty not in await rt.store.client.list_database_names()  # nothing created there


async def test_status_audit_and_dlq_count_the_same_things_the_same_way(
    rt: Runtime, users: Users
) -> None:
    """One set of counts: `moods` (documents), `records`, `invalid` (moods that cannot become
    a record, whatever the reason: a bad field, no usable `user`, an `_id` that is no
    ObjectId), `no_account`, named alike and equal in `status`, `audit` and `dlq list`."""
    alice, nobody = await users.make(), await users.make(with_account=False)
    async with running(rt):
        kept = await insert_mood(rt.store, alice.sub, "kept, then spoiled")
        purged = await insert_mood(rt.store, alice.sub, "purged")
        await insert_mood(rt.store, alice.sub, "fine")
        await insert_mood(rt.store, alice.sub, "")  # invalid: empty
        await insert_mood(rt.store, nobody.sub, "no account")
        now = datetime.now(UTC)
        await rt.store.docs.insert_one({"user": None, "mood": "whose?", "when": now})
        await rt.store.docs.insert_one({"_id": "legacy-1", "user": alice.sub,
                                         "mood": "string id", "when": now})  # fmt: skip
        await eventually(lambda: _records_are(rt, alice, 3), 30, "mirrored")
        await rt.store.docs.delete_one({"_id": purged})
        await rt.store.docs.update_one({"_id": kept}, {"$set": {"mood": 42}})  # record kept
        await eventually(lambda: _records_are(rt, alice, 2), 30, "the purge mirrored")
        await anyio.sleep(1)
    env = env_for(rt.settings)
    status = json.loads(replicator("status", "--json", env=env).stdout)
    audit = json.loads(replicator("audit", "--json", env=env).stdout)
    dlq = json.loads(replicator("dlq", "list", "--json", env=env).stdout)
    moods = await rt.store.docs.count_documents({})
    assert status["launch"]["moods"] == audit["moods"] == moods == 6
    assert status["launch"]["records"] == audit["records"] == 2  # the spoiled one's is kept
    assert status["launch"]["invalid"] == audit["invalid"] == dlq["invalid"] == 4
    assert status["dead_letters"]["count"] == dlq["total"] == 4
    assert status["launch"]["no_account"] == audit["no_account"] == 1
    assert "parked        none" in replicator("status", env=env).stdout


async def _records_are(rt: Runtime, who: Any, n: int) -> bool:
    return len(await records(rt.settings.pds_url, who.did or "")) == n


async def test_each_applied_batch_is_one_info_line(rt: Runtime, users: Users) -> None:
    """At INFO a newcomer sees their change arrive: one line a batch, saying what the PDS was
    asked to create, update and delete, and how far behind MongoDB that was (the echo of the
    replicator's own rkey write-back, which asks nothing of the PDS, only at DEBUG)."""
    who = await users.make()
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(m.record["message"]), level="INFO")
    try:
        async with running(rt):
            mood = await insert_mood(rt.store, who.sub, "hello")
            await eventually(lambda: _records_are(rt, who, 1), 30, "created")
            await rt.store.docs.update_one({"_id": mood}, {"$set": {"mood": "hello again"}})
            await eventually(lambda: _applied(lines, "0 created, 1 updated, 0 deleted"), 30)
            await rt.store.docs.update_one({"_id": mood}, {"$set": {"deleted": True}})
            await eventually(lambda: _records_are(rt, who, 0), 30, "deleted")
            await eventually(lambda: _applied(lines, "0 created, 0 updated, 1 deleted"), 30)
    finally:
        logger.remove(sink)
    applied = [line for line in lines if line.startswith("applied ")]
    assert re.fullmatch(r"applied 1 change: 1 created, 0 updated, 0 deleted; lag \d+\.\ds",
                        applied[0]), applied  # fmt: skip
    assert len(applied) == 3, applied


async def _applied(lines: list[str], what: str) -> bool:
    return any(line.startswith("applied ") and what in line for line in lines)
