"""Which PDS hosts a DID, from its DID document: did:plc through a PLC directory, did:web over
https. Cached for at most ten minutes: an account that moved is noticed within that time.

An account whose document names another PDS than ours has moved: relays drop commits from a
PDS that is no longer the account's, so writing there is pointless (accounts.py parks it).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any
from urllib.parse import quote, urlsplit

import httpx
from loguru import logger

PUBLIC_PLC = "https://plc.directory"
CACHE_SECONDS = 600.0


def pds_endpoint(doc: Any) -> str | None:
    """The `#atproto_pds` service endpoint of a DID document."""
    if not isinstance(doc, dict):
        return None
    for service in doc.get("service") or []:
        if not isinstance(service, dict):
            continue
        sid = str(service.get("id", ""))
        if sid.endswith("#atproto_pds") and service.get("type") == "AtprotoPersonalDataServer":
            endpoint = service.get("serviceEndpoint")
            return endpoint if isinstance(endpoint, str) else None
    return None


def same_host(a: str, b: str) -> bool:
    """Two PDS URLs name the same server (scheme, host and port; a trailing slash aside)."""
    x, y = urlsplit(a.rstrip("/")), urlsplit(b.rstrip("/"))
    return (x.scheme, x.hostname, x.port) == (y.scheme, y.hostname, y.port)


def host_of(url: str) -> str:
    parts = urlsplit(url)
    return parts.netloc or url


class Resolver:
    """DID → PDS URL. A lookup that fails returns None ("unknown"), and is retried on the next
    call: an unreachable directory must not stop the mirror of accounts that did not move."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        plc_url: str = PUBLIC_PLC,
        *,
        ttl: float = CACHE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.http = http
        self.plc_url = plc_url.rstrip("/")
        self.ttl = min(ttl, CACHE_SECONDS)
        self._clock = clock
        self._cache: dict[str, tuple[float, str | None]] = {}

    def _url(self, did: str) -> str | None:
        if did.startswith("did:plc:"):
            return f"{self.plc_url}/{quote(did)}"
        if did.startswith("did:web:"):
            host = did.removeprefix("did:web:").split(":", 1)[0]
            return f"https://{host}/.well-known/did.json"
        return None

    async def pds_of(self, did: str) -> str | None:
        cached = self._cache.get(did)
        now = self._clock()
        if cached is not None and now - cached[0] < self.ttl:
            return cached[1]
        url = self._url(did)
        if url is None:
            return None
        try:
            resp = await self.http.get(url, timeout=10.0)
            resp.raise_for_status()
            endpoint = pds_endpoint(resp.json())
        except (httpx.HTTPError, ValueError) as exc:
            logger.bind(did=did).warning("could not resolve the DID document: {}", exc)
            return None
        self._cache[did] = (now, endpoint)
        return endpoint

    def forget(self, did: str) -> None:
        self._cache.pop(did, None)
