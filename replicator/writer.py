"""Send one account's writes: a single call for one write, one `applyWrites` commit for several.

All three calls are idempotent with a fixed rkey, which is what makes replays after a crash
safe. A single `putRecord`/`deleteRecord` carries `swapRecord` where the ledger is sure of
what the PDS holds, so a write based on a wrong belief fails (`InvalidSwap`) instead of
silently winning; `applyWrites` has no per-record swap and fails as a whole. Nothing here
falls back or retries a refused write: the applier decides that, once (apply.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .errors import Rejected, Transient
from .model import Account, Write
from .outbound import Outbound
from .pds import single_body, write_op
from .sessions import SessionPool


class RepoWriter:
    def __init__(
        self,
        sessions: SessionPool,
        outbound: Outbound,
        *,
        batch: bool = True,
    ) -> None:
        """`outbound`: what every write passes on its way (budgets, the fence, the crash
        point); the writer sends nothing any other way."""
        self.sessions = sessions
        self.outbound = outbound
        self.batch = batch  # False: one call per write (the old writer's shape, for the bench)
        self.batches = 0
        self.single_calls = 0

    async def send(
        self, account: Account, writes: Sequence[Write], collection: str
    ) -> dict[str, str | None]:
        """One commit to the `collection` (an NSID) of the account's repo; returns the new CID
        per rkey written (None for deletes). `writes` fit one `applyWrites` (`pds.batches`
        splits them)."""
        if not writes:
            return {}
        await self.outbound.pace(account.did, writes)
        if len(writes) == 1:
            return {writes[0].rkey: await self._single(account, writes[0], collection)}
        self.batches += 1
        body: dict[str, Any] = {
            "repo": account.did,
            "writes": [write_op(w, collection) for w in writes],
        }
        out = await self.sessions.call(account, lambda t: self._apply_writes(body, t))
        results: dict[str, str | None] = {w.rkey: None for w in writes}
        for write, result in zip(writes, out.get("results", []), strict=False):
            cid = result.get("cid") if isinstance(result, dict) else None
            results[write.rkey] = str(cid) if cid else None
        return results

    async def _apply_writes(self, body: dict[str, Any], token: str) -> dict[str, Any]:
        try:
            return await self.outbound.write("com.atproto.repo.applyWrites", body, token)
        except Transient as exc:
            # The reference PDS answers a batch whose premise was wrong (a create of a record
            # that exists, an update or delete of one that does not) with a 500: refused as a
            # whole, not worth repeating as it is. The applier sends its writes one by one.
            if exc.status == 500:
                raise Rejected(exc.nsid, exc.status, exc.error, exc.message) from None
            raise

    async def _single(self, account: Account, write: Write, collection: str) -> str | None:
        self.single_calls += 1
        body = single_body(account.did, write, collection)
        nsid = "com.atproto.repo.putRecord" if write.action == "put" else (
            "com.atproto.repo.deleteRecord"
        )  # fmt: skip
        out = await self.sessions.call(account, lambda t: self.outbound.write(nsid, body, t))
        cid = out.get("cid")
        return str(cid) if cid and write.action == "put" else None

    def forget(self, did: str) -> None:
        """An erased user's account: its session and its budget go from memory too."""
        self.sessions.forget(did)
        self.outbound.forget(did)
