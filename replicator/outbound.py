"""Every write on its way to the PDS, in one place.

The transport (`pds.Pds`) is HTTP and XRPC alone. What a write must pass besides sits here,
owned by the writer:

- the lease fence, checked right before the write leaves the process (no await between
  the check and the send): a process that may have lost the lease sends nothing (lease.py);
- the `pds_call` crash point, once the PDS answered or did not (crashpoints.py);
- the account's write budget, read from every answer's rate-limit headers and spent
  before sending (budget.py).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

from . import crashpoints
from .budget import Budgets
from .errors import PdsError
from .lease import Fence
from .pds import Pds


class Outbound:
    def __init__(self, pds: Pds, fence: Fence) -> None:
        self.pds = pds
        self.fence = fence
        self.budgets = Budgets()

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
        self.budgets.forget(did)
