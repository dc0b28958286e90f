"""A document's desired record, for any declared record type: pure, deterministic,
byte-identical for the same document.

The PDS skips a `putRecord` whose CID is unchanged, and the ledger compares content hashes, so
the same document must always map to the same bytes: fixed key order, milliseconds, `Z`.

Bad input (what each malformed field leads to, and why) is decided here and in each type's
`build` (`recordtypes/`), and documented in `docs/bad-input.md`. A document that cannot become
a valid record is `INVALID` with a reason that names the field and what is wrong with it.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import libipld
import orjson
from bson import ObjectId

from . import tid
from .lexicon import LexiconError, validate_record
from .model import Desired, Record, State
from .recordtypes.base import RecordType
from .recordtypes.fields import JS_WHITESPACE, InvalidDocument, got, preview, unicode_problem

DOCUMENT_DELETED = "document deleted"


def user_problem(value: Any, present: bool = True, field: str = "user") -> str | None:
    """Why `value` cannot identify the document's owner, or None when it can."""
    if not present:
        return f"{field}: missing"
    if value is None:
        return f"{field}: missing (null)"
    if not isinstance(value, str):
        return f"{field}: expected a string (an Auth0 sub), got {got(value)}"
    if not value.strip(JS_WHITESPACE):
        return f"{field}: empty"
    if (at := unicode_problem(value)) is not None:
        return f"{field}: not valid Unicode (lone surrogate or invalid UTF-8 at character {at})"
    return None


def valid_user(value: Any) -> str | None:
    """The owner's sub, or None when the value cannot be one (see `user_problem`)."""
    return value if isinstance(value, str) and user_problem(value) is None else None


def bad_id_reason(value: Any, rtype: RecordType) -> str:
    """Reason for a document whose `_id` is not an ObjectId: it has no `ref`, no derived rkey."""
    return f"_id is not an ObjectId ({got(value)}): a {rtype.name} needs one to be mirrored"


def record_of(rtype: RecordType, doc: Mapping[str, Any], doc_id: ObjectId) -> tuple[Record, str]:
    """The validated record and its content hash (computed once: it keys the validation
    cache and is what the ledger compares)."""
    record = rtype.build(doc, doc_id)
    key = content_hash(record)
    try:
        _validate(record, key, rtype.nsid)
    except InvalidDocument as exc:
        field, _, rest = str(exc).partition(":")
        if field in rtype.sources:
            raise InvalidDocument(f"{rtype.sources[field]} ({field}):{rest}") from None
        raise
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


def _validate(record: Record, key: str, nsid: str) -> None:
    if key in _VALID:
        _VALID.move_to_end(key)
        return
    try:
        validate_record(record, nsid)
    except LexiconError as exc:
        raise InvalidDocument(str(exc)) from None
    _VALID[key] = None
    if len(_VALID) > _VALID_MAX:
        _VALID.popitem(last=False)


def doc_rkey(rtype: RecordType, doc: Mapping[str, Any]) -> str | None:
    """The document's own rkey (a public permalink) when it is a usable TID.

    Anything else (the write-back location not an object, no `rkey`, an rkey that is not a
    TID) is ignored: the document gets the TID derived from its ObjectId, which is then
    written back.
    """
    where = doc.get(rtype.write_back)
    if isinstance(where, Mapping):
        rkey = where.get("rkey")
        if tid.is_tid(rkey):
            return str(rkey)
    return None


def desired_state(
    rtype: RecordType, doc_id: ObjectId, doc: Mapping[str, Any] | None, *, has_account: bool
) -> Desired:
    """The record a document should have: present iff the document exists, is ours, is not
    soft-deleted, its owner has an account and it makes a valid record."""
    if doc is None:
        return Desired(doc_id, None, State.ABSENT, reason=DOCUMENT_DELETED)
    user = valid_user(doc.get(rtype.owner))
    if (foreign := rtype.foreign(doc)) is not None:
        # Not ours: its write-back location is someone else's (never read as our permalink).
        return Desired(doc_id, user, State.SKIPPED, reason=foreign)
    rkey = doc_rkey(rtype, doc)
    if (deleted := rtype.deleted(doc)) is not None:
        return Desired(doc_id, user, State.ABSENT, doc_rkey=rkey, reason=deleted)
    if user is None:
        problem = user_problem(doc.get(rtype.owner), rtype.owner in doc, rtype.owner)
        if rtype.ownerless == "skip":
            return Desired(doc_id, None, State.SKIPPED, doc_rkey=rkey,
                           reason=f"no owner ({problem}): not mirrored")  # fmt: skip
        return Desired(doc_id, None, State.INVALID, doc_rkey=rkey, reason=problem)
    if not has_account:
        return Desired(doc_id, user, State.SKIPPED, doc_rkey=rkey, reason="no ATProto account")
    try:
        record, key = record_of(rtype, doc, doc_id)
    except InvalidDocument as exc:
        return Desired(doc_id, user, State.INVALID, doc_rkey=rkey, reason=str(exc))
    return Desired(doc_id, user, State.PRESENT, record, key, rkey)


__all__ = [
    "DOCUMENT_DELETED",
    "InvalidDocument",
    "bad_id_reason",
    "content_hash",
    "desired_state",
    "doc_rkey",
    "preview",
    "record_cid",
    "record_of",
    "user_problem",
    "valid_user",
]
