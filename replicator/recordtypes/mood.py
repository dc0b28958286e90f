"""`moods` → `computer.aesthetic.mood`: the first type, and the one every default is for."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from bson import ObjectId

from ..lexicon import MOOD_NSID
from .base import Document, Record, RecordType
from .fields import preview, text, when

NSID = MOOD_NSID
_FALSY_STRINGS = frozenset({"", "false", "0", "no", "off", "null", "undefined"})


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


def nuked(doc: Document) -> str | None:
    deleted = doc.get("deleted")
    if not is_deleted(deleted):
        return None
    return "nuked" if deleted is True else f"nuked (deleted: {preview(deleted)})"


def build(doc: Document, mood_id: ObjectId) -> Record:
    """Empty or blank is not a mood: the app trims the text and refuses an empty one."""
    return {
        "$type": NSID,
        "mood": text(doc, "mood"),
        "when": when(doc),
        "ref": str(mood_id),
    }


MOOD = RecordType(
    name="mood",
    collection="moods",
    nsid=NSID,
    build=build,
    deleted=nuked,
    fingerprint=("mood", "when", "deleted"),
)
