"""`replicator bench`: how fast the replicator mirrors moods, next to what the PDS itself takes.

One run on the local stack (or the servers named by `MONGODB_CONNECTION_STRING` / `PDS_URL`)
measures and prints one table (issue #6):

- (a) the PDS's capacity on this machine: single-record commits across the bench's repos,
  `applyWrites` batches of 200 creates, and the commits the backfill and the burst actually
  sent (same records per commit, same calls, as many repos in flight), as fast as the PDS
  accepts them;
- (b) the old inline writer: `createSession` + `createRecord` per mood, one after another;
- (c) the replicator: a burst of inserts (first insert → last record seen on the PDS
  firehose), a purge (`deleteMany` per user), a backfill, the insert → visible lag under a
  steady insert rate, peak RSS while draining a large backlog, and the core alone (change
  stream → direct read → desired state → ledger diff → ledger write, with a PDS that does
  nothing) plus the pure planner on in-memory data.

Modules: `common` (sizes, seeded users, the replicator as a child process, the firehose
watcher, CPU accounting, the bench's stack), `probe` (the replicator with its PDS calls
recorded), `shape` (a scenario's commit shape from those calls), `pds_capacity` ((a) and (b)),
`scenarios` ((c) end to end), `core` (the core alone), `report` (table, ratios, targets,
JSON), `runner` (the whole run).

The package imports nothing itself: `python -m replicator_dev.bench.probe` loads no more than the
replicator it runs.
"""
