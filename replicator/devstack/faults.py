"""Fault injection at the HTTP edge: answers chosen PDS calls with 5xx, 429 or a timeout
before they reach the real PDS; every other call goes through to it unchanged."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
import orjson

Rule = Callable[[httpx.Request], httpx.Response | Exception | None]


@dataclass
class FaultTransport(httpx.AsyncBaseTransport):
    inner: httpx.AsyncBaseTransport = field(default_factory=httpx.AsyncHTTPTransport)
    rules: list[Rule] = field(default_factory=list)
    injected: int = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        for rule in list(self.rules):
            verdict = rule(request)
            if verdict is None:
                continue
            self.injected += 1
            if isinstance(verdict, Exception):
                raise verdict
            return verdict
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


def nsid_of(request: httpx.Request) -> str:
    return request.url.path.rsplit("/", 1)[-1]


def repo_of(request: httpx.Request) -> str | None:
    if request.method != "POST" or not request.content:
        return None
    try:
        body = orjson.loads(request.content)
    except orjson.JSONDecodeError:
        return None
    repo = body.get("repo") if isinstance(body, dict) else None
    return repo if isinstance(repo, str) else None


def fail_next(
    n: int,
    nsids: set[str],
    status: int = 503,
    headers: dict[str, str] | None = None,
    did: str | None = None,
) -> Rule:
    """The next `n` calls to `nsids` (optionally only for repo `did`) get `status`."""
    left = [n]

    def rule(request: httpx.Request) -> httpx.Response | None:
        if left[0] <= 0 or nsid_of(request) not in nsids:
            return None
        if did is not None and repo_of(request) != did:
            return None
        left[0] -= 1
        error = "RateLimitExceeded" if status == 429 else "InternalServerError"
        return httpx.Response(status, headers=headers or {},
                              json={"error": error, "message": "injected fault"})  # fmt: skip

    return rule


def timeout_next(n: int, nsids: set[str]) -> Rule:
    left = [n]

    def rule(request: httpx.Request) -> Exception | None:
        if left[0] <= 0 or nsid_of(request) not in nsids:
            return None
        left[0] -= 1
        return httpx.ReadTimeout("injected timeout", request=request)

    return rule
