"""The local stack: an embedded MongoDB wire-protocol server and the reference PDS.

One module serves `replicator dev` and the test fixtures, so what developers run
is what the tests run against.
"""
