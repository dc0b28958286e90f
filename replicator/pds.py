"""The PDS, over one shared HTTP connection pool: XRPC calls, errors, retries.

A thin XRPC layer rather than one SDK client per account: every account's calls share one
`httpx.AsyncClient` (one pool, keep-alive), and error handling sees the status, the XRPC error
name and the rate-limit headers it needs. Messages never include request bodies or headers:
they carry passwords and tokens.
"""

from __future__ import annotations

import email.utils
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

import anyio
import httpx
import orjson
import stamina
from loguru import logger

from . import logs
from .errors import (
    MAX_INLINE_WAIT,
    AccountGone,
    AccountUnavailable,
    AuthFailed,
    PdsError,
    RateLimited,
    Transient,
    classify,
)
from .model import RemoteRecord, Write

# `getRepoStatus`'s `status`, as the error name a write to such an account answers.
_STATUS_ERRORS = {"deactivated": "AccountDeactivated", "takendown": "AccountTakedown",
                  "suspended": "RepoSuspended"}  # fmt: skip
WRITE_NSIDS = frozenset(
    f"com.atproto.repo.{name}"
    for name in ("putRecord", "deleteRecord", "applyWrites", "createRecord")
)
APPLY_WRITES_MAX = 200
LIST_PAGE = 100
T = TypeVar("T")


def _retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds the server asks us to wait: `Retry-After` (seconds or date), `RateLimit-Reset`."""
    value = headers.get("retry-after")
    if value:
        try:
            return max(0.0, float(value))
        except ValueError:
            parsed = email.utils.parsedate_to_datetime(value)
            return max(0.0, parsed.timestamp() - time.time())
    reset = headers.get("ratelimit-reset")
    if reset and headers.get("ratelimit-remaining") == "0":
        try:
            seconds = float(reset)
        except ValueError:
            return None
        # Either a delta or an epoch timestamp, depending on the server.
        return max(0.0, seconds - time.time()) if seconds > 1e9 else seconds
    return None


def retry_hook(exc: Exception) -> bool | float:
    """stamina's hook: transient errors and short rate limits are retried, with the server's
    hint when it gave one; a long rate limit is the caller's to decide (park the account)."""
    if isinstance(exc, RateLimited):
        return False if exc.long else (exc.retry_after if exc.retry_after is not None else True)
    if isinstance(exc, Transient):
        return exc.retry_after if exc.retry_after is not None else True
    return False


class Pds:
    """One PDS. `retry_timeout` bounds how long transient failures are retried (None: forever,
    for the sidecar, which must not advance its checkpoint past unapplied work)."""

    def __init__(
        self,
        base_url: str,
        *,
        http: httpx.AsyncClient | None = None,
        timeout: float | None = None,
        retry_timeout: float | None = None,
        on_request: Callable[[str, int], None] | None = None,
        on_retry: Callable[[PdsError], None] | None = None,
        bypass_key: str | None = None,
    ) -> None:
        """`bypass_key`: the PDS's `PDS_RATE_LIMIT_BYPASS_KEY`, sent as `x-ratelimit-bypass`
        on every call (the operator's own PDS lets us past its rate limits); never logged.
        `timeout`: of each call on the pool made here (`http` not given: then it is needed;
        `Settings.http_timeout` is the runtime's)."""
        if http is None and timeout is None:
            raise TypeError("Pds: give the timeout of its calls, or the pool (http)")
        self.base_url = base_url.rstrip("/")
        self._http = http or httpx.AsyncClient(
            timeout=timeout, limits=httpx.Limits(max_connections=64, max_keepalive_connections=64)
        )
        self._owns_http = http is None
        self.retry_timeout = retry_timeout
        self._on_request = on_request
        self._on_retry = on_retry
        self.requests: Counter[str] = Counter()  # by NSID, for status and tests
        self._headers = {"x-ratelimit-bypass": bypass_key} if bypass_key else {}
        if bypass_key:
            logs.add_secret(bypass_key)

    async def aclose(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    async def unreachable(self, seconds: float = 5.0) -> str | None:
        """Why the PDS does not answer its health check within `seconds`; None if it does."""
        try:
            with anyio.fail_after(seconds):
                await self.health()
        except (PdsError, TimeoutError, ValueError) as exc:  # ValueError: not JSON
            return str(exc) or f"no answer within {seconds:.0f}s"
        return None

    async def xrpc(
        self,
        nsid: str,
        *,
        body: Mapping[str, Any] | None = None,
        params: Mapping[str, Any] | None = None,
        token: str | None = None,
        post: bool = False,
        on_headers: Callable[[httpx.Headers], None] | None = None,
    ) -> dict[str, Any]:
        """One call, no retry. A procedure without input (`post`, no `body`) sends no body:
        the PDS refuses one it does not expect. `on_headers`: sees every answer's headers
        (the rate-limit ones), whatever its status."""
        headers = {**self._headers, **({"authorization": f"Bearer {token}"} if token else {})}
        url = f"{self.base_url}/xrpc/{nsid}"
        self.requests[nsid] += 1
        try:
            if body is None and post:
                resp = await self._http.post(url, headers=headers)
            elif body is None:
                resp = await self._http.get(url, params=params, headers=headers)
            else:
                headers["content-type"] = "application/json"
                resp = await self._http.post(url, content=orjson.dumps(body), headers=headers)
        except httpx.TransportError as exc:
            if self._on_request:
                self._on_request(nsid, 0)
            raise classify(nsid, 0, type(exc).__name__, str(exc) or None) from None
        if self._on_request:
            self._on_request(nsid, resp.status_code)
        if on_headers is not None:
            on_headers(resp.headers)
        if resp.status_code == 200:
            return dict(orjson.loads(resp.content)) if resp.content else {}
        error = message = None
        try:
            payload = orjson.loads(resp.content)
            error, message = payload.get("error"), payload.get("message")
        except (orjson.JSONDecodeError, AttributeError):
            message = resp.reason_phrase
        raise classify(nsid, resp.status_code, error, message, _retry_after(resp.headers))

    async def retrying(self, call: Callable[[], Awaitable[T]]) -> T:
        """Retry `call` on transient failures with exponential backoff and jitter."""
        async for attempt in stamina.retry_context(
            on=self._hook, attempts=None, timeout=self.retry_timeout, wait_max=5.0
        ):
            with attempt:
                return await call()
        raise AssertionError("unreachable")  # pragma: no cover

    def _hook(self, exc: Exception) -> bool | float:
        verdict = retry_hook(exc)
        if verdict is not False and isinstance(exc, PdsError):
            logger.warning("PDS call failed, retrying: {}", exc)
            if self._on_retry:
                self._on_retry(exc)
        return verdict

    # -- unauthenticated reads -------------------------------------------------------------

    async def list_records(self, did: str, collection: str) -> list[RemoteRecord]:
        """Every record of the collection: pages until the server returns no cursor.

        A deactivated or taken-down repo answers "Could not find repo", as a deleted one does;
        it is not empty, only hidden, so `getRepoStatus` tells them apart: an inactive account
        raises `AccountUnavailable`, a deleted one `AccountGone`."""
        try:
            return await self._list(did, collection)
        except AccountGone:
            status = await self.repo_status(did)  # AccountGone again if it is really gone
            if status.get("active") is False:
                reason = str(status.get("status") or "inactive")
                raise AccountUnavailable(
                    "com.atproto.sync.getRepoStatus", 200, _STATUS_ERRORS.get(reason), reason
                ) from None
            raise

    async def _list(self, did: str, collection: str) -> list[RemoteRecord]:
        out: list[RemoteRecord] = []
        cursor: str | None = None
        while True:
            params: dict[str, Any] = {"repo": did, "collection": collection, "limit": LIST_PAGE}
            if cursor:
                params["cursor"] = cursor
            page = await self.retrying(
                lambda p=params: self.xrpc("com.atproto.repo.listRecords", params=p)  # type: ignore[misc]
            )
            for item in page.get("records", []):
                rkey = str(item["uri"]).rsplit("/", 1)[-1]
                out.append(RemoteRecord(rkey, item.get("cid"), dict(item.get("value") or {})))
            cursor = page.get("cursor")
            if not cursor or not page.get("records"):
                return out

    async def repo_status(self, did: str) -> dict[str, Any]:
        """`com.atproto.sync.getRepoStatus`: `{active, status}` (deactivated, takendown, ...)."""
        return await self.retrying(
            lambda: self.xrpc("com.atproto.sync.getRepoStatus", params={"did": did})
        )

    async def get_record(self, repo: str, collection: str, rkey: str) -> dict[str, Any] | None:
        """A record's value, or None when the repo has no such record (`repo`: DID or handle)."""
        params = {"repo": repo, "collection": collection, "rkey": rkey}
        try:
            out = await self.retrying(
                lambda: self.xrpc("com.atproto.repo.getRecord", params=params)
            )
        except PdsError as exc:
            if exc.status == 400 and exc.error == "RecordNotFound":
                return None
            raise
        value = out.get("value")
        return dict(value) if isinstance(value, dict) else None

    async def health(self) -> dict[str, Any]:
        """`/xrpc/_health`: `{version}` on the reference PDS."""
        return await self.xrpc("_health")


def write_op(write: Write, collection: str) -> dict[str, Any]:
    """One `applyWrites` operation; `create` only where the record is known to be absent."""
    if write.action == "delete":
        return {
            "$type": "com.atproto.repo.applyWrites#delete",
            "collection": collection,
            "rkey": write.rkey,
        }
    kind = "update" if write.exists else "create"
    return {
        "$type": f"com.atproto.repo.applyWrites#{kind}",
        "collection": collection,
        "rkey": write.rkey,
        "value": write.record,
    }


# The reference PDS refuses request bodies over 1,000,000 bytes (HTTP 413): leave headroom.
MAX_BODY_BYTES = 900_000


def batches(writes: Sequence[Write]) -> list[Sequence[Write]]:
    """`applyWrites` batches: at most 200 operations and about 900 kB of JSON each."""
    out: list[Sequence[Write]] = []
    start, size = 0, 0
    for i, write in enumerate(writes):
        op_size = len(orjson.dumps(write_op(write, "")))  # + the collection: well within
        if i > start and (i - start >= APPLY_WRITES_MAX or size + op_size > MAX_BODY_BYTES):
            out.append(writes[start:i])
            start, size = i, 0
        size += op_size
    if start < len(writes):
        out.append(writes[start:])
    return out


def single_body(did: str, write: Write, collection: str) -> dict[str, Any]:
    """`putRecord` / `deleteRecord` input, with `swapRecord` where the ledger is sure: the
    record's CID, or null for "must not exist" (a create)."""
    body: dict[str, Any] = {"repo": did, "collection": collection, "rkey": write.rkey}
    if write.action == "put":
        body["record"] = write.record
    send, cid = write.swap
    if send:
        body["swapRecord"] = cid
    return body


XrpcError = PdsError  # the name other modules knew; prefer `errors.PdsError`

__all__ = ["MAX_INLINE_WAIT", "AccountGone", "AuthFailed", "Pds", "PdsError", "XrpcError"]
