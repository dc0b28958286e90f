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

import httpx
import orjson
import stamina
from loguru import logger

from .budget import Budgets
from .model import Record, RemoteRecord, Write

MOOD_COLLECTION = "computer.aesthetic.mood"
WRITE_NSIDS = frozenset(
    f"com.atproto.repo.{name}"
    for name in ("putRecord", "deleteRecord", "applyWrites", "createRecord")
)
APPLY_WRITES_MAX = 200
LIST_PAGE = 100
T = TypeVar("T")

_GONE_ERRORS = frozenset(
    {"RepoNotFound", "AccountNotFound", "AccountDeactivated", "AccountTakedown"}
)


class XrpcError(Exception):
    """An XRPC call failed. `status` 0 means no HTTP answer (refused, reset, timed out)."""

    def __init__(
        self,
        nsid: str,
        status: int,
        error: str | None = None,
        message: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        self.nsid = nsid
        self.status = status
        self.error = error
        self.message = message
        self.retry_after = retry_after
        what = f"HTTP {status}" if status else "no answer"
        detail = f" {error}" if error else ""
        text = f": {message}" if message else ""
        super().__init__(f"{nsid}: {what}{detail}{text}")

    @property
    def transient(self) -> bool:
        return self.status == 0 or self.status == 429 or self.status >= 500

    @property
    def budget_exhausted(self) -> bool:
        """An account's write budget is spent for longer than is worth waiting in place."""
        return self.status == 429 and (self.retry_after or 0.0) > MAX_INLINE_WAIT

    @property
    def account_gone(self) -> bool:
        if self.error in _GONE_ERRORS:
            return True
        return bool(self.message and "Could not find repo" in self.message)

    @property
    def token_problem(self) -> bool:
        return self.error in {"ExpiredToken", "InvalidToken"} or self.status == 401


class AuthFailed(XrpcError):
    """The account's password was refused: its work is parked, others flow."""


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


# A rate limit that resets sooner than this is waited out in place; a longer one (an account's
# hourly or daily write budget) parks that account's work so the other accounts keep flowing.
MAX_INLINE_WAIT = 30.0


def retry_hook(exc: Exception) -> bool | float:
    """stamina's hook: transient errors are retried, with the server's hint when it gave one."""
    if not isinstance(exc, XrpcError) or not exc.transient:
        return False
    if exc.retry_after is None:
        return True
    if exc.status == 429 and exc.retry_after > MAX_INLINE_WAIT:
        return False
    return exc.retry_after


class Pds:
    """One PDS. `retry_timeout` bounds how long transient failures are retried (None: forever,
    for the sidecar, which must not advance its checkpoint past unapplied work)."""

    def __init__(
        self,
        base_url: str,
        *,
        http: httpx.AsyncClient | None = None,
        timeout: float = 30.0,
        retry_timeout: float | None = None,
        on_request: Callable[[str, int], None] | None = None,
        on_retry: Callable[[XrpcError], None] | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._http = http or httpx.AsyncClient(
            timeout=timeout, limits=httpx.Limits(max_connections=64, max_keepalive_connections=64)
        )
        self._owns_http = http is None
        self.retry_timeout = retry_timeout
        self._on_request = on_request
        self._on_retry = on_retry
        self.requests: Counter[str] = Counter()  # by NSID, for status and tests
        self.budgets = Budgets()

    async def aclose(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    async def xrpc(
        self,
        nsid: str,
        *,
        body: Mapping[str, Any] | None = None,
        params: Mapping[str, Any] | None = None,
        token: str | None = None,
        post: bool = False,
    ) -> dict[str, Any]:
        """One call, no retry. A procedure without input (`post`, no `body`) sends no body:
        the PDS refuses one it does not expect."""
        headers = {"authorization": f"Bearer {token}"} if token else {}
        self.requests[nsid] += 1
        url = f"{self.base_url}/xrpc/{nsid}"
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
            raise XrpcError(nsid, 0, type(exc).__name__, str(exc) or None) from None
        if self._on_request:
            self._on_request(nsid, resp.status_code)
        if body is not None and isinstance(body.get("repo"), str) and nsid in WRITE_NSIDS:
            self.budgets.observe(body["repo"], resp.headers)
        if resp.status_code == 200:
            return dict(orjson.loads(resp.content)) if resp.content else {}
        error = message = None
        try:
            payload = orjson.loads(resp.content)
            error, message = payload.get("error"), payload.get("message")
        except (orjson.JSONDecodeError, AttributeError):
            message = resp.reason_phrase
        raise XrpcError(nsid, resp.status_code, error, message, _retry_after(resp.headers))

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
        if verdict is not False and isinstance(exc, XrpcError):
            logger.warning("PDS call failed, retrying: {}", exc)
            if self._on_retry:
                self._on_retry(exc)
        return verdict

    # -- unauthenticated reads -------------------------------------------------------------

    async def list_records(self, did: str, collection: str = MOOD_COLLECTION) -> list[RemoteRecord]:
        """Every record of the collection: pages until the server returns no cursor."""
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


def write_op(write: Write, collection: str = MOOD_COLLECTION) -> dict[str, Any]:
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
        op_size = len(orjson.dumps(write_op(write)))
        if i > start and (i - start >= APPLY_WRITES_MAX or size + op_size > MAX_BODY_BYTES):
            out.append(writes[start:i])
            start, size = i, 0
        size += op_size
    if start < len(writes):
        out.append(writes[start:])
    return out


def put_body(did: str, rkey: str, record: Record) -> dict[str, Any]:
    return {"repo": did, "collection": MOOD_COLLECTION, "rkey": rkey, "record": record}
