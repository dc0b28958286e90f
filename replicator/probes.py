"""The I/O side of `replicator check`: try each thing `replicator run` will do, and hand what
was seen to `replicator.preflight`, which judges it.

Privileges are tried, not read from the user's roles: roles can be inherited, custom, or
scoped to collections, and only the server knows what they add up to. Every operation is one
the replicator itself performs, on the same collections, with the same options (the change
streams are opened through `Store.watch_docs` / `Store.watch_users`), and none changes the
app's data: the update on `moods` matches nothing, the write probe goes to a collection of
its own (`replicator_preflight`), the only thing created is the `moods.user` index that
`run` would create at start anyway, and a session obtained for a sampled account is saved
where `run` will reuse it (no extra login later).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Literal

import httpx
from bson import ObjectId
from pymongo.errors import ConnectionFailure, OperationFailure, PyMongoError

from . import preflight as judge
from .config import Settings
from .errors import AuthFailed, PdsError
from .identity import Directory, Unreachable
from .lexicon import SCHEMA_NSID, LexiconError, load_lexicons, schema_record
from .logs import redact, redact_uri
from .pds import Pds
from .preflight import Result
from .recordtypes import enabled
from .sessions import SessionPool
from .store import Store, account_from_user, connect, mongo_problem, unreachable

# A preflight gives up on a PDS that stays unreachable; the sidecar would retry for ever.
PDS_TIMEOUT = 10.0
DIRECTORY_TIMEOUT = 5.0
PROBE_COLLECTION = "preflight"  # after the replicator's prefix: `replicator_preflight`


def mongo_error(exc: BaseException) -> str:
    """A MongoDB error as one short line: the server's code name and message, without the
    driver's dump of the whole reply."""
    if isinstance(exc, OperationFailure):
        details = exc.details or {}
        code = details.get("codeName") or exc.code
        return redact(f"{code}: {details.get('errmsg') or exc}")
    if isinstance(exc, ConnectionFailure):
        return redact(unreachable(exc))
    return redact(f"{type(exc).__name__}: {str(exc).split(', Timeout:')[0]}")


def pds_error(exc: PdsError) -> str:
    if isinstance(exc, AuthFailed):
        return f"the PDS refused its credentials ({exc.error or exc.status})"
    what = exc.error or (f"HTTP {exc.status}" if exc.status else "no answer")
    return redact(f"{what}{f': {exc.message}' if exc.message else ''}")


def _grant(action: str, where: str) -> str:
    return f"grant {action} on {where} to the replicator's MongoDB user (role: docs/deploy.md)"


async def run_checks(
    settings: Settings,
    *,
    sample_accounts: int = 3,
    outage_hours: float = judge.DEFAULT_OUTAGE_HOURS,
    lexicon_identifier: str | None = None,
    lexicon_dir: Path | None = None,
) -> list[Result]:
    """Every check, in the order an operator fixes things: MongoDB, then the PDS."""
    results: list[Result] = []
    try:
        client = connect(settings.mongodb_uri)
    except PyMongoError as exc:  # a URI the driver refuses, an SRV name that does not resolve
        raise mongo_problem(exc, settings.mongodb_uri) or exc from None
    pds = Pds(settings.pds_url, timeout=PDS_TIMEOUT, retry_timeout=PDS_TIMEOUT,
              bypass_key=settings.rate_limit_bypass_key)  # fmt: skip
    try:
        store = Store(
            client, settings.db_name, settings.names, rtypes=enabled(settings.record_types)
        )
        reached, answered = await check_mongo(store, settings.mongodb_uri)
        results += reached
        if answered:  # a standalone server too: what it refuses besides streams is worth seeing
            results += await check_privileges(store, create_index=settings.create_indexes)
            results.append(await check_oplog(store, outage_hours))
        pds_result = await check_pds(pds)
        results.append(pds_result)
        if answered:
            results.append(await check_directory(store, settings.plc_url, settings.pds_url))
        if pds_result.status != "fail":
            if answered:
                results.append(await check_accounts(store, pds, sample_accounts))
            results.append(await check_lexicons(pds, lexicon_identifier, lexicon_dir))
    finally:
        await pds.aclose()
        await client.close()
    return results


# -- MongoDB ------------------------------------------------------------------------------------


async def check_mongo(store: Store, uri: str) -> tuple[list[Result], bool]:
    """Reachable, a replica set, and its clock: one `hello`. True if the server answered."""
    sent = time.time()
    try:
        hello = await store.client.admin.command("hello")
    except PyMongoError as exc:
        return [
            judge.fail(
                "mongodb",
                f"{redact_uri(uri)}: {mongo_error(exc)} (the other MongoDB checks did not run)",
                "check MONGODB_CONNECTION_STRING / --mongodb-uri: host, port, user and password, "
                "TLS, and that this host may connect (Atlas: the IP access list)",
            )
        ], False
    received = time.time()
    results = [judge.judge_replica_set(hello)]
    local_time = hello.get("localTime")
    if local_time is not None:
        results.append(judge.judge_clock(local_time.timestamp(), sent, received))
    return results, True


async def _attempt(
    name: str, op: Callable[[], Awaitable[Any]], fix: str, done: str = "granted"
) -> Result:
    try:
        await op()
    except PyMongoError as exc:
        return judge.judge_privilege(name, mongo_error(exc), fix)
    return judge.judge_privilege(name, None, fix, done)


async def check_privileges(store: Store, *, create_index: bool = True) -> list[Result]:
    """Each privilege `run` needs, by doing what `run` does."""
    db, names = store.db.name, store.names

    async def watch_docs() -> None:
        await (await store.watch_docs(None, max_await_ms=100, batch_size=1)).close()

    async def watch_users() -> None:
        await (await store.watch_users(None, max_await_ms=100)).close()

    views = store.views
    watched = ", ".join(v.collection for v in views)
    where = f"{db}.{views[0].collection}" if len(views) == 1 else f"the database {db}"
    results = [
        await _attempt(
            f"changeStream {watched}", watch_docs, _grant("changeStream and find", where)
        ),
        await _attempt(
            f"changeStream {names.users}",
            watch_users,
            _grant("changeStream and find", f"{db}.{names.users}"),
        ),
    ]
    for coll in (*(v.docs for v in views), store.users, store.handles):

        async def find_one(c: Any = coll) -> None:
            await c.find_one({}, {"_id": 1})

        results.append(
            await _attempt(f"find {coll.name}", find_one, _grant("find", f"{db}.{coll.name}"))
        )
    for view in views:
        results += await _check_type(view, create_index=create_index)
    results.append(await check_own_collections(store))
    return results


async def _check_type(view: Store, *, create_index: bool) -> list[Result]:
    """The write-back, the owner index and pre-images of one type's collection."""
    db, name, back = view.db.name, view.collection, view.rtype.write_back
    results: list[Result] = []

    async def update_nothing() -> None:
        # Matches nothing (a fresh ObjectId), and still needs the update privilege.
        await view.docs.update_one({"_id": ObjectId()}, {"$set": {f"{back}.rkey": "-"}})

    listing: Result | None = None
    options: dict[str, Any] | None = None
    try:
        options = await collection_options(view)
    except PyMongoError as exc:
        fix = _grant("listCollections", f"the database {db}")
        listing = judge.fail("pre-images", f"cannot list collections: {mongo_error(exc)}", fix)
    update = f"update {name}"
    if listing is None and options is None:
        # No write is aimed at a collection that does not exist (as in `ensure_indexes`): a
        # server may create the collection for it, where one was dropped or renamed away.
        results.append(judge.warn(update, f"not checked: {name} does not exist"))
    else:
        results.append(
            await _attempt(
                update,
                update_nothing,
                _grant("update", f"{db}.{name}") + f" (the {back}.rkey write-back)",
            )
        )
    if listing is not None:
        results.append(listing)
    else:
        results.append(await check_index(view, exists=options is not None, create=create_index))
        results.append(judge.judge_preimages(options, name))
    return results


async def collection_options(store: Store) -> dict[str, Any] | None:
    """The type's collection's options from listCollections; None when it does not exist."""
    cursor = await store.db.list_collections(filter={"name": store.collection})
    async for info in cursor:
        return dict(info.get("options") or {})
    return None


async def check_index(store: Store, *, exists: bool, create: bool = True) -> Result:
    """Present (any index led by the owner field), else created as `Store.ensure_indexes`
    does; with `--no-create-indexes`, a warning with the command instead, as `run` gives."""
    moods, owner = store.collection, store.rtype.owner
    if not exists:
        return judge.judge_index(False, False, f"{moods} does not exist", moods)
    try:
        present = await store.has_index(moods, [owner])
    except PyMongoError as exc:
        return judge.fail(
            f"index {moods}.{owner}",
            f"cannot list indexes: {mongo_error(exc)}",
            _grant("listIndexes", f"{store.db.name}.{moods}"),
        )
    if present:
        return judge.judge_index(True, False, None, moods)
    if not create:
        return judge.judge_index(False, False, None, moods)
    try:
        await store.docs.create_index(owner)
    except PyMongoError as exc:
        return judge.judge_index(False, False, mongo_error(exc), moods)
    return judge.judge_index(False, True, None, moods)


async def check_own_collections(store: Store) -> Result:
    """Insert, update, read, index and delete a probe document in `replicator_preflight`."""
    coll = store.db[f"{store.names.prefix}{PROBE_COLLECTION}"]
    probe = f"probe:{secrets.token_hex(6)}"
    name = f"readWrite {store.names.prefix}*"
    steps: list[tuple[str, Callable[[], Awaitable[Any]]]] = [
        ("insert", lambda: coll.insert_one({"_id": probe, "at": time.time()})),
        ("update", lambda: coll.update_one({"_id": probe}, {"$set": {"at": time.time()}})),
        ("find", lambda: coll.find_one({"_id": probe})),
        ("createIndex", lambda: coll.create_index("at")),
        ("remove", lambda: coll.delete_one({"_id": probe})),
    ]
    for action, step in steps:
        try:
            await step()
        except PyMongoError as exc:
            return judge.fail(
                name,
                f"{action} in {coll.name}: {mongo_error(exc)}",
                _grant(
                    "find, insert, update, remove and createIndex",
                    f"each {store.names.prefix}* collection",
                ),
            )
    return judge.ok(name, f"insert, update, find, createIndex and remove in {coll.name}")


async def check_oplog(store: Store, outage_hours: float) -> Result:
    """The oplog's first entry against the checkpoint's time."""
    now = time.time()
    try:
        first = await store.client.local["oplog.rs"].find_one({}, {"ts": 1}, sort=[("$natural", 1)])
        checkpoint = await store.load_checkpoint()
    except PyMongoError as exc:
        return judge.judge_oplog(None, now, None, "", outage_hours, error=mongo_error(exc))
    first_at = float(first["ts"].time) if first and "ts" in first else None
    checkpoint_at, source = None, ""
    if checkpoint is not None:
        checkpoint_at = judge.token_time(checkpoint.get("token"))
        source = "its resume token's time"
        if checkpoint_at is None and isinstance(checkpoint.get("saved_at"), int | float):
            # A token whose format we cannot read: the time it was saved is close (the idle
            # token is saved every heartbeat) and errs late by at most the replicator's lag.
            checkpoint_at, source = float(checkpoint["saved_at"]), "the time it was saved"
    return judge.judge_oplog(first_at, now, checkpoint_at, source, outage_hours)


# -- the PDS ------------------------------------------------------------------------------------


async def check_pds(pds: Pds) -> Result:
    try:
        health = await pds.health()
    except PdsError as exc:
        error = f"{pds_error(exc)} (accounts and lexicon not checked)"
        return judge.judge_pds(None, error, pds.base_url)
    return judge.judge_pds(health, None, pds.base_url)


async def check_directory(store: Store, plc_url: str, pds_url: str) -> Result:
    """The DID document of one account with a did:plc, fetched as `run` fetches it."""
    try:
        doc = await store.users.find_one(
            {"atproto.did": {"$regex": "^did:plc:"}}, {"atproto.did": 1}
        )
    except PyMongoError as exc:
        return judge.judge_directory(plc_url, pds_url, None, None, mongo_error(exc))
    if doc is None:
        return judge.judge_directory(plc_url, pds_url, None, None, None)
    did = str(doc["atproto"]["did"])
    async with httpx.AsyncClient() as http:
        try:
            endpoint = await Directory(http, plc_url, timeout=DIRECTORY_TIMEOUT).fetch(did)
        except Unreachable as exc:
            return judge.judge_directory(plc_url, pds_url, did, None, str(exc))
    return judge.judge_directory(plc_url, pds_url, did, endpoint, None)


async def check_accounts(store: Store, pds: Pds, sample: int) -> Result:
    """A few accounts get a session the way `run` gets one: the stored one, refreshed if it
    is rejected, or a login (`SessionPool`); `getSession` proves it works."""
    if sample == 0:
        return judge.judge_accounts([], 0)
    try:
        cursor = await store.users.aggregate(
            [
                {
                    "$match": {
                        "atproto.did": {"$regex": "^did:"},
                        "atproto.password": {"$type": "string", "$ne": ""},
                    }
                },
                {"$sample": {"size": sample}},
            ]
        )
        docs = [d async for d in cursor]
    except PyMongoError as exc:
        return judge.fail(
            "accounts",
            f"cannot read {store.names.users}: {mongo_error(exc)}",
            _grant("find", f"{store.db.name}.{store.names.users}"),
        )
    pool = SessionPool(pds, store)
    sampled: list[tuple[str, str | None]] = []
    for doc in docs:
        account = account_from_user(doc)
        if account is None:
            continue
        label = account.handle or account.did
        try:
            out = await pool.call(
                account, lambda token: pds.xrpc("com.atproto.server.getSession", token=token)
            )
            error = None if out.get("did") == account.did else "the session is another DID's"
        except PdsError as exc:
            error = pds_error(exc)
        except PyMongoError as exc:
            error = f"sessions in {store.names.sessions}: {mongo_error(exc)}"
        sampled.append((label, error))
    return judge.judge_accounts(sampled, sample)


async def check_lexicons(pds: Pds, identifier: str | None, lexicon_dir: Path | None) -> Result:
    """Each lexicon's schema record in the authority's repo, against lexicons/."""
    if not identifier:
        return judge.judge_lexicons({}, None)
    compared: dict[str, Literal["same", "differs", "missing"]] = {}
    try:
        for doc in load_lexicons(lexicon_dir):
            nsid = str(doc["id"])
            current = await pds.get_record(identifier, SCHEMA_NSID, nsid)
            if current is None:
                compared[nsid] = "missing"
            else:
                compared[nsid] = "same" if current == schema_record(doc) else "differs"
    except PdsError as exc:
        return judge.judge_lexicons(compared, identifier, pds_error(exc))
    except (OSError, LexiconError) as exc:
        return judge.judge_lexicons(compared, identifier, f"cannot load lexicons: {exc}")
    return judge.judge_lexicons(compared, identifier)
