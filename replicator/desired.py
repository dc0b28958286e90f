"""A mood document's desired record: pure, deterministic, byte-identical for the same document.

The PDS skips a `putRecord` whose CID is unchanged, and the ledger compares content hashes, so
the same document must always map to the same bytes: fixed key order, milliseconds, `Z`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import orjson
from bson import ObjectId

from . import tid
from .lexicon import MOOD_NSID, LexiconError, validate_record
from .model import Desired, Record, State

_FALSY_STRINGS = frozenset({"", "false", "0", "no", "off", "null", "undefined"})


class InvalidMood(ValueError):
    """The document cannot become a valid record; the message is the reason, for people."""


def is_deleted(value: Any) -> bool:
    """Whether `deleted` nukes the mood.

    The app stores whatever the client sent. Booleans and numbers mean what they say; strings
    mean what a person typed (`"false"`, `"0"`, `"no"` keep the mood); an empty object or list
    carries no intent and keeps the mood: we never delete a user's record on a guess.
    """
    if value is None or isinstance(value, bool):
        return bool(value)
    if isinstance(value, int | float):
        return value != 0 and value == value  # NaN is falsy, as in JavaScript
    if isinstance(value, str):
        return value.strip().lower() not in _FALSY_STRINGS
    if isinstance(value, Mapping | list | tuple):
        return len(value) > 0
    return True


def format_when(value: Any) -> str:
    if not isinstance(value, datetime):
        raise InvalidMood(f"when: expected a date, got {type(value).__name__}")
    try:
        dt: datetime = value.astimezone(UTC) if value.tzinfo is not None else value
    except OverflowError:
        raise InvalidMood("when: out of range once converted to UTC") from None
    # Formatted by hand: strftime's %Y drops the leading zeros of years before 1000.
    return (
        f"{dt.year:04d}-{dt.month:02d}-{dt.day:02d}T{dt.hour:02d}:{dt.minute:02d}:"
        f"{dt.second:02d}.{dt.microsecond // 1000:03d}Z"
    )


def build_record(doc: Mapping[str, Any], mood_id: ObjectId) -> Record:
    mood = doc.get("mood")
    if mood is None:
        raise InvalidMood("mood: missing")
    if not isinstance(mood, str):
        raise InvalidMood(f"mood: expected a string, got {type(mood).__name__}")
    if not mood.strip():
        raise InvalidMood("mood: empty")
    try:
        mood.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidMood(f"mood: not valid Unicode (lone surrogate at {exc.start})") from None
    if "when" not in doc:
        raise InvalidMood("when: missing")
    record: Record = {
        "$type": MOOD_NSID,
        "mood": mood,
        "when": format_when(doc["when"]),
        "ref": str(mood_id),
    }
    try:
        validate_record(record)
    except LexiconError as exc:
        raise InvalidMood(str(exc)) from None
    return record


def content_hash(record: Record) -> str:
    return hashlib.sha256(orjson.dumps(record, option=orjson.OPT_SORT_KEYS)).hexdigest()


def doc_rkey(doc: Mapping[str, Any]) -> str | None:
    """The document's own rkey (a public permalink) when it is a usable TID."""
    atproto = doc.get("atproto")
    if isinstance(atproto, Mapping):
        rkey = atproto.get("rkey")
        if tid.is_tid(rkey):
            return str(rkey)
    return None


def desired_state(
    mood_id: ObjectId, doc: Mapping[str, Any] | None, *, has_account: bool
) -> Desired:
    """The record a mood should have: present iff the document exists, is not nuked, its user
    has an account and it makes a valid record."""
    if doc is None:
        return Desired(mood_id, None, State.ABSENT, reason="document deleted")
    user = doc.get("user")
    user = user if isinstance(user, str) and user else None
    rkey = doc_rkey(doc)
    if is_deleted(doc.get("deleted")):
        return Desired(mood_id, user, State.ABSENT, doc_rkey=rkey, reason="nuked")
    if user is None:
        return Desired(mood_id, None, State.INVALID, reason="user: missing or not a string")
    if not has_account:
        return Desired(mood_id, user, State.SKIPPED, doc_rkey=rkey, reason="no ATProto account")
    try:
        record = build_record(doc, mood_id)
    except InvalidMood as exc:
        return Desired(mood_id, user, State.INVALID, doc_rkey=rkey, reason=str(exc))
    return Desired(mood_id, user, State.PRESENT, record, content_hash(record), rkey)
