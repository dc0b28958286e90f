"""`replicator check` as a process, against the local stack: the all-ok case, a broken case per
important check, and MongoDB users without the privileges (a server of its own, with --auth).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pymongo
import pytest
from bson import ObjectId
from pymongo.errors import OperationFailure

from replicator.commands.lexicon import publish_lexicons
from replicator.config import Settings
from replicator.lexicon import load_lexicons
from replicator.pds import Pds
from replicator.runtime import Runtime
from replicator.store import Store
from replicator_dev.devstack.procs import free_port
from replicator_dev.devstack.seed import create_account
from replicator_dev.devstack.servers import EmbeddedMongo
from replicator_dev.devstack.stack import LocalStack

from .conftest import Users, env_for
from .harness import changed_lexicons

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent
MONGO_CHECKS = [
    "mongodb", "clock", "changeStream moods", "changeStream users", "find moods", "find users",
    "find @handles", "update moods", "index moods.user", "pre-images", "readWrite replicator_*",
    "oplog window",
]  # fmt: skip


@dataclass
class Checked:
    code: int
    checks: dict[str, dict[str, Any]]
    stdout: str
    stderr: str

    def status(self, name: str) -> str:
        return str(self.checks[name]["status"])


def run_check(env: dict[str, str], *args: str) -> Checked:
    proc = subprocess.run(
        [sys.executable, "-m", "replicator.cli", "check", "--json", *args],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.stdout, proc.stderr
    payload = json.loads(proc.stdout)
    assert payload["ok"] is (proc.returncode == 0)
    checks = {c["name"]: c for c in payload["checks"]}
    assert len(checks) == len(payload["checks"]), "one line per check"
    return Checked(proc.returncode, checks, proc.stdout, proc.stderr)


async def moods_with_preimages(store: Store, enabled: bool = True) -> None:
    await store.db.create_collection(
        store.names.moods, changeStreamPreAndPostImages={"enabled": enabled}
    )


@pytest.fixture
async def authority(stack: LocalStack) -> str:
    """A lexicon authority's account with the lexicons published; its handle."""
    assert stack.pds_url
    handle = f"lex{secrets.token_hex(4)}.test"
    password = secrets.token_urlsafe(16)
    await create_account(stack.pds_url, handle, password)
    pds = Pds(stack.pds_url, timeout=Settings.http_timeout, retry_timeout=30)
    try:
        await publish_lexicons(pds, handle, password, load_lexicons())
    finally:
        await pds.aclose()
    return handle


async def test_all_ok(rt: Runtime, users: Users, authority: str) -> None:
    store = rt.store
    await moods_with_preimages(store)
    one, two = await users.make(), await users.make()
    await users.make(with_account=False)
    # A checkpoint as `run` leaves it: the token of an open stream, saved just now.
    stream = await store.watch_docs(None, max_await_ms=100, batch_size=1)
    await stream.try_next()
    await store.save_checkpoint(stream.resume_token)
    await stream.close()

    env = env_for(rt.settings)
    got = run_check(env, "--lexicon-identifier", authority, "--outage-hours", "0")
    assert got.code == 0, got.stdout
    assert list(got.checks) == [*MONGO_CHECKS, "pds", "did directory", "accounts", "lexicon"]
    assert {n: c["status"] for n, c in got.checks.items() if c["status"] != "ok"} == {}
    assert "replica set" in got.checks["mongodb"]["detail"]
    assert "version" in got.checks["pds"]["detail"]
    assert "checkpoint" in got.checks["oplog window"]["detail"]
    accounts = got.checks["accounts"]["detail"]
    assert one.handle in accounts and two.handle in accounts and "2 sampled" in accounts
    assert "computer.aesthetic.mood" in got.checks["lexicon"]["detail"]
    for secret in (one.password, two.password):
        assert secret and secret not in got.stdout + got.stderr
    # The probe is gone, the app's data untouched, the session kept for `run`.
    assert await store.db["replicator_preflight"].count_documents({}) == 0
    assert await store.docs.count_documents({}) == 0
    assert await store.sessions.count_documents({}) == 2
    assert "user_1" in await store.docs.index_information()

    text = subprocess.run(
        [sys.executable, "-m", "replicator.cli", "check", "--outage-hours", "0",
         "--lexicon-identifier", authority],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert text.returncode == 0, text.stdout + text.stderr
    lines = text.stdout.splitlines()
    assert all(line.startswith("ok    ") for line in lines[:-1]), text.stdout
    assert lines[-1] == "all checks passed"


async def test_unreachable_pds_fails_and_skips_what_needs_it(rt: Runtime) -> None:
    await moods_with_preimages(rt.store)
    env = env_for(rt.settings, PDS_URL=f"http://127.0.0.1:{free_port()}")
    got = run_check(env, "--outage-hours", "0")
    assert got.code == 1
    assert got.status("pds") == "fail"
    assert "PDS_URL" in got.checks["pds"]["fix"]
    assert "accounts" not in got.checks and "lexicon" not in got.checks
    assert all(got.status(n) == "ok" for n in MONGO_CHECKS)
    text = subprocess.run(
        [sys.executable, "-m", "replicator.cli", "check", "--outage-hours", "0"],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert text.returncode == 1
    lines = text.stdout.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("fail  pds"))
    assert lines[at + 1].strip().startswith("fix: check PDS_URL")
    assert lines[-1].startswith("some checks failed")


def test_without_settings_it_is_a_usage_error() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("MONGODB_CONNECTION_STRING", "PDS_URL")}
    proc = subprocess.run(
        [sys.executable, "-m", "replicator.cli", "check"],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "MONGODB_CONNECTION_STRING" in proc.stderr


async def test_a_rejected_stored_session_is_renewed(rt: Runtime, users: Users) -> None:
    await moods_with_preimages(rt.store)
    user = await users.make()
    env = env_for(rt.settings)
    assert run_check(env, "--outage-hours", "0").status("accounts") == "ok"
    first = await rt.store.sessions.find_one({"_id": user.did})
    assert first
    await rt.store.sessions.update_one({"_id": user.did}, {"$set": {"access": "not-a-token"}})
    got = run_check(env, "--outage-hours", "0")
    assert got.status("accounts") == "ok", got.checks["accounts"]
    renewed = await rt.store.sessions.find_one({"_id": user.did})
    # Renewed: a new refresh token (the access token can come out the same bytes as the
    # first one: a JWT of the same account and claims, issued within the same second).
    assert renewed and renewed["access"] != "not-a-token"
    assert renewed["refresh"] != first["refresh"]
    assert "not-a-token" not in got.stdout + got.stderr


async def test_no_preimages_and_no_lexicon_authority_are_only_warnings(rt: Runtime) -> None:
    await moods_with_preimages(rt.store, enabled=False)
    got = run_check(env_for(rt.settings), "--outage-hours", "0")
    assert got.code == 0, got.stdout
    assert got.status("pre-images") == "warn"
    assert "changeStreamPreAndPostImages: {enabled: true}" in got.checks["pre-images"]["fix"]
    assert got.status("lexicon") == "warn"
    assert "REPLICATOR_LEXICON_IDENTIFIER" in got.checks["lexicon"]["fix"]
    assert got.status("accounts") == "warn"  # nobody has credentials in this database


async def test_no_create_indexes_warns_with_the_command_and_creates_nothing(rt: Runtime) -> None:
    await moods_with_preimages(rt.store)
    got = run_check(env_for(rt.settings), "--outage-hours", "0", "--no-create-indexes")
    index = got.checks["index moods.user"]
    assert index["status"] == "warn", got.stdout
    assert "createIndex({user: 1})" in index["fix"]
    assert "user_1" not in await rt.store.docs.index_information()


async def test_a_missing_moods_collection_fails(rt: Runtime) -> None:
    got = run_check(env_for(rt.settings), "--outage-hours", "0")
    assert got.code == 1
    assert got.status("pre-images") == "fail"
    assert "does not exist" in got.checks["pre-images"]["detail"]
    assert not await rt.store.docs_exist()  # the check did not create it


async def test_a_user_with_a_bad_password_fails_without_printing_it(
    rt: Runtime, users: Users
) -> None:
    await moods_with_preimages(rt.store)
    good, bad = await users.make(), await users.make()
    wrong = f"wrong-{secrets.token_urlsafe(12)}"
    await rt.store.users.update_one({"_id": bad.sub}, {"$set": {"atproto.password": wrong}})
    got = run_check(env_for(rt.settings), "--outage-hours", "0")
    assert got.code == 1
    accounts = got.checks["accounts"]
    assert accounts["status"] == "fail"
    assert f"{bad.handle}: the PDS refused its credentials" in accounts["detail"]
    assert good.handle not in accounts["detail"]
    assert "users.atproto.password" in accounts["fix"]
    for secret in (wrong, bad.password, good.password):
        assert secret and secret not in got.stdout + got.stderr


async def test_lexicon_not_published_or_different_fails(
    rt: Runtime, stack: LocalStack, authority: str, tmp_path: Path
) -> None:
    assert stack.pds_url
    await moods_with_preimages(rt.store)
    env = env_for(rt.settings)
    bare = f"bare{secrets.token_hex(4)}.test"
    await create_account(stack.pds_url, bare, secrets.token_urlsafe(16))
    got = run_check(env, "--outage-hours", "0", "--lexicon-identifier", bare)
    assert got.code == 1
    lexicon = got.checks["lexicon"]
    assert lexicon["status"] == "fail"
    assert "not published: computer.aesthetic.mood" in lexicon["detail"]
    assert "replicator lexicon publish" in lexicon["fix"]

    changed = changed_lexicons(tmp_path, "Not what was published.")
    got = run_check(
        env, "--outage-hours", "0", "--lexicon-identifier", authority, "--lexicons", str(changed)
    )
    assert got.code == 1
    assert "differs from lexicons/: computer.aesthetic.mood" in got.checks["lexicon"]["detail"]


async def test_a_checkpoint_older_than_the_oplog_fails(rt: Runtime) -> None:
    await moods_with_preimages(rt.store)
    # A mongod resume token (KeyString timestamp) from 30 days ago: out of any oplog here.
    seconds = int(time.time()) - 30 * 86400
    token = {"_data": f"82{seconds:08X}00000001" + "2B022C0100296E5A1004"}
    await rt.store.save_checkpoint(token)
    got = run_check(env_for(rt.settings), "--outage-hours", "0")
    assert got.code == 1
    oplog = got.checks["oplog window"]
    assert oplog["status"] == "fail"
    assert "resume token" in oplog["detail"] and "already out of history" in oplog["detail"]

    await rt.store.save_checkpoint({"_data": "8200"})  # unreadable: its save time is used
    got = run_check(env_for(rt.settings), "--outage-hours", "0")
    assert got.status("oplog window") == "ok"
    assert "the time it was saved" in got.checks["oplog window"]["detail"]


def test_an_unreachable_mongodb_is_one_failure(settings: Settings) -> None:
    env = env_for(settings)
    secret = f"pw-{secrets.token_hex(6)}"
    port = free_port()
    env.update(
        MONGODB_CONNECTION_STRING=f"mongodb://rep:{secret}@127.0.0.1:{port}/?directConnection=true"
    )
    got = run_check(env, "--outage-hours", "0")
    assert got.code == 1
    mongodb = got.checks["mongodb"]
    assert mongodb["status"] == "fail"
    assert f"mongodb://rep:***@127.0.0.1:{port}" in mongodb["detail"]
    assert "no server reachable" in mongodb["detail"]  # what `run` says, not the driver's dump
    assert "ServerSelectionTimeoutError" not in mongodb["detail"]
    assert "configured timeouts" not in mongodb["detail"]
    assert "MONGODB_CONNECTION_STRING" in mongodb["fix"]
    assert secret not in got.stdout + got.stderr
    assert not any(n in got.checks for n in MONGO_CHECKS[1:])
    assert "pds" in got.checks  # the PDS is still checked


def test_a_standalone_server_is_not_enough(settings: Settings, tmp_path: Path) -> None:
    mongo = EmbeddedMongo(tmp_path / "standalone", extra_args=("--standalone",)).start()
    try:
        env = env_for(settings)
        env.update(MONGODB_CONNECTION_STRING=mongo.uri)
        got = run_check(env, "--outage-hours", "0")
    finally:
        mongo.stop()
    assert got.code == 1
    mongodb = got.checks["mongodb"]
    assert mongodb["status"] == "fail" and "not a replica set" in mongodb["detail"]
    assert "--replSet" in mongodb["fix"]
    assert "find moods" in got.checks  # it answered: the rest is still tried


# -- MongoDB users without the privileges: a server of its own, with --auth --------------------

DB = "aesthetic_auth"


def documented_role(db: str) -> dict[str, Any]:
    """The custom role exactly as docs/deploy.md gives it, for the database `db`."""
    text = (ROOT / "docs/deploy.md").read_text()
    found = re.search(r"db\.createRole\((\{.*?\n\})\)", text, re.DOTALL)
    assert found, "docs/deploy.md has a db.createRole({...}) block"
    role = json.loads(found[1].replace('"db": "aesthetic"', f'"db": "{db}"'))
    assert isinstance(role, dict)
    return role


@dataclass
class AuthServer:
    port: int
    passwords: dict[str, str]

    def uri(self, user: str, password: str | None = None) -> str:
        pw = password or self.passwords[user]
        return f"mongodb://{user}:{pw}@127.0.0.1:{self.port}/?directConnection=true&authSource={DB}"


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthServer]:
    """Users are created without auth, then the server restarts with --auth (secantusd-py)."""
    mongo = EmbeddedMongo(tmp_path_factory.mktemp("auth-mongo")).start()
    try:
        passwords = {
            u: f"{u}-{secrets.token_hex(8)}"
            for u in ("root", "rep", "ro", "narrow", "noupdate", "elsewhere")
        }
        client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(mongo.uri)
        db = client[DB]
        db.create_collection("moods", changeStreamPreAndPostImages={"enabled": True})
        db.moods.insert_one({"_id": ObjectId(), "user": "auth0|x", "mood": "hi"})
        db.users.insert_one({"_id": "auth0|x"})
        db["@handles"].insert_one({"_id": "auth0|x", "handle": "x"})
        client.admin.command("createUser", "root", pwd=passwords["root"], roles=["root"])
        role = documented_role(DB)
        db.command("createRole", role["role"], privileges=role["privileges"], roles=[])
        # Everything of the documented role except users and @handles.
        narrow = [p for p in role["privileges"]
                  if p["resource"]["collection"] not in ("users", "@handles")]  # fmt: skip
        db.command("createRole", "withoutUsers", privileges=narrow, roles=[])
        # The documented role without its write actions (action level; on every collection,
        # as a server that ignores a privilege's collection would otherwise grant them).
        writes = ("update", "createIndex", "insert", "remove")
        fewer = [{**p, "actions": [a for a in p["actions"] if a not in writes]}
                 for p in role["privileges"]]  # fmt: skip
        db.command("createRole", "withoutWrites", privileges=fewer, roles=[])
        # Everything, on another database (database level).
        elsewhere = [{**p, "resource": {**p["resource"], "db": "another"}}
                     for p in role["privileges"] if p["resource"]["db"] == DB]  # fmt: skip
        db.command("createRole", "elsewhere", privileges=elsewhere, roles=[])
        db.command("createUser", "rep", pwd=passwords["rep"], roles=[role["role"]])
        db.command("createUser", "ro", pwd=passwords["ro"], roles=[{"role": "read", "db": DB}])
        db.command("createUser", "narrow", pwd=passwords["narrow"], roles=["withoutUsers"])
        db.command("createUser", "noupdate", pwd=passwords["noupdate"], roles=["withoutWrites"])
        db.command("createUser", "elsewhere", pwd=passwords["elsewhere"], roles=["elsewhere"])
        client.close()
        mongo.stop()
        mongo.extra_args = ("--auth",)
        mongo.start()
        yield AuthServer(mongo.port, passwords)
    finally:
        mongo.stop()


def auth_env(
    settings: Settings, server: AuthServer, user: str, password: str | None = None
) -> dict[str, str]:
    env = env_for(settings)
    env.update(MONGODB_CONNECTION_STRING=server.uri(user, password), MONGODB_NAME=DB)
    return env


def without_user_index(server: AuthServer) -> None:
    """Each test decides whether `check` finds the moods.user index or must create it."""
    root: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(
        server.uri("root").replace(f"authSource={DB}", "authSource=admin")
    )
    root[DB].moods.drop_indexes()
    root.close()


def check_as(
    settings: Settings, server: AuthServer, user: str, password: str | None = None
) -> Checked:
    got = run_check(auth_env(settings, server, user, password), "--outage-hours", "0")
    for secret in server.passwords.values():
        assert secret not in got.stdout + got.stderr
    return got


def test_the_server_enforces_authentication(settings: Settings, auth_server: AuthServer) -> None:
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(
        f"mongodb://127.0.0.1:{auth_server.port}/?directConnection=true"
    )
    with pytest.raises(OperationFailure) as refused:
        client[DB].moods.find_one()
    assert refused.value.code == 13
    client.close()


def test_the_documented_role_is_enough(settings: Settings, auth_server: AuthServer) -> None:
    without_user_index(auth_server)
    got = check_as(settings, auth_server, "rep")
    assert {n: got.status(n) for n in MONGO_CHECKS} == dict.fromkeys(MONGO_CHECKS, "ok")
    assert "created" in got.checks["index moods.user"]["detail"]


def test_a_read_only_user_fails_the_writes(settings: Settings, auth_server: AuthServer) -> None:
    without_user_index(auth_server)
    got = check_as(settings, auth_server, "ro")
    assert got.code == 1
    for name in ("mongodb", "changeStream moods", "changeStream users", "find moods",
                 "find users", "find @handles", "pre-images"):  # fmt: skip
        assert got.status(name) == "ok", got.checks[name]
    for name in ("update moods", "index moods.user", "readWrite replicator_*"):
        assert got.status(name) == "fail", got.checks[name]
        assert "Unauthorized" in got.checks[name]["detail"]
        assert got.checks[name]["fix"]
    assert "grant update on aesthetic_auth.moods" in got.checks["update moods"]["fix"]
    assert "createIndex({user: 1})" in got.checks["index moods.user"]["fix"]
    assert got.status("oplog window") == "warn"  # `read` on the app's database excludes local
    assert "local.oplog.rs" in got.checks["oplog window"]["fix"]


def test_a_custom_role_without_writes_fails_exactly_those(
    settings: Settings, auth_server: AuthServer
) -> None:
    without_user_index(auth_server)
    got = check_as(settings, auth_server, "noupdate")
    assert got.code == 1
    failed = {n for n in MONGO_CHECKS if got.status(n) != "ok"}
    assert failed == {"update moods", "index moods.user", "readWrite replicator_*"}, got.checks
    assert "insert in replicator_preflight" in got.checks["readWrite replicator_*"]["detail"]


def test_a_role_on_another_database_grants_nothing_here(
    settings: Settings, auth_server: AuthServer
) -> None:
    got = check_as(settings, auth_server, "elsewhere")
    assert got.code == 1
    assert got.status("mongodb") == "ok"  # authenticated: `hello` needs no privilege
    refused = [n for n in MONGO_CHECKS if n not in ("mongodb", "clock", "oplog window")]
    refused.remove("index moods.user")  # not reached: listCollections is refused first
    for name in refused:
        assert got.status(name) == "fail", got.checks[name]


def test_a_wrong_mongodb_password_is_one_failure(
    settings: Settings, auth_server: AuthServer
) -> None:
    wrong = f"nope-{secrets.token_hex(8)}"
    got = check_as(settings, auth_server, "rep", wrong)
    assert got.code == 1
    assert got.status("mongodb") == "fail"
    assert "AuthenticationFailed" in got.checks["mongodb"]["detail"]
    assert "did not run" in got.checks["mongodb"]["detail"]
    assert wrong not in got.stdout + got.stderr
    assert not any(n in got.checks for n in MONGO_CHECKS[1:])


def test_collection_level_privileges(settings: Settings, auth_server: AuthServer) -> None:
    """A role without `users` and `@handles`. Only meaningful on a server that scopes a
    privilege to its collection: asked first, directly."""
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(
        auth_server.uri("narrow"), serverSelectionTimeoutMS=5000
    )
    try:
        client[DB].users.find_one({}, {"_id": 1})
    except OperationFailure as exc:
        assert exc.code == 13
    else:
        pytest.skip(
            "this MongoDB server (SecantusDB here) ignores the collection of a privilege's "
            "resource: a role granting find on moods only may also read users, so a "
            "collection-level refusal cannot be produced (roles, databases and actions are "
            "enforced: the other tests here)"
        )
    finally:
        client.close()
    got = check_as(settings, auth_server, "narrow")
    assert got.code == 1
    for name in ("changeStream users", "find users", "find @handles"):
        assert got.status(name) == "fail", got.checks[name]
    assert got.status("changeStream moods") == "ok"
