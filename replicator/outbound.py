"""Every write on its way to the PDS, in one place.

The transport (`pds.Pds`) is HTTP and XRPC alone. What a write must pass besides sits here,
owned by the writer:

- the write budgets, spent before sending (`pace`): the global one (`--rate`, a token
  bucket shared by every lane) and the account's, read from every answer's rate-limit
  headers (budget.py);
- the lease fence, checked right before the write leaves the process (no await between
  the check and the send): a process that may have lost the lease sends nothing (lease.py);
- the `pds_call` crash point, once the PDS answered or did not (crashpoints.py).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import anyio

from . import crashpoints
from .budget import Budgets
from .budget import cost as budget_cost
from .errors import MAX_INLINE_WAIT, PdsError, RateLimited
from .lease import Fence
from .model import Write
from .pds import Pds
from .ratelimit import TokenBucket


class Outbound:
    def __init__(self, pds: Pds, fence: Fence, *, rate: TokenBucket | None = None) -> None:
        """`rate`: the writes a second every lane together may send (None: no such limit)."""
        self.pds = pds
        self.fence = fence
        self.rate = rate
        self.budgets = Budgets()

    async def pace(self, did: str, writes: Sequence[Write]) -> None:
        """Spend the budgets `writes` to `did`'s repo cost, or wait / give up as they say."""
        if self.rate is not None:
            await self.rate.take(len(writes))
        wait = self.budgets.reserve(did, budget_cost(tuple(writes)))
        if wait > MAX_INLINE_WAIT:
            why = "the account's write budget is spent (paced before sending)"
            raise RateLimited("com.atproto.repo.applyWrites", 429, "RateLimitExceeded", why, wait)
        if wait > 0:
            await anyio.sleep(wait)

    async def write(self, nsid: str, body: Mapping[str, Any], token: str) -> dict[str, Any]:
        """One write call (no retry: the session pool retries, and each attempt comes back
        through here)."""
        observe = functools.partial(self.budgets.observe, str(body["repo"]))
        self.fence.check()
        try:
            out = await self.pds.xrpc(nsid, body=body, token=token, on_headers=observe)
        except PdsError:
            crashpoints.hit("pds_call")
            raise
        crashpoints.hit("pds_call")
        return out

    def forget(self, did: str) -> None:
        """An erased user's account: its budget goes from memory."""
        self.budgets.forget(did)
