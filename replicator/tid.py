"""Record keys: TIDs derived deterministically from ObjectIds.

Every process must derive the same rkey for the same mood, so a crash between the PDS write and
the ledger write cannot produce a second record: the retry lands on the same key. The TID's
timestamp is the ObjectId's creation second (so records sort as the moods were made); the
microseconds and clock id come from a hash of the whole ObjectId, which spreads moods created in
the same second over 2^10 * 10^6 slots. A `salt` re-derives on the rare collision.
"""

from __future__ import annotations

import functools
import hashlib
import re

from bson import ObjectId

_ALPHABET = "234567abcdefghijklmnopqrstuvwxyz"
_TID_RE = re.compile(r"^[234567abcdefghij][234567abcdefghijklmnopqrstuvwxyz]{12}$")
# Record key syntax (atproto spec): 1-512 chars of [A-Za-z0-9._:~-], not "." or "..".
_RKEY_RE = re.compile(r"^[A-Za-z0-9._:~-]{1,512}$")


def encode(value: int) -> str:
    out = []
    for _ in range(13):
        out.append(_ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(out))


def decode(tid: str) -> int:
    value = 0
    for char in tid:
        value = (value << 5) | _ALPHABET.index(char)
    return value


def is_tid(value: object) -> bool:
    return isinstance(value, str) and _TID_RE.fullmatch(value) is not None


def is_record_key(value: object) -> bool:
    return isinstance(value, str) and value not in {".", ".."} and bool(_RKEY_RE.fullmatch(value))


@functools.lru_cache(maxsize=65536)  # each insert is seen again as its write-back event
def from_object_id(oid: ObjectId, salt: int = 0) -> str:
    seconds = int.from_bytes(oid.binary[:4], "big")
    digest = hashlib.sha256(oid.binary + salt.to_bytes(4, "big")).digest()
    micros = seconds * 1_000_000 + int.from_bytes(digest[:4], "big") % 1_000_000
    clock_id = int.from_bytes(digest[4:6], "big") & 0x3FF
    return encode((micros << 10) | clock_id)


def timestamp_seconds(tid: str) -> int:
    return (decode(tid) >> 10) // 1_000_000
