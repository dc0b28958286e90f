"""A mood document's desired record: deletion flags, dates, record shape, states, rkeys."""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, timedelta, timezone
from typing import Any

import orjson
import pytest
from bson import ObjectId

from replicator import tid
from replicator.desired import content_hash, desired_state, doc_rkey, record_of
from replicator.lexicon import MOOD_NSID, validate_record
from replicator.model import State
from replicator.recordtypes import MOOD, InvalidDocument
from replicator.recordtypes.fields import format_when
from replicator.recordtypes.mood import is_deleted


def build_record(doc: dict[str, Any], mood_id: ObjectId) -> dict[str, Any]:
    return record_of(MOOD, doc, mood_id)[0]


MOOD_ID = ObjectId("65a1b2c3d4e5f60718293a4b")
USER = "auth0|66db1c30aa0000000000beef"
WHEN = datetime(2024, 1, 2, 3, 4, 5, 678901)  # naive, as PyMongo returns it: UTC
RKEY = "3kabcdefghij2"
ISO_MS_Z = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")


def make_doc(**fields: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"_id": MOOD_ID, "user": USER, "mood": "feeling fine", "when": WHEN}
    doc.update(fields)
    return doc


def without(doc: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in doc.items() if k != key}


# -- is_deleted -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (True, True),
        (False, False),
        (None, False),
        (0, False),
        (1, True),
        (-1, True),
        (0.0, False),
        (2.5, True),
        ("yes", True),
        ("true", True),
        ("false", False),
        ("FALSE", False),
        (" no ", False),
        ("0", False),
        ("", False),
        ({}, False),
        ({"a": 1}, True),
        ([], False),
        ([1], True),
        (float("nan"), False),  # NaN is falsy, as in JavaScript
    ],
)
def test_is_deleted(value: Any, expected: bool) -> None:
    assert is_deleted(value) is expected


def test_absent_deleted_field_is_not_deleted() -> None:
    assert desired_state(MOOD, MOOD_ID, make_doc(), has_account=True).state is State.PRESENT


# -- format_when ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (datetime(2024, 1, 2, 3, 4, 5, 678901), "2024-01-02T03:04:05.678Z"),
        (datetime(2024, 1, 2, 3, 4, 5), "2024-01-02T03:04:05.000Z"),
        (datetime(2024, 1, 2, 3, 4, 5, 999999), "2024-01-02T03:04:05.999Z"),  # truncated
        (datetime(2024, 1, 2, 3, 4, 5, 999), "2024-01-02T03:04:05.000Z"),
        (datetime(2024, 1, 2, 3, 4, 5, 1000), "2024-01-02T03:04:05.001Z"),
        (datetime(1, 1, 1), "0001-01-01T00:00:00.000Z"),
        (datetime(999, 12, 31, 23, 59, 59), "0999-12-31T23:59:59.000Z"),
        (datetime(9999, 12, 31, 23, 59, 59, 999999), "9999-12-31T23:59:59.999Z"),
        (datetime(2024, 1, 2, 3, 4, 5, 678901, tzinfo=UTC), "2024-01-02T03:04:05.678Z"),
        (
            datetime(2024, 1, 2, 1, 30, 0, 250000, tzinfo=timezone(timedelta(hours=2))),
            "2024-01-01T23:30:00.250Z",
        ),
        (
            datetime(2024, 12, 31, 20, 0, 0, tzinfo=timezone(timedelta(hours=-5))),
            "2025-01-01T01:00:00.000Z",
        ),
    ],
)
def test_format_when(value: datetime, expected: str) -> None:
    formatted = format_when(value)
    assert formatted == expected
    assert ISO_MS_Z.match(formatted)


def test_format_when_naive_equals_utc_aware() -> None:
    naive = datetime(2023, 6, 7, 8, 9, 10, 111222)
    assert format_when(naive) == format_when(naive.replace(tzinfo=UTC))


@pytest.mark.parametrize(
    "value", [None, "2024-01-02T03:04:05.678Z", 1704164645678, date(2024, 1, 2)]
)
def test_format_when_rejects_non_datetimes(value: Any) -> None:
    with pytest.raises(InvalidDocument, match=r"^when:"):
        format_when(value)


def test_format_when_output_is_a_lexicon_datetime() -> None:
    record = build_record(make_doc(when=datetime(1, 1, 1)), MOOD_ID)
    assert record["when"] == "0001-01-01T00:00:00.000Z"
    validate_record(record)


# -- build_record / content_hash ------------------------------------------------------------


def test_build_record_shape_and_key_order() -> None:
    record = build_record(make_doc(), MOOD_ID)
    assert list(record) == ["$type", "mood", "when", "ref"]
    assert record == {
        "$type": MOOD_NSID,
        "mood": "feeling fine",
        "when": "2024-01-02T03:04:05.678Z",
        "ref": "65a1b2c3d4e5f60718293a4b",
    }
    assert re.fullmatch(r"[0-9a-f]{24}", record["ref"])
    assert orjson.dumps(record).startswith(b'{"$type":"computer.aesthetic.mood","mood":')


def test_build_record_is_byte_identical_across_calls() -> None:
    doc = make_doc(mood="multi\nline 🙂 \u00e9\u0301 \u202etext")
    first = orjson.dumps(build_record(doc, MOOD_ID))
    for _ in range(5):
        assert orjson.dumps(build_record(doc, MOOD_ID)) == first
    # A copy with the fields in another order and the replicator's own write-back.
    reordered = {
        "atproto": {"rkey": RKEY},
        "when": doc["when"],
        "mood": doc["mood"],
        "user": USER,
        "_id": MOOD_ID,
        "deleted": False,
    }
    assert orjson.dumps(build_record(reordered, MOOD_ID)) == first


def test_build_record_keeps_text_as_written() -> None:
    text = "  leading and trailing  \n\n"
    assert build_record(make_doc(mood=text), MOOD_ID)["mood"] == text


def test_content_hash_is_stable() -> None:
    record = build_record(make_doc(), MOOD_ID)
    digest = content_hash(record)
    assert re.fullmatch(r"[0-9a-f]{64}", digest)
    assert content_hash(build_record(make_doc(), MOOD_ID)) == digest
    assert content_hash(dict(reversed(list(record.items())))) == digest  # key order ignored


def test_content_hash_changes_with_content() -> None:
    base = content_hash(build_record(make_doc(), MOOD_ID))
    assert content_hash(build_record(make_doc(mood="feeling fine!"), MOOD_ID)) != base
    later = WHEN + timedelta(milliseconds=1)
    assert content_hash(build_record(make_doc(when=later), MOOD_ID)) != base
    other_id = ObjectId("65a1b2c3d4e5f60718293a4c")
    assert content_hash(build_record(make_doc(), other_id)) != base


def test_content_hash_ignores_sub_millisecond_changes() -> None:
    a = build_record(make_doc(when=WHEN.replace(microsecond=678000)), MOOD_ID)
    b = build_record(make_doc(when=WHEN.replace(microsecond=678999)), MOOD_ID)
    assert content_hash(a) == content_hash(b)


# -- desired_state --------------------------------------------------------------------------


def test_desired_document_gone_is_absent() -> None:
    d = desired_state(MOOD, MOOD_ID, None, has_account=True)
    assert d.state is State.ABSENT
    assert d.mood_id == MOOD_ID
    assert d.record is None and d.hash is None


@pytest.mark.parametrize("deleted", [True, 1, "yes", {"by": "admin"}])
def test_desired_nuked_is_absent_and_keeps_doc_rkey(deleted: Any) -> None:
    d = desired_state(
        MOOD, MOOD_ID, make_doc(deleted=deleted, atproto={"rkey": RKEY}), has_account=True
    )
    assert d.state is State.ABSENT
    assert d.doc_rkey == RKEY
    assert d.user == USER
    assert d.record is None


@pytest.mark.parametrize("deleted", [False, None, 0, "false", "", {}, []])
def test_desired_not_nuked_is_present(deleted: Any) -> None:
    d = desired_state(MOOD, MOOD_ID, make_doc(deleted=deleted), has_account=True)
    assert d.state is State.PRESENT


def test_desired_nuked_wins_over_missing_account() -> None:
    d = desired_state(MOOD, MOOD_ID, make_doc(deleted=True), has_account=False)
    assert d.state is State.ABSENT


def test_desired_without_account_is_skipped() -> None:
    d = desired_state(MOOD, MOOD_ID, make_doc(atproto={"rkey": RKEY}), has_account=False)
    assert d.state is State.SKIPPED
    assert d.user == USER
    assert d.doc_rkey == RKEY
    assert d.record is None


@pytest.mark.parametrize("user", ["missing", None, 123, "", ["auth0|x"]])
def test_desired_bad_user_is_invalid(user: Any) -> None:
    doc = without(make_doc(), "user") if user == "missing" else make_doc(user=user)
    d = desired_state(MOOD, MOOD_ID, doc, has_account=True)
    assert d.state is State.INVALID
    assert d.user is None
    assert d.reason is not None and d.reason.startswith("user")


@pytest.mark.parametrize(
    ("mood", "reason"),
    [
        (None, r"^mood: missing"),
        (42, r"^mood: expected a string, got int"),
        (["a"], r"^mood: expected a string"),
        ("", r"^mood: empty"),
        ("a" * 5001, r"^mood: longer than maxLength 5000 UTF-8 bytes"),
        ("\u00e9" * 2501, r"^mood: longer than maxLength 5000 UTF-8 bytes \(5002\)"),
        ("\U0001f600" * 1251, r"^mood: longer than maxLength 5000 UTF-8 bytes \(5004\)"),
        ("\ud800", r"^mood: not valid Unicode"),
        ("ok \udfff ok", r"^mood: not valid Unicode"),
    ],
)
def test_desired_bad_mood_is_invalid(mood: Any, reason: str) -> None:
    d = desired_state(MOOD, MOOD_ID, make_doc(mood=mood, atproto={"rkey": RKEY}), has_account=True)
    assert d.state is State.INVALID
    assert d.reason is not None and re.search(reason, d.reason), d.reason
    assert d.record is None and d.hash is None
    assert d.doc_rkey == RKEY  # the permalink is remembered even while invalid


def test_desired_missing_mood_key_is_invalid() -> None:
    d = desired_state(MOOD, MOOD_ID, without(make_doc(), "mood"), has_account=True)
    assert d.state is State.INVALID
    assert d.reason == "mood: missing"


@pytest.mark.parametrize(
    "mood", ["a" * 5000, "\u00e9" * 2500, "\U0001f600" * 1250, "x", "🙂", "line\nline"]
)
def test_desired_mood_up_to_5000_bytes_is_present(mood: str) -> None:
    d = desired_state(MOOD, MOOD_ID, make_doc(mood=mood), has_account=True)
    assert d.state is State.PRESENT, d.reason
    assert d.record is not None and d.record["mood"] == mood


@pytest.mark.parametrize("when", [None, "2024-01-02T03:04:05Z", 1704164645678, date(2024, 1, 2)])
def test_desired_non_date_when_is_invalid(when: Any) -> None:
    d = desired_state(MOOD, MOOD_ID, make_doc(when=when), has_account=True)
    assert d.state is State.INVALID
    assert d.reason is not None and d.reason.startswith("when:")


def test_desired_missing_when_is_invalid() -> None:
    d = desired_state(MOOD, MOOD_ID, without(make_doc(), "when"), has_account=True)
    assert d.state is State.INVALID
    assert d.reason == "when: missing"


def test_desired_valid_is_present_with_record_and_hash() -> None:
    d = desired_state(MOOD, MOOD_ID, make_doc(atproto={"rkey": RKEY}), has_account=True)
    assert d.state is State.PRESENT
    assert d.user == USER
    assert d.record == build_record(make_doc(), MOOD_ID)
    assert d.hash == content_hash(build_record(make_doc(), MOOD_ID))
    assert d.doc_rkey == RKEY
    assert d.reason is None
    validate_record(d.record)


def test_desired_is_deterministic() -> None:
    a = desired_state(MOOD, MOOD_ID, make_doc(), has_account=True)
    b = desired_state(MOOD, MOOD_ID, make_doc(), has_account=True)
    assert a == b
    assert a.record is not None and b.record is not None
    assert orjson.dumps(a.record) == orjson.dumps(b.record)


def test_desired_write_back_does_not_change_content() -> None:
    before = desired_state(MOOD, MOOD_ID, make_doc(), has_account=True)
    after = desired_state(MOOD, MOOD_ID, make_doc(atproto={"rkey": RKEY}), has_account=True)
    assert before.hash == after.hash
    assert before.doc_rkey is None and after.doc_rkey == RKEY


# -- doc_rkey -------------------------------------------------------------------------------


def test_doc_rkey_returns_a_valid_tid() -> None:
    assert doc_rkey(MOOD, {"atproto": {"rkey": RKEY}}) == RKEY
    derived = tid.from_object_id(MOOD_ID)
    assert doc_rkey(MOOD, {"atproto": {"rkey": derived, "other": 1}}) == derived


@pytest.mark.parametrize(
    "atproto",
    [
        {},
        "str",
        RKEY,  # an rkey string where an object belongs
        None,
        [RKEY],
        {"rkey": None},
        {"rkey": ""},
        {"rkey": 12345},
        {"rkey": "self"},  # a valid record key but not a TID
        {"rkey": "3kabcdefghij"},  # 12 chars
        {"rkey": "3KABCDEFGHIJ2"},
        {"rkey": "kkabcdefghij2"},  # first char outside [2-7a-j]
        {"rkey": RKEY + " "},
    ],
)
def test_doc_rkey_ignores_unusable_values(atproto: Any) -> None:
    assert doc_rkey(MOOD, {"atproto": atproto}) is None


def test_doc_rkey_without_atproto() -> None:
    assert doc_rkey(MOOD, {}) is None
    assert doc_rkey(MOOD, make_doc()) is None


def test_doc_rkey_rejects_trailing_newline() -> None:
    assert doc_rkey(MOOD, {"atproto": {"rkey": RKEY + "\n"}}) is None
