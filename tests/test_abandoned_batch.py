"""A batch abandoned in flight does not leave the replicator "behind" for ever.

Found by the deterministic simulation (seed 15729 of a 20,000-seed sweep then; seed 721 of
today's world, with erasures, finds it when the fix is taken out): the oplog is
truncated while a batch is being read, so `try_next` raises 286 after the batch's first event.
The stream loop recovers (a new position, every user reconciled) and goes on, caught up, but
`oldest_unapplied_at`, set when that first event was read, was only ever cleared at the end of
an applied batch. It stayed set: `Replicator.idle` was False for good, and the lag
(`replicator_lag_seconds`, from the oldest unapplied event) grew without end on a replicator
that had nothing left to do, which pages someone for nothing. The same for any batch given up
when its stream closes (a MongoDB error while reading, a fence).
"""

from __future__ import annotations

from loguru import logger

from .sim.world import simulate


def test_a_history_loss_in_the_middle_of_a_batch_leaves_the_replicator_idle() -> None:
    """The schedule reads one event, loses the oplog under the next getMore, recovers; the
    world is then quiet (which needs `idle`) and the PDS exact."""
    logger.remove()
    result = simulate(721)
    assert any("history lost: getMore moods" in line for line in result.log)
    assert result.ok, result.problems[:4]
