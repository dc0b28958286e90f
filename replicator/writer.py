"""Apply one account's writes: single calls for one write, `applyWrites` batches for bursts.

All three calls are idempotent with a fixed rkey, which is what makes replays after a crash
safe. A batch is one commit and fails as a whole (a `create` of a record that exists, a delete
of one that is gone): then its writes are applied one by one, each idempotent on its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import anyio

from .budget import cost as budget_cost
from .model import Account, Write
from .pds import MAX_INLINE_WAIT, MOOD_COLLECTION, XrpcError, batches, put_body, write_op
from .ratelimit import TokenBucket
from .sessions import SessionPool


class AccountGone(Exception):
    """The account no longer exists on the PDS."""


class RepoWriter:
    def __init__(
        self, sessions: SessionPool, *, batch: bool = True, rate: TokenBucket | None = None
    ) -> None:
        self.sessions = sessions
        self.pds = sessions.pds
        self.batch = batch
        self.rate = rate  # global writes/second budget, shared by every lane
        self.batches = 0
        self.batch_fallbacks = 0
        self.single_calls = 0

    async def apply(self, account: Account, writes: Sequence[Write]) -> dict[str, str | None]:
        """Returns the new CID per rkey written (None for deletes)."""
        results: dict[str, str | None] = {}
        if not writes:
            return results
        try:
            if len(writes) == 1 or not self.batch:
                for write in writes:
                    results[write.rkey] = await self._single(account, write)
                return results
            for part in batches(writes):
                results.update(await self._batch(account, part))
        except XrpcError as exc:
            if exc.account_gone:
                raise AccountGone(account.did) from None
            raise
        return results

    async def _pace(self, account: Account, writes: Sequence[Write], nsid: str) -> None:
        """Spend the account's announced write budget, or wait / give up as it says."""
        if self.rate is not None:
            await self.rate.take(len(writes))
        wait = self.pds.budgets.reserve(account.did, budget_cost(tuple(writes)))
        if wait > MAX_INLINE_WAIT:
            why = "the account's write budget is spent (paced before sending)"
            raise XrpcError(nsid, 429, "RateLimitExceeded", why, wait)
        if wait > 0:
            await anyio.sleep(wait)

    async def _single(self, account: Account, write: Write) -> str | None:
        self.single_calls += 1
        await self._pace(account, [write], "com.atproto.repo.putRecord")
        if write.action == "delete":
            body = {"repo": account.did, "collection": MOOD_COLLECTION, "rkey": write.rkey}
            await self.sessions.call(
                account,
                lambda t: self.pds.xrpc("com.atproto.repo.deleteRecord", body=body, token=t),
            )
            return None
        assert write.record is not None
        put = put_body(account.did, write.rkey, write.record)
        out = await self.sessions.call(
            account, lambda t: self.pds.xrpc("com.atproto.repo.putRecord", body=put, token=t)
        )
        cid = out.get("cid")
        return str(cid) if cid else None

    async def _batch(self, account: Account, writes: Sequence[Write]) -> dict[str, str | None]:
        body: dict[str, Any] = {"repo": account.did, "writes": [write_op(w) for w in writes]}
        await self._pace(account, writes, "com.atproto.repo.applyWrites")
        try:
            self.batches += 1
            out = await self.sessions.call(account, lambda t: self._apply_writes_once(body, t))
        except _BatchRejected:
            self.batch_fallbacks += 1
            return {w.rkey: await self._single(account, w) for w in writes}
        results: dict[str, str | None] = {}
        for write, result in zip(writes, out.get("results", []), strict=False):
            cid = result.get("cid") if isinstance(result, dict) else None
            results[write.rkey] = str(cid) if cid else None
        for write in writes[len(results) :]:
            results[write.rkey] = None
        return results

    async def _apply_writes_once(self, body: dict[str, Any], token: str) -> dict[str, Any]:
        try:
            return await self.pds.xrpc("com.atproto.repo.applyWrites", body=body, token=token)
        except XrpcError as exc:
            # A batch whose premise was wrong (create of an existing record, delete or update of
            # a missing one) is refused whole, as a 400 or (reference PDS) a 500.
            if exc.status in (400, 500) and not exc.token_problem and not exc.account_gone:
                raise _BatchRejected(exc.nsid, exc.status, exc.error, exc.message) from None
            raise


class _BatchRejected(XrpcError):
    @property
    def transient(self) -> bool:
        return False
