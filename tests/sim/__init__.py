"""A deterministic simulation of the apply path (issue 11, requirement 6).

The real `Replicator`, `Applier`, planner and `RepoWriter` run against in-memory fakes with a
real replica set's and the reference PDS's semantics; a process is killed at seeded awaits on
Mongo or the PDS and restarted over the same persistent state. See `world.simulate`.
"""
