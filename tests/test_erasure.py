"""Erasure against the real stack (issue 16): the app erases a user the ways it really does
(AC-RECORD-TYPES.md, "Account erasure"): their moods deleted and their `users` document
deleted or its `atproto` unset, in either order, while the replicator runs, while it is
stopped, or past the oplog window; the PDS account deleted before, after or never; the stored
session still good, or only the last password, or nothing. Each ends the same way: no record
of theirs on the PDS and nothing in `replicator_*` that names them (a sha256 of the sub
aside), or, when no credential works, the user parked `erased` with every record still held
in the ledger, until an operator deletes the account or restores the credentials.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from bson import ObjectId

from replicator import metrics
from replicator.commands.status import gather, render
from replicator.health import Monitor
from replicator.model import State
from replicator.runtime import Runtime, open_runtime
from replicator.store import Store
from replicator_dev.devstack.seed import SeededUser, insert_mood
from replicator_dev.devstack.servers import EmbeddedMongo
from replicator_dev.devstack.stack import LocalStack

from .conftest import Users, env_for
from .harness import eventually, records, running

pytestmark = pytest.mark.anyio
MOODS = 6


# -- the app's side ---------------------------------------------------------------------------


async def with_moods(rt: Runtime, users: Users, n: int = MOODS) -> tuple[SeededUser, list[Any]]:
    """A user whose `n` moods are mirrored (the replicator runs meanwhile)."""
    user = await users.make()
    async with running(rt):
        ids = [await insert_mood(rt.store, user.sub, f"mood {i} of a soon erased user")
               for i in range(n)]  # fmt: skip
        await eventually(lambda: count_is(rt, user, n), 30, "the user's moods mirrored")
    return user, ids


async def count_is(rt: Runtime, user: SeededUser, n: int) -> bool:
    return len(await records(rt.settings.pds_url, user.did or "")) == n


async def delete_moods(store: Store, user: SeededUser) -> None:
    await store.docs.delete_many({"user": user.sub})


async def delete_user(store: Store, user: SeededUser) -> None:
    """The newer job's last steps: `@handles`, then the `users` document."""
    await store.handles.delete_one({"_id": user.sub})
    await store.users.delete_one({"_id": user.sub})


async def unset_atproto(store: Store, user: SeededUser) -> None:
    """The older endpoint's last step."""
    await store.users.update_one({"_id": user.sub}, {"$unset": {"atproto": ""}})


async def erase(store: Store, user: SeededUser, order: str) -> None:
    if order == "moods_first":
        await delete_moods(store, user)
        await delete_user(store, user)
    elif order == "users_first":
        await delete_user(store, user)
        await anyio.sleep(1.0)  # "moods a second later"
        await delete_moods(store, user)
    elif order == "unset_atproto":
        await delete_moods(store, user)
        await unset_atproto(store, user)
    else:
        raise AssertionError(order)


async def admin(stack: LocalStack, nsid: str, body: dict[str, Any]) -> None:
    assert stack.pds_url and stack.pds_admin_password
    async with httpx.AsyncClient(timeout=30) as http:
        resp = await http.post(f"{stack.pds_url}/xrpc/{nsid}", json=body,
                               auth=("admin", stack.pds_admin_password))  # fmt: skip
        resp.raise_for_status()


async def delete_account(stack: LocalStack, user: SeededUser) -> None:
    """`com.atproto.admin.deleteAccount`, as the app's erasure calls it."""
    await admin(stack, "com.atproto.admin.deleteAccount", {"did": user.did})


async def repo_gone(stack: LocalStack, user: SeededUser) -> bool:
    async with httpx.AsyncClient(timeout=30) as http:
        resp = await http.get(f"{stack.pds_url}/xrpc/com.atproto.sync.getRepoStatus",
                              params={"did": user.did})  # fmt: skip
    return resp.status_code == 400 and resp.json().get("error") == "RepoNotFound"


async def spoil_session(rt: Runtime, user: SeededUser) -> None:
    """The stored session no longer works: its access token garbage, its refresh token
    revoked on the PDS (`deleteSession`), and the running process's copy forgotten."""
    doc = await rt.store.sessions.find_one({"_id": user.did})
    assert doc is not None, "the replicator kept no session for the user"
    async with httpx.AsyncClient(timeout=30) as http:
        resp = await http.post(f"{rt.settings.pds_url}/xrpc/com.atproto.server.deleteSession",
                               headers={"authorization": f"Bearer {doc['refresh']}"})  # fmt: skip
        resp.raise_for_status()
    await rt.store.sessions.update_one({"_id": user.did}, {"$set": {"access": "not-a-token"}})
    rt.sessions.forget(user.did or "")


# -- what must hold afterwards ----------------------------------------------------------------


async def named(store: Store, user: SeededUser) -> list[str]:
    """Where the replicator's own collections still name the user (sub, DID or handle)."""
    needles = [n for n in (user.sub, user.did, user.handle, user.handle.split(".")[0]) if n]
    found = []
    for name in sorted(await store.db.list_collection_names()):
        if not name.startswith(store.names.prefix):
            continue
        async for doc in store.db[name].find({}):
            text = repr(doc)
            found += [f"{name} {doc['_id']!r}: {n}" for n in needles if n in text]
    return found


async def forgotten(rt: Runtime, user: SeededUser) -> bool:
    """Nothing of theirs on the PDS, nothing naming them in replicator_*, the hash kept."""
    if not await gone(rt, user) and await records(rt.settings.pds_url, user.did or ""):
        return False
    if await named(rt.store, user):
        return False
    mark = await rt.store.erasures.find_one({"_id": hashlib.sha256(user.sub.encode()).hexdigest()})
    return mark is not None and "sub" not in mark


async def gone(rt: Runtime, user: SeededUser) -> bool:
    async with httpx.AsyncClient(timeout=30) as http:
        resp = await http.get(f"{rt.settings.pds_url}/xrpc/com.atproto.sync.getRepoStatus",
                              params={"did": user.did})  # fmt: skip
    return resp.status_code == 400


def waiting(rt: Runtime, user: SeededUser) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return await forgotten(rt, user)

    return check


async def explain(rt: Runtime, user: SeededUser) -> str:
    left = {} if await gone(rt, user) else await records(rt.settings.pds_url, user.did or "")
    return f"{len(left)} records left; named in: {(await named(rt.store, user))[:6]}"


async def until_forgotten(rt: Runtime, user: SeededUser, timeout: float = 30) -> None:
    try:
        await eventually(waiting(rt, user), timeout, "the erased user's records gone, forgotten")
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {await explain(rt, user)}") from None


# -- every order, while running ---------------------------------------------------------------


@pytest.mark.parametrize("order", ["moods_first", "users_first", "unset_atproto"])
async def test_erased_while_running_in_every_order(rt: Runtime, users: Users, order: str) -> None:
    user, _ = await with_moods(rt, users)
    bystander, _ = await with_moods(rt, users, 2)
    async with running(rt):
        await erase(rt.store, user, order)
        await until_forgotten(rt, user)
    assert await count_is(rt, bystander, 2), "another user's records were touched"
    assert await named(rt.store, bystander), "another user was forgotten"


async def test_erased_while_stopped_then_started(rt: Runtime, users: Users) -> None:
    user, _ = await with_moods(rt, users)
    await erase(rt.store, user, "moods_first")  # the replicator is stopped
    assert await count_is(rt, user, MOODS)
    async with running(rt):
        await until_forgotten(rt, user)


async def test_erased_past_the_oplog_window(
    settings: Any, stack: LocalStack, users: Users, tmp_path: Path
) -> None:
    """Stopped longer than the oplog keeps, the erasure meanwhile: the history-loss recovery
    finds the user in the ledger, not in `users`, and erases them."""
    if stack.mongo is None:
        pytest.skip("needs the embedded MongoDB (REPLICATOR_TEST_MONGODB_URI points elsewhere)")
    mongo = EmbeddedMongo(tmp_path / "mongo", extra_args=("--oplog-max-entries", "100")).start()
    try:
        async with open_runtime(replace(settings, mongodb_uri=mongo.uri)) as rt:
            user = await Users(rt.store, stack).make()
            await with_moods_here(rt, user)
            await erase(rt.store, user, "moods_first")
            for i in range(150):  # the oplog moves on past the checkpoint
                await rt.store.state.update_one({"_id": "filler"}, {"$set": {"i": i}},
                                                upsert=True)  # fmt: skip
            await rt.store.client.admin.command("secantusAdmin.pruneOplog")
            async with running(rt):
                await until_forgotten(rt, user, 60)
            checkpoint = await rt.store.load_checkpoint() or {}
            assert "recovery" not in checkpoint
    finally:
        mongo.stop()


async def with_moods_here(rt: Runtime, user: SeededUser) -> None:
    async with running(rt):
        for i in range(MOODS):
            await insert_mood(rt.store, user.sub, f"mood {i}")
        await eventually(lambda: count_is(rt, user, MOODS), 30, "mirrored")


# -- the PDS account: deleted before, after; credentials: only the password, none -----------


async def test_account_deleted_before_the_erasure(
    rt: Runtime, users: Users, stack: LocalStack
) -> None:
    user, _ = await with_moods(rt, users)
    await delete_account(stack, user)
    async with running(rt):
        await erase(rt.store, user, "moods_first")
        await until_forgotten(rt, user)


async def test_account_deleted_after_the_erasure(
    rt: Runtime, users: Users, stack: LocalStack
) -> None:
    user, _ = await with_moods(rt, users)
    await erase(rt.store, user, "users_first")
    await delete_account(stack, user)
    async with running(rt):
        await until_forgotten(rt, user)


async def test_only_the_last_password_works(rt: Runtime, users: Users) -> None:
    """The stored session is refused (expired, revoked): the password seen in `users` before
    the erasure is what deletes the records."""
    user, _ = await with_moods(rt, users)
    await spoil_session(rt, user)
    logins = rt.sessions.logins
    async with running(rt):
        await erase(rt.store, user, "users_first")
        await until_forgotten(rt, user)
    assert rt.sessions.logins == logins + 1


async def no_credential_works(rt: Runtime, users: Users, stack: LocalStack) -> SeededUser:
    """Erased while the replicator is stopped, after the admin changed the account's password
    (which revokes its refresh tokens) and with the stored access token refused: parked."""
    user, ids = await with_moods(rt, users)
    await spoil_session(rt, user)
    await admin(stack, "com.atproto.admin.updateAccountPassword",
                {"did": user.did, "password": "a-new-one-nobody-told-us"})  # fmt: skip
    await erase(rt.store, user, "moods_first")

    async def parked() -> bool:
        doc = await rt.store.parked.find_one({"_id": user.did})
        return doc is not None and doc.get("kind") == "erased"

    await eventually(parked, 30, "the user parked `erased`")
    # Nothing is marked done: every record is still there, and the ledger holds each.
    assert await count_is(rt, user, MOODS)
    entries = await rt.store.ledger_by_id(ids)
    assert len(entries) == MOODS
    assert all(e.state is State.PARKED and e.held for e in entries.values()), entries
    return user


async def test_no_credential_works_parks_the_user_until_the_account_is_deleted(
    rt: Runtime, users: Users, stack: LocalStack
) -> None:
    async with running(rt) as replicator:
        user = await no_credential_works(rt, users, stack)
        report = await gather(rt.store)
        reasons = report["parked_accounts"]["by_reason"]
        assert any(r.startswith("erased") for r in reasons), reasons
        assert "erased" in render(report)
        await Monitor(rt, replicator).refresh()
        gauge = metrics.REGISTRY.get_sample_value("replicator_parked_accounts",
                                                  {"reason": "erased"})  # fmt: skip
        assert gauge == 1.0
        assert user.password not in json.dumps(report, default=str)
        # The operator deletes the account with the admin password (docs/runbook.md).
        await delete_account(stack, user)
        await until_forgotten(rt, user, 60)
        await Monitor(rt, replicator).refresh()
    assert metrics.REGISTRY.get_sample_value("replicator_parked_accounts",
                                             {"reason": "erased"}) == 0.0  # fmt: skip


async def test_no_credential_works_until_the_operator_restores_them(
    rt: Runtime, users: Users, stack: LocalStack
) -> None:
    """The runbook's other way: the account's credentials back in `users` (the records are
    deleted with them), then the user erased again (forgotten)."""
    async with running(rt):
        user = await no_credential_works(rt, users, stack)
        restored = {"did": user.did, "handle": user.handle, "password": "a-new-one-nobody-told-us"}
        await rt.store.users.insert_one({"_id": user.sub, "atproto": restored})
        await eventually(lambda: count_is(rt, user, 0), 30, "deleted with the restored password")
        await delete_user(rt.store, user)
        await until_forgotten(rt, user)


# -- audit, backfill ------------------------------------------------------------------------


def cli(settings: Any, *args: str) -> tuple[int, dict[str, Any], str]:
    out = subprocess.run(
        [sys.executable, "-m", "replicator.cli", *args, "--json"],
        env=env_for(settings), capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    return out.returncode, json.loads(out.stdout or "{}"), out.stderr


async def test_audit_reports_an_erased_users_records_and_fix_erases_them(
    rt: Runtime, users: Users
) -> None:
    user, _ = await with_moods(rt, users)
    await erase(rt.store, user, "moods_first")  # no replicator runs
    code, report, err = cli(rt.settings, "audit")
    assert code == 1, err
    assert report["divergences"]["erased"] == MOODS, report
    assert {e["did"] for e in report["examples"] if e["kind"] == "erased"} == {user.did}
    code, report, err = cli(rt.settings, "audit", "--fix")
    assert code == 0, (err, report)
    assert await forgotten(rt, user), await explain(rt, user)


async def test_backfill_erases_an_erased_user(rt: Runtime, users: Users) -> None:
    user, _ = await with_moods(rt, users)
    await erase(rt.store, user, "unset_atproto")
    code, summary, err = cli(rt.settings, "backfill")
    assert code == 0, err
    assert summary["erased_users"] == 1, summary
    assert await forgotten(rt, user), await explain(rt, user)


async def test_a_user_without_an_account_is_forgotten_too(rt: Runtime, users: Users) -> None:
    """Nothing on any PDS, but the ledger knew their moods (skipped): forgotten as well."""
    user = await users.make(with_account=False)
    async with running(rt):
        mood = await insert_mood(rt.store, user.sub, "no account")

        async def skipped() -> bool:
            entry = (await rt.store.ledger_by_id([ObjectId(mood)])).get(mood)
            return entry is not None and entry.state is State.SKIPPED

        await eventually(skipped, 30, "recorded as skipped")
        await delete_user(rt.store, user)

        async def nothing() -> bool:
            return not await named(rt.store, user)

        await eventually(nothing, 30, "forgotten")
