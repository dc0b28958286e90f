"""`replicator dev`: the whole thing on one machine, in the foreground.

It prints (and writes to `.state/dev.env`) the `export` lines every other command needs to
talk to this stack, and keeps its ports from one start to the next when they are free (the
demo user's sub and DID are new each time: the local PDS and its PLC start empty). One
`replicator dev` at a time per state directory: a second one says so in one line.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shlex
import sys
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

import anyio
import click

from replicator.config import Settings
from replicator.errors import Unavailable
from replicator.identity import PUBLIC_PLC
from replicator.runtime import open_runtime
from replicator.store import Store, open_client

from .procs import free_port, port_open
from .seed import insert_mood, seed_user
from .servers import LOCAL_PDS_ADMIN_PASSWORD
from .stack import LocalStack

DEMO_MOODS = ["first mood from the local stack", "multi-line\nmood ✨", "🌈 unicode works"]


def run_dev(db_name: str, *, run_replicator_too: bool = True) -> int:
    stack = LocalStack.from_env()
    lock = _only_one(stack.state)
    last = _last_ports(stack.state / ENV_FILE)
    stack.prefer = last
    click.echo("starting the local stack (MongoDB wire-protocol server + reference PDS)...")
    with lock, stack:
        assert stack.mongodb_uri is not None and stack.pds_url is not None
        # Free ports for everything, the metrics endpoint included (9464 may be taken).
        http_port = last.get("http", 0)
        if not http_port or port_open("127.0.0.1", http_port):
            http_port = free_port()
        http_addr = os.environ.get("REPLICATOR_HTTP_ADDR") or f"127.0.0.1:{http_port}"
        settings = Settings(stack.mongodb_uri, db_name, stack.pds_url, http_addr=http_addr,
                            plc_url=stack.plc_url or PUBLIC_PLC)  # fmt: skip
        demo = anyio.run(_seed, settings, stack.pds_admin_password)
        # The admin password of the embedded PDS only (a local constant): an external PDS's,
        # from the environment, is neither printed nor written down.
        local = stack.pds_admin_password if stack.pds is not None else None
        exports = _exports(settings, local)
        env_file = stack.state / ENV_FILE
        env_file.touch(mode=0o600)  # the connection string may hold a password
        env_file.chmod(0o600)
        env_file.write_text(exports + "\n")
        _print_banner(settings, demo, exports, stack.state / ENV_FILE, metrics=run_replicator_too)
        if not run_replicator_too:
            click.echo("\n--no-run: the stack stays up until Ctrl-C")
            with contextlib.suppress(KeyboardInterrupt):
                anyio.run(anyio.sleep_forever)
            return 0
        from replicator.service import run_replicator

        try:
            return anyio.run(run_replicator, settings)
        except KeyboardInterrupt:
            return 0


async def _seed(settings: Settings, admin_password: str | None) -> dict[str, str]:
    async with open_client(settings.mongodb_uri) as client:
        await client.drop_database(settings.db_name)  # the local PDS starts empty every time
        store = Store(client, settings.db_name, settings.names)
        await store.docs.create_index("user")  # as the app's own database has it
        user = await seed_user(store, settings.pds_url, "alice", admin_password=admin_password)
        await seed_user(store, settings.pds_url, "bob", with_account=False)
        for i, text in enumerate(DEMO_MOODS):
            when = datetime(2026, 1, 1 + i, 12, 0, tzinfo=UTC)
            await insert_mood(store, user.sub, text, when=when)
        async with open_runtime(settings) as rt:  # mirror the seeded moods (the backfill path)
            await rt.applier.reconcile_user(user.sub)
        # Everything seeded is mirrored: the replicator starts from here, with nothing left for
        # a backfill (a first start without a checkpoint would advise one).
        stream = await store.watch_docs(None, max_await_ms=100, batch_size=1)
        try:
            await store.save_checkpoint(stream.resume_token)
        finally:
            await stream.close()
        return {"sub": user.sub, "did": user.did or "", "handle": user.handle}


ENV_FILE = "dev.env"


def _only_one(state: Path) -> FileLock:
    """Held for the life of this `replicator dev`: a second one in the same state directory
    (its MongoDB data is in use) is an `Unavailable` error, one line."""
    state.mkdir(parents=True, exist_ok=True)
    lock = FileLock(state / "dev.lock")
    if not lock.acquire():
        raise Unavailable(
            f"another `replicator dev` is running with the state in {state} (its MongoDB data "
            "is in use): stop it (Ctrl-C there), use its stack (`source "
            f"{state / ENV_FILE}`), or give this one its own with REPLICATOR_STATE_DIR=<dir>"
        )
    return lock


class FileLock:
    """An exclusive, non-blocking `flock` on a file, released when the process ends."""

    def __init__(self, path: Path) -> None:
        self.file = path.open("a+")

    def acquire(self) -> bool:
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        self.file.seek(0)
        self.file.truncate()
        self.file.write(str(os.getpid()))
        self.file.flush()
        return True

    def __enter__(self) -> FileLock:
        return self

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self.file, fcntl.LOCK_UN)
        self.file.close()


_PORT_OF = {"MONGODB_CONNECTION_STRING": "mongo", "PDS_URL": "pds", "REPLICATOR_PLC_URL": "plc",
            "REPLICATOR_HTTP_ADDR": "http"}  # fmt: skip


def _last_ports(path: Path) -> dict[str, int]:
    """The ports the last `replicator dev` wrote to its env file (none: a first start)."""
    ports: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            key, _, value = line.removeprefix("export ").partition("=")
            value = value.strip().strip("'")
            name = _PORT_OF.get(key)
            port = _port_of(value)
            if name and port is not None:
                ports[name] = port
    return ports


def _port_of(value: str) -> int | None:
    """The port of a URL (`mongodb://u:pw@h:27017/...`: 27017, not a password's digits) or
    of a bare `host:port`."""
    with contextlib.suppress(ValueError):
        return urlsplit(value if "://" in value else f"//{value}").port
    return None


def _exports(settings: Settings, admin_password: str | None) -> str:
    """What `status`, `audit`, `backfill`, `check` and the rest need to reach this stack."""
    values = {
        "MONGODB_CONNECTION_STRING": settings.mongodb_uri,
        "MONGODB_NAME": settings.db_name,
        "PDS_URL": settings.pds_url,
        "REPLICATOR_PLC_URL": settings.plc_url,
        "REPLICATOR_HTTP_ADDR": settings.http_addr,
        "PDS_ADMIN_PASSWORD": admin_password or "",
    }
    return "\n".join(f"export {k}={shlex.quote(v)}" for k, v in values.items() if v)


def _print_banner(
    settings: Settings, demo: dict[str, str], exports: str, env_file: Path, *, metrics: bool
) -> None:
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
    local = "PDS_ADMIN_PASSWORD" in exports  # the embedded PDS (its password is a constant)
    pds_note = f"  (admin password: {LOCAL_PDS_ADMIN_PASSWORD}, local only)" if local else ""
    served = (
        f"  metrics   http://{settings.http_addr}/metrics  (/healthz /readyz)\n" if metrics else ""
    )
    click.echo(
        f"""
local stack is up
  MongoDB   {uri}
  database  {db}
  PDS       {settings.pds_url}{pds_note}
  PLC       {settings.plc_url}
{served}  demo user {demo["handle"]}  sub {demo["sub"]}  did {demo["did"]}
            {len(DEMO_MOODS)} moods seeded and mirrored; a user without an ATProto account too
            (new each start: the local PDS starts empty; the ports stay when they are free)

for every other command, in another terminal (also in {env_file}: `source` it):
{exports}

then, for example:
  replicator status
  {insert}
  {listing}

Ctrl-C stops the replicator and the servers.
"""
    )
