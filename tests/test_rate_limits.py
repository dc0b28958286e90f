"""A PDS with the production installer's rate limits, and its operator's bypass key
(issue 17, part 3), on a reference PDS of this module's own (`PDS_RATE_LIMITS_ENABLED=true`,
`PDS_RATE_LIMIT_BYPASS_KEY`).

- With `PDS_RATE_LIMIT_BYPASS_KEY` set, every call carries `x-ratelimit-bypass`: the PDS
  counts nothing (35 logins of one account in a row pass a limit of 30 per 5 minutes), the
  replicator mirrors a burst, and the key is in no log line.
- Without it, the limits are what they were: the 31st login in 5 minutes is refused (429),
  and the replicator reads each account's write budget from the answers (`RateLimit-*`).
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from loguru import logger

from replicator.config import Settings
from replicator.errors import RateLimited
from replicator.pds import Pds
from replicator.runtime import Runtime, open_runtime
from replicator_dev.devstack.seed import SeededUser, insert_mood, seed_user
from replicator_dev.devstack.servers import LocalPDS

from .harness import eventually, records, running

pytestmark = pytest.mark.anyio
KEY = f"bypass-{secrets.token_hex(8)}"
LOGINS_PER_5_MIN = 30


@pytest.fixture(scope="module")
def limited_pds(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalPDS]:
    pds = LocalPDS(tmp_path_factory.mktemp("limited-pds"), rate_limits=True, bypass_key=KEY)
    pds.start()
    yield pds
    pds.stop()


@pytest.fixture
def limited(settings: Settings, limited_pds: LocalPDS) -> Settings:
    return replace(settings, pds_url=limited_pds.url, plc_url=limited_pds.plc_url)


@pytest.fixture
async def rt_with_key(limited: Settings) -> AsyncIterator[Runtime]:
    async with open_runtime(replace(limited, rate_limit_bypass_key=KEY)) as runtime:
        yield runtime
        await runtime.store.client.drop_database(limited.db_name)


async def user_on(rt: Runtime, limited_pds: LocalPDS) -> SeededUser:
    return await seed_user(rt.store, limited_pds.url, f"r{secrets.token_hex(5)}",
                           admin_password=limited_pds.admin_password)  # fmt: skip


async def logins(pds: Pds, who: SeededUser, n: int) -> int:
    """How many of `n` logins in a row the PDS let through."""
    for i in range(n):
        try:
            await pds.xrpc(
                "com.atproto.server.createSession",
                body={"identifier": who.did, "password": who.password},
            )
        except RateLimited:
            return i
    return n


async def test_the_bypass_key_lifts_the_limits_and_stays_secret(
    rt_with_key: Runtime, limited_pds: LocalPDS, tmp_path: Path
) -> None:
    rt = rt_with_key
    who = await user_on(rt, limited_pds)
    assert await logins(rt.pds, who, LOGINS_PER_5_MIN + 5) == LOGINS_PER_5_MIN + 5
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m)), level="DEBUG")
    try:
        async with running(rt):
            await burst(rt, who, 40, "with the bypass key")
    finally:
        logger.remove(sink)
    assert (
        rt.writer.outbound.budgets.remaining(who.did or "") is None
    )  # no limit was counted or said
    assert KEY not in "".join(lines)
    assert KEY not in repr(rt.settings)


async def test_without_the_key_the_limits_hold_and_are_read(
    limited: Settings, limited_pds: LocalPDS
) -> None:
    async with open_runtime(limited) as rt:
        try:
            who = await user_on(rt, limited_pds)
            assert await logins(rt.pds, who, LOGINS_PER_5_MIN + 1) == LOGINS_PER_5_MIN
            writer = await user_on(rt, limited_pds)
            async with running(rt):
                await burst(rt, writer, 10, "within the account's budget")
            left = rt.writer.outbound.budgets.remaining(writer.did or "")
            assert left is not None and left < 5000, left  # the hour's budget, as the PDS said
        finally:
            await rt.store.client.drop_database(limited.db_name)


async def burst(rt: Runtime, who: SeededUser, n: int, how: str) -> None:
    """`n` moods inserted for `who`, then waited for on the PDS."""
    for i in range(n):
        await insert_mood(rt.store, who.sub, f"{how} {i}")

    async def mirrored() -> bool:
        return len(await records(rt.settings.pds_url, who.did or "")) == n

    await eventually(mirrored, 30, f"a burst mirrored {how}")
