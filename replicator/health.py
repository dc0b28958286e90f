"""`/metrics`, `/healthz` and `/readyz` for `replicator run`, and the loop that keeps them true.

The HTTP server is the standard library's threaded WSGI server in a daemon thread, with
prometheus_client's own exposition app behind `/metrics`: a scrape never waits on the event
loop and cannot slow the replicator down. The handlers only read plain attributes that the
event loop keeps up to date (`Monitor`), so there is nothing to lock. Because the server
lives in its own thread, `/healthz` checks that the event loop still ticks: a wedged loop
must not look alive.

- `/healthz` 200 while the process lives and its event loop runs (a liveness probe);
- `/readyz` 200 when the change stream is open, the checkpoint is fresh and the PDS answered
  its last probe; 503 with the failing checks otherwise (a readiness probe; a standby waiting
  for the lease is alive but not ready).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import socketserver
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from importlib.metadata import PackageNotFoundError, version
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import anyio
from anyio.abc import TaskStatus
from loguru import logger
from prometheus_client import make_wsgi_app
from pymongo.errors import PyMongoError

from . import metrics
from .model import State
from .runtime import Runtime
from .stream import Replicator

TICK_SECONDS = 1.0
DEFAULT_INTERVAL = 10.0  # seconds between monitor rounds: PDS probe, gauges, stats flush

StartResponse = Callable[..., Any]


def parse_addr(addr: str) -> tuple[str, int] | None:
    """`host:port`, `[v6]:port` or `:port` (all interfaces); `off` or empty: no server."""
    addr = addr.strip()
    if addr.lower() in ("", "off", "none", "0"):
        return None
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"not host:port: {addr!r}")
    host = host.strip("[]") or "0.0.0.0"  # noqa: S104 - `:port` asks for every interface
    return host, int(port)


class Monitor:
    """The replicator's live state as the probes and gauges see it, and the loop that
    refreshes what has to be fetched (PDS probe, ledger counts, dead letters, stats)."""

    def __init__(
        self,
        rt: Runtime,
        replicator: Replicator,
        *,
        interval: float = DEFAULT_INTERVAL,
        checkpoint_max_age: float | None = None,
    ) -> None:
        self.rt = rt
        self.replicator = replicator
        self.interval = interval
        heartbeat = rt.settings.heartbeat_seconds
        self.checkpoint_max_age = checkpoint_max_age or max(60.0, 10 * heartbeat)
        self.started = time.monotonic()
        self.started_at = time.time()
        self.loop_tick = time.monotonic()
        self.pds_ok_at: float | None = None
        self.pds_error: str | None = "not probed yet"
        self._pds_warned = False  # the PDS's absence was logged; said again when it is back
        self._budget_waited = 0.0

    # -- read by the gauges and the HTTP thread ----------------------------------------------

    def lag(self) -> float:
        """Seconds since the oldest change read but not yet applied (0 when caught up)."""
        oldest = self.replicator.oldest_unapplied_at
        return 0.0 if oldest is None else max(0.0, time.time() - oldest)

    def checkpoint_age(self) -> float:
        last = self.replicator.last_checkpoint_at
        return time.monotonic() - (last if last is not None else self.started)

    def alive(self) -> bool:
        return time.monotonic() - self.loop_tick <= max(30.0, 10 * TICK_SECONDS)

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        age = self.checkpoint_age()
        # Three missed probes, and never less than 30 s: a slow round is not an outage.
        pds_fresh = self.pds_ok_at is not None and (
            time.monotonic() - self.pds_ok_at <= max(30.0, 3 * self.interval)
        )
        checks = {
            "stream_open": bool(self.replicator.stream_open),
            "checkpoint_fresh": age <= self.checkpoint_max_age,
            "pds_reachable": pds_fresh,
        }
        ready = all(checks.values())
        detail: dict[str, Any] = {
            "ready": ready,
            "checks": checks,
            "checkpoint_age_seconds": round(age, 3),
            "checkpoint_max_age_seconds": self.checkpoint_max_age,
            "lag_seconds": round(self.lag(), 3),
            "dry_run": self.rt.settings.dry_run,
        }
        if not pds_fresh and self.pds_error:
            detail["pds_error"] = self.pds_error
        return ready, detail

    def bind(self) -> None:
        """Point the live gauges at this replicator (one `run` per process)."""
        r, sessions = self.replicator, self.rt.sessions
        metrics.LAG.set_function(self.lag)
        metrics.LAST_EVENT.set_function(lambda: r.last_event_at or 0.0)
        metrics.CHECKPOINT_AGE.set_function(self.checkpoint_age)
        metrics.STREAM_OPEN.set_function(lambda: float(r.stream_open))
        metrics.OPEN_SESSIONS.set_function(lambda: sessions.open_sessions)
        metrics.READY.set_function(lambda: float(self.readiness()[0]))
        directory = self.rt.directory
        metrics.DIRECTORY_UP.set_function(
            lambda: 0.0 if directory is not None and directory.up is False else 1.0
        )
        metrics.INFO.info({"version": _version(), "mode": self.mode})

    @property
    def mode(self) -> str:
        return "dry-run" if self.rt.settings.dry_run else "live"

    def live_view(self, *, running: bool = True) -> dict[str, Any]:
        """What `replicator status` shows about this process (no secrets)."""
        ready, _ = self.readiness()
        return {
            "running": running,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "mode": self.mode,
            "started_at": self.started_at,
            "interval": self.interval,
            "stream_open": bool(self.replicator.stream_open),
            "ready": ready,
            "lag_seconds": round(self.lag(), 3),
            "events_applied": self.replicator.events_applied,
        }

    # -- the event loop's side ----------------------------------------------------------------

    async def refresh(self) -> None:
        """One round: probe the PDS, read the ledger, dead-letter and parked-account counts,
        flush stats."""
        await self._probe_pds()
        store = self.rt.store
        try:
            counts: Counter[str] = Counter()
            letters = 0
            for view in store.views:  # every type's, together
                counts.update(await view.ledger_counts())
                letters += await view.dead_letter_count()
            for state in {*(s.value for s in State), *counts}:
                metrics.LEDGER.labels(state).set(counts.get(state, 0))
            metrics.DEAD_LETTERS.set(letters)
            parked = await store.parked_accounts()
            metrics.observe_parked_accounts((p.kind, p.reason) for p in parked)
        except PyMongoError as exc:
            logger.debug("metrics refresh: MongoDB unavailable ({})", exc)
        rate = self.rt.rate
        if rate is not None and rate.waited > self._budget_waited:
            metrics.RATE_LIMIT_WAIT.labels("budget").inc(rate.waited - self._budget_waited)
            self._budget_waited = rate.waited
        try:
            await metrics.flush_stats(
                store, dry_run=self.rt.settings.dry_run, live=self.live_view()
            )
        except PyMongoError as exc:
            logger.debug("stats flush: MongoDB unavailable ({})", exc)

    async def _probe_pds(self) -> None:
        error = await self.rt.pds.unreachable()
        if error is not None:
            if not self._pds_warned:  # once per outage (at start too), not every 10 s
                logger.warning("PDS {} unreachable ({}): writes wait and are retried; check "
                               "PDS_URL and that the PDS is up",
                               self.rt.settings.pds_url, error)  # fmt: skip
                self._pds_warned = True
            self.pds_error = error
            metrics.PDS_UP.set(0)
            return
        if self._pds_warned:
            logger.info("PDS {} reachable again", self.rt.settings.pds_url)
        self._pds_warned = False
        self.pds_ok_at = time.monotonic()
        self.pds_error = None
        metrics.PDS_UP.set(1)

    async def run(self) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._tick)
            while True:
                try:
                    await self.refresh()
                except Exception as exc:  # the dashboard must never take the sidecar down
                    logger.warning("metrics refresh failed: {}: {}", type(exc).__name__, exc)
                await anyio.sleep(self.interval)

    async def _tick(self) -> None:
        while True:
            self.loop_tick = time.monotonic()
            await anyio.sleep(TICK_SECONDS)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # scrapes every 15 s: no logs
        pass


class _Server(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _Server6(_Server):
    address_family = socket.AF_INET6


def make_app(monitor: Monitor) -> Callable[[dict[str, Any], StartResponse], Iterable[bytes]]:
    metrics_app = make_wsgi_app(metrics.REGISTRY)

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO") or "/"
        if path == "/metrics":
            return metrics_app(environ, start_response)  # type: ignore[no-any-return]
        if path == "/healthz":
            alive = monitor.alive()
            return _json(start_response, 200 if alive else 503, {"alive": alive})
        if path == "/readyz":
            ready, detail = monitor.readiness()
            return _json(start_response, 200 if ready else 503, detail)
        paths = ["/metrics", "/healthz", "/readyz"]
        return _json(start_response, 404, {"error": "not found", "paths": paths})

    return app


def _json(start_response: StartResponse, status: int, body: dict[str, Any]) -> list[bytes]:
    reason = {200: "OK", 404: "Not Found", 503: "Service Unavailable"}[status]
    data = json.dumps(body).encode()
    start_response(f"{status} {reason}", [("Content-Type", "application/json"),
                                          ("Content-Length", str(len(data)))])  # fmt: skip
    return [data]


class HttpServer:
    """The WSGI server in a daemon thread; `port` is the bound one (useful with port 0)."""

    def __init__(self, host: str, port: int, monitor: Monitor) -> None:
        cls = _Server6 if ":" in host else _Server
        self._httpd = make_server(host, port, make_app(monitor), cls, _QuietHandler)
        self.host = host
        self.port = int(self._httpd.server_port)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.2},
            name="replicator-http", daemon=True,
        )  # fmt: skip
        self._thread.start()

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


async def serve(
    rt: Runtime,
    replicator: Replicator,
    *,
    interval: float = DEFAULT_INTERVAL,
    task_status: TaskStatus[HttpServer | None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Run the monitor and, unless `http_addr` is off, the HTTP server, until cancelled.

    A port already in use is logged and the replicator goes on without the endpoints: the
    sync matters more than its dashboard (and `/readyz` failing says the same to a prober).
    """
    metrics.discard_pending()
    monitor = Monitor(rt, replicator, interval=interval)
    monitor.bind()
    if rt.settings.dry_run:
        logger.warning("dry run (shadow): planning only, nothing is written; checkpoint {!r}",
                       rt.store.checkpoint_name)  # fmt: skip
    server: HttpServer | None = None
    try:
        where = parse_addr(rt.settings.http_addr)
        if where is not None:
            server = HttpServer(*where, monitor)
            logger.info("metrics and health on http://{}:{}/ (/metrics /healthz /readyz)",
                        where[0], server.port)  # fmt: skip
    except (OSError, ValueError) as exc:
        logger.error("metrics/health server not started ({!r}): {}", rt.settings.http_addr, exc)
    task_status.started(server)
    try:
        await monitor.run()
    finally:
        with anyio.CancelScope(shield=True):
            if server is not None:
                await anyio.to_thread.run_sync(server.close)
            with anyio.move_on_after(5), contextlib.suppress(PyMongoError):
                await metrics.flush_stats(
                    rt.store, dry_run=rt.settings.dry_run, live=monitor.live_view(running=False)
                )


def _version() -> str:
    try:
        return version("moods-replicator")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "unknown"
