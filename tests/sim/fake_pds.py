"""An in-memory PDS behind an `httpx.MockTransport`, so the real `Pds`, `SessionPool` and
`RepoWriter` run over it unchanged.

Its answers are the reference PDS's (`@atproto/pds`, checked against the local stack's one):

- `putRecord`: a record identical to the current one is a no-op that ignores `swapRecord`;
  `swapRecord: null` on an existing record, or a CID on a missing record or one that differs,
  is 400 `InvalidSwap`.
- `deleteRecord`: a missing record is a no-op success (even with a `swapRecord` CID); a CID
  that differs from an existing record's is 400 `InvalidSwap`.
- `applyWrites`: atomic; its operations apply in order, and a `#create` of an existing record
  or an `#update`/`#delete` of a missing one fails the whole batch. The reference PDS answers
  that with **HTTP 500** `InternalServerError` (its MST throws a plain Error), not a 400.
- `listRecords`: newest rkey first, at most 100 a page, and a `cursor` (the page's last rkey)
  on every page that has records, the last one included.
- `createSession` / `refreshSession`: access tokens expire (a world option) with 400
  `ExpiredToken`; refresh tokens are single-use; more than 30 logins of one account in five
  minutes is a 429.
- `getRepoStatus`: `{did, active, rev}`.
- An account deleted by the admin (`delete_account`, as `com.atproto.admin.deleteAccount`):
  its repo and records are gone; `listRecords` answers 400 "Could not find repo", a write
  with a token issued before 403 `AccountNotFound`,
  `getRepoStatus` 400 `RepoNotFound`, `createSession` 401 (no such identifier).
- A password changed by the admin (`change_password`) revokes the account's refresh tokens,
  as the reference PDS does; `revoke_sessions` drops its access tokens too (sessions that
  expired while nobody used them).

CIDs are a hash of the canonical record bytes. Every applied record change goes to `log` with
its step number and to `on_change`, where the safety check watches them as they happen.
Transient faults (a world option): a request dropped before it arrives, a 502 before the
write, or a 502 after it (committed, but the answer lost).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx
import orjson

from replicator.desired import record_cid

from .scheduler import Process, Scheduler

COLLECTION = "computer.aesthetic.mood"
COLLECTIONS = frozenset({COLLECTION, "computer.aesthetic.news"})  # the record types mirrored
REFUSED = "⛔"  # a content policy: this PDS refuses, for good, a record whose text holds it
Record = dict[str, Any]
Fault = Literal["drop", "502", "502-applied"]
LOGIN_WINDOW = 300.0
LOGINS_PER_WINDOW = 30


class XrpcFail(Exception):
    """An XRPC error answer; `cause` is what the server logged (not sent), for the step log."""

    def __init__(self, status: int, error: str, message: str = "", cause: str = "") -> None:
        super().__init__(f"{status} {error}: {message}")
        self.status, self.error, self.message, self.cause = status, error, message, cause


def cid_of(record: Record) -> str:
    """The CID the reference PDS gives a record (dag-cbor, sha2-256)."""
    return record_cid(record)


@dataclass
class Repo:
    did: str
    handle: str
    password: str
    active: bool = True
    records: dict[str, dict[str, tuple[str, Record]]] = field(default_factory=dict)
    rev: int = 0

    def collection(self, name: str = COLLECTION) -> dict[str, tuple[str, Record]]:
        return self.records.setdefault(name, {})


@dataclass(frozen=True)
class Applied:
    """One record change the PDS committed."""

    step: int
    did: str
    action: Literal["create", "update", "delete"]
    rkey: str
    ref: str | None
    cid: str | None
    collection: str = COLLECTION


@dataclass
class PdsState:
    """What survives every process: accounts, repos, sessions, the log of applied writes."""

    url: str = "https://pds.sim.test"
    token_ttl: float | None = None
    fault_rate: float = 0.0
    repos: dict[str, Repo] = field(default_factory=dict)
    access: dict[str, tuple[str, float]] = field(default_factory=dict)  # token → (did, expiry)
    refresh: dict[str, str] = field(default_factory=dict)  # live refresh token → did
    logins: dict[str, list[float]] = field(default_factory=dict)
    log: list[Applied] = field(default_factory=list)
    on_change: Callable[[Applied, Record | None], None] | None = None
    _serial: int = 0

    def create_account(self, did: str, handle: str, password: str) -> Repo:
        repo = Repo(did, handle, password)
        self.repos[did] = repo
        return repo

    # -- what the admin (the app, an operator) does --------------------------------------------

    def delete_account(self, did: str) -> None:
        """Access tokens are JWTs: they still verify, and a write then finds no account."""
        self.repos.pop(did, None)
        self.refresh = {t: d for t, d in self.refresh.items() if d != did}

    def change_password(self, did: str, password: str) -> None:
        self.repos[did].password = password
        self.refresh = {t: d for t, d in self.refresh.items() if d != did}

    def revoke_sessions(self, did: str) -> None:
        self.refresh = {t: d for t, d in self.refresh.items() if d != did}
        self.access = {t: v for t, v in self.access.items() if v[0] != did}

    def _mint(self, kind: str) -> str:
        self._serial += 1
        return f"{kind}-{self._serial:06d}"

    # -- auth --------------------------------------------------------------------------------

    def _session(self, repo: Repo, now: float) -> dict[str, Any]:
        access, refresh = self._mint("access"), self._mint("refresh")
        expiry = now + self.token_ttl if self.token_ttl is not None else float("inf")
        self.access[access] = (repo.did, expiry)
        self.refresh[refresh] = repo.did
        return {"accessJwt": access, "refreshJwt": refresh, "did": repo.did,
                "handle": repo.handle, "active": repo.active}  # fmt: skip

    def create_session(self, body: dict[str, Any], now: float) -> dict[str, Any]:
        ident, password = body.get("identifier"), body.get("password")
        repo = self.repos.get(str(ident)) or next(
            (r for r in self.repos.values() if r.handle == ident), None
        )
        if repo is None or repo.password != password:
            raise XrpcFail(401, "AuthenticationRequired", "Invalid identifier or password")
        recent = [t for t in self.logins.get(repo.did, []) if t > now - LOGIN_WINDOW]
        if len(recent) >= LOGINS_PER_WINDOW:
            raise XrpcFail(429, "RateLimitExceeded", "Rate Limit Exceeded")
        self.logins[repo.did] = [*recent, now]
        return self._session(repo, now)

    def refresh_session(self, bearer: str | None, now: float) -> dict[str, Any]:
        did = self.refresh.pop(bearer or "", None)
        if did is None or did not in self.repos:
            raise XrpcFail(400, "ExpiredToken", "Token has been revoked")
        return self._session(self.repos[did], now)

    def authed(self, bearer: str | None, repo_did: Any, now: float) -> Repo:
        did, expiry = self.access.get(bearer or "", (None, 0.0))
        if did is None:
            raise XrpcFail(401, "AuthenticationRequired", "Invalid token")
        if now >= expiry:
            raise XrpcFail(400, "ExpiredToken", "Token has expired")
        repo = self.repos.get(str(repo_did))
        if repo is None and did == repo_did:
            raise XrpcFail(403, "AccountNotFound", "Account not found")
        if repo is None:
            raise XrpcFail(400, "InvalidRequest", f"Could not find repo: {repo_did}")
        if repo.did != did:
            raise XrpcFail(403, "AuthRequired", "repo does not match the session")
        if not repo.active:
            raise XrpcFail(400, "AccountDeactivated", "Account is deactivated")
        return repo

    # -- writes ------------------------------------------------------------------------------

    def _commit(
        self, repo: Repo, step: int, changes: list[tuple[str, str, str, Record | None]]
    ) -> None:
        """Apply (action, collection, rkey, record) in order, in one commit; the log and the
        monitor see each change."""
        repo.rev += 1
        for _action, name, rkey, record in changes:
            coll = repo.collection(name)
            before = coll.get(rkey)
            if record is None:
                del coll[rkey]
                ref = _ref(before[1]) if before else None
                applied = Applied(step, repo.did, "delete", rkey, ref, None, name)
            else:
                cid = cid_of(record)
                coll[rkey] = (cid, record)
                kind: Literal["create", "update"] = "update" if before else "create"
                applied = Applied(step, repo.did, kind, rkey, _ref(record), cid, name)
            self.log.append(applied)
            if self.on_change is not None:
                self.on_change(applied, record)

    def put_record(self, repo: Repo, body: dict[str, Any], step: int) -> dict[str, Any]:
        rkey, record, name = str(body["rkey"]), dict(body["record"]), str(body.get("collection"))
        _check_collection(name, record)
        current = repo.collection(name).get(rkey)
        cid = cid_of(record)
        uri = f"at://{repo.did}/{name}/{rkey}"
        if current is not None and current[0] == cid:
            return {"uri": uri, "cid": cid, "validationStatus": "unknown"}  # no-op, swap ignored
        if "swapRecord" in body:
            swap = body["swapRecord"]
            if (swap is None and current is not None) or (
                swap is not None and (current is None or current[0] != swap)
            ):
                was = current[0] if current else "null"
                raise XrpcFail(400, "InvalidSwap", f"Record was at {was}")
        self._commit(repo, step, [("put", name, rkey, record)])
        commit = {"cid": f"commit-{repo.rev}", "rev": str(repo.rev)}
        return {"uri": uri, "cid": cid, "commit": commit, "validationStatus": "unknown"}

    def delete_record(self, repo: Repo, body: dict[str, Any], step: int) -> dict[str, Any]:
        rkey, name = str(body["rkey"]), str(body.get("collection"))
        current = repo.collection(name).get(rkey)
        if current is None:
            return {}  # no-op, whatever the swap says
        swap = body.get("swapRecord")
        if swap and swap != current[0]:
            raise XrpcFail(400, "InvalidSwap", f"Record was at {current[0]}")
        self._commit(repo, step, [("delete", name, rkey, None)])
        return {"commit": {"cid": f"commit-{repo.rev}", "rev": str(repo.rev)}}

    def apply_writes(self, repo: Repo, body: dict[str, Any], step: int) -> dict[str, Any]:
        writes = list(body.get("writes") or [])
        if len(writes) > 200:
            raise XrpcFail(400, "InvalidRequest", "Too many writes. Max: 200")
        present = {(name, rkey) for name in COLLECTIONS for rkey in repo.collection(name)}
        changes: list[tuple[str, str, str, Record | None]] = []
        results: list[dict[str, Any]] = []
        for op in writes:
            kind = str(op.get("$type", "")).rsplit("#", 1)[-1]
            rkey, name = str(op["rkey"]), str(op.get("collection"))
            if kind in ("create", "update"):
                record = dict(op["value"])
                _check_collection(name, record)
                if (kind == "create") == ((name, rkey) in present):
                    why = "already a value" if kind == "create" else "could not find a record"
                    raise XrpcFail(500, "InternalServerError", "Internal Server Error", why)
                present.add((name, rkey))
                changes.append(("put", name, rkey, record))
                results.append({"$type": f"com.atproto.repo.applyWrites#{kind}Result",
                                "uri": f"at://{repo.did}/{name}/{rkey}",
                                "cid": cid_of(record), "validationStatus": "unknown"})  # fmt: skip
            elif kind == "delete":
                if (name, rkey) not in present:
                    raise XrpcFail(500, "InternalServerError", "Internal Server Error",
                                   "could not find a record")  # fmt: skip
                present.discard((name, rkey))
                changes.append(("delete", name, rkey, None))
                results.append({"$type": "com.atproto.repo.applyWrites#deleteResult"})
            else:
                raise XrpcFail(400, "InvalidRequest", f"Action not supported: {op.get('$type')}")
        self._commit(repo, step, changes)
        return {"commit": {"cid": f"commit-{repo.rev}", "rev": str(repo.rev)}, "results": results}

    # -- reads -------------------------------------------------------------------------------

    def list_records(self, params: httpx.QueryParams) -> dict[str, Any]:
        repo = self.repos.get(params.get("repo", ""))
        if repo is None:
            raise XrpcFail(400, "InvalidRequest", f"Could not find repo: {params.get('repo')}")
        limit = min(100, max(1, int(params.get("limit", "50"))))
        cursor = params.get("cursor")
        name = params.get("collection", COLLECTION)
        coll = repo.collection(name)
        rkeys = sorted(coll, reverse=True)
        if cursor:
            rkeys = [r for r in rkeys if r < cursor]
        page = rkeys[:limit]
        out: dict[str, Any] = {"records": [
            {"uri": f"at://{repo.did}/{name}/{r}", "cid": coll[r][0], "value": coll[r][1]}
            for r in page
        ]}  # fmt: skip
        if page:
            out["cursor"] = page[-1]
        return out

    def repo_status(self, params: httpx.QueryParams) -> dict[str, Any]:
        repo = self.repos.get(params.get("did", ""))
        if repo is None:
            raise XrpcFail(400, "RepoNotFound", f"Could not find repo for DID: {params.get('did')}")
        out: dict[str, Any] = {"did": repo.did, "active": repo.active, "rev": str(repo.rev)}
        if not repo.active:
            out["status"] = "deactivated"
        return out


def _ref(record: Record | None) -> str | None:
    ref = (record or {}).get("ref")
    return ref if isinstance(ref, str) else None


def _check_collection(collection: Any, record: Record) -> None:
    if collection not in COLLECTIONS or record.get("$type") != collection:
        raise XrpcFail(400, "InvalidRequest", f"Invalid $type: expected {collection}")
    if REFUSED in str(record.get("mood", "")):
        raise XrpcFail(400, "InvalidRequest", "Record refused by this server's content policy",
                       "content policy")  # fmt: skip


def _json(status: int, body: dict[str, Any]) -> httpx.Response:
    return httpx.Response(status, content=orjson.dumps(body),
                          headers={"content-type": "application/json"})  # fmt: skip


def pds_handler(
    state: PdsState, scheduler: Scheduler, proc: Process, rng: random.Random
) -> Callable[[httpx.Request], Any]:
    """The MockTransport handler of one process: every request is one step."""

    async def handle(request: httpx.Request) -> httpx.Response:
        nsid = request.url.path.rsplit("/", 1)[-1]
        bearer = request.headers.get("authorization", "").removeprefix("Bearer ") or None
        body = orjson.loads(request.content) if request.content else {}

        def serve() -> httpx.Response:
            now = scheduler.clock.time()
            step = scheduler.step
            fault = _fault(state, rng)
            if fault == "drop":
                raise httpx.ConnectError("connection refused (simulated)", request=request)
            if fault == "502":
                return _json(502, {"error": "BadGateway", "message": "upstream unavailable"})
            try:
                out = _route(state, nsid, body, request.url.params, bearer, now, step)
            except XrpcFail as fail:
                if fail.cause:
                    scheduler.note(f"pds {nsid} {fail.status}: {fail.cause}")
                return _json(fail.status, {"error": fail.error, "message": fail.message})
            if fault == "502-applied":
                return _json(502, {"error": "BadGateway", "message": "upstream timed out"})
            return _json(200, out)

        return await scheduler.io(proc, f"pds:{nsid}", serve)

    return handle


_WRITES = frozenset({"putRecord", "deleteRecord", "applyWrites"})


def _fault(state: PdsState, rng: random.Random) -> Fault | None:
    if state.fault_rate <= 0 or rng.random() >= state.fault_rate:
        return None
    return rng.choice(("drop", "502", "502-applied"))


def _route(
    state: PdsState,
    nsid: str,
    body: dict[str, Any],
    params: httpx.QueryParams,
    bearer: str | None,
    now: float,
    step: int,
) -> dict[str, Any]:
    name = nsid.rsplit(".", 1)[-1]
    if name == "createSession":
        return state.create_session(body, now)
    if name == "refreshSession":
        return state.refresh_session(bearer, now)
    if name == "listRecords":
        return state.list_records(params)
    if name == "getRepoStatus":
        return state.repo_status(params)
    if name in _WRITES:
        repo = state.authed(bearer, body.get("repo"), now)
        if name == "putRecord":
            return state.put_record(repo, body, step)
        if name == "deleteRecord":
            return state.delete_record(repo, body, step)
        return state.apply_writes(repo, body, step)
    raise XrpcFail(501, "MethodNotImplemented", f"{nsid} is not simulated")


def plc_handler(
    pds_url: str, scheduler: Scheduler, proc: Process
) -> Callable[[httpx.Request], Any]:
    """A PLC directory that says every DID lives on our PDS (accounts never move here)."""

    async def handle(request: httpx.Request) -> httpx.Response:
        did = request.url.path.strip("/")

        def serve() -> httpx.Response:
            service = {"id": "#atproto_pds", "type": "AtprotoPersonalDataServer",
                       "serviceEndpoint": pds_url}  # fmt: skip
            return _json(200, {"id": did, "service": [service]})

        return await scheduler.io(proc, "plc:resolve", serve)

    return handle
