"""Fixtures: one real local stack per test session, a fresh database per test.

`REPLICATOR_TEST_MONGODB_URI` / `REPLICATOR_TEST_PDS_URL` point the same tests at external
servers (a real replica set, a real PDS); otherwise the embedded servers are started.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from typing import Any

import httpx
import pytest

from replicator.config import Settings
from replicator.identity import PUBLIC_PLC
from replicator.runtime import Runtime, open_runtime
from replicator.store import Store, connect
from replicator_dev.devstack.faults import FaultTransport
from replicator_dev.devstack.seed import SeededUser, seed_user
from replicator_dev.devstack.stack import LocalStack


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "settings(**fields): the `settings` (and so the `rt`) a test runs with, these fields "
        "given (the runtime is wired with them: nothing is changed on it afterwards)",
    )


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    state = tmp_path_factory.mktemp("stack")
    local = LocalStack.from_env(state, prefix="REPLICATOR_TEST_")
    local.start()
    yield local
    local.stop()


@pytest.fixture
def settings(stack: LocalStack, request: pytest.FixtureRequest) -> Settings:
    assert stack.mongodb_uri and stack.pds_url
    marker = request.node.get_closest_marker("settings")
    given = Settings(
        mongodb_uri=stack.mongodb_uri,
        db_name=f"t_{secrets.token_hex(6)}",
        pds_url=stack.pds_url,
        heartbeat_seconds=0.2,
        max_batch_ms=200,
        parked_retry_seconds=2.0,
        plc_url=stack.plc_url or PUBLIC_PLC,
        account_recheck_seconds=1.0,
    )
    return replace(given, **marker.kwargs) if marker else given


@pytest.fixture
async def rt(settings: Settings) -> AsyncIterator[Runtime]:
    async with open_runtime(settings) as runtime:
        yield runtime
        await runtime.store.client.drop_database(settings.db_name)


@pytest.fixture
async def faulty(settings: Settings) -> AsyncIterator[tuple[Runtime, FaultTransport]]:
    """A runtime whose PDS calls pass through a `FaultTransport` (rules answer chosen calls
    with 5xx, 429, timeouts or refusals; all others reach the real PDS)."""
    transport = FaultTransport()
    async with (
        httpx.AsyncClient(transport=transport, timeout=30) as http,
        open_runtime(settings, http=http) as runtime,
    ):
        yield runtime, transport
        await runtime.store.client.drop_database(settings.db_name)


@pytest.fixture
def store(rt: Runtime) -> Store:
    return rt.store


class Users:
    """Creates production-shaped users on demand (unique handles per test)."""

    def __init__(self, store: Store, stack: LocalStack) -> None:
        self.store = store
        self.stack = stack

    async def make(self, *, with_account: bool = True, name: str | None = None) -> SeededUser:
        name = name or f"u{secrets.token_hex(5)}"
        return await seed_user(
            self.store, self.stack.pds_url, name,
            with_account=with_account, admin_password=self.stack.pds_admin_password,
        )  # fmt: skip


@pytest.fixture
def users(store: Store, stack: LocalStack) -> Users:
    return Users(store, stack)


def env_for(settings: Settings, **extra: Any) -> dict[str, str]:
    """Environment for a `replicator` subprocess with these settings."""
    env = dict(os.environ)
    env.update(
        MONGODB_CONNECTION_STRING=settings.mongodb_uri,
        MONGODB_NAME=settings.db_name,
        PDS_URL=settings.pds_url,
        REPLICATOR_MOODS_COLLECTION=settings.names.moods,
        REPLICATOR_USERS_COLLECTION=settings.names.users,
        REPLICATOR_HANDLES_COLLECTION=settings.names.handles,
        REPLICATOR_HEARTBEAT_SECONDS=str(settings.heartbeat_seconds),
        REPLICATOR_PLC_URL=settings.plc_url,
        REPLICATOR_ACCOUNT_RECHECK_SECONDS=str(settings.account_recheck_seconds),
    )
    env.update({k: str(v) for k, v in extra.items()})
    return env


def with_settings(settings: Settings, **changes: Any) -> Settings:
    return replace(settings, **changes)


@pytest.fixture(scope="session")
def docker_available() -> bool:
    try:
        import docker  # type: ignore[import-untyped]

        docker.from_env().ping()
    except Exception:
        return False
    return True


@pytest.fixture(scope="session")
def replica_set_uri(docker_available: bool) -> Iterator[str]:
    """A real single-node MongoDB replica set in Docker (testcontainers), where Docker runs."""
    if not docker_available:
        pytest.skip("no Docker engine here: the testcontainers replica set cannot start")
    from testcontainers.mongodb import MongoDbContainer

    with MongoDbContainer("mongo:7.0").with_command("--replSet rs0 --bind_ip_all") as mongo:
        host, port = mongo.get_container_host_ip(), mongo.get_exposed_port(27017)
        import pymongo

        admin = pymongo.MongoClient(host, int(port), directConnection=True,
                                    username=mongo.username, password=mongo.password)  # fmt: skip
        admin.admin.command(
            "replSetInitiate", {"_id": "rs0", "members": [{"_id": 0, "host": "localhost:27017"}]}
        )
        yield (f"mongodb://{mongo.username}:{mongo.password}@{host}:{port}/?directConnection=true")


__all__ = ["Users", "connect", "env_for", "with_settings"]
