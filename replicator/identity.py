"""Which PDS hosts a DID, from its DID document (did:plc through a PLC directory, did:web over
https): a lookup that is advisory, so it never holds a write.

The write path only reads the cache (`Directory.endpoint`): the last endpoint known for the
DID, or None while none is (the account is then written where `users` says, on PDS_URL).
Documents are fetched beside it, by `Directory.run`: DIDs seen for the first time, entries
older than `ttl`, and those a re-check asks about. A directory that is slow, hung or
unreachable costs the writes nothing: its fetches time out in the background; an answer, a
"no such DID" included, is cached, and a failure keeps the last good endpoint; while the
directory is down one probe at a time goes out, with backoff, not one per DID. One WARNING
when it becomes unreachable, one INFO when it answers again, and `up` for the
`replicator_directory_up` gauge. A moved account is detected once it answers.

An account whose document names another PDS than ours has moved: relays drop commits from a
PDS that is no longer the account's, so writing there is pointless (accounts.py parks it).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

import anyio
import httpx
from loguru import logger

PUBLIC_PLC = "https://plc.directory"
CACHE_SECONDS = 600.0  # an account that moved is noticed within this (plus a fetch)
FETCH_SECONDS = 10.0  # one document fetch, at most
PARALLEL = 4  # fetches in flight while the directory answers
DOWN_WAIT = (5.0, 300.0)  # while it does not: first and longest wait between two probes


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


class Unreachable(Exception):
    """The directory gave no answer (refused, timed out, 5xx): nothing is known of the DID."""


@dataclass
class _Entry:
    endpoint: str | None  # the last one known (None: the document names none, or no answer yet)
    fetched_at: float | None  # monotonic time of the last answer (None: never answered)


class Directory:
    """DID → PDS URL, cached, refreshed in the background (`run`)."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        plc_url: str = PUBLIC_PLC,
        *,
        ttl: float = CACHE_SECONDS,
        timeout: float = FETCH_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.http = http
        self.plc_url = plc_url.rstrip("/")
        self.ttl = ttl
        self.timeout = timeout
        self._clock = clock
        self._entries: dict[str, _Entry] = {}
        self._due: dict[str, None] = {}  # to fetch, oldest request first
        self._wake: anyio.Event | None = None  # set by `refresh`, while `run` waits
        self.up: bool | None = None  # None: not asked yet
        self.last_error: str | None = None
        self.fetches = 0

    # -- what the write path reads: never waits ------------------------------------------------

    def endpoint(self, did: str) -> str | None:
        """The last endpoint known for the DID, or None while none is. A fetch is asked for
        (not waited on) when the entry is missing or older than the TTL."""
        entry = self._entries.get(did)
        fetched = entry.fetched_at if entry is not None else None
        if fetched is None or self._clock() - fetched >= self.ttl:
            self.refresh(did)
        return entry.endpoint if entry is not None else None

    def refresh(self, did: str) -> None:
        """Fetch the DID's document again soon (a re-check of a moved account asks this)."""
        if did not in self._due and self._url(did) is not None:
            self._due[did] = None
            if self._wake is not None:
                self._wake.set()

    def forget(self, did: str) -> None:
        self._entries.pop(did, None)
        self._due.pop(did, None)

    # -- beside it -----------------------------------------------------------------------------

    async def run(self) -> None:
        """Fetch what is due until cancelled: `PARALLEL` at a time while the directory
        answers; one probe at a time, with backoff, while it does not."""
        wait = DOWN_WAIT[0]
        while True:
            if not self._due:
                self._wake = anyio.Event()
                await self._wake.wait()
                self._wake = None
                continue
            take = PARALLEL if self.up is not False else 1
            dids = list(self._due)[:take]
            failed: list[str] = []
            async with anyio.create_task_group() as tg:
                for did in dids:
                    tg.start_soon(self._fetch, did, failed)
            if not failed:
                wait = DOWN_WAIT[0]
                continue
            await anyio.sleep(wait)  # what is due stays due; one probe after the wait
            wait = min(DOWN_WAIT[1], wait * 2)

    async def fetch(self, did: str) -> str | None:
        """The endpoint the DID's document names, now (None: no such DID, or not a did:plc
        or did:web); `Unreachable` if the directory does not answer. Caches nothing."""
        url = self._url(did)
        return None if url is None else await self._get(url)

    async def _fetch(self, did: str, failed: list[str]) -> None:
        self._due.pop(did, None)
        self.fetches += 1
        plc = did.startswith("did:plc:")
        try:
            endpoint = await self.fetch(did)
        except Unreachable as exc:
            if plc:  # the directory is down: again, once it answers
                failed.append(did)
                self._due[did] = None
                self._down(str(exc))
            else:  # one did:web host: its last endpoint stands until the TTL runs out again
                last = self._entries.get(did)
                self._entries[did] = _Entry(last.endpoint if last else None, self._clock())
            return
        self._entries[did] = _Entry(endpoint, self._clock())
        if plc:
            self._back()

    async def _get(self, url: str) -> str | None:
        """The endpoint the document names; None for a DID the directory does not know."""
        try:
            with anyio.fail_after(self.timeout):
                resp = await self.http.get(url, timeout=self.timeout)
        except TimeoutError:
            raise Unreachable(f"no answer within {self.timeout:.0f}s") from None
        except httpx.HTTPError as exc:
            raise Unreachable(f"{type(exc).__name__}: {exc}".split("\n")[0]) from None
        if resp.status_code >= 500:
            raise Unreachable(f"HTTP {resp.status_code}")
        if resp.status_code != 200:
            return None  # an answer: no such DID (404), or a document we may not read
        try:
            return pds_endpoint(resp.json())
        except ValueError:
            return None

    def _down(self, why: str) -> None:
        self.last_error = why
        if self.up is not False:
            logger.warning(
                "DID directory {} unreachable ({}): every account keeps its last known PDS "
                "(else PDS_URL) and writes go on; moved accounts are noticed once it answers",
                self.plc_url, why,
            )  # fmt: skip
        self.up = False

    def _back(self) -> None:
        if self.up is False:
            logger.info("DID directory {} answers again", self.plc_url)
        self.up = True
        self.last_error = None

    def _url(self, did: str) -> str | None:
        if did.startswith("did:plc:"):
            return f"{self.plc_url}/{quote(did)}"
        if did.startswith("did:web:"):
            host = did.removeprefix("did:web:").split(":", 1)[0]
            return f"https://{host}/.well-known/did.json"
        return None
