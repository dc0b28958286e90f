"""`replicator dev`: the whole thing on one machine, in the foreground."""

from __future__ import annotations

import contextlib
import os
import sys
from datetime import UTC, datetime

import anyio
import click

from ..config import Settings
from ..identity import PUBLIC_PLC
from ..runtime import open_runtime
from ..store import Store, open_client
from .procs import free_port
from .seed import insert_mood, seed_user
from .stack import LocalStack

DEMO_MOODS = ["first mood from the local stack", "multi-line\nmood ✨", "🌈 unicode works"]


def run_dev(db_name: str, *, run_replicator_too: bool = True) -> int:
    stack = LocalStack.from_env()
    click.echo("starting the local stack (MongoDB wire-protocol server + reference PDS)...")
    with stack:
        assert stack.mongodb_uri is not None and stack.pds_url is not None
        # Free ports for everything, the metrics endpoint included (9464 may be taken).
        http_addr = os.environ.get("REPLICATOR_HTTP_ADDR") or f"127.0.0.1:{free_port()}"
        settings = Settings(stack.mongodb_uri, db_name, stack.pds_url, http_addr=http_addr,
                            plc_url=stack.plc_url or PUBLIC_PLC)  # fmt: skip
        demo = anyio.run(_seed, settings, stack.pds_admin_password)
        _print_banner(settings, demo, metrics=run_replicator_too)
        if not run_replicator_too:
            click.echo("\n--no-run: the stack stays up until Ctrl-C")
            with contextlib.suppress(KeyboardInterrupt):
                anyio.run(anyio.sleep_forever)
            return 0
        from ..cli import run_replicator

        try:
            return anyio.run(run_replicator, settings)
        except KeyboardInterrupt:
            return 0


async def _seed(settings: Settings, admin_password: str | None) -> dict[str, str]:
    async with open_client(settings.mongodb_uri) as client:
        await client.drop_database(settings.db_name)  # the local PDS starts empty every time
        store = Store(client, settings.db_name, settings.names)
        await store.moods.create_index("user")  # as the app's own database has it
        user = await seed_user(store, settings.pds_url, "alice", admin_password=admin_password)
        await seed_user(store, settings.pds_url, "bob", with_account=False)
        for i, text in enumerate(DEMO_MOODS):
            when = datetime(2026, 1, 1 + i, 12, 0, tzinfo=UTC)
            await insert_mood(store, user.sub, text, when=when)
        async with open_runtime(settings) as rt:  # mirror the seeded moods (the backfill path)
            await rt.applier.reconcile_user(user.sub)
        # Everything seeded is mirrored: the replicator starts from here, with nothing left for
        # a backfill (a first start without a checkpoint would advise one).
        stream = await store.watch_moods(None, max_await_ms=100, batch_size=1)
        try:
            await store.save_checkpoint(stream.resume_token)
        finally:
            await stream.close()
        return {"sub": user.sub, "did": user.did or "", "handle": user.handle}


def _print_banner(settings: Settings, demo: dict[str, str], *, metrics: bool) -> None:
    py = sys.executable
    uri, db, moods = settings.mongodb_uri, settings.db_name, settings.names.moods
    insert = (
        f"{py} -c \"import datetime, pymongo; pymongo.MongoClient('{uri}')['{db}']['{moods}']"
        f".insert_one({{'user': '{demo['sub']}', 'mood': 'hello from the one-liner', "
        f"'when': datetime.datetime.now(datetime.timezone.utc)}})\""
    )
    listing = (
        f"curl -s '{settings.pds_url}/xrpc/com.atproto.repo.listRecords"
        f"?repo={demo['did']}&collection=computer.aesthetic.mood'"
    )
    served = (
        f"  metrics   http://{settings.http_addr}/metrics  (/healthz /readyz)\n" if metrics else ""
    )
    click.echo(
        f"""
local stack is up
  MongoDB   {uri}  (db {db!r})
  PDS       {settings.pds_url}
{served}  demo user {demo["handle"]}  sub {demo["sub"]}  did {demo["did"]}
            {len(DEMO_MOODS)} moods seeded and mirrored; a user without an ATProto account too

insert a mood (in another terminal):
  {insert}
see the records on the PDS:
  {listing}

Ctrl-C stops the replicator and the servers.
"""
    )
