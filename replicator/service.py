"""`replicator run` as a function: the sidecar until SIGTERM/SIGINT, its exit code.

Apart from the CLI so that whatever else runs the sidecar (the dev stack) imports this and
not the command line: imports flow one way.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable

import anyio
from loguru import logger

from . import health, logs
from .config import Settings
from .lease import Fenced
from .runtime import open_runtime
from .stream import HistoryLost, StreamInvalidated

EXIT_HISTORY_LOST = 3
EXIT_INVALIDATED = 4
EXIT_LEASE_LOST = 5


async def run_replicator(settings: Settings, ready: Callable[[], None] | None = None) -> int:
    stop = anyio.Event()
    # Signals are ours from the first line: a Ctrl-C while the runtime is still opening must
    # stop it too, not fall to asyncio's default handler.
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with anyio.create_task_group() as tg:

            async def on_signals() -> None:
                async for signum in signals:
                    logger.info("{}: finishing the batch in flight, then exiting",
                                signal.Signals(signum).name)  # fmt: skip
                    stop.set()
                    return

            tg.start_soon(on_signals)
            code = await _run(settings, stop, ready)
            tg.cancel_scope.cancel()
    return code


async def _run(settings: Settings, stop: anyio.Event, ready: Callable[[], None] | None) -> int:
    logger.info(
        "replicator starting: mongodb={} db={} pds={}",
        logs.redact_uri(settings.mongodb_uri), settings.db_name, settings.pds_url,
    )  # fmt: skip
    async with open_runtime(settings, lease=True) as rt, anyio.create_task_group() as tg:
        replicator = rt.replicator()
        await tg.start(health.serve, rt, replicator)  # /metrics /healthz /readyz, stats
        code = 0
        try:
            with anyio.CancelScope() as scope:

                async def grace() -> None:
                    await stop.wait()
                    await anyio.sleep(settings.shutdown_grace)
                    logger.warning("in-flight work abandoned after {}s; it will be replayed",
                                   settings.shutdown_grace)  # fmt: skip
                    scope.cancel()

                tg.start_soon(grace)
                if ready:
                    ready()
                await replicator.run(stop)
        except HistoryLost:
            code = EXIT_HISTORY_LOST
        except StreamInvalidated as exc:
            logger.critical("{}; not resuming. Check the collection, then `replicator run`.", exc)
            code = EXIT_INVALIDATED
        except Fenced:
            code = EXIT_LEASE_LOST
        _exit_within(settings.shutdown_grace + 5.0, code)
        tg.cancel_scope.cancel()
    logger.info("replicator stopped ({} events applied)", replicator.events_applied)
    return code


def _exit_within(seconds: float, code: int) -> None:
    """If closing the clients hangs (a PyMongo async client whose operations were cancelled
    can, on Python 3.11: tests/test_fencing.py), exit anyway: the supervisor restarts us."""

    def hard_exit() -> None:
        logger.error("shutdown did not finish within {:.0f}s; exiting", seconds)
        os._exit(code)

    timer = threading.Timer(seconds, hard_exit)
    timer.daemon = True
    timer.start()
