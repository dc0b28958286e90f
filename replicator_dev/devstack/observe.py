"""What a PDS shows any client: the test suite's and the soak's view of the outcome.

Deliberately not `replicator.pds.Pds.list_records`: checks must not trust the code they check.
"""

from __future__ import annotations

from typing import Any

import httpx

MOOD_NSID = "computer.aesthetic.mood"


async def listed_records(
    http: httpx.AsyncClient, pds_url: str, did: str, collection: str = MOOD_NSID
) -> dict[str, dict[str, Any]]:
    """rkey → value for every record of the collection, paging `listRecords` to the end."""
    out: dict[str, dict[str, Any]] = {}
    cursor: str | None = None
    while True:
        params: dict[str, Any] = {"repo": did, "collection": collection, "limit": 100}
        if cursor:
            params["cursor"] = cursor
        resp = await http.get(f"{pds_url}/xrpc/com.atproto.repo.listRecords", params=params)
        resp.raise_for_status()
        page = resp.json()
        for item in page["records"]:
            out[item["uri"].rsplit("/", 1)[-1]] = item["value"]
        cursor = page.get("cursor")
        if not cursor or not page["records"]:
            return out
