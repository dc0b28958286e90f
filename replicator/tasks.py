"""Task groups whose single failure comes out as it was raised.

anyio wraps whatever a task group's body or tasks raise in an exception group. The callers
decide with one `except` per error (Fenced, a crash, a lost connection); a group holding one
exception would slip past all of them, so it is unwrapped. Several failures stay a group."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import anyio.abc


@asynccontextmanager
async def task_group() -> AsyncIterator[anyio.abc.TaskGroup]:
    try:
        async with anyio.create_task_group() as tg:
            yield tg
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
