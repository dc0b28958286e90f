"""Accounts that cannot be written now, and why: the PDS says deactivated, taken down or
suspended, or the DID document names another PDS (moved). All of these are reversible.

`erased` is the one kind the replicator cannot get out of by itself: the app erased the user,
the account still exists on the PDS, and no credential the replicator kept works any more
(the stored session refused, the last password refused or never seen). Their records stay
public until an operator acts (docs/runbook.md, "An erasure that cannot finish"); the gate
re-checks, with backoff, whether the account was deleted meanwhile, and the user is released
as soon as `users` gives them an account again (credentials restored).

While an account is parked here, every write of its user is parked too, deletes included: a
deactivated account hides its records without deleting them, so a delete that "succeeded"
against it proves nothing. The gate re-checks each parked account with backoff
(`getRepoStatus`, or the DID document for a move); once it is writable again the applier
reconciles the user against the full listing of the repo, with no one running anything. A
deleted account (RepoNotFound/AccountNotFound) is not parked: it is final, and its deletes
count as done.

Kept in `replicator_accounts`, so `status` shows parked accounts by reason and a restart
does not forget them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Literal, Protocol

from loguru import logger

from .errors import AccountGone, PdsError
from .identity import Directory, host_of, same_host
from .model import Account

Kind = Literal["unavailable", "moved", "erased"]


@dataclass(frozen=True)
class ParkedAccount:
    did: str
    sub: str
    kind: Kind
    reason: str
    since: float
    next_check_at: float
    attempts: int = 0


class AccountStore(Protocol):
    async def parked_accounts(self) -> list[ParkedAccount]: ...
    async def save_parked_account(self, parked: ParkedAccount) -> None: ...
    async def release_account(self, did: str) -> None: ...


class StatusSource(Protocol):
    async def repo_status(self, did: str) -> dict[str, object]: ...


class AccountGate:
    def __init__(
        self,
        store: AccountStore,
        pds: StatusSource,
        pds_url: str,
        directory: Directory | None = None,
        *,
        recheck_seconds: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.pds = pds
        self.pds_url = pds_url
        self.directory = directory
        self.recheck_seconds = recheck_seconds
        self._clock = clock
        self._parked: dict[str, ParkedAccount] | None = None

    async def _all(self) -> dict[str, ParkedAccount]:
        if self._parked is None:
            self._parked = {p.did: p for p in await self.store.parked_accounts()}
        return self._parked

    def _backoff(self, attempts: int, kind: Kind = "unavailable") -> float:
        """An erased user's account is looked at every minute at most: once it is deleted,
        the user is forgotten within a minute (a `getRepoStatus`, nothing more)."""
        cap = 60.0 if kind == "erased" else 900.0
        return float(min(cap, self.recheck_seconds * 2 ** min(attempts, 10)))

    async def blocked(self, account: Account) -> str | None:
        """Why this account cannot be written now, or None."""
        parked = (await self._all()).get(account.did)
        if parked is not None and parked.kind == "erased" and not account.erased:
            await self.release(account.did)  # `users` has credentials for it again
            parked = None
        if parked is not None:
            return parked.reason
        if self.directory is not None:  # what is known now: the write never waits for it
            endpoint = self.directory.endpoint(account.did)
            if endpoint is not None and not same_host(endpoint, self.pds_url):
                reason = f"account moved to {host_of(endpoint)}"
                await self.park(account, "moved", reason)
                return reason
        return None

    async def all_parked(self, dids: Iterable[str]) -> bool:
        """Every one of these accounts waits on its own re-check (nothing to try before)."""
        parked = await self._all()
        return all(did in parked for did in dids)

    async def release(self, did: str) -> None:
        await self.store.release_account(did)
        (await self._all()).pop(did, None)

    def forget(self, did: str) -> None:
        """An erased user's entry and DID document, once their records are gone (the store
        forgets the entry too)."""
        if self._parked is not None:
            self._parked.pop(did, None)
        if self.directory is not None:
            self.directory.forget(did)

    async def park(self, account: Account, kind: Kind, reason: str) -> ParkedAccount:
        parked_all = await self._all()
        now = self._clock()
        previous = parked_all.get(account.did)
        parked = ParkedAccount(
            account.did, account.sub, kind, reason,
            since=previous.since if previous else now,
            next_check_at=now + self._backoff(0, kind), attempts=0,
        )  # fmt: skip
        if previous is None or (previous.kind, previous.reason) != (kind, reason):
            logger.bind(did=account.did).warning("account parked: {}", reason)
        await self.store.save_parked_account(parked)
        parked_all[account.did] = parked
        return parked

    async def due(self) -> list[ParkedAccount]:
        now = self._clock()
        return [p for p in (await self._all()).values() if p.next_check_at <= now]

    async def recheck(self, parked: ParkedAccount) -> bool:
        """True once the account can be written again (it is then released)."""
        try:
            writable = await self._writable(parked)
        except AccountGone:
            writable = True  # deleted for good: the reconcile counts its deletes as done
        except PdsError as exc:
            logger.bind(did=parked.did).warning("account check failed: {}", exc)
            writable = False
        parked_all = await self._all()
        if writable:
            await self.release(parked.did)
            logger.bind(did=parked.did).info("account writable again ({}): reconciling",
                                             parked.reason)  # fmt: skip
            return True
        attempts = parked.attempts + 1
        later = replace(
            parked,
            attempts=attempts,
            next_check_at=self._clock() + self._backoff(attempts, parked.kind),
        )
        await self.store.save_parked_account(later)
        parked_all[parked.did] = later
        return False

    async def _writable(self, parked: ParkedAccount) -> bool:
        if parked.kind == "moved":
            if self.directory is None:
                return True
            # Decided on what the directory said last; its document is fetched again now,
            # and the next check (with backoff) sees that.
            endpoint = self.directory.endpoint(parked.did)
            self.directory.refresh(parked.did)
            return endpoint is not None and same_host(endpoint, self.pds_url)
        status = await self.pds.repo_status(parked.did)
        if parked.kind == "erased":
            # Its credentials will not come back by themselves: only a deleted account (then
            # AccountGone) or a `users` document with an account again (`blocked`) end it.
            return False
        return bool(status.get("active"))
