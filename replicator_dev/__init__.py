"""What a working copy adds to `replicator`: the local stack (`dev`, `setup`), the bench and
the soak's helpers. Not shipped in the production image; it imports `replicator`, never the
reverse (its commands reach the CLI through the `replicator.commands` entry points)."""
