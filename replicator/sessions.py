"""One PDS session per account, reused, refreshed, and kept in Mongo across restarts.

The PDS allows 30 `createSession` per 5 minutes and 300 per day per account: logging in per
write (what the app's inline writer did) or on every restart would lock busy users out.

A stored session also keeps whose it is and the last password seen for it: when the app erases
a user (their `users` document, and the password in it, gone), these are the last credentials
that can still delete their records. Once the erasure is confirmed they are forgotten.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import anyio

from .errors import AuthFailed, Rejected, TokenRejected
from .model import Account
from .pds import Pds


@dataclass
class Session:
    access: str
    refresh: str
    sub: str | None = None
    password: str | None = field(default=None, repr=False)

    def remembers(self, account: Account) -> bool:
        """Whose it is and the password are what `users` says now."""
        return self.sub == account.sub and self.password == account.password


def session_from_doc(doc: Mapping[str, Any]) -> Session:
    return Session(str(doc["access"]), str(doc["refresh"]), doc.get("sub"), doc.get("password"))


def session_to_doc(session: Session) -> dict[str, Any]:
    doc = {"access": session.access, "refresh": session.refresh, "sub": session.sub}
    if session.password:
        doc["password"] = session.password
    return doc


def _of(account: Account, access: str, refresh: str) -> Session:
    return Session(access, refresh, account.sub, account.password or None)


class SessionStore(Protocol):
    async def load_session(self, did: str) -> Session | None: ...
    async def save_session(self, did: str, session: Session) -> None: ...


class SessionPool:
    def __init__(
        self,
        pds: Pds,
        store: SessionStore,
        on_login: Callable[[str], None] | None = None,
    ) -> None:
        self.pds = pds
        self.store = store
        self._cache: dict[str, Session] = {}
        self._locks: dict[str, anyio.Lock] = {}
        self._on_login = on_login
        self.logins = 0
        self.refreshes = 0

    def _lock(self, did: str) -> anyio.Lock:
        return self._locks.setdefault(did, anyio.Lock())

    @property
    def open_sessions(self) -> int:
        return len(self._cache)

    async def _login(self, account: Account) -> Session:
        if not account.password:  # an erased user's session was its last credential
            raise AuthFailed("com.atproto.server.createSession", 0, "NoPassword",
                             "no password is known for this account")  # fmt: skip
        try:
            out = await self.pds.retrying(
                lambda: self.pds.xrpc(
                    "com.atproto.server.createSession",
                    body={"identifier": account.did, "password": account.password},
                )
            )
        except (TokenRejected, Rejected) as exc:  # the password, not the account's state
            raise AuthFailed(exc.nsid, exc.status, exc.error, exc.message) from None
        self.logins += 1
        if self._on_login:
            self._on_login(account.did)
        session = _of(account, out["accessJwt"], out["refreshJwt"])
        await self.store.save_session(account.did, session)
        return session

    async def _refresh(self, account: Account, stale: Session) -> Session:
        try:
            out = await self.pds.retrying(
                lambda: self.pds.xrpc(
                    "com.atproto.server.refreshSession", post=True, token=stale.refresh
                )
            )
        except (TokenRejected, Rejected):
            return await self._login(account)  # refresh token expired or revoked: log in once
        self.refreshes += 1
        session = _of(account, out["accessJwt"], out["refreshJwt"])
        await self.store.save_session(account.did, session)
        return session

    async def session(self, account: Account) -> Session:
        cached = self._cache.get(account.did)
        if cached is not None:
            return cached
        async with self._lock(account.did):
            cached = self._cache.get(account.did)
            if cached is None:
                cached = await self.store.load_session(account.did)
                if cached is None:
                    cached = await self._login(account)
                elif not account.erased and not cached.remembers(account):
                    cached = replace(cached, sub=account.sub, password=account.password or None)
                    await self.store.save_session(account.did, cached)
                self._cache[account.did] = cached
            return cached

    def forget(self, did: str) -> None:
        """An erased user's session, once their records are gone."""
        self._cache.pop(did, None)
        self._locks.pop(did, None)

    async def _renew(self, account: Account, stale: Session) -> Session:
        async with self._lock(account.did):
            current = self._cache.get(account.did)
            if current is not None and current.access != stale.access:
                return current  # another task already renewed it
            fresh = await self._refresh(account, stale)
            self._cache[account.did] = fresh
            return fresh

    async def call(
        self, account: Account, fn: Callable[[str], Awaitable[dict[str, Any]]]
    ) -> dict[str, Any]:
        """Run `fn(access_token)` with transient retries; on a token error renew and retry once."""
        session = await self.session(account)
        try:
            return await self.pds.retrying(lambda: fn(session.access))
        except TokenRejected:
            pass
        session = await self._renew(account, session)
        return await self.pds.retrying(lambda: fn(session.access))
