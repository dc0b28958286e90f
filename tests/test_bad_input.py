"""Bad input, end to end against the real stack (docs/bad-input.md is the table of decisions).

Each case inserts one malformed mood between good ones, in one `insert_many`, while the
replicator runs. Then: the bad one has its outcome (mirrored as written, nuked, skipped, or
invalid with a dead letter, a ledger state, a log line and a metric, each carrying the same
specific reason), and every good mood of the same batch is on the PDS. An invalid mood whose
document is then fixed is mirrored and its dead letter cleared.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import bson
import pytest
from bson import ObjectId
from bson.datetime_ms import DatetimeMS
from loguru import logger

from replicator import metrics, tid
from replicator.desired import desired_state
from replicator.model import State
from replicator.recordtypes import MOOD
from replicator.runtime import Runtime
from replicator.store import Store

from .conftest import Users
from .harness import eventually, records, running

pytestmark = pytest.mark.anyio
WHEN = datetime(2026, 3, 4, 5, 6, 7, 891000, tzinfo=UTC)
WHEN_ISO = "2026-03-04T05:06:07.891Z"
MISSING = object()  # the field is left out of the document
USER = object()  # the seeded user's sub
Outcome = Literal["invalid", "mirrored", "nuked", "skipped", "bad_id"]


@dataclass
class Case:
    fields: dict[str, Any]
    outcome: Outcome
    reason: str = ""  # regex the reason must match (invalid, bad_id)
    mood: str | None = None  # mirrored: the record's text (default: the document's)
    when: str = WHEN_ISO  # mirrored: the record's `when`
    dead_letter_user: Any = USER
    extra: dict[str, Any] = field(default_factory=dict)


CASES: dict[str, Case] = {
    # -- mood ---------------------------------------------------------------------------------
    "mood missing": Case({"mood": MISSING}, "invalid", r"^mood: missing$"),
    "mood null": Case({"mood": None}, "invalid", r"^mood: missing \(null\)$"),
    "mood a number": Case({"mood": 42}, "invalid", r"^mood: expected a string, got int 42$"),
    "mood an array": Case({"mood": ["hi"]}, "invalid", r"^mood: expected a string, got list"),
    "mood empty": Case({"mood": ""}, "invalid", r"^mood: empty$"),
    "mood only whitespace": Case(
        {"mood": " \n\t\u3000\ufeff"}, "invalid", r"^mood: empty \(only whitespace\)$"
    ),
    "mood over 5000 bytes": Case(
        {"mood": "a" * 5001}, "invalid", r"^mood: longer than maxLength 5000 UTF-8 bytes \(5001\)$"
    ),
    "mood over 5000 bytes in 2501 characters": Case(
        {"mood": "é" * 2501}, "invalid", r"^mood: longer than maxLength 5000 UTF-8 bytes \(5002\)$"
    ),
    "mood 1 MiB": Case(
        {"mood": "a" * 2**20},
        "invalid",
        r"^mood: longer than maxLength 5000 UTF-8 bytes \(1048576\)$",
    ),
    "mood exactly 5000 bytes": Case({"mood": "🙂" * 1250}, "mirrored"),
    "mood with NUL": Case({"mood": "before\x00after"}, "mirrored"),
    "mood with control characters": Case(
        {"mood": "\x01\x07\x08\x1b[31mred\x1b[0m\x1f\x7f\x85\u2028\u202e"}, "mirrored"
    ),
    # What the app's Node driver stores for a JS string holding a lone surrogate: U+FFFD.
    "mood with a lone surrogate as the app stores it": Case(
        {"mood": "half an emoji: \ufffd"}, "mirrored"
    ),
    # -- when ---------------------------------------------------------------------------------
    "when missing": Case({"when": MISSING}, "invalid", r"^when: missing$"),
    "when null": Case({"when": None}, "invalid", r"^when: missing \(null\)$"),
    "when an ISO string": Case(
        {"when": "2026-03-04T05:06:07.891Z"},
        "invalid",
        r"^when: expected a date, got str '2026-03-04T05:06:07.891Z'; the app stores dates",
    ),
    "when epoch milliseconds": Case(
        {"when": 1772600767891},
        "invalid",
        r"^when: expected a date, got int 1772600767891; not guessed as epoch",
    ),
    "when year 1": Case(
        {"when": datetime(1, 1, 1, tzinfo=UTC)}, "mirrored", when="0001-01-01T00:00:00.000Z"
    ),
    "when year 9999": Case(
        {"when": datetime(9999, 12, 31, 23, 59, 59, 999000, tzinfo=UTC)},
        "mirrored",
        when="9999-12-31T23:59:59.999Z",
    ),
    "when sub-millisecond": Case(
        {"when": datetime(2026, 3, 4, 5, 6, 7, 891999, tzinfo=UTC)}, "mirrored", when=WHEN_ISO
    ),
    # -- user ---------------------------------------------------------------------------------
    "user missing": Case({"user": MISSING}, "invalid", r"^user: missing$", dead_letter_user=None),
    "user a number": Case(
        {"user": 12345},
        "invalid",
        r"^user: expected a string \(an Auth0 sub\), got int 12345$",
        dead_letter_user=None,
    ),
    "user empty": Case({"user": ""}, "invalid", r"^user: empty$", dead_letter_user=None),
    "user unknown": Case({"user": "auth0|nobody-knows-me"}, "skipped"),
    # -- deleted ------------------------------------------------------------------------------
    'deleted "yes"': Case({"deleted": "yes"}, "nuked"),
    'deleted "false"': Case({"deleted": "false"}, "mirrored"),
    "deleted 0": Case({"deleted": 0}, "mirrored"),
    "deleted null": Case({"deleted": None}, "mirrored"),
    "deleted {}": Case({"deleted": {}}, "mirrored"),
    # -- atproto ------------------------------------------------------------------------------
    "atproto a string": Case({"atproto": "3kabcdefghij2"}, "mirrored"),
    "atproto with a malformed rkey": Case({"atproto": {"rkey": "not a tid!"}}, "mirrored"),
    "atproto empty": Case({"atproto": {}}, "mirrored"),
    # -- _id ----------------------------------------------------------------------------------
    "_id a string": Case({"_id": "mood-1"}, "bad_id", r"^_id is not an ObjectId \(str 'mood-1'\)"),
    "_id a number": Case({"_id": 42}, "bad_id", r"^_id is not an ObjectId \((int 42|str '42')\)"),
}


@pytest.fixture
def warnings() -> Iterator[list[Any]]:
    """Log records of level WARNING and above, as loguru hands them to a sink."""
    captured: list[Any] = []
    handler = logger.add(lambda message: captured.append(message.record), level="WARNING")
    yield captured
    logger.remove(handler)


def invalid_count() -> float:
    value = metrics.REGISTRY.get_sample_value(
        "replicator_events_total", {"operation": "none", "outcome": "invalid"}
    )
    return value or 0.0


def bad_doc(case: Case, sub: str) -> dict[str, Any]:
    doc: dict[str, Any] = {"user": sub, "mood": "the bad one", "when": WHEN}
    for key, value in case.fields.items():
        if value is MISSING:
            doc.pop(key, None)
        else:
            doc[key] = value
    doc.setdefault("_id", ObjectId())
    return doc


@pytest.mark.parametrize("name", list(CASES))
async def test_bad_input(rt: Runtime, users: Users, warnings: list[Any], name: str) -> None:
    case = CASES[name]
    user, other = await users.make(), await users.make()
    assert user.did and other.did
    doc = bad_doc(case, user.sub)
    bad_id = doc["_id"]
    good = [
        {"_id": ObjectId(), "user": user.sub, "mood": "good before", "when": WHEN},
        doc,
        {"_id": ObjectId(), "user": user.sub, "mood": "good after", "when": WHEN},
        {"_id": ObjectId(), "user": other.sub, "mood": "someone else's", "when": WHEN},
    ]
    good_ids = [d["_id"] for d in good if d is not doc]
    invalid_before = invalid_count()
    async with running(rt):
        await rt.store.docs.insert_many(good)

        async def settled() -> bool:
            ledger = await rt.store.ledger_by_id(good_ids)
            if any(i not in ledger or ledger[i].state is State.PENDING for i in good_ids):
                return False  # a pending entry is a write in flight
            if isinstance(bad_id, ObjectId):
                entry = (await rt.store.ledger_by_id([bad_id])).get(bad_id)
                return entry is not None and entry.state is not State.PENDING
            return await _bad_id_letter(rt.store) is not None

        await eventually(settled, what=f"{name}: the batch applied")
        mine = await records(rt.settings.pds_url, user.did)
        theirs = await records(rt.settings.pds_url, other.did)
        # Every good mood of the batch flows, whatever happened to the bad one.
        refs = {v["ref"] for v in mine.values()}
        assert {str(i) for i in good_ids[:2]} <= refs
        assert {v["ref"] for v in theirs.values()} == {str(good_ids[2])}
        for value in [*mine.values(), *theirs.values()]:
            assert value["mood"] in ("good before", "good after", "someone else's") or (
                value["ref"] == str(bad_id)
            )

        if case.outcome == "mirrored":
            await _check_mirrored(rt, case, doc, mine)
        elif case.outcome == "nuked":
            assert str(bad_id) not in refs
            entry = (await rt.store.ledger_by_id([bad_id]))[bad_id]
            assert entry.state is State.ABSENT and entry.reason == "nuked (deleted: 'yes')"
        elif case.outcome == "skipped":
            entry = (await rt.store.ledger_by_id([bad_id]))[bad_id]
            assert (entry.state, entry.reason) == (State.SKIPPED, "no ATProto account")
            assert str(bad_id) not in refs | {v["ref"] for v in theirs.values()}
        elif case.outcome == "invalid":
            assert str(bad_id) not in refs
            await _check_reported(rt, case, bad_id, user.sub, warnings)
            assert invalid_count() >= invalid_before + 1  # replicator_events_total{invalid}
            await _fix_and_check(rt, bad_id, user.sub, user.did)
        else:  # bad_id: reported, never mirrored; deleting the document clears the report
            # Keyed by the repr of the id as the change event gives it.
            letter = await _bad_id_letter(rt.store)
            assert letter is not None and re.search(case.reason, letter["reason"]), letter
            key = letter["_id"]
            assert key == repr(bad_id)
            assert letter["user"] == user.sub and letter["attempts"] == 1
            assert any(r["extra"].get("mood_id") == key and letter["reason"] in r["message"]
                       for r in warnings)  # fmt: skip
            assert len(mine) == 2
            await rt.store.docs.delete_one({"_id": bad_id})
            await eventually(lambda: _no_letter(rt.store, key), what="report of a gone document")
    if case.outcome not in ("invalid", "bad_id"):
        assert await rt.store.dead_letter_count() == 0


async def _check_mirrored(
    rt: Runtime, case: Case, doc: dict[str, Any], mine: dict[str, Any]
) -> None:
    bad_id = doc["_id"]
    [(rkey, value)] = [(k, v) for k, v in mine.items() if v["ref"] == str(bad_id)]
    expected_mood = case.mood if case.mood is not None else doc["mood"]
    assert value == {"$type": "computer.aesthetic.mood", "mood": expected_mood,
                     "when": case.when, "ref": str(bad_id)}  # fmt: skip
    entry = (await rt.store.ledger_by_id([bad_id]))[bad_id]
    assert (entry.state, entry.rkey) == (State.PRESENT, rkey)
    if "atproto" in case.fields:
        # An unusable `atproto` never names the record: the rkey is derived from the ObjectId
        # and written back (a string `atproto` is replaced by the object).
        assert rkey == tid.from_object_id(bad_id)

        async def written_back() -> bool:
            found = await rt.store.docs.find_one({"_id": bad_id})
            return bool(found and found.get("atproto") == {"rkey": rkey})

        await eventually(written_back, what="derived rkey written back")


async def _check_reported(
    rt: Runtime, case: Case, mood_id: ObjectId, sub: str, warnings: list[Any]
) -> None:
    entry = (await rt.store.ledger_by_id([mood_id]))[mood_id]
    assert entry.state is State.INVALID
    assert entry.reason is not None and re.search(case.reason, entry.reason), entry.reason
    letter = await rt.store.dead_letters.find_one({"_id": str(mood_id)})
    assert letter is not None
    assert letter["reason"] == entry.reason
    assert letter["user"] == (sub if case.dead_letter_user is USER else None)
    assert letter["attempts"] == 1
    assert letter["first_at"] <= letter["last_at"]
    lines = [r for r in warnings if r["extra"].get("mood_id") == str(mood_id)]
    assert lines and entry.reason in lines[0]["message"], [r["message"] for r in warnings]
    assert len(lines[0]["message"]) < 300  # the reason, not the 1 MiB value


async def _fix_and_check(rt: Runtime, mood_id: ObjectId, sub: str, did: str) -> None:
    """The document edited back to valid: mirrored, and its dead letter cleared."""
    await rt.store.docs.update_one(
        {"_id": mood_id}, {"$set": {"user": sub, "mood": "fixed", "when": WHEN}}
    )

    async def mirrored() -> bool:
        have = await records(rt.settings.pds_url, did)
        return any(v["ref"] == str(mood_id) and v["mood"] == "fixed" for v in have.values())

    await eventually(mirrored, what="the fixed mood mirrored")
    await eventually(lambda: _no_letter(rt.store, str(mood_id)), what="dead letter cleared")
    entry = (await rt.store.ledger_by_id([mood_id]))[mood_id]
    assert entry.state is State.PRESENT and entry.reason is None


async def _bad_id_letter(store: Store) -> dict[str, Any] | None:
    letters = [d async for d in store.dead_letters.find({})]
    found = [d for d in letters if d["reason"].startswith("_id is not an ObjectId")]
    assert len(found) <= 1, found
    return found[0] if found else None


async def _no_letter(store: Store, key: str) -> bool:
    return await store.dead_letters.find_one({"_id": key}) is None


# -- what the test server cannot hold, through the same decoding and apply path ---------------


def _raw_with(doc: dict[str, Any], field_name: str, raw_utf8: bytes) -> bytes:
    """BSON for `doc` whose string field `field_name` holds `raw_utf8` (may be invalid UTF-8),
    as a real MongoDB can store it (it does not validate UTF-8) and the test server refuses."""
    placeholder = "\x02PLACEHOLDER\x03"
    data = bson.encode({**doc, field_name: placeholder})
    old = placeholder.encode() + b"\x00"
    new = raw_utf8 + b"\x00"
    data = data.replace(len(old).to_bytes(4, "little") + old, len(new).to_bytes(4, "little") + new)
    return len(data).to_bytes(4, "little") + data[4:]


async def test_invalid_utf8_and_out_of_range_dates_are_reported_not_crashes(
    rt: Runtime, users: Users, warnings: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real MongoDB stores invalid UTF-8 (a lone surrogate written as WTF-8/CESU-8, bytes cut
    mid-character) and dates beyond Python's years 1-9999; PyMongo's defaults raise on reading
    them, which would stop the change stream on that event for good. The store decodes them,
    and the mood is reported as invalid with a reason while the others flow."""
    user = await users.make()
    assert user.did
    codec = rt.store.docs.codec_options
    assert codec.unicode_decode_error_handler == "surrogateescape"
    base = {"user": user.sub, "when": WHEN}
    lone = ObjectId()
    cut = ObjectId()
    bad_user = ObjectId()
    far = ObjectId()
    good = ObjectId()
    decoded = {
        lone: bson.decode(_raw_with({"_id": lone, **base}, "mood", b"ok \xed\xa0\x80 ok"), codec),
        cut: bson.decode(_raw_with({"_id": cut, **base}, "mood", "🙂".encode()[:3]), codec),
        bad_user: bson.decode(
            _raw_with({"_id": bad_user, "mood": "m", "when": WHEN}, "user", b"auth0|\xff"), codec
        ),
        far: bson.decode(
            bson.encode({"_id": far, **base, "mood": "m", "when": DatetimeMS(2**52)}), codec
        ),
        good: {"_id": good, **base, "mood": "fine"},
    }
    # The documents exist (valid stand-ins); reads return what a real server would.
    await rt.store.docs.insert_many(
        [{"_id": i, **base, "mood": "stand-in"} for i in decoded if i != good] + [decoded[good]]
    )

    async def moods_by_id(ids: Any) -> dict[ObjectId, dict[str, Any]]:
        return {i: decoded[i] for i in ids if i in decoded}

    monkeypatch.setattr(rt.store, "moods_by_id", moods_by_id)
    await rt.applier.apply_ids(list(decoded))

    ledger = await rt.store.ledger_by_id(list(decoded))
    expected = {
        lone: r"^mood: not valid Unicode \(lone surrogate or invalid UTF-8 at character 3\)$",
        cut: r"^mood: not valid Unicode \(lone surrogate or invalid UTF-8 at character 0\)$",
        bad_user: r"^user: not valid Unicode",
        far: r"^when: a date around the year \d+, outside the years 1 to 9999",
    }
    for mood_id, pattern in expected.items():
        entry = ledger[mood_id]
        assert entry.state is State.INVALID and re.search(pattern, entry.reason or ""), entry
        letter = await rt.store.dead_letters.find_one({"_id": str(mood_id)})
        assert letter is not None and letter["reason"] == entry.reason
        assert any(r["extra"].get("mood_id") == str(mood_id) for r in warnings)
    assert ledger[good].state is State.PRESENT
    assert [v["ref"] for v in (await records(rt.settings.pds_url, user.did)).values()] == [
        str(good)
    ]
    # The pure core agrees on a lone surrogate however it arrives.
    lone_py = desired_state(MOOD, lone, {**base, "mood": "x\ud83d"}, has_account=True)
    assert lone_py.state is State.INVALID and "character 1" in (lone_py.reason or "")


# -- other paths -------------------------------------------------------------------------------


async def test_backfill_reports_an_id_that_is_not_an_objectid_and_mirrors_the_rest(
    rt: Runtime, users: Users
) -> None:
    """The backfill and history-loss recovery read a user's documents directly."""
    user = await users.make()
    assert user.did
    ids = [ObjectId(), ObjectId()]
    await rt.store.docs.insert_many([
        {"_id": ids[0], "user": user.sub, "mood": "one", "when": WHEN},
        {"_id": "legacy-7", "user": user.sub, "mood": "odd id", "when": WHEN},
        {"_id": ids[1], "user": user.sub, "mood": "two", "when": WHEN},
    ])  # fmt: skip
    outcome = await rt.applier.reconcile_user(user.sub)
    assert outcome.counts.sent.put == 2
    have = await records(rt.settings.pds_url, user.did)
    assert sorted(v["ref"] for v in have.values()) == sorted(str(i) for i in ids)
    letter = await rt.store.dead_letters.find_one({"_id": "'legacy-7'"})
    assert letter is not None and letter["user"] == user.sub
    assert letter["reason"].startswith("_id is not an ObjectId (str 'legacy-7')")


async def test_burst_over_the_pds_body_limit_flows_and_a_fixed_mood_leaves_the_queue(
    rt: Runtime, users: Users
) -> None:
    """The reference PDS refuses an `applyWrites` body over 1 MB (HTTP 413): 60 moods of 5000
    control characters (JSON-escaped to 30 KB each) make one. The moods are then written one by
    one: all land, and a mood fixed in the same batch has its dead letter cleared."""
    user = await users.make()
    assert user.did
    bad = await rt.store.docs.insert_one({"user": user.sub, "mood": "", "when": WHEN})
    await rt.applier.apply_ids([bad.inserted_id])
    assert await rt.store.dead_letters.find_one({"_id": str(bad.inserted_id)}) is not None
    burst = await rt.store.docs.insert_many(
        [{"user": user.sub, "mood": "\x01" * 5000, "when": WHEN} for _ in range(60)]
    )
    await rt.store.docs.update_one({"_id": bad.inserted_id}, {"$set": {"mood": "fixed"}})
    await rt.applier.apply_ids([bad.inserted_id, *burst.inserted_ids])
    have = await records(rt.settings.pds_url, user.did)
    assert len(have) == 61
    assert all(v["mood"] == "\x01" * 5000 for v in have.values() if v["mood"] != "fixed")
    assert await rt.store.dead_letter_count() == 0
    entries = await rt.store.ledger_by_id([bad.inserted_id, *burst.inserted_ids])
    assert {e.state for e in entries.values()} == {State.PRESENT}
