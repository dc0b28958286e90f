"""One writer at a time: a lease in Mongo, with a fencing generation on every checkpoint.

Two `replicator run` processes against one database would race each other's checkpoints. The
second waits for the lease; when the holder dies, the lease expires after `ttl` seconds and the
waiter takes over. Each takeover increments `generation`, and a checkpoint write carries it: a
checkpoint from an older generation (a paused process that woke up after losing the lease) is
refused, so it can never move the position backwards or past work it did not do.
"""

from __future__ import annotations

import os
import secrets
import socket
import time
from typing import Any

from pymongo import ReturnDocument
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import DuplicateKeyError


class LeaseLost(RuntimeError):
    """Another process holds the lease now: stop writing."""


def owner_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


class Lease:
    def __init__(
        self, state: AsyncCollection[Any], name: str, *, ttl: float = 15.0, owner: str | None = None
    ) -> None:
        self.state = state
        self.name = name
        self.ttl = ttl
        self.owner = owner or owner_id()
        self.generation: int | None = None

    async def try_acquire(self) -> bool:
        now = time.time()
        try:
            doc = await self.state.find_one_and_update(
                {"_id": self.name, "$or": [{"expires_at": {"$lt": now}}, {"owner": self.owner}]},
                {"$set": {"owner": self.owner, "expires_at": now + self.ttl, "renewed_at": now},
                 "$inc": {"generation": 1}},
                upsert=True,
                return_document=ReturnDocument.AFTER,
            )  # fmt: skip
        except DuplicateKeyError:
            return False  # held by a live owner
        if doc is None or doc.get("owner") != self.owner:
            return False
        self.generation = int(doc["generation"])
        return True

    async def renew(self) -> None:
        now = time.time()
        result = await self.state.update_one(
            {"_id": self.name, "owner": self.owner, "generation": self.generation},
            {"$set": {"expires_at": now + self.ttl, "renewed_at": now}},
        )
        if result.matched_count == 0:
            self.generation = None
            raise LeaseLost(f"lease {self.name!r} was taken over")

    async def holder(self) -> dict[str, Any] | None:
        return await self.state.find_one({"_id": self.name})

    async def release(self) -> None:
        if self.generation is not None:
            await self.state.update_one(
                {"_id": self.name, "owner": self.owner, "generation": self.generation},
                {"$set": {"expires_at": 0.0}},
            )
            self.generation = None
