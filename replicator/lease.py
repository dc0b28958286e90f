"""One writer at a time: a lease in Mongo, a local deadline, and a generation on every write.

Two `replicator run` processes against one database would undo each other's work. The second
waits for the lease; when the holder dies, the lease expires `ttl` seconds after its last
renewal and the waiter takes over. Expiry is judged on the server's clock (`$$NOW`), so hosts
whose clocks disagree still agree on who holds it.

A holder that is paused (SIGSTOP, a long GC, a VM migration) or cut off from MongoDB cannot
know that it lost the lease. So it never relies on knowing: every write (to the PDS, to the
ledger, to `moods`, the checkpoint) first calls `check()`, which fails once the local
monotonic deadline has passed: the moment the last successful renewal was *sent*, plus the
TTL, minus a margin. Another process can take over only after the TTL has run out on the
server's clock from a renewal that was received after it was sent, so by then this process
has stopped writing, by at least `margin` seconds.

What remains (docs/architecture.md, "Fencing"): a pause that falls between `check()` and the
moment the request leaves the process, or a request that spends longer than `margin` in the
network. To make the first as small as it can be, the PDS client checks right before it hands
the request to the connection pool (no await in between). For the ledger and the checkpoint,
the generation closes the gap completely: each entry carries the generation that wrote it, and
MongoDB refuses an older generation's write over a newer one (`Store.save_entries`).
"""

from __future__ import annotations

import os
import secrets
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
from loguru import logger
from pymongo import ReturnDocument
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import ConnectionFailure, DuplicateKeyError, PyMongoError


class Fenced(RuntimeError):
    """This process can no longer prove it holds the lease: it must not write."""


class LeaseLost(Fenced):
    """Another process holds the lease now (exit 5)."""


class Fence:
    """What every write checks first. This one never refuses: commands that do not hold the
    lease (backfill, audit, dlq) write under the generation they read when they started."""

    def __init__(self, generation: int | None = None) -> None:
        self.generation = generation

    def check(self) -> None:
        return None


def owner_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


# The server's clock, as epoch seconds: the unit of every time the replicator stores.
_NOW = {"$divide": [{"$toLong": "$$NOW"}, 1000]}
_NEXT = {"$add": [{"$ifNull": ["$generation", 0]}, 1]}


class Lease(Fence):
    def __init__(
        self,
        state: AsyncCollection[Any],
        name: str,
        *,
        ttl: float,  # --lease-seconds (`Settings.lease_seconds`)
        owner: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.state = state
        self.name = name
        self.ttl = ttl
        self.margin = ttl / 3  # also the renewal interval: one missed renewal is harmless
        self.owner = owner or owner_id()
        self._clock = clock
        self._deadline = float("-inf")
        self.taken_over = False

    # -- the fence ---------------------------------------------------------------------------

    def check(self) -> None:
        if self.generation is None or self._clock() >= self._deadline:
            raise Fenced(
                f"lease {self.name!r} not renewed in time: this process may no longer hold it"
            )

    @property
    def seconds_left(self) -> float:
        return self._deadline - self._clock()

    # -- Mongo -------------------------------------------------------------------------------

    def _takeable(self) -> dict[str, Any]:
        """Expired on the server's clock, or already ours."""
        expired = {"$lt": ["$expires_at", _NOW]}
        return {"_id": self.name, "$expr": {"$or": [expired, {"$eq": ["$owner", self.owner]}]}}

    def _renewal(self) -> dict[str, Any]:
        return {"expires_at": {"$add": [_NOW, self.ttl]}, "renewed_at": _NOW}

    async def try_acquire(self) -> bool:
        sent = self._clock()
        try:
            doc = await self.state.find_one_and_update(
                self._takeable(),
                [{"$set": {**self._renewal(), "owner": self.owner, "generation": _NEXT}}],
                upsert=True,
                return_document=ReturnDocument.AFTER,
            )
        except DuplicateKeyError:
            return False  # held by a live owner
        if doc is None or doc.get("owner") != self.owner:
            return False
        self.generation = int(doc["generation"])
        self._deadline = sent + self.ttl - self.margin
        self.taken_over = False
        return True

    async def renew(self) -> None:
        sent = self._clock()
        result = await self.state.update_one(
            {"_id": self.name, "owner": self.owner, "generation": self.generation},
            [{"$set": self._renewal()}],
        )
        if result.matched_count == 0:
            self.taken_over = True
            self._deadline = float("-inf")
            raise LeaseLost(f"lease {self.name!r} was taken over")
        self._deadline = sent + self.ttl - self.margin

    async def holder(self) -> dict[str, Any] | None:
        return await self.state.find_one({"_id": self.name})

    async def release(self) -> None:
        if self.generation is not None and not self.taken_over:
            await self.state.update_one(
                {"_id": self.name, "owner": self.owner, "generation": self.generation},
                {"$set": {"expires_at": 0.0}},
            )
        self._deadline = float("-inf")

    # -- keeping it ----------------------------------------------------------------------------

    async def acquire(self, stop: anyio.Event) -> bool:
        """Wait until the lease is ours (True) or `stop` is set (False)."""
        said = False
        while not stop.is_set():
            try:
                if await self.try_acquire():
                    logger.info("lease acquired (generation {})", self.generation)
                    return True
                if not said:
                    holder = await self.holder() or {}
                    logger.warning("another replicator holds the lease ({}); waiting to take "
                                   "over", holder.get("owner", "?"))  # fmt: skip
                    said = True
            except ConnectionFailure as exc:
                logger.warning("MongoDB unreachable while acquiring the lease: {}", exc)
            with anyio.move_on_after(max(0.2, self.margin)):
                await stop.wait()
        return False

    async def _keep(self, body: anyio.CancelScope) -> None:
        while True:
            await anyio.sleep(self.margin)
            try:
                await self.renew()
            except LeaseLost:
                logger.critical("the lease was taken over by another process; stopping")
                body.cancel()
                return
            except PyMongoError as exc:  # Mongo away: `check()` fences once the deadline passes
                logger.warning("lease renewal failed ({:.1f}s before writes stop): {}",
                               max(0.0, self.seconds_left), exc)  # fmt: skip

    @asynccontextmanager
    async def kept(self, stop: anyio.Event) -> AsyncIterator[bool]:
        """Acquire (waiting for the holder's lease to expire), renew in the background while
        the body runs, release at the end. Yields False if `stop` came first. If another
        process takes the lease over, the body is cancelled and `LeaseLost` raised."""
        if not await self.acquire(stop):
            yield False
            return
        error: Exception | None = None
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._keep, tg.cancel_scope)
            try:
                yield True
            except Exception as exc:  # re-raised below, outside the group, unwrapped
                error = exc
            finally:
                tg.cancel_scope.cancel()
        if self.taken_over:
            raise LeaseLost(f"lease {self.name!r} was taken over")
        if not isinstance(error, Fenced):  # a fenced process cannot know it still holds it
            try:
                await self.release()
            except PyMongoError as exc:
                logger.warning("could not release the lease (it expires by itself): {}", exc)
        if error is not None:
            raise error
