"""The `users` change stream ending (invalidate: the collection dropped or renamed) must not
freeze the process.

Found while modelling PyMongo's change streams for the simulation (tests/sim/fake_mongo.py),
not by a seed: after an `invalidate` the server closes the cursor, PyMongo marks the stream
closed (`alive` False), and every later `try_next()` returns None at once, without a round
trip and without yielding to the event loop. `Replicator._follow_users` loops on `try_next()`
while `stop` is not set and never looked at `alive`, so it spun forever in one step of the
event loop: the moods stream, the lease and the health thread's loop tick all stopped with it.
Now an invalidate ends the read and the next stream starts after it (`startAfter`).
"""

from __future__ import annotations

from typing import Any, cast

import anyio
import pytest

from replicator.apply import Applier
from replicator.store import Names, Store
from replicator.stream import Replicator

SPIN = 1000  # calls of try_next on an ended stream that count as spinning


class EndedStream:
    """A users change stream as PyMongo 4 leaves it after an invalidate."""

    def __init__(self) -> None:
        self.calls = 0
        self.resume_token: dict[str, str] | None = {"_data": "8200000000000001"}

    @property
    def alive(self) -> bool:
        return self.calls == 0

    async def try_next(self) -> dict[str, Any] | None:
        self.calls += 1
        if self.calls == 1:
            return {"_id": self.resume_token, "operationType": "invalidate"}
        if self.calls > SPIN:
            raise RuntimeError("try_next called in a loop on a closed change stream")
        return None  # a closed cursor: no getMore, no await

    async def close(self) -> None:
        return None


class UsersOnly:
    def __init__(self) -> None:
        self.streams: list[EndedStream] = []
        self.names = Names()

    async def load_checkpoint(self, stream: str | None = None) -> dict[str, Any] | None:
        return None

    async def save_checkpoint(self, token: Any, *, stream: str | None = None) -> None:
        return None

    async def watch_users(self, token: Any, *, max_await_ms: int) -> EndedStream:
        self.streams.append(EndedStream())
        return self.streams[-1]


@pytest.mark.anyio
async def test_an_ended_users_stream_is_not_read_in_a_loop() -> None:
    store = UsersOnly()
    replicator = Replicator(cast(Store, store), cast(Applier, None), max_await_ms=10)
    stop = anyio.Event()
    spun = False
    with anyio.move_on_after(1.0):
        try:
            await replicator._follow_users(stop)
        except RuntimeError:
            spun = True
    assert not spun, "try_next() was called in a loop on a stream that had ended"
    assert all(s.calls < SPIN for s in store.streams)
    assert 1 <= len(store.streams) <= 3  # reopened after the invalidate, with a pause
