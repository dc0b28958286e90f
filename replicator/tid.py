"""Record keys: TIDs derived deterministically from ObjectIds.

Every process must derive the same rkey for the same mood, so a crash between the PDS write and
the ledger write cannot produce a second record: the retry lands on the same key. The TID's
timestamp is the ObjectId's creation second (so records sort as the moods were made); the
microseconds and clock id come from a hash of the whole ObjectId, which spreads moods created in
the same second over 2^10 * 10^6 slots. A `salt` re-derives on the rare collision.

The reference PDS refuses a record key that matches its list of slurs ("Unacceptable slur in
record key": @atproto/pds `repo/prepare.ts`, `handle/explicit-slurs.ts`). A derived TID does,
by chance, about once in a few hundred moods; such a mood would be refused forever. So the
derivation steps past those keys: `refused_by_pds` holds the PDS's patterns restricted to the
TID alphabet (exact for TIDs; tests/test_tid.py checks it against the PDS's own function).
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


# The one pattern of the PDS's list that can match inside a TID: the others are anchored by
# `\b` at both ends, which within a 13-character TID means matching all of it, and none of them
# is that long. (Its character classes, restricted to the TID alphabet.)
_REFUSED = re.compile(r"n[4ailo][gq]{2}(l[3e]t|[3e]r)s?")


def refused_by_pds(rkey: str) -> bool:
    """Whether the reference PDS refuses this TID as a record key (its slur filter)."""
    return _REFUSED.search(rkey) is not None


@functools.lru_cache(maxsize=65536)  # each insert is seen again as its write-back event
def from_object_id(oid: ObjectId, salt: int = 0) -> str:
    """The `salt`-th usable TID derived from the ObjectId (keys the PDS refuses skipped)."""
    found = -1
    attempt = 0
    while True:
        rkey = _derive(oid, attempt)
        attempt += 1
        if not refused_by_pds(rkey):
            found += 1
            if found == salt:
                return rkey


def _derive(oid: ObjectId, salt: int) -> str:
    seconds = int.from_bytes(oid.binary[:4], "big")
    digest = hashlib.sha256(oid.binary + salt.to_bytes(4, "big")).digest()
    micros = seconds * 1_000_000 + int.from_bytes(digest[:4], "big") % 1_000_000
    clock_id = int.from_bytes(digest[4:6], "big") & 0x3FF
    return encode((micros << 10) | clock_id)


def timestamp_seconds(tid: str) -> int:
    return (decode(tid) >> 10) // 1_000_000
