"""Reading the app's fields as the app wrote them: text, dates, owners. Pure.

Shared by every record type's `build`: the same document field means the same thing in every
collection (a `when` is a date the app wrote with `new Date()`, text is trimmed the way
JavaScript trims it), and a reason names the field and what is wrong with it. Reasons never
quote more than a short, escaped preview of the value: they go to logs, the dead-letter queue
and the ledger, and must stay storable in BSON even when the value is not valid UTF-8.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from bson.datetime_ms import DatetimeMS

_MS_PER_YEAR = 365.2425 * 86_400_000
# What JavaScript's `String.prototype.trim()` removes (WhiteSpace and LineTerminator): the app
# trims with it. Not Python's `str.strip()`, which also strips U+001C..U+001F and U+0085.
JS_WHITESPACE = "\t\n\v\f\r \u00a0\u1680\u2028\u2029\u202f\u205f\u3000\ufeff" + "".join(
    chr(c) for c in range(0x2000, 0x200B)
)
PREVIEW_CHARS = 40


class InvalidDocument(ValueError):
    """The document cannot become a valid record; the message is the reason, for people."""


def preview(value: Any, limit: int = PREVIEW_CHARS) -> str:
    """A short, ASCII-safe repr for reasons: lone surrogates and control characters escaped."""
    text = ascii(value)
    return text if len(text) <= limit else f"{text[: limit - 1]}…"


def got(value: Any) -> str:
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


def text(doc: Mapping[str, Any], field: str, *, required: bool = True) -> str | None:
    """`field` as the record's text, or `InvalidDocument` saying exactly what is wrong with
    it. Optional text that is missing, null or blank is left out (None); required text that
    is blank did not come from the app, which trims and refuses it. Any Unicode the lexicon
    accepts is kept as written, NUL and other control characters included (JSON escapes
    them); what the lexicon limits (lengths) is its to check."""
    value = doc.get(field)
    if value is None:
        if required:
            raise InvalidDocument(f"{field}: missing" + (" (null)" if field in doc else ""))
        return None
    if not isinstance(value, str):
        raise InvalidDocument(f"{field}: expected a string, got {got(value)}")
    if not value.strip(JS_WHITESPACE):
        if not required:
            return None
        raise InvalidDocument(f"{field}: empty" + (" (only whitespace)" if value else ""))
    if (at := unicode_problem(value)) is not None:
        raise InvalidDocument(
            f"{field}: not valid Unicode (lone surrogate or invalid UTF-8 at character {at})"
        )
    return value


def when(doc: Mapping[str, Any], field: str = "when") -> str:
    """A date as an atproto datetime: UTC, milliseconds (sub-milliseconds are truncated), `Z`.

    Only a date is a date: the app writes `new Date()`. A string or a number is reported, not
    guessed at (which time zone? seconds or milliseconds?): a wrong guess would publish a
    wrong time under the user's name.
    """
    if field not in doc:
        raise InvalidDocument(f"{field}: missing")
    return format_when(doc[field], field)


def format_when(value: Any, field: str = "when") -> str:
    if isinstance(value, DatetimeMS):  # a BSON date Python cannot represent
        years = 1970 + int(value) / _MS_PER_YEAR
        raise InvalidDocument(
            f"{field}: a date around the year {years:.0f}, outside the years 1 to 9999 that "
            "atproto datetimes allow"
        )
    if not isinstance(value, datetime):
        if value is None:
            raise InvalidDocument(f"{field}: missing (null)")
        hint = ""
        if isinstance(value, str):
            hint = "; the app stores dates, not strings"
        elif isinstance(value, int | float) and not isinstance(value, bool):
            hint = "; not guessed as epoch seconds or milliseconds"
        raise InvalidDocument(f"{field}: expected a date, got {got(value)}{hint}")
    try:
        dt: datetime = value.astimezone(UTC) if value.tzinfo is not None else value
    except OverflowError:
        raise InvalidDocument(f"{field}: out of range once converted to UTC") from None
    # Formatted by hand: strftime's %Y drops the leading zeros of years before 1000.
    return (
        f"{dt.year:04d}-{dt.month:02d}-{dt.day:02d}T{dt.hour:02d}:{dt.minute:02d}:"
        f"{dt.second:02d}.{dt.microsecond // 1000:03d}Z"
    )
