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
    # Called with each real answer; may change its headers (e.g. announce rate limits).
    after: list[Callable[[httpx.Request, httpx.Response], None]] = field(default_factory=list)
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
        response = await self.inner.handle_async_request(request)
        for hook in self.after:
            hook(request, response)
        return response

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


def announce_budget(
    did: str, remaining: int, reset_in: float
) -> Callable[[httpx.Request, httpx.Response], None]:
    """Make the real PDS's answers to `did`'s writes carry a write budget, as a PDS with repo
    write limits enabled does (`RateLimit-Remaining` falls by each write's cost)."""
    import time

    left = [remaining]
    reset_at = time.time() + reset_in

    def hook(request: httpx.Request, response: httpx.Response) -> None:
        if repo_of(request) != did or nsid_of(request) not in _WRITES:
            return
        left[0] = max(0, left[0] - 3)
        response.headers["RateLimit-Limit"] = "5000"
        response.headers["RateLimit-Remaining"] = str(left[0])
        response.headers["RateLimit-Reset"] = str(int(reset_at))
        response.headers["RateLimit-Policy"] = "5000;w=3600"

    return hook


_WRITES = {f"com.atproto.repo.{n}" for n in ("putRecord", "applyWrites", "deleteRecord",
                                               "createRecord")}  # fmt: skip
