"""The local stack as one object: external servers when configured, embedded ones otherwise."""

from __future__ import annotations

import atexit
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from replicator.config import MONGODB_SCHEMES, check_url

from .servers import EmbeddedMongo, LocalPDS, state_dir


@dataclass
class LocalStack:
    """`MONGODB_CONNECTION_STRING` / `PDS_URL` win; otherwise embedded servers are started.

    Data and logs go to `state` (default `./.state`): `mongo/` persists across runs.
    """

    mongodb_uri: str | None = None
    pds_url: str | None = None
    pds_admin_password: str | None = None
    plc_url: str | None = None
    state: Path = field(default_factory=state_dir)
    # Ports a first start takes when they are free: `replicator dev` keeps its last ones.
    prefer: dict[str, int] = field(default_factory=dict)
    mongo: EmbeddedMongo | None = field(default=None, init=False)
    pds: LocalPDS | None = field(default=None, init=False)

    @classmethod
    def from_env(cls, state: Path | None = None, *, prefix: str = "") -> LocalStack:
        """`prefix="REPLICATOR_TEST_"` reads the test suite's variables instead."""
        mongo = os.environ.get(f"{prefix}MONGODB_URI" if prefix else "MONGODB_CONNECTION_STRING")
        return cls(
            mongodb_uri=mongo or None,
            pds_url=os.environ.get(f"{prefix}PDS_URL") or None,
            pds_admin_password=os.environ.get("PDS_ADMIN_PASSWORD") or None,
            plc_url=os.environ.get(f"{prefix}PLC_URL" if prefix else "REPLICATOR_PLC_URL") or None,
            state=state or state_dir(),
        )

    def start(self) -> LocalStack:
        """External servers are checked like `run` checks them (a bad URL: `ConfigError`)."""
        if self.mongodb_uri is not None:
            check_url("MONGODB_CONNECTION_STRING", self.mongodb_uri, MONGODB_SCHEMES)
        if self.pds_url is not None:
            check_url("PDS_URL", self.pds_url)
        _stop_on_signals(self)
        try:
            if self.mongodb_uri is None:
                self.mongo = EmbeddedMongo(
                    self.state / "mongo", prefer=self.prefer.get("mongo", 0)
                ).start()
                self.mongodb_uri = self.mongo.uri
            if self.pds_url is None:
                prefer = (self.prefer.get("pds", 0), self.prefer.get("plc", 0))
                self.pds = LocalPDS(self.state / "logs", prefer=prefer).start()
                self.pds_url = self.pds.url
                self.pds_admin_password = self.pds.admin_password
                self.plc_url = self.pds.plc_url
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.pds is not None:
            self.pds.stop()
        if self.mongo is not None:
            self.mongo.stop()

    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _stop_on_signals(stack: LocalStack) -> None:
    """SIGTERM stops the children before we go; atexit covers a normal exit. (A kill -9 of the
    parent is covered by PR_SET_PDEATHSIG in the children.) Only the process that started the
    stack stops it: a forked child (a multiprocessing worker, say) inherits both the handler
    and the atexit hook, and its SIGTERM must not take the parent's servers down."""
    owner = os.getpid()

    def stop_if_owner() -> None:
        if os.getpid() == owner:
            stack.stop()

    atexit.register(stop_if_owner)
    if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):

        def on_term(signum: int, frame: object) -> None:
            stop_if_owner()
            raise SystemExit(128 + signum)

        signal.signal(signal.SIGTERM, on_term)
