"""`replicator dlq list|retry|drop`, run as the real command (a subprocess) against the stack."""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from typing import Any

import pytest
from bson import ObjectId

from replicator.commands.dlq import human_age
from replicator.model import State
from replicator.runtime import Runtime
from replicator_dev.devstack.seed import SeededUser

from .conftest import Users, env_for
from .harness import records

pytestmark = pytest.mark.anyio
WHEN = datetime(2026, 3, 4, 5, 6, 7, 891000, tzinfo=UTC)


class Result:
    def __init__(self, code: int, out: str, err: str) -> None:
        self.code, self.out, self.err = code, out, err

    def __repr__(self) -> str:
        return f"exit {self.code}\n--- stdout\n{self.out}\n--- stderr\n{self.err}"


async def dlq(rt: Runtime, *args: str, **env: Any) -> Result:
    import anyio

    proc = await anyio.run_process(
        [sys.executable, "-m", "replicator.cli", "dlq", *args],
        env=env_for(rt.settings, **env),
        check=False,
    )
    return Result(proc.returncode, proc.stdout.decode(), proc.stderr.decode())


async def mood(rt: Runtime, user: SeededUser, text: Any, **extra: Any) -> ObjectId:
    result = await rt.store.docs.insert_one({"user": user.sub, "mood": text, "when": WHEN, **extra})
    return ObjectId(result.inserted_id)


async def fix(rt: Runtime, mood_id: ObjectId, text: str) -> None:
    """Replace the document whole (the test server turns a date given to `$set` into a string)."""
    current = await rt.store.docs.find_one({"_id": mood_id})
    assert current is not None
    await rt.store.docs.replace_one({"_id": mood_id}, {**current, "mood": text})


async def letter(rt: Runtime, key: str) -> dict[str, Any] | None:
    return await rt.store.dead_letters.find_one({"_id": key})


def no_secrets(result: Result, *users: SeededUser) -> None:
    text = result.out + result.err
    for user in users:
        assert user.password and user.password not in text
    assert "accessJwt" not in text and "eyJ" not in text


async def test_list_table_json_user_filter_and_limit(rt: Runtime, users: Users) -> None:
    alice, bob = await users.make(), await users.make()
    empty = await mood(rt, alice, "")
    stringly = await mood(rt, alice, "ok", when="yesterday")
    huge = await mood(rt, bob, "a" * 6000)
    await rt.store.docs.insert_one({"_id": "legacy-1", "user": alice.sub, "mood": "x"})
    await rt.applier.apply_ids([empty, stringly, huge])
    await rt.applier.reconcile_user(alice.sub)  # reports the id that is not an ObjectId

    table = await dlq(rt, "list")
    assert table.code == 0, table
    lines = table.out.splitlines()
    assert lines[0].split() == ["ID", "USER", "DID", "ATTEMPTS", "AGE", "REASON"]
    row = next(line for line in lines if line.startswith(str(empty)))
    assert f"@{alice.handle.split('.')[0]}" in row and alice.did in row
    assert row.rstrip().endswith("mood: empty")
    assert any("when: expected a date, got str 'yesterday'" in line for line in lines)
    assert any(line.startswith("'legacy-1'") and "_id is not an ObjectId" in line for line in lines)
    assert "4 dead letters" in lines[-1]
    no_secrets(table, alice, bob)

    listed = await dlq(rt, "list", "--json")
    assert listed.code == 0, listed
    report = json.loads(listed.out)
    assert (report["total"], report["shown"]) == (4, 4)
    assert (report["invalid"], report["failed"]) == (4, 0)  # as `status` and `audit` count
    by_id = {e["id"]: e for e in report["dead_letters"]}
    assert by_id[str(huge)] | {"first_at": 0, "last_at": 0, "age_seconds": 0} == {
        "id": str(huge), "kind": "invalid", "user": bob.sub,
        "handle": f"@{bob.handle.split('.')[0]}",
        "did": bob.did, "attempts": 1, "first_at": 0, "last_at": 0, "age_seconds": 0,
        "reason": "mood: longer than maxLength 5000 UTF-8 bytes (6000)",
    }  # fmt: skip
    assert 0 <= by_id[str(huge)]["age_seconds"] < 120

    with_domain = await dlq(rt, "list", "--user", f"@{alice.handle}")
    assert with_domain.code == 2, with_domain  # a handle is `@name`, without the domain
    only_alice = json.loads(
        (await dlq(rt, "list", "--json", "--user", f"@{alice.handle.split('.')[0]}")).out
    )
    assert sorted(e["id"] for e in only_alice["dead_letters"]) == sorted(
        [str(empty), str(stringly), "'legacy-1'"]
    )
    only_bob = json.loads((await dlq(rt, "list", "--json", "--user", bob.sub)).out)
    assert [e["id"] for e in only_bob["dead_letters"]] == [str(huge)]

    limited = await dlq(rt, "list", "--limit", "1")
    assert (
        limited.code == 0
        and "4 dead letters (4 invalid, 0 failed)" in limited.out
        and "showing 1, raise --limit" in limited.out
    )

    unknown = await dlq(rt, "list", "--user", "@nobody-here")
    assert unknown.code == 2 and "unknown user '@nobody-here'" in unknown.err


async def test_list_empty_and_no_pds_needed(rt: Runtime) -> None:
    await rt.store.db.create_collection(rt.store.names.moods)
    result = await dlq(rt, "list", PDS_URL="")
    assert result.code == 0, result
    assert result.out.strip() == "no dead letters"


@pytest.mark.parametrize("command", [["list"], ["drop", "--all", "--yes"]])
async def test_a_database_without_moods_is_refused_and_left_as_it_was(
    rt: Runtime, command: list[str]
) -> None:
    """A wrong MONGODB_NAME must not read as an empty queue: one line, exit 2, nothing made."""
    before = await rt.store.db.list_collection_names()
    result = await dlq(rt, *command)
    assert result.code == 2, result
    assert f"database {rt.settings.db_name!r} has no 'moods' collection" in result.err
    assert "--empty-ok" in result.err and len(result.err.strip().splitlines()) == 1
    assert await rt.store.db.list_collection_names() == before
    assert (await dlq(rt, *command, "--empty-ok")).code == 0


async def test_retry_clears_what_is_fixed_and_counts_what_is_not(rt: Runtime, users: Users) -> None:
    user = await users.make()
    assert user.did
    fixed, still = await mood(rt, user, ""), await mood(rt, user, "   ")
    await rt.applier.apply_ids([fixed, still])
    await fix(rt, fixed, "now it is a mood")  # the sidecar is not running: only retry applies it

    result = await dlq(rt, "retry", str(fixed), str(still))
    assert result.code == 1, result
    assert f"{fixed}: cleared (present)" in result.out
    assert f"{still}: still failing (attempt 2): mood: empty (only whitespace)" in result.out
    assert "retried 2: 1 cleared, 1 still failing" in result.out
    assert await letter(rt, str(fixed)) is None
    kept = await letter(rt, str(still))
    assert kept is not None and kept["attempts"] == 2 and kept["last_at"] > kept["first_at"]
    have = await records(rt.settings.pds_url, user.did)
    assert [v["mood"] for v in have.values()] == ["now it is a mood"]

    await fix(rt, still, "fixed too")
    everything = await dlq(rt, "retry", "--all")
    assert everything.code == 0, everything
    assert "retried 1: 1 cleared, 0 still failing" in everything.out
    assert await rt.store.dead_letter_count() == 0
    assert len(await records(rt.settings.pds_url, user.did)) == 2
    no_secrets(everything, user)

    missing = await dlq(rt, "retry", "65a1b2c3d4e5f60718293a4b")
    assert missing.code == 1 and "not in the dead-letter queue" in missing.err
    usage = await dlq(rt, "retry")
    assert usage.code == 2 and "--all" in usage.err


async def test_retry_of_parked_work_after_the_password_is_fixed(rt: Runtime, users: Users) -> None:
    user = await users.make()
    assert user.did and user.password
    await rt.store.users.update_one({"_id": user.sub}, {"$set": {"atproto.password": "wrong-1"}})
    parked = await mood(rt, user, "written while the password was wrong")
    await rt.applier.apply_ids([parked])
    entry = (await rt.store.ledger_by_id([parked]))[parked]
    assert entry.state is State.PARKED

    again = await dlq(rt, "retry", "--all")
    assert again.code == 1, again
    assert "still failing (attempt 2): PDS refused the account's password" in again.out
    no_secrets(again, user)
    assert "wrong-1" not in again.out + again.err

    await rt.store.users.update_one(
        {"_id": user.sub}, {"$set": {"atproto.password": user.password}}
    )
    done = await dlq(rt, "retry", str(parked))
    assert done.code == 0, done
    assert f"{parked}: cleared (present)" in done.out
    assert [v["ref"] for v in (await records(rt.settings.pds_url, user.did)).values()] == [
        str(parked)
    ]
    no_secrets(done, user)


async def test_retry_of_an_id_that_is_not_an_objectid(rt: Runtime, users: Users) -> None:
    user = await users.make()
    await rt.store.docs.insert_one({"_id": "legacy-2", "user": user.sub, "mood": "x"})
    await rt.applier.reconcile_user(user.sub)
    result = await dlq(rt, "retry", "'legacy-2'")
    assert result.code == 1, result
    assert "'legacy-2': still failing (attempt 2): _id is not an ObjectId" in result.out
    await rt.store.docs.delete_one({"_id": "legacy-2"})
    gone = await dlq(rt, "retry", "--all")
    assert gone.code == 0, gone
    assert "'legacy-2': cleared (document gone)" in gone.out
    assert await rt.store.dead_letter_count() == 0


async def test_a_string_id_is_found_as_typed_without_its_quotes(rt: Runtime, users: Users) -> None:
    """`dlq list` shows `'legacy-3'` (the repr, as an int `_id` would be `42`); `mood-3` typed
    bare in a shell (where the quotes vanish) names it as well."""
    user = await users.make()
    await rt.store.docs.insert_many(
        [{"_id": key, "user": user.sub, "mood": "x"} for key in ("legacy-3", "legacy-4")]
    )
    await rt.applier.reconcile_user(user.sub)
    retried = await dlq(rt, "retry", "legacy-3")
    assert "'legacy-3': still failing (attempt 2): _id is not an ObjectId" in retried.out, retried
    dropped = await dlq(rt, "drop", "legacy-3", "'legacy-4'", "legacy-5")
    assert dropped.code == 1, dropped
    assert "dropped 2 dead letters" in dropped.out
    assert "legacy-5: not in the dead-letter queue" in dropped.err
    assert await rt.store.dead_letter_count() == 0


async def test_drop_removes_entries_and_never_touches_moods(rt: Runtime, users: Users) -> None:
    user = await users.make()
    ids = [await mood(rt, user, "") for _ in range(3)]
    await rt.applier.apply_ids(ids)
    before = [d async for d in rt.store.docs.find({}).sort("_id", 1)]

    one = await dlq(rt, "drop", str(ids[0]), PDS_URL="")
    assert one.code == 0, one
    assert "dropped 1 dead letter" in one.out
    assert await letter(rt, str(ids[0])) is None and await letter(rt, str(ids[1])) is not None

    unknown = await dlq(rt, "drop", str(ids[0]), str(ids[1]))
    assert unknown.code == 1, unknown
    assert f"{ids[0]}: not in the dead-letter queue" in unknown.err
    assert "dropped 1 dead letter" in unknown.out

    refused = await dlq(rt, "drop", "--all")
    assert refused.code == 2 and "--yes" in refused.err
    assert await rt.store.dead_letter_count() == 1
    both = await dlq(rt, "drop", str(ids[2]), "--all", "--yes")
    assert both.code == 2 and "not both" in both.err

    everything = await dlq(rt, "drop", "--all", "--yes")
    assert everything.code == 0 and "dropped 1 dead letter" in everything.out
    assert await rt.store.dead_letter_count() == 0
    assert [d async for d in rt.store.docs.find({}).sort("_id", 1)] == before
    ledger = await rt.store.ledger_by_id(ids)
    assert {e.state for e in ledger.values()} == {State.INVALID}  # the ledger is untouched too


async def test_help_texts(rt: Runtime) -> None:
    group = await dlq(rt, "--help")
    assert group.code == 0 and all(c in group.out for c in ("list", "retry", "drop"))
    assert "Dead letters" in group.out
    for command, words in {
        "list": ("--user", "--json", "--limit", "AGE"),
        "retry": ("--all", "Exit: 0 all cleared, 1 some remain"),
        "drop": ("--all", "--yes", "untouched"),
    }.items():
        result = await dlq(rt, command, "--help")
        assert result.code == 0, result
        text = " ".join(result.out.split())
        assert all(w in text for w in words), (command, text)


def test_human_age() -> None:
    assert [human_age(s) for s in (None, 5, 89, 90, 3599, 5400, 86399, 200_000)] == [
        "?", "5s", "89s", "1m", "59m", "1h", "23h", "2d",
    ]  # fmt: skip
