"""Accounts are alive (issue 12), against the real local stack: deactivated and taken down
accounts park their user and come back with no manual step, an account created later or a
new DID is picked up from `users`, a password fixed in `users` releases the parked work, a
DID document that names another PDS parks the user, one account's PDS answering 503 forever
holds the others back by no more than the lane deadline, and a record someone else changed
makes the single `putRecord` fail `InvalidSwap` and the replicator re-read the repo."""

from __future__ import annotations

import json
import secrets
import sys
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import quote, unquote

import anyio
import httpx
import orjson
import pytest
from bson import ObjectId

from replicator.config import Settings
from replicator.model import LedgerEntry, State
from replicator.runtime import Runtime, open_runtime
from replicator_dev.devstack.faults import FaultTransport, nsid_of, repo_of
from replicator_dev.devstack.seed import SeededUser, create_account, insert_mood
from replicator_dev.devstack.stack import LocalStack

from .conftest import Users, env_for, with_settings
from .harness import clean, diff, eventually, records, running
from .test_ops_metrics import get, serving, value

pytestmark = pytest.mark.anyio
MOOD = "computer.aesthetic.mood"
WRITES = {"com.atproto.repo.putRecord", "com.atproto.repo.applyWrites",
          "com.atproto.repo.deleteRecord"}  # fmt: skip


# -- the PDS as the account's owner and its admin see it ------------------------------------


async def login(pds_url: str, who: SeededUser) -> str:
    async with httpx.AsyncClient(base_url=f"{pds_url}/xrpc/", timeout=30) as http:
        resp = await http.post(
            "com.atproto.server.createSession",
            json={"identifier": who.did, "password": who.password},
        )
        resp.raise_for_status()
        return str(resp.json()["accessJwt"])


async def deactivate(pds_url: str, who: SeededUser) -> None:
    """The account's own token, an empty JSON body (ENVIRONMENT.md, "Account states")."""
    token = await login(pds_url, who)
    async with httpx.AsyncClient(base_url=f"{pds_url}/xrpc/", timeout=30) as http:
        resp = await http.post(
            "com.atproto.server.deactivateAccount",
            json={},
            headers={"authorization": f"Bearer {token}"},
        )
        resp.raise_for_status()


async def activate(pds_url: str, who: SeededUser) -> None:
    """No body at all: the PDS refuses a JSON body, even `{}`, here."""
    token = await login(pds_url, who)  # createSession still works while deactivated
    async with httpx.AsyncClient(base_url=f"{pds_url}/xrpc/", timeout=30) as http:
        resp = await http.post(
            "com.atproto.server.activateAccount", headers={"authorization": f"Bearer {token}"}
        )
        resp.raise_for_status()


async def takedown(stack: LocalStack, did: str, *, applied: bool) -> None:
    assert stack.pds_url and stack.pds_admin_password
    body: dict[str, Any] = {
        "subject": {"$type": "com.atproto.admin.defs#repoRef", "did": did},
        "takedown": {"applied": True, "ref": "issue-12-test"} if applied else {"applied": False},
    }
    async with httpx.AsyncClient(base_url=f"{stack.pds_url}/xrpc/", timeout=30) as http:
        resp = await http.post(
            "com.atproto.admin.updateSubjectStatus",
            json=body,
            auth=("admin", stack.pds_admin_password),
        )
        resp.raise_for_status()


async def repo_status(pds_url: str, did: str) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=30) as http:
        resp = await http.get(f"{pds_url}/xrpc/com.atproto.sync.getRepoStatus", params={"did": did})
        resp.raise_for_status()
        return dict(resp.json())


# -- the replicator's own PDS traffic ----------------------------------------------------------


@asynccontextmanager
async def faulty_runtime(settings: Settings, transport: FaultTransport) -> AsyncIterator[Runtime]:
    async with (
        httpx.AsyncClient(transport=transport, timeout=30) as http,
        open_runtime(settings, http=http) as runtime,
    ):
        yield runtime


@dataclass
class Tap(FaultTransport):
    """Every write the replicator sends and what the PDS answered (status, XRPC error)."""

    writes: list[tuple[str, dict[str, Any], int, str | None]] = field(default_factory=list)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await super().handle_async_request(request)
        if nsid_of(request) in WRITES:
            content = await response.aread()  # kept on the response: the client reads it again
            error = None
            if response.status_code != 200 and content:
                error = orjson.loads(content).get("error")
            body = orjson.loads(request.content)
            self.writes.append((nsid_of(request), body, response.status_code, error))
        return response


# -- what the replicator says ---------------------------------------------------------------


async def cli_json(settings: Settings, *args: str) -> tuple[int, dict[str, Any]]:
    """`replicator <args> --json` as a process, without blocking the event loop (the
    replicator under test runs in it)."""
    done = await anyio.run_process(
        [sys.executable, "-m", "replicator.cli", *args, "--json"],
        env=env_for(settings),
        check=False,
    )
    assert done.returncode in (0, 1), done.stderr.decode()
    return done.returncode, json.loads(done.stdout)


async def entries(rt: Runtime, ids: list[ObjectId]) -> dict[ObjectId, LedgerEntry]:
    return await rt.store.ledger_by_id(ids)


def parked_with(found: dict[ObjectId, LedgerEntry], ids: list[ObjectId], reason: str) -> bool:
    return len(found) == len(ids) and all(
        e.state is State.PARKED and reason in (e.reason or "") for e in found.values()
    )


async def in_sync(rt: Runtime, *people: SeededUser) -> bool:
    for who in people:
        assert who.did is not None
        if not clean(await diff(rt.store, rt.settings.pds_url, who.sub, who.did)):
            return False
    return True


async def exactly(rt: Runtime, who: SeededUser, live: int) -> bool:
    """In sync, and exactly `live` records: no record of a nuked mood left."""
    assert who.did is not None
    return await in_sync(rt, who) and len(await records(rt.settings.pds_url, who.did)) == live


async def converged(rt: Runtime, who: SeededUser, live: int, *, timeout: float) -> float:
    started = time.monotonic()
    await eventually(lambda: exactly(rt, who, live), timeout, f"{who.handle} converged")
    return time.monotonic() - started


async def nothing_parked(rt: Runtime, sub: str) -> bool:
    parked = await rt.store.ledger.count_documents({"user": sub, "state": State.PARKED.value})
    pending = await rt.store.ledger.count_documents({"user": sub, "state": State.PENDING.value})
    return parked == 0 and pending == 0


# -- deactivated, taken down ----------------------------------------------------------------


async def test_deactivated_account_parks_its_user_and_converges_after_activation(
    settings: Settings, rt: Runtime, users: Users
) -> None:
    """Deactivate, then nuke and insert, then activate: the user converges with no manual
    step; `status` and `/metrics` show the parked account by reason meanwhile; the other
    user's moods keep flowing."""
    alice, bob = await users.make(), await users.make()
    assert alice.did and bob.did
    async with (
        serving(settings) as (live, replicator, url, stop),
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(replicator.run, stop)
        await eventually(lambda: _open(replicator), 30, "stream open")
        kept = [await insert_mood(rt.store, alice.sub, f"before {i}") for i in range(4)]
        await eventually(lambda: exactly(rt, alice, 4), 30, "mirrored before")

        await deactivate(settings.pds_url, alice)
        assert (await repo_status(settings.pds_url, alice.did))["status"] == "deactivated"
        # The app's nuke (every mood of the user), then new moods: none of it can be written.
        await rt.store.docs.update_many({"user": alice.sub}, {"$set": {"deleted": True}})
        fresh = [await insert_mood(rt.store, alice.sub, f"while away {i}") for i in range(3)]
        for i in range(2):
            await insert_mood(rt.store, bob.sub, f"bob {i}")
        await eventually(lambda: exactly(rt, bob, 2), 30, "the other user flows")

        reason = "account deactivated on the PDS"

        async def parked() -> bool:
            return parked_with(await entries(rt, kept + fresh), kept + fresh, reason)

        await eventually(parked, 30, "alice's writes parked, deletes included")
        letters = {d["_id"]: d["reason"] async for d in rt.store.dead_letters.find({})}
        assert letters == {str(i): reason for i in kept + fresh}

        _, report = await cli_json(settings, "status")
        assert "parked_accounts" in report, "status does not show parked accounts"
        assert report["parked_accounts"]["by_reason"] == {reason: 1}
        [shown] = report["parked_accounts"]["accounts"]
        assert (shown["did"], shown["user"], shown["reason"]) == (alice.did, alice.sub, reason)
        text = await anyio.run_process(
            [sys.executable, "-m", "replicator.cli", "status"], env=env_for(settings)
        )
        assert f"parked        1 account ({reason} 1)" in text.stdout.decode()

        async def gauge() -> bool:
            text = (await get(f"{url}/metrics")).text
            return value(text, "replicator_parked_accounts", reason="deactivated") == 1

        await eventually(gauge, 10, "replicator_parked_accounts{reason=deactivated} 1")

        # Still parked: bob keeps flowing beside it.
        await insert_mood(rt.store, bob.sub, "bob while alice is away")
        await eventually(lambda: exactly(rt, bob, 3), 30, "the other user still flows")

        await activate(settings.pds_url, alice)
        took = await converged(rt, alice, len(fresh), timeout=60)
        await eventually(lambda: nothing_parked(rt, alice.sub), 10, "nothing parked")
        assert await rt.store.dead_letter_count() == 0
        assert await rt.store.parked.count_documents({}) == 0
        await eventually(lambda: _gauge_is(url, "deactivated", 0), 10, "gauge back to 0")
        stop.set()
    _, report = await cli_json(settings, "status")
    assert report["parked_accounts"] == {"count": 0, "by_reason": {}, "accounts": []}
    values = list((await records(settings.pds_url, alice.did)).values())
    assert sorted(v["mood"] for v in values) == [f"while away {i}" for i in range(3)]
    assert live.pds.requests["com.atproto.sync.getRepoStatus"] >= 1
    print(f"\nconverged {took:.1f}s after activation")


async def test_taken_down_account_parks_its_user_until_reversed(
    stack: LocalStack, rt: Runtime, users: Users
) -> None:
    """A takedown by the PDS admin (`updateSubjectStatus`): a new login answers 401
    `AccountTakedown` (so do the tokens); parked as taken down, converged once reversed. (A
    suspension cannot be made here: the reference PDS's `getRepoStatus` knows only takendown
    and deactivated.)"""
    carol, dave = await users.make(), await users.make()
    assert carol.did and dave.did
    async with running(rt):
        first = [await insert_mood(rt.store, carol.sub, f"before {i}") for i in range(2)]
        await eventually(lambda: exactly(rt, carol, 2), 30, "mirrored before")
        await takedown(stack, carol.did, applied=True)
        assert (await repo_status(rt.settings.pds_url, carol.did))["status"] == "takendown"
        # No session kept either (as after a restart): the next write has to log in, and the
        # login's own 401 `AccountTakedown` parks the account (not "wrong password").
        await rt.store.sessions.delete_many({})
        rt.sessions._cache.clear()
        await rt.store.docs.update_one({"_id": first[0]}, {"$set": {"deleted": True}})
        later = await insert_mood(rt.store, carol.sub, "while taken down")
        await insert_mood(rt.store, dave.sub, "dave flows")
        await eventually(lambda: exactly(rt, dave, 1), 30, "the other user flows")
        reason = "account takendown on the PDS"

        async def parked() -> bool:
            ids = [first[0], later]
            return parked_with(await entries(rt, ids), ids, reason)

        await eventually(parked, 30, "carol's writes parked as taken down")
        parked_accounts = await rt.store.parked_accounts()
        assert [(p.did, p.reason) for p in parked_accounts] == [(carol.did, reason)]
        await anyio.sleep(1.5)  # re-checked at least once while still taken down: stays parked
        assert await rt.store.parked.count_documents({"_id": carol.did, "attempts": {"$gte": 1}})

        assert await rt.store.sessions.find_one({"_id": carol.did}) is None  # no login got in
        await takedown(stack, carol.did, applied=False)
        await converged(rt, carol, 2, timeout=60)
        await eventually(lambda: nothing_parked(rt, carol.sub), 10, "nothing parked")
    assert await rt.store.sessions.find_one({"_id": carol.did})  # logged in once it was back
    assert await rt.store.parked.count_documents({}) == 0
    assert await rt.store.dead_letter_count() == 0


async def test_a_listing_of_a_deactivated_repo_is_not_an_empty_repo(
    rt: Runtime, users: Users
) -> None:
    """What `backfill`, `audit --fix`, a history-loss recovery or a change in `users` do while
    an account is deactivated and the gate has not noticed yet: reconcile the user from the
    listing. The records are hidden, not deleted; the ledger must keep knowing where."""
    who = await users.make()
    assert who.did is not None
    ids = [await insert_mood(rt.store, who.sub, f"m{i}") for i in range(3)]
    await rt.applier.apply_ids(ids)
    assert await exactly(rt, who, 3)
    await deactivate(rt.settings.pds_url, who)
    await rt.store.docs.update_many({"user": who.sub}, {"$set": {"deleted": True}})
    await rt.applier.reconcile_user(who.sub)
    found = await entries(rt, ids)
    assert await rt.store.parked.count_documents({"_id": who.did}) == 1  # the account parked
    await activate(rt.settings.pds_url, who)

    async def swept() -> bool:
        await rt.applier.maintain()  # what the sidecar does between batches
        return await records(rt.settings.pds_url, who.did or "") == {}

    await eventually(swept, 20, "the nuked moods' records deleted once the account is back")
    assert all(e.held or e.state is State.PARKED for e in found.values()), found


# -- users: an account created later, a password fixed, a new DID ------------------------------


async def test_account_created_later_is_mirrored_without_a_backfill(
    rt: Runtime, users: Users
) -> None:
    erin = await users.make(with_account=False)
    async with running(rt):
        ids = [await insert_mood(rt.store, erin.sub, f"before the account {i}") for i in range(3)]

        async def skipped() -> bool:
            found = await entries(rt, ids)
            return len(found) == 3 and all(e.state is State.SKIPPED for e in found.values())

        await eventually(skipped, 30, "recorded as skipped")
        password = secrets.token_urlsafe(12)
        assert users.stack.pds_url
        did = await create_account(
            users.stack.pds_url, erin.handle, password,
            admin_password=users.stack.pds_admin_password,
        )  # fmt: skip
        started = time.monotonic()
        await rt.store.users.update_one(
            {"_id": erin.sub},
            {"$set": {"atproto": {"did": did, "handle": erin.handle, "password": password}}},
        )
        now = SeededUser(erin.sub, erin.handle, did, password)
        await eventually(lambda: exactly(rt, now, 3), 20, "earlier moods mirrored")
        took = time.monotonic() - started
        await insert_mood(rt.store, erin.sub, "after the account")
        await eventually(lambda: exactly(rt, now, 4), 20, "new moods too")
    assert took < 10
    for doc in await rt.store.moods_of_user(erin.sub):
        assert doc["atproto"]["rkey"]
    print(f"\nmirrored {took:.1f}s after the account appeared in users")


async def test_password_fixed_in_users_releases_the_parked_work(rt: Runtime, users: Users) -> None:
    """No `dlq retry`, no restart: the change in `users` is followed, the user reconciled."""
    fay, gus = await users.make(), await users.make()
    assert fay.password
    await rt.store.users.update_one(
        {"_id": fay.sub}, {"$set": {"atproto.password": "wrong-" + fay.password}}
    )
    async with running(rt):
        ids = [await insert_mood(rt.store, fay.sub, f"locked out {i}") for i in range(2)]
        await insert_mood(rt.store, gus.sub, "flows")
        await eventually(lambda: exactly(rt, gus, 1), 30, "the other user flows")

        async def parked() -> bool:
            return parked_with(await entries(rt, ids), ids, "refused the account's password")

        await eventually(parked, 30, "parked on the password")
        retry_at = min(e.retry_at or 0 for e in (await entries(rt, ids)).values())
        await rt.store.users.update_one(
            {"_id": fay.sub}, {"$set": {"atproto.password": fay.password}}
        )
        await eventually(lambda: exactly(rt, fay, 2), 20, "flows once fixed in users")
        # Well before the parked moods' own retry: it was the change in `users`.
        assert time.time() < retry_at
    assert await rt.store.dead_letter_count() == 0
    assert await nothing_parked(rt, fay.sub)


async def test_new_did_gets_the_moods_and_audit_reports_the_old_repo_as_stale(
    rt: Runtime, users: Users
) -> None:
    hal = await users.make()
    assert hal.did
    async with running(rt):
        ids = [await insert_mood(rt.store, hal.sub, f"m{i}") for i in range(3)]
        await eventually(lambda: exactly(rt, hal, 3), 30, "mirrored into the first repo")
        old = await records(rt.settings.pds_url, hal.did)
        # The user gets another account (a new DID): the app rewrites `atproto`.
        handle = f"n{secrets.token_hex(5)}.test"
        password = secrets.token_urlsafe(12)
        assert users.stack.pds_url
        new_did = await create_account(
            users.stack.pds_url, handle, password, admin_password=users.stack.pds_admin_password
        )
        await rt.store.users.update_one(
            {"_id": hal.sub},
            {"$set": {"atproto": {"did": new_did, "handle": handle, "password": password}}},
        )
        moved = SeededUser(hal.sub, handle, new_did, password)
        await eventually(lambda: exactly(rt, moved, 3), 20, "moods written into the new repo")
        await insert_mood(rt.store, hal.sub, "after the new DID")
        await eventually(lambda: exactly(rt, moved, 4), 20, "new moods go to the new repo")
    # The old repo is untouched (no credentials for it any more) and reported.
    assert await records(rt.settings.pds_url, hal.did) == old
    new = await records(rt.settings.pds_url, new_did)
    assert set(old) <= set(new)  # same permalinks
    code, report = await cli_json(rt.settings, "audit")
    assert code == 1
    assert report["divergences"]["stale"] == 3
    stale = [e for e in report["examples"] if e["kind"] == "stale"]
    assert {(e["did"], e["rkey"]) for e in stale} == {(hal.did, rkey) for rkey in old}
    assert {e["mood_id"] for e in stale} == {str(i) for i in ids}
    assert report["divergences"]["missing"] == 0 and report["divergences"]["orphan"] == 0


# -- a DID document that points elsewhere -----------------------------------------------------


@dataclass
class PlcProxy:
    """A PLC directory on loopback that forwards to the dev PLC, and answers, for the DIDs in
    `moved`, a document whose `#atproto_pds` names `endpoint` instead."""

    upstream: str
    endpoint: str = "https://elsewhere.example"
    moved: set[str] = field(default_factory=set)
    served: list[str] = field(default_factory=list)
    url: str = ""

    def answer(self, path: str) -> tuple[int, bytes]:
        did = unquote(path.lstrip("/"))
        self.served.append(did)
        try:
            with urllib.request.urlopen(f"{self.upstream}/{quote(did)}", timeout=10) as up:
                doc = json.load(up)
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()
        if did in self.moved:
            for service in doc.get("service", []):
                if str(service.get("id", "")).endswith("#atproto_pds"):
                    service["serviceEndpoint"] = self.endpoint
        return 200, json.dumps(doc).encode()


@contextmanager
def plc_proxy(upstream: str) -> Iterator[PlcProxy]:
    proxy = PlcProxy(upstream.rstrip("/"))

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            status, body = proxy.answer(self.path)
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1})
    thread.start()
    proxy.url = f"http://127.0.0.1:{server.server_port}"
    try:
        yield proxy
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


async def test_did_document_pointing_elsewhere_parks_the_user(
    stack: LocalStack, settings: Settings, rt: Runtime, users: Users
) -> None:
    """The directory is read beside the writes: an account's first write goes where `users`
    says (PDS_URL) while its document is being fetched; once the document names another PDS,
    the account's writes are parked, and released when it names ours again."""
    ivy, jon = await users.make(), await users.make()
    assert ivy.did and jon.did and stack.plc_url
    with plc_proxy(stack.plc_url) as plc:
        plc.moved.add(ivy.did)
        tap = Tap()
        async with (
            faulty_runtime(with_settings(settings, plc_url=plc.url), tap) as own,
            running(own),
        ):
            assert own.directory is not None
            directory = own.directory
            for i in range(2):
                await insert_mood(rt.store, jon.sub, f"jon {i}")
            await eventually(lambda: exactly(rt, jon, 2), 30, "the other user flows")
            directory.endpoint(ivy.did)  # as the first write of ivy would: a fetch is asked

            async def known() -> bool:
                return directory.endpoint(ivy.did) == plc.endpoint

            await eventually(known, 30, "ivy's document fetched beside the writes")
            ids = [await insert_mood(rt.store, ivy.sub, f"ivy {i}") for i in range(2)]
            reason = "account moved to elsewhere.example"

            async def parked() -> bool:
                return parked_with(await entries(rt, ids), ids, reason)

            await eventually(parked, 30, "parked as moved")
            assert await records(settings.pds_url, ivy.did) == {}  # nothing sent to our PDS
            assert [w for w in tap.writes if w[1]["repo"] == ivy.did] == []  # nothing tried
            assert {w[1]["repo"] for w in tap.writes} == {jon.did}
            _, report = await cli_json(settings, "status")
            assert report.get("parked_accounts", {}).get("by_reason") == {reason: 1}
            assert {ivy.did, jon.did} <= set(plc.served)

            # The document names our PDS again: re-checked, released, reconciled.
            plc.moved.clear()
            await converged(own, ivy, 2, timeout=60)
            await eventually(lambda: nothing_parked(rt, ivy.sub), 10, "nothing parked")
        assert await rt.store.parked.count_documents({}) == 0


# -- one account's PDS answering 503 forever ---------------------------------------------------


@dataclass
class Outage:
    """Every write of `did` answered 503 while `on`: a rule with no count."""

    did: str
    on: bool = True
    answered: int = 0

    def __call__(self, request: httpx.Request) -> httpx.Response | None:
        if not self.on or nsid_of(request) not in WRITES or repo_of(request) != self.did:
            return None
        self.answered += 1
        return httpx.Response(503, json={"error": "InternalServerError", "message": "injected"})


async def test_a_pds_503ing_one_account_delays_the_others_by_at_most_the_lane_deadline(
    settings: Settings, rt: Runtime, users: Users
) -> None:
    deadline = 3.0
    stuck, *others = [await users.make() for _ in range(4)]
    assert stuck.did
    outage = Outage(stuck.did)
    transport = FaultTransport(rules=[outage])
    own_settings = with_settings(settings, lane_deadline=deadline)
    inserted: dict[ObjectId, float] = {}
    seen: dict[str, float] = {}

    async def watch(stop: anyio.Event) -> None:
        while not stop.is_set():
            for who in others:
                for value_ in (await records(settings.pds_url, who.did or "")).values():
                    seen.setdefault(value_["ref"], time.monotonic())
            await anyio.sleep(0.1)

    async with faulty_runtime(own_settings, transport) as own, running(own) as replicator:
        done = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(watch, done)
            stuck_ids = []
            for round_ in range(4):  # the stuck user and the others in the same batches
                stuck_ids.append(await insert_mood(rt.store, stuck.sub, f"stuck {round_}"))
                for who in others:
                    mood_id = await insert_mood(rt.store, who.sub, f"round {round_}")
                    inserted[mood_id] = time.monotonic()
                await anyio.sleep(1.0)

            async def all_seen() -> bool:
                return all(str(i) in seen for i in inserted)

            await eventually(all_seen, 4 * (deadline + 5), "the others' records")
            done.set()
        delays = {i: seen[str(i)] - t for i, t in inserted.items()}
        worst = max(delays.values())
        assert worst <= deadline + 5, f"another user waited {worst:.1f}s (deadline {deadline}s)"

        why = f"PDS did not take this account's writes within {deadline:.0f}s"

        async def parked() -> bool:
            return parked_with(await entries(rt, stuck_ids), stuck_ids, why)

        await eventually(parked, 4 * (deadline + 5), "the stuck user's moods parked")
        parked_at = time.time()
        assert await records(settings.pds_url, stuck.did) == {}
        assert outage.answered >= 4
        # The checkpoint moved on past the parked work: caught up, saved after the parking.
        await eventually(lambda: _idle(replicator), 10, "caught up")

        async def saved_after() -> bool:
            doc = await rt.store.load_checkpoint()
            return doc is not None and float(doc["saved_at"]) > parked_at

        await eventually(saved_after, 10, "checkpoint saved after the parking")
        # The PDS takes the account's writes again: the parked work is retried (backoff).
        outage.on = False
        took = await converged(own, stuck, 4, timeout=60)
        await eventually(lambda: nothing_parked(rt, stuck.sub), 10, "nothing parked")
    assert await rt.store.dead_letter_count() == 0
    print(
        f"\nothers waited at most {worst:.1f}s (lane deadline {deadline:.0f}s); "
        f"stuck user converged {took:.1f}s after the PDS recovered"
    )


# -- a record someone else changed --------------------------------------------------------------


async def put_directly(pds_url: str, who: SeededUser, rkey: str, record: dict[str, Any]) -> str:
    """Someone else (the app's old writer, a client with the password) writes the record."""
    token = await login(pds_url, who)
    async with httpx.AsyncClient(base_url=f"{pds_url}/xrpc/", timeout=30) as http:
        resp = await http.post(
            "com.atproto.repo.putRecord",
            json={"repo": who.did, "collection": MOOD, "rkey": rkey, "record": record},
            headers={"authorization": f"Bearer {token}"},
        )
        resp.raise_for_status()
        return str(resp.json()["cid"])


class ReplanFailed(AssertionError):
    """The write planned from the re-read listing failed too."""


@pytest.mark.parametrize(
    "foreign",
    [
        "edited elsewhere",
        "another mood's record",
    ],
)
async def test_record_changed_elsewhere_fails_the_swap_and_is_reread(
    settings: Settings, rt: Runtime, users: Users, foreign: str
) -> None:
    who = await users.make()
    assert who.did
    tap = Tap()
    async with faulty_runtime(settings, tap) as own, running(own):
        mood_id = await insert_mood(rt.store, who.sub, "v1", when=datetime(2025, 1, 2, tzinfo=UTC))
        await eventually(lambda: exactly(rt, who, 1), 30, "mirrored")
        entry = (await entries(rt, [mood_id]))[mood_id]
        assert entry.state is State.PRESENT and entry.rkey and entry.cid
        [(rkey, record)] = (await records(settings.pds_url, who.did)).items()
        if foreign == "edited elsewhere":
            other = {**record, "mood": "changed behind the replicator's back"}
        else:  # someone else's record squats the permalink
            other = {**record, "mood": "not this mood", "ref": str(ObjectId())}
        foreign_cid = await put_directly(settings.pds_url, who, rkey, other)
        listed = own.pds.requests["com.atproto.repo.listRecords"]
        tap.writes.clear()

        await rt.store.docs.update_one({"_id": mood_id}, {"$set": {"mood": "v2"}})

        async def desired() -> bool:
            have = await records(settings.pds_url, who.did or "")
            now = (await entries(rt, [mood_id]))[mood_id]
            return have.get(rkey, {}).get("mood") == "v2" and now.state is State.PRESENT

        await eventually(desired, 30, "the desired content wins")
    first = tap.writes[0]
    assert first[0] == "com.atproto.repo.putRecord"  # one write: a single call, with a swap
    assert first[1]["swapRecord"] == entry.cid
    assert (first[2], first[3]) == (400, "InvalidSwap")
    assert own.pds.requests["com.atproto.repo.listRecords"] > listed  # re-read: full listing
    assert await exactly(rt, who, 1)
    final = (await entries(rt, [mood_id]))[mood_id]
    assert final.rkey == rkey and final.state is State.PRESENT
    async with httpx.AsyncClient(timeout=30) as http:
        got = await http.get(
            f"{settings.pds_url}/xrpc/com.atproto.repo.getRecord",
            params={"repo": who.did, "collection": MOOD, "rkey": rkey},
        )
    assert final.cid == got.json()["cid"] != foreign_cid
    assert await rt.store.dead_letter_count() == 0
    sent = [(w[0].rsplit(".", 1)[-1], w[1].get("swapRecord", "-"), w[2], w[3]) for w in tap.writes]
    print(f"\n{foreign}: writes (nsid, swapRecord, status, error) {sent}")
    # Re-planned from the listing, the next write swaps against what it just read, and wins.
    second = tap.writes[1]
    if (second[1].get("swapRecord"), second[2]) != (foreign_cid, 200):
        raise ReplanFailed(f"the write after the re-read was {sent[1]}")
    assert len(tap.writes) == 2


async def _open(replicator: Any) -> bool:
    return bool(replicator.stream_open)


async def _idle(replicator: Any) -> bool:
    return bool(replicator.idle)


async def _gauge_is(url: str, reason: str, expected: float) -> bool:
    text = (await get(f"{url}/metrics")).text
    return value(text, "replicator_parked_accounts", reason=reason) == expected


async def test_an_app_password_in_users_is_enough(rt: Runtime, users: Users) -> None:
    """`atproto.password` may be an app password (Settings → App passwords, or
    `createAppPassword`): it logs in and writes records, creates, edits and deletes alike."""
    hal = await users.make()
    assert hal.did and hal.password
    async with httpx.AsyncClient(base_url=f"{rt.settings.pds_url}/xrpc/") as http:
        login = await http.post("com.atproto.server.createSession",
                                json={"identifier": hal.did, "password": hal.password})  # fmt: skip
        made = await http.post(
            "com.atproto.server.createAppPassword", json={"name": "moods-replicator"},
            headers={"authorization": f"Bearer {login.json()['accessJwt']}"},
        )  # fmt: skip
        made.raise_for_status()
    app_password = made.json()["password"]
    await rt.store.users.update_one({"_id": hal.sub}, {"$set": {"atproto.password": app_password}})
    async with running(rt):
        mood = await insert_mood(rt.store, hal.sub, "written with an app password")
        await eventually(lambda: exactly(rt, hal, 1), 30, "created")
        await rt.store.docs.update_one({"_id": mood}, {"$set": {"mood": "and edited"}})

        async def edited() -> bool:
            got = await records(rt.settings.pds_url, hal.did or "")
            return [r["mood"] for r in got.values()] == ["and edited"]

        await eventually(edited, 30, "edited")
        await rt.store.docs.update_one({"_id": mood}, {"$set": {"deleted": True}})
        await eventually(lambda: exactly(rt, hal, 0), 30, "deleted")
    assert await rt.store.dead_letter_count() == 0
