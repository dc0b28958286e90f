"""The two servers of the local stack: MongoDB (SecantusDB, embedded) and the reference PDS."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .node import PDS_DIR, ensure_pds_installed, node_binary, npm_env
from .procs import Child, StackError, free_port, port_open

MONGO_READY_TIMEOUT = 30.0
PDS_READY_TIMEOUT = 120.0
# dev-env's fixed admin password (TestNetworkNoAppView); only the local stack uses it.
LOCAL_PDS_ADMIN_PASSWORD = "admin-pass"


def _http_ok(url: str) -> bool:
    with (
        contextlib.suppress(OSError, ValueError),
        urllib.request.urlopen(url, timeout=1) as resp,  # noqa: S310 - loopback URL we built
    ):
        return bool(resp.status == 200)
    return False


def _launch(spawn: Callable[[int], tuple[Child, Callable[[], bool], str]], timeout: float) -> Child:
    """Start a server and wait until it answers; up to three tries (a port taken meanwhile)."""
    for attempt in range(3):
        child, ready, what = spawn(attempt)
        try:
            child.wait_ready(ready, timeout=timeout, what=what)
            return child
        except StackError:
            child.stop()
            if attempt == 2:
                raise
            time.sleep(0.5)
    raise AssertionError("unreachable")


@dataclass
class EmbeddedMongo:
    """SecantusDB: a single-node replica set speaking MongoDB's wire protocol, on WiredTiger.

    Run as a separate process (its code is GPL-2.0: never imported by `replicator`), with
    `--sync-on-commit`, without which a kill -9 of the server loses acknowledged writes. Data
    lives in `data_dir` and survives a stop and start, which the fault tests rely on.
    `extra_args` set server options for a test (a short oplog, `--auth`).
    """

    data_dir: Path
    port: int = 0
    host: str = "127.0.0.1"
    extra_args: tuple[str, ...] = ()
    prefer: int = 0  # a first start's port when it is free (`replicator dev` keeps its own)
    child: Child | None = field(default=None, init=False)

    @property
    def uri(self) -> str:
        return f"mongodb://{self.host}:{self.port}/?directConnection=true"

    def start(self) -> EmbeddedMongo:
        """A restart keeps the port (clients hold the URI); a first start may move on to
        another free port if it loses the race for the one it picked."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        keep = bool(self.port)

        def spawn(attempt: int) -> tuple[Child, Callable[[], bool], str]:
            if not self.port or (attempt and not keep):
                free = self.prefer and not attempt and not port_open(self.host, self.prefer)
                self.port = self.prefer if free else free_port(self.host)
            argv = [
                str(secantus_binary()), "--host", self.host, "--port", str(self.port),
                "--storage-path", str(self.data_dir / "wt"), "--sync-on-commit",
                "--log-level", "WARNING", *self.extra_args,
            ]  # fmt: skip
            child = Child("mongodb (SecantusDB)", argv, self.data_dir / "server.log")
            return child, lambda: port_open(self.host, self.port), f"listening on port {self.port}"

        self.child = _launch(spawn, MONGO_READY_TIMEOUT)
        return self

    def stop(self) -> None:
        if self.child is not None:
            self.child.stop()

    def kill(self) -> None:
        if self.child is not None:
            self.child.kill()


def secantus_binary() -> Path:
    """`secantusd-py` from this environment (the `stack` extra installs it)."""
    found = Path(sys.executable).parent / "secantusd-py"
    if found.exists():
        return found
    on_path = shutil.which("secantusd-py")
    if on_path is None:
        raise StackError(
            "SecantusDB is not installed: `pip install -e '.[stack]'` (or `.[dev]`) installs "
            "the embedded MongoDB server, or set MONGODB_CONNECTION_STRING to a replica set"
        )
    return Path(on_path)


@dataclass
class LocalPDS:
    """The reference PDS and an in-memory PLC from `@atproto/dev-env`, on Node 22.

    `pause()`/`resume()` restart the PDS server with its data; a `stop()` and `start()` is a
    new network (the PLC and the SQLite files live as long as the process).
    """

    log_dir: Path
    port: int = 0
    plc_port: int = 0
    # The production installer's rate limits (`PDS_RATE_LIMITS_ENABLED=true`), with this
    # bypass key (`PDS_RATE_LIMIT_BYPASS_KEY`) when given: for the tests that need them.
    rate_limits: bool = False
    bypass_key: str | None = None
    prefer: tuple[int, int] = (0, 0)  # a first start's PDS and PLC ports, when they are free
    child: Child | None = field(default=None, init=False)

    @property
    def url(self) -> str:
        return f"http://localhost:{self.port}"

    @property
    def plc_url(self) -> str:
        return f"http://localhost:{self.plc_port}"

    admin_password = LOCAL_PDS_ADMIN_PASSWORD

    def start(self) -> LocalPDS:
        ensure_pds_installed()
        keep = bool(self.port)

        def spawn(attempt: int) -> tuple[Child, Callable[[], bool], str]:
            if not self.port or (attempt and not keep):
                self.port, self.plc_port = free_port(), free_port()
                if not attempt and all(p and not port_open("127.0.0.1", p) for p in self.prefer):
                    self.port, self.plc_port = self.prefer
            self.plc_port = self.plc_port or free_port()
            env = npm_env()
            env.update(PDS_PORT=str(self.port), PLC_PORT=str(self.plc_port), LOG_ENABLED="false")
            if self.rate_limits:
                env["PDS_RATE_LIMITS_ENABLED"] = "true"
            if self.bypass_key:
                env["PDS_RATE_LIMIT_BYPASS_KEY"] = self.bypass_key
            env.setdefault("NODE_ENV", "development")
            child = Child(
                "PDS (@atproto/dev-env)",
                [str(node_binary()), str(PDS_DIR / "pds.mjs")],
                self.log_dir / f"pds-{self.port}.log",
                env=env,
                cwd=PDS_DIR,
            )
            url = f"{self.url}/xrpc/_health"
            return child, lambda: _http_ok(url), f"answering {url} (PLC on port {self.plc_port})"

        self.child = _launch(spawn, PDS_READY_TIMEOUT)
        return self

    def stop(self) -> None:
        if self.child is not None:
            self.child.stop()

    def pause(self, timeout: float = 30.0) -> None:
        """Stop the PDS server (clients get "connection refused"); its data is kept."""
        assert self.child is not None and self.child.alive()
        os.kill(self.child.pid, signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        while _http_ok(f"{self.url}/xrpc/_health"):
            if time.monotonic() > deadline:
                raise StackError(f"PDS on port {self.port} did not stop within {timeout:.0f}s")
            time.sleep(0.1)

    def resume(self) -> None:
        """Start the same PDS again: same port, data, keys and accounts."""
        assert self.child is not None
        os.kill(self.child.pid, signal.SIGUSR2)
        self.child.wait_ready(
            lambda: _http_ok(f"{self.url}/xrpc/_health"),
            timeout=PDS_READY_TIMEOUT,
            what=f"answering {self.url}/xrpc/_health after a restart",
        )


def state_dir() -> Path:
    """Project-local folder for the stack's data and logs (`REPLICATOR_STATE_DIR` overrides)."""
    base = os.environ.get("REPLICATOR_STATE_DIR")
    if base:
        return Path(base)
    return Path.cwd() / ".state"
