"""`python -m replicator_dev.bench.probe <replicator args>`: a replicator command whose PDS calls
are recorded, so the bench can say which commit shapes a scenario really produced.

Every `Pds.xrpc` call of the process is appended to the file named by `BENCH_PROBE_FILE` as
one JSON line, when it ends: `[nsid, repo, writes, ok, start, end]`. `writes` is the number of
records the call changes (the length of `applyWrites`'s `writes`, 1 for `putRecord` /
`deleteRecord` / `createRecord`, 0 for a read); `start`/`end` are `time.monotonic()`, the
system-wide CLOCK_MONOTONIC, comparable with the bench's own clock. One unbuffered write per
call, a few microseconds next to an HTTP round trip; nothing else of the replicator changes.

With `BENCH_NULL_PDS=1` the process has no PDS at all: every call is answered at once, as
the reference PDS would (a write with its records' CIDs, a listing with no record): the same
command's MongoDB work, with nothing else to wait for, for the bench's MongoDB ceilings.

Imports only what the command imports anyway (the `replicator_dev.bench` package imports nothing).
"""

from __future__ import annotations

import os
import time
from typing import Any

import orjson

ENV = "BENCH_PROBE_FILE"
NULL_PDS_ENV = "BENCH_NULL_PDS"


def install_null_pds() -> None:
    from replicator.desired import record_cid
    from replicator.pds import Pds

    async def xrpc(self: Pds, nsid: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
        body = kwargs.get("body") or {}
        name = nsid.rsplit(".", 1)[-1]
        if name in ("createSession", "refreshSession"):
            return {"accessJwt": "null", "refreshJwt": "null", "did": body.get("identifier")}
        if name == "listRecords":
            return {"records": []}
        if name == "getRepoStatus":
            return {"active": True}
        if name == "applyWrites":
            results = [{"cid": record_cid(w["value"])} if "value" in w else {}
                       for w in body.get("writes") or ()]  # fmt: skip
            return {"results": results}
        if name == "putRecord":
            return {"cid": record_cid(body["record"])}
        return {}

    Pds.xrpc = xrpc  # type: ignore[method-assign]


def install(path: str) -> None:
    from replicator.pds import WRITE_NSIDS, Pds

    out = open(path, "ab", buffering=0)  # noqa: SIM115 - open for the life of the process
    original = Pds.xrpc

    async def xrpc(self: Pds, nsid: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
        body = kwargs.get("body") or {}
        repo = body.get("repo")
        if nsid == "com.atproto.repo.applyWrites":
            writes = len(body.get("writes") or ())
        else:
            writes = 1 if nsid in WRITE_NSIDS else 0
        ok = False
        start = time.monotonic()
        try:
            result = await original(self, nsid, *args, **kwargs)
            ok = True
            return result
        finally:
            line = [nsid, repo, writes, ok, start, time.monotonic()]
            out.write(orjson.dumps(line) + b"\n")

    Pds.xrpc = xrpc  # type: ignore[method-assign]


def main() -> None:
    if os.environ.get(NULL_PDS_ENV):
        install_null_pds()
    path = os.environ.get(ENV)
    if path:
        install(path)
    from replicator.cli import main as cli

    cli(prog_name="replicator")


if __name__ == "__main__":
    main()
