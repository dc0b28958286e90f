"""`replicator bench`: the throughput, lag and memory figures of issue #6, in one table."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import click

# Everything else is imported when the command runs: `replicator run` stays lean.

# A placeholder when no measurement needs the PDS (`--only core`): no PDS is started.
_NO_PDS = "http://no-pds.invalid"


@click.command()
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write the report (table, ratios, targets, raw figures) as JSON.",
)
@click.option(
    "--quick",
    is_flag=True,
    help="About 10x smaller (20 users, 1,000 moods, 10 s lag window): a smoke run.",
)
@click.option(
    "--only",
    default="a,b,c",
    show_default=True,
    help="Comma-separated subset: a, b, c (= backfill, burst, purge, lag, backlog, "
    "core), or any of those names; rss = backlog. The backfill and the burst always bring "
    "their own (a) run at their commit shape.",
)
@click.option(
    "--users",
    type=click.IntRange(1, 10_000),
    help="Users (PDS accounts) the load is spread over. [default: 200; quick 20]",
)
@click.option(
    "--moods",
    type=click.IntRange(10),
    help="Moods of the burst and the backfill (purge: half; backlog: 10x; core: 2x). "
    "[default: 10,000; quick 1,000]",
)
@click.option(
    "--backlog",
    type=click.IntRange(10),
    help="Moods of the peak-RSS backlog. [default: 100,000; quick 10,000]",
)
@click.option(
    "--backlog-seconds",
    type=click.FloatRange(1),
    help="Drain the backlog at most this long, then report how far it got. "
    "[default: 300; quick 60]",
)
@click.option(
    "--lag-seconds",
    type=click.FloatRange(1),
    help="Window of the steady 50 inserts/s. [default: 60; quick 10]",
)
@click.option(
    "--seconds",
    "capacity_seconds",
    type=click.FloatRange(1),
    help="Duration of each PDS capacity run (a), at the burst's and the backfill's shapes "
    "too. [default: 20; quick 4]",
)
@click.option(
    "--concurrency",
    type=click.IntRange(1, 256),
    help="The replicator's --concurrency. [default: its own default, 8]",
)
@click.option(
    "--batch-size",
    type=click.IntRange(1, 10_000),
    help="The replicator's --batch-size. [default: its own default, 2000]",
)
@click.option(
    "--profile",
    "profile_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Profile the burst's and the backfill's replicator (pyinstrument), the MongoDB "
    "server meanwhile (py-spy) and the core (pyinstrument) into this folder.",
)
@click.option(
    "--mongodb-uri",
    envvar="MONGODB_CONNECTION_STRING",
    show_envvar=True,
    help="An existing MongoDB (replica set); default: start the embedded server.",
)
@click.option(
    "--pds-url",
    envvar="PDS_URL",
    show_envvar=True,
    help="An existing PDS; default: start the reference PDS locally.",
)
@click.option("--keep", is_flag=True, help="Keep the bench's databases (bench_<run>_*).")
def bench(**kw: Any) -> None:
    """Measure the PDS's capacity (a), the old inline writer (b) and the replicator (c).

    Starts its own local stack (like `replicator dev`) unless MONGODB_CONNECTION_STRING /
    PDS_URL name servers, seeds users once, runs each measurement in a database of its own
    (dropped afterwards), prints one table with the ratios (c)/(a) and (c)/(b), and the CPU
    each process used. The burst's and the backfill's commit shapes (records per commit,
    repos in flight) are counted from the replicator's own PDS calls, and (a) is measured
    again at each of them: the PDS's real limit for writes of that shape. `--quick` takes
    about 4 minutes on two cores; a full run does about ten times the work.
    """  # fmt: skip
    import anyio
    from rich.console import Console

    from replicator_dev.bench.common import BenchStack, Sizes, dumps, oplog_entries
    from replicator_dev.bench.report import print_report
    from replicator_dev.bench.runner import needs_pds, parse_only, run_bench
    from replicator_dev.devstack.servers import state_dir

    try:
        only = parse_only(kw["only"])
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--only") from None
    if not only:
        raise click.BadParameter("nothing selected", param_hint="--only")
    sizes = Sizes.build(
        quick=kw["quick"], users=kw["users"], moods=kw["moods"], backlog=kw["backlog"],
        lag_seconds=kw["lag_seconds"], capacity_seconds=kw["capacity_seconds"],
        concurrency=kw["concurrency"], batch_size=kw["batch_size"],
        backlog_seconds=kw["backlog_seconds"],
    )  # fmt: skip
    code = _code_version()
    work_dir = state_dir() / "bench"
    oplog = oplog_entries(sizes)
    stack = BenchStack(
        mongodb_uri=kw["mongodb_uri"] or None,
        pds_url=kw["pds_url"] or (None if needs_pds(only) else _NO_PDS),
        pds_admin_password=os.environ.get("PDS_ADMIN_PASSWORD") or None,
        plc_url=os.environ.get("REPLICATOR_PLC_URL") or None,
        state=work_dir / "stack",
        mongo_args=("--oplog-max-entries", str(oplog)),
    )
    say = _say
    say("starting the local stack..." if stack.mongodb_uri is None or stack.pds_url is None
        else "using the configured servers")  # fmt: skip
    with stack:
        assert stack.mongodb_uri is not None and stack.pds_url is not None
        server_pids = {
            "mongo": stack.mongo.child.pid if stack.mongo and stack.mongo.child else None,
            "pds": stack.pds.child.pid if stack.pds and stack.pds.child else None,
        }
        stack_kind = {
            "mongodb": "embedded SecantusDB" if stack.mongo else "external",
            "pds": ("embedded @atproto/dev-env" if stack.pds
                    else "none" if stack.pds_url == _NO_PDS else "external"),
        }  # fmt: skip
        if stack.mongo:
            stack_kind["oplog_entries"] = f"{oplog:,}"
        report = anyio.run(
            lambda: run_bench(
                mongodb_uri=stack.mongodb_uri or "",
                pds_url=stack.pds_url or "",
                admin_password=stack.pds_admin_password,
                sizes=sizes,
                only=only,
                work_dir=work_dir,
                server_pids=server_pids,
                stack_kind=stack_kind,
                plc_url=stack.plc_url,
                profile_dir=kw["profile_dir"],
                keep=kw["keep"],
                say=say,
            )
        )
    report["code"] = code
    if _code_version() != code:
        report["notes"].append(
            "The replicator's files changed during the run: measurements that started a new "
            "process after the change ran the new code."
        )
    print_report(report, Console(width=max(150, Console().width)))
    if kw["json_path"]:
        kw["json_path"].write_bytes(dumps(report))
        say(f"JSON written to {kw['json_path']}")
    failed = [k for k, v in report["results"].items() if isinstance(v, dict) and "error" in v]
    sys.exit(1 if failed else 0)


def _code_version() -> dict[str, Any]:
    """Which replicator was measured: the commit, and whether its files differ from it."""
    import subprocess

    here = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        changed = subprocess.run(
            ["git", "status", "--porcelain", "--", "."],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.split("\n")
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"commit": commit or None,
            "uncommitted": sorted(line[3:] for line in changed if line.strip())}  # fmt: skip


def _say(text: str) -> None:
    click.echo(text, err=True)
