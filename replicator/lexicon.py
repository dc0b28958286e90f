"""Lexicon schemas for the records the replicator writes, and validation against them.

A record the PDS refuses stalls the change stream on that document, and one it accepts but
AppViews reject is silently invisible; checking every record against the same lexicon
before the write turns both into an immediate, explainable error.

The checking itself is done by `lexrpc` (snarfed/lexrpc), so the rules are the library's
reading of the atproto lexicon spec rather than a hand-kept copy of our schema. Where
lexrpc leaves something unchecked that we rely on, this module adds the missing piece and
says why next to it:

* lexrpc's record validation ignores `$type`; a record filed under the wrong collection is
  exactly the mistake a replicator can make, and the reference validator
  (`@atproto/lexicon`) rejects it, so `validate_record` checks it.
* lexrpc validates nothing for an NSID whose def is not a record (it finds no `record`
  schema and returns), so `validate_record` insists the def is a record.
* lexrpc only checks a lexicon document's `lexicon`, `id` and def types, and its intended
  check of record schemas never runs (it looks up the literal key "field"), so
  `validate_lexicon` also parses the document with the atproto SDK's lexicon models
  (`atproto_lexicon`, pydantic: every def, property and type as the spec has them, which
  rejects what the reference `parseLexiconDoc` rejects, `"type": "strng"` included) and adds
  the structural checks record validation later depends on.

Known leniency, deliberately left alone because none of our records can hit it (we format
`when` ourselves) and the fix would mean re-implementing the datetime grammar: lexrpc's
datetime check ends in Python's `datetime.fromisoformat`, which also accepts ISO 8601
forms the atproto spec forbids (no seconds, `-00:00`, basic and week-date formats, a comma
before fractional seconds). The lexicon tests pin this as expected failures.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from atproto_lexicon.parser import lexicon_parse
from lexrpc.base import NSID_RE, Base, ValidationError
from pydantic import ValidationError as PydanticError

__all__ = [
    "LEXICON_DIR",
    "MOOD_NSID",
    "SCHEMA_NSID",
    "LexiconError",
    "lexicon_files",
    "load_lexicon_file",
    "load_lexicons",
    "schema_record",
    "validate_lexicon",
    "validate_record",
]

MOOD_NSID = "computer.aesthetic.mood"
# How a lexicon is published: a record of this type in its authority's repo, rkey = its NSID.
SCHEMA_NSID = "com.atproto.lexicon.schema"

# Package data (the image carries them with the code that validates against them); the
# repository's top-level `lexicons/` is a link here: the protocol contract, reviewed on its own.
LEXICON_DIR = Path(__file__).resolve().parent / "lexicons"

_JSON_TYPE_NAMES = {
    "NoneType": "null",
    "bool": "boolean",
    "dict": "object",
    "float": "number",
    "int": "integer",
    "list": "array",
    "str": "string",
}


class LexiconError(ValueError):
    """A lexicon document or a record is invalid.

    A `ValueError` so callers that already treat bad input as `ValueError` keep working;
    the message names the field (or file) and the broken rule, because it ends up in logs
    and CLI output read by someone deciding whether to fix the data or the schema.
    """


def lexicon_files(directory: Path | None = None) -> list[Path]:
    """Every `*.json` under the lexicon directory, sorted so output and errors are stable."""
    root = LEXICON_DIR if directory is None else Path(directory)
    if not root.is_dir():
        raise FileNotFoundError(f"lexicon directory not found: {root}")
    return sorted(p for p in root.rglob("*.json") if p.is_file())


def load_lexicon_file(path: Path) -> dict[str, Any]:
    """Parse and check one lexicon file, naming the file in any error.

    An unreadable file raises `OSError` untouched: that is an environment problem, not a
    bad lexicon, and the CLI reports the two differently.
    """
    raw = Path(path).read_bytes()
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LexiconError(f"{path}: invalid JSON: {exc}") from exc
    try:
        validate_lexicon(doc)
    except LexiconError as exc:
        raise LexiconError(f"{path}: {exc}") from exc
    return dict(doc)


def load_lexicons(directory: Path | None = None) -> list[dict[str, Any]]:
    """All lexicon documents under `directory` (default: the repo's `lexicons/`).

    Fails on the first bad file rather than skipping it: a validator missing a schema
    would report every record of that type as unknown, which hides the real cause.
    """
    docs: list[dict[str, Any]] = []
    seen: dict[str, Path] = {}
    for path in lexicon_files(directory):
        doc = load_lexicon_file(path)
        nsid = doc["id"]
        if nsid in seen:
            raise LexiconError(f"{path}: duplicate lexicon id {nsid!r} (also in {seen[nsid]})")
        seen[nsid] = path
        docs.append(doc)
    return docs


def schema_record(doc: Mapping[str, Any]) -> dict[str, Any]:
    """The `com.atproto.lexicon.schema` record that publishes `doc`: what `lexicon publish`
    writes and what `check` expects to read back, so the two can never disagree."""
    return {"$type": SCHEMA_NSID, **doc}


def validate_lexicon(doc: Any) -> None:
    """Check a lexicon document well enough that record validation against it is meaningful.

    lexrpc's constructor does the checks it has (`lexicon` is 1, `id` present, each def has
    a known type); the rest covers what it skips, listed in the module docstring.
    """
    if not isinstance(doc, dict):
        raise LexiconError(f"lexicon document must be a JSON object, got {_json_type(doc)}")
    defs = doc.get("defs")
    if not isinstance(defs, dict) or not defs:
        raise LexiconError("defs: must be a non-empty object")
    for name, defn in defs.items():
        if not isinstance(defn, dict) or not isinstance(defn.get("type"), str):
            raise LexiconError(f"defs.{name}: must be an object with a string 'type'")
    try:
        Base([doc])
    except ValidationError as exc:
        raise LexiconError(str(exc)) from exc
    # lexrpc only requires a non-empty string id; an id that is not an NSID can never
    # match a collection or a `$type`.
    if not NSID_RE.fullmatch(doc["id"]):
        raise LexiconError(f"id: {doc['id']!r} is not a valid NSID")
    for name, defn in defs.items():
        if defn["type"] == "record":
            _check_record_def(f"defs.{name}", defn)
    try:
        lexicon_parse(dict(doc))
    except PydanticError as exc:
        raise LexiconError(_schema_reason(doc, exc)) from None
    # The SDK's models still know `number`, which the spec (and `parseLexiconDoc`) dropped.
    if where := _find_type(defs, "number", "defs"):
        raise LexiconError(f"{where}: type 'number' is not a lexicon type (integer is)")


def _check_record_def(where: str, defn: Mapping[str, Any]) -> None:
    """The shape lexrpc's record validation indexes without guarding (KeyError otherwise)."""
    schema = defn.get("record")
    if not isinstance(schema, dict) or schema.get("type") != "object":
        raise LexiconError(f"{where}.record: must be an object schema with type 'object'")
    props = schema.get("properties", {})
    if not isinstance(props, dict):
        raise LexiconError(f"{where}.record.properties: must be an object")
    for prop, prop_schema in props.items():
        if not isinstance(prop_schema, dict) or not isinstance(prop_schema.get("type"), str):
            raise LexiconError(
                f"{where}.record.properties.{prop}: must be an object with a string 'type'"
            )
    required = schema.get("required", [])
    if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
        raise LexiconError(f"{where}.record.required: must be an array of strings")
    if missing := [r for r in required if r not in props]:
        raise LexiconError(f"{where}.record.required: names undeclared properties {missing}")


@functools.cache
def _validator(directory: Path | None) -> Any:
    """One lexrpc `Base` per lexicon directory: building it re-reads and deep-copies every
    lexicon, too slow to repeat for each record of a backfill."""
    return Base(load_lexicons(directory), validate=True, truncate=False)


def validate_record(
    record: Mapping[str, Any],
    nsid: str = MOOD_NSID,
    *,
    lexicons: Path | None = None,
) -> None:
    """Raise `LexiconError` unless `record` is a valid `nsid` record, `$type` included.

    `lexicons` selects another lexicon directory (tests, the CLI's `--lexicons`); the
    validator for each directory is built once per process.
    """
    if not isinstance(record, Mapping):
        raise LexiconError(f"record must be a JSON object, got {_json_type(record)}")
    if "$type" not in record:
        raise LexiconError(f"$type: missing (must be {nsid!r})")
    if record["$type"] != nsid:
        raise LexiconError(f"$type: must be {nsid!r}, got {record['$type']!r}")

    directory = None if lexicons is None else Path(lexicons).resolve()
    validator = _validator(directory)
    defn = validator.defs.get(nsid)
    if defn is None:
        raise LexiconError(f"no lexicon for {nsid!r} in {directory or LEXICON_DIR}")
    if defn.get("type") != "record":
        raise LexiconError(f"{nsid} is a {defn.get('type')} lexicon, not a record")

    try:
        # lexrpc type-checks with `type(v) == dict`, so a Mapping that is not a dict (a
        # MappingProxy, a BSON document) would be rejected for its class, not its content.
        validator.validate(nsid, "record", dict(record))
    except ValidationError as exc:
        raise LexiconError(_reason(str(exc))) from exc


# lexrpc's message: "[in <lexicon>, ]<type> <name> with value `<repr, cut at 50>`: <reason>"
_LEXRPC_MESSAGE = re.compile(
    r"^(?:in \S+, )?(?P<type>\S+) (?P<name>\S+) with value `(?P<value>.*)`: (?P<msg>.*)$",
    re.DOTALL,
)


def _reason(message: str) -> str:
    """Reword a lexrpc message as "<field>: <what is wrong>".

    lexrpc leads with the schema type and the value's repr, which buries the field name
    and, for a 5000-byte mood, fills a log line with text; and its "longer than maxLength"
    does not say the unit, which is bytes, not characters.
    """
    m = _LEXRPC_MESSAGE.match(message)
    if m is None:
        return message
    field, value, msg = m["name"], m["value"], m["msg"]
    if found := re.fullmatch(r"missing required property (\S+)", msg):
        return f"{found[1]}: required property is missing"
    if found := re.fullmatch(r"property (\S+) is not nullable", msg):
        return f"{found[1]}: must not be null"
    if found := re.fullmatch(r"is longer \((\d+)\) than maxLength (\d+)", msg):
        unit = " UTF-8 bytes" if m["type"] == "string" else ""
        return f"{field}: longer than maxLength {found[2]}{unit} ({found[1]})"
    if found := re.fullmatch(r"is shorter \((\d+)\) than minLength (\d+)", msg):
        unit = " UTF-8 bytes" if m["type"] == "string" else ""
        return f"{field}: shorter than minLength {found[2]}{unit} ({found[1]})"
    if found := re.fullmatch(r".* is invalid for format (\S+)", msg, re.DOTALL):
        return f"{field}: {value} is not a valid {found[1]}"
    if found := re.fullmatch(r"has unexpected type (\S+)", msg):
        got = _JSON_TYPE_NAMES.get(found[1], found[1])
        expected = "object" if field == "record" else m["type"]
        return f"{field}: must be {_article(expected)} {expected}, got {got}"
    return f"{field}: {msg}"


def _find_type(node: Any, kind: str, where: str) -> str | None:
    """Where in `node` a schema of type `kind` is, if anywhere."""
    if isinstance(node, Mapping):
        if node.get("type") == kind:
            return where
        items: Any = node.items()
    elif isinstance(node, list):
        items = enumerate(node)
    else:
        return None
    for key, value in items:
        if found := _find_type(value, kind, f"{where}.{key}"):
            return found
    return None


def _schema_reason(doc: Mapping[str, Any], exc: PydanticError) -> str:
    """The first thing the lexicon models refuse, as "<where in the document>: <what>"."""
    first = exc.errors()[0]
    where: list[str] = []
    node: Any = doc
    for step in first["loc"]:  # union tags (a def's `type`) are in the path too: skipped
        inside = (isinstance(node, Mapping) and step in node) or (
            isinstance(node, list) and isinstance(step, int) and step < len(node)
        )
        if inside:
            node = node[step]
            where.append(str(step))
    message = str(first["msg"])
    if first["type"] == "missing":
        where.append(str(first["loc"][-1]))
        message = "required"
    elif first["type"] == "union_tag_invalid":
        message = f"type {node.get('type')!r} is not a lexicon type" if isinstance(
            node, Mapping) else message  # fmt: skip
    return f"{'.'.join(where) or 'lexicon'}: {message}"


def _json_type(value: Any) -> str:
    name = type(value).__name__
    return _JSON_TYPE_NAMES.get(name, name)


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"
