"""An intent settles only once its rkey is written back.

Found by the deterministic simulation (seed 9216 of the 20,000-seed sweep): an account comes
back, its user is reconciled (work after the checkpoint: no event will replay it), the
`applyWrites` lands, the ledger settles the entries as `present`, and the process dies before
`write_back_many`. Nothing ever wrote `atproto.rkey` on those documents again: the records
were right, but the moods had no permalink. Now the rkeys are written back first; a kill
between the two leaves the intents pending, and a pending intent is finished later (a replay,
or the retry of stale intents).

These run one apply over the simulation's fakes (tests/sim), killing the process right after
one store call, then look at what a restarted process finds.
"""

from __future__ import annotations

import functools

import anyio
import pytest
from bson import ObjectId
from loguru import logger

from replicator import tid
from replicator.model import State
from replicator.store import STALE_INTENT_SECONDS

from .sim.loop import SimLoop
from .sim.scheduler import Crash, Trigger
from .sim.world import World


def _run_reconcile(kill_after: str, nth: int) -> tuple[World, ObjectId]:
    """One user with one new mood; its reconcile is killed right after the `nth` call of
    `kill_after`; then a new process retries what is due once the intent is stale."""
    logger.remove()
    world = World(0, overrides={"pds_fault_rate": 0.0, "token_ttl": None, "triggers": ()},
                  crash_at=(Trigger("after", site=kill_after, nth=nth),))  # fmt: skip
    user = world.app.add_user(with_account=True)
    mood = world.app.object_id()
    world.mongo.insert("moods", {"_id": mood, "user": user.sub, "mood": "hi",
                                 "when": world.app.when()})  # fmt: skip

    async def main() -> None:
        first = world.spawn(crashable=True)
        with pytest.raises(Crash):
            await first.replicator.applier.reconcile_user(user.sub)
        world.clock.advance(STALE_INTENT_SECONDS + 1)
        second = world.spawn(crashable=False)
        await second.replicator.applier.retry_parked()
        for inc in (first, second):
            for client in inc.clients:
                await client.aclose()

    anyio.run(main, backend_options={"loop_factory": functools.partial(SimLoop, world.clock)})
    return world, mood


@pytest.mark.parametrize(("site", "nth"), [("save_entries", 2), ("write_back_many", 1)])
def test_a_kill_around_the_settle_still_ends_written_back(site: str, nth: int) -> None:
    world, mood = _run_reconcile(site, nth)
    assert world.scheduler.crashed_at == [(site, "after")]
    doc = world.mongo.coll("moods")[mood]
    entry = world.mongo.coll("replicator_ledger")[str(mood)]
    rkey = tid.from_object_id(mood)
    assert entry["state"] == State.PRESENT.value
    assert (doc.get("atproto") or {}).get("rkey") == rkey, "settled, but never written back"
    assert list(world.pds.repos[entry["did"]].collection()) == [rkey]
