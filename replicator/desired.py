"""A mood document's desired record: pure, deterministic, byte-identical for the same document.

The PDS skips a `putRecord` whose CID is unchanged, and the ledger compares content hashes, so
the same document must always map to the same bytes: fixed key order, milliseconds, `Z`.

Bad input (what each malformed field leads to, and why) is decided here and documented in
`docs/bad-input.md`. A document that cannot become a valid record is `INVALID` with a reason
that names the field and what is wrong with it; reasons never quote more than a short,
escaped preview of the value (they go to logs, the dead-letter queue and the ledger, and a
reason must stay storable in BSON even when the value is not valid UTF-8).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import libipld
import orjson
from bson import ObjectId
from bson.datetime_ms import DatetimeMS

from . import tid
from .lexicon import MOOD_NSID, LexiconError, validate_record
from .model import Desired, Record, State

_FALSY_STRINGS = frozenset({"", "false", "0", "no", "off", "null", "undefined"})
_MS_PER_YEAR = 365.2425 * 86_400_000
# What JavaScript's `String.prototype.trim()` removes (WhiteSpace and LineTerminator): the app
# trims with it. Not Python's `str.strip()`, which also strips U+001C..U+001F and U+0085.
JS_WHITESPACE = "\t\n\v\f\r \u00a0\u1680\u2028\u2029\u202f\u205f\u3000\ufeff" + "".join(
    chr(c) for c in range(0x2000, 0x200B)
)
PREVIEW_CHARS = 40
DOCUMENT_DELETED = "document deleted"


class InvalidMood(ValueError):
    """The document cannot become a valid record; the message is the reason, for people."""


def preview(value: Any, limit: int = PREVIEW_CHARS) -> str:
    """A short, ASCII-safe repr for reasons: lone surrogates and control characters escaped."""
    text = ascii(value)
    return text if len(text) <= limit else f"{text[: limit - 1]}…"


def _got(value: Any) -> str:
    """`<type> <preview>`; BSON's `Int64` (how large integers come back) reads as `int`."""
    if isinstance(value, int) and not isinstance(value, bool):
        return f"int {int(value)}"
    return f"{type(value).__name__} {preview(value)}"


def unicode_problem(text: str) -> int | None:
    """Index of the first character that cannot be encoded as UTF-8, if any.

    Only a lone surrogate can be: Python decodes invalid UTF-8 read from MongoDB into
    U+DC80..U+DCFF (the store connects with `unicode_decode_error_handler="surrogateescape"`),
    so both a lone surrogate and an invalid byte end up here.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return int(exc.start)
    return None


def user_problem(value: Any, present: bool = True) -> str | None:
    """Why `user` cannot identify the mood's owner, or None when it can."""
    if not present:
        return "user: missing"
    if value is None:
        return "user: missing (null)"
    if not isinstance(value, str):
        return f"user: expected a string (an Auth0 sub), got {_got(value)}"
    if not value.strip(JS_WHITESPACE):
        return "user: empty"
    if (at := unicode_problem(value)) is not None:
        return f"user: not valid Unicode (lone surrogate or invalid UTF-8 at character {at})"
    return None


def valid_user(value: Any) -> str | None:
    """The owner's sub, or None when `user` cannot be one (see `user_problem`)."""
    return value if isinstance(value, str) and user_problem(value) is None else None


def bad_id_reason(value: Any) -> str:
    """Reason for a mood whose `_id` is not an ObjectId: it has no `ref`, no derived rkey."""
    return f"_id is not an ObjectId ({_got(value)}): a mood needs one to be mirrored"


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
    """`when` as an atproto datetime: UTC, milliseconds (sub-milliseconds are truncated), `Z`.

    Only a date is a date: the app writes `new Date()`. A string or a number is reported, not
    guessed at (which time zone? seconds or milliseconds?): a wrong guess would publish a
    wrong time under the user's name.
    """
    if isinstance(value, DatetimeMS):  # a BSON date Python cannot represent
        years = 1970 + int(value) / _MS_PER_YEAR
        raise InvalidMood(
            f"when: a date around the year {years:.0f}, outside the years 1 to 9999 that "
            "atproto datetimes allow"
        )
    if not isinstance(value, datetime):
        if value is None:
            raise InvalidMood("when: missing (null)")
        hint = ""
        if isinstance(value, str):
            hint = "; the app stores dates, not strings"
        elif isinstance(value, int | float) and not isinstance(value, bool):
            hint = "; not guessed as epoch seconds or milliseconds"
        raise InvalidMood(f"when: expected a date, got {_got(value)}{hint}")
    try:
        dt: datetime = value.astimezone(UTC) if value.tzinfo is not None else value
    except OverflowError:
        raise InvalidMood("when: out of range once converted to UTC") from None
    # Formatted by hand: strftime's %Y drops the leading zeros of years before 1000.
    return (
        f"{dt.year:04d}-{dt.month:02d}-{dt.day:02d}T{dt.hour:02d}:{dt.minute:02d}:"
        f"{dt.second:02d}.{dt.microsecond // 1000:03d}Z"
    )


def check_mood_text(doc: Mapping[str, Any]) -> str:
    """The `mood` text, or `InvalidMood` saying exactly what is wrong with it.

    Any Unicode the lexicon and the reference PDS accept is mirrored as written, NUL and other
    control characters included (JSON escapes them). Empty or blank is not a mood: the app
    trims the text and refuses an empty one, so such a document did not come from it.
    """
    if "mood" not in doc:
        raise InvalidMood("mood: missing")
    mood = doc["mood"]
    if mood is None:
        raise InvalidMood("mood: missing (null)")
    if not isinstance(mood, str):
        raise InvalidMood(f"mood: expected a string, got {_got(mood)}")
    if not mood:
        raise InvalidMood("mood: empty")
    if not mood.strip(JS_WHITESPACE):
        raise InvalidMood("mood: empty (only whitespace)")
    if (at := unicode_problem(mood)) is not None:
        raise InvalidMood(
            f"mood: not valid Unicode (lone surrogate or invalid UTF-8 at character {at})"
        )
    return mood


def build_record(doc: Mapping[str, Any], mood_id: ObjectId) -> Record:
    return _build(doc, mood_id)[0]


def _build(doc: Mapping[str, Any], mood_id: ObjectId) -> tuple[Record, str]:
    """The validated record and its content hash (computed once: it keys the validation
    cache and is what the ledger compares)."""
    mood = check_mood_text(doc)
    if "when" not in doc:
        raise InvalidMood("when: missing")
    record: Record = {
        "$type": MOOD_NSID,
        "mood": mood,
        "when": format_when(doc["when"]),
        "ref": str(mood_id),
    }
    key = content_hash(record)
    _validate(record, key)
    return record, key


def content_hash(record: Record) -> str:
    return hashlib.sha256(orjson.dumps(record, option=orjson.OPT_SORT_KEYS)).hexdigest()


_CID_V1_DAG_CBOR_SHA256 = b"\x01\x71\x12\x20"  # version 1, dag-cbor, sha2-256, 32 bytes


def record_cid(record: Record) -> str:
    """The CID the PDS gives this record (CIDv1, dag-cbor, sha2-256, base32), known before
    it is written: an intent records it, so the outcome of a create is only its state."""
    digest = hashlib.sha256(libipld.encode_dag_cbor(record)).digest()
    return str(libipld.encode_cid(_CID_V1_DAG_CBOR_SHA256 + digest))


# Hashes of records that passed the lexicon. Every insert comes back as a second event (our own
# `atproto.rkey` write-back) and every replay repeats the first: both re-derive a record already
# validated. Bounded; only successes are kept, so an invalid record is always re-checked.
_VALID: OrderedDict[str, None] = OrderedDict()
_VALID_MAX = 50_000


def _validate(record: Record, key: str) -> None:
    if key in _VALID:
        _VALID.move_to_end(key)
        return
    try:
        validate_record(record)
    except LexiconError as exc:
        raise InvalidMood(str(exc)) from None
    _VALID[key] = None
    if len(_VALID) > _VALID_MAX:
        _VALID.popitem(last=False)


def doc_rkey(doc: Mapping[str, Any]) -> str | None:
    """The document's own rkey (a public permalink) when it is a usable TID.

    Anything else (`atproto` not an object, no `rkey`, an rkey that is not a TID) is ignored:
    the mood gets the TID derived from its ObjectId, which is then written back.
    """
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
        return Desired(mood_id, None, State.ABSENT, reason=DOCUMENT_DELETED)
    user = valid_user(doc.get("user"))
    rkey = doc_rkey(doc)
    deleted = doc.get("deleted")
    if is_deleted(deleted):
        reason = "nuked" if deleted is True else f"nuked (deleted: {preview(deleted)})"
        return Desired(mood_id, user, State.ABSENT, doc_rkey=rkey, reason=reason)
    if user is None:
        problem = user_problem(doc.get("user"), "user" in doc) or "user: unusable"
        return Desired(mood_id, None, State.INVALID, doc_rkey=rkey, reason=problem)
    if not has_account:
        return Desired(mood_id, user, State.SKIPPED, doc_rkey=rkey, reason="no ATProto account")
    try:
        record, key = _build(doc, mood_id)
    except InvalidMood as exc:
        return Desired(mood_id, user, State.INVALID, doc_rkey=rkey, reason=str(exc))
    return Desired(mood_id, user, State.PRESENT, record, key, rkey)
