"""Record keys: TID encoding, deterministic derivation from ObjectIds, record-key syntax."""

from __future__ import annotations

import random
from datetime import UTC, datetime

import pytest
from bson import ObjectId

from replicator import tid

SECOND = 1_700_000_000  # 2023-11-14T22:13:20Z


def oid_at(seconds: int, tail: int) -> ObjectId:
    """An ObjectId with the given 4-byte creation second and 8 bytes of anything else."""
    return ObjectId(seconds.to_bytes(4, "big") + tail.to_bytes(8, "big"))


# -- encode / decode ------------------------------------------------------------------------


@pytest.mark.parametrize("value", [0, 1, 31, 32, 1023, 2**53 - 1, 2**63 - 1])
def test_encode_decode_round_trip(value: int) -> None:
    encoded = tid.encode(value)
    assert len(encoded) == 13
    assert tid.decode(encoded) == value


def test_encode_decode_round_trip_random_values() -> None:
    rng = random.Random(1234)
    for _ in range(2_000):
        value = rng.getrandbits(63)
        encoded = tid.encode(value)
        assert tid.is_tid(encoded)
        assert tid.decode(encoded) == value


def test_encode_known_values() -> None:
    assert tid.encode(0) == "2222222222222"
    assert tid.encode(1) == "2222222222223"
    assert tid.encode(31) == "222222222222z"


def test_encoding_preserves_numeric_order() -> None:
    rng = random.Random(99)
    values = sorted(rng.getrandbits(63) for _ in range(500))
    encoded = [tid.encode(v) for v in values]
    assert encoded == sorted(encoded)


# -- is_tid ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value", ["3jzfcijpj2z2a", "2222222222222", "jzzzzzzzzzzzz", "7777777777777"]
)
def test_is_tid_accepts(value: str) -> None:
    assert tid.is_tid(value)


@pytest.mark.parametrize(
    "value",
    [
        "",
        "3jzfcijpj2z2",  # 12 chars
        "3jzfcijpj2z2aa",  # 14 chars
        "3JZFCIJPJ2Z2A",  # upper case
        "kjzfcijpj2z2a",  # first char outside [2-7a-j]: more than 64 bits
        "3jzfcijpj2z21",  # '1' is not in the alphabet
        "3jzfcijpj2z28",  # '8' is not in the alphabet
        "3jzfcijpj2z2-",
        None,
        12345,
        b"3jzfcijpj2z2a",
    ],
)
def test_is_tid_rejects(value: object) -> None:
    assert not tid.is_tid(value)


def test_is_tid_rejects_trailing_newline() -> None:
    assert not tid.is_tid("3jzfcijpj2z2a\n")


# -- from_object_id -------------------------------------------------------------------------


def test_from_object_id_is_deterministic() -> None:
    oid = ObjectId("65a1b2c3d4e5f60718293a4b")
    first = tid.from_object_id(oid)
    assert tid.from_object_id(oid) == first
    assert tid.from_object_id(ObjectId(str(oid))) == first  # a fresh, equal ObjectId
    assert tid.from_object_id(oid, 0) == first  # salt 0 is the default


def test_from_object_id_is_a_valid_tid() -> None:
    rng = random.Random(7)
    for _ in range(1_000):
        oid = ObjectId(rng.randbytes(12))
        assert tid.is_tid(tid.from_object_id(oid))
        assert tid.is_record_key(tid.from_object_id(oid))
    assert tid.is_tid(tid.from_object_id(ObjectId(b"\xff" * 12)))  # the last possible second
    assert tid.is_tid(tid.from_object_id(ObjectId(b"\x00" * 12)))


def test_from_object_id_differs_per_object_id() -> None:
    a = oid_at(SECOND, 1)
    b = oid_at(SECOND, 2)
    assert tid.from_object_id(a) != tid.from_object_id(b)


def test_from_object_id_differs_per_salt() -> None:
    oid = oid_at(SECOND, 42)
    salted = [tid.from_object_id(oid, salt) for salt in range(50)]
    assert len(set(salted)) == len(salted)
    for value in salted:
        assert tid.is_tid(value)
        assert tid.timestamp_seconds(value) == SECOND  # a salt never moves the time


def test_from_object_id_timestamp_is_the_object_id_second() -> None:
    rng = random.Random(3)
    for _ in range(500):
        oid = ObjectId(rng.randbytes(12))
        expected = int(oid.generation_time.timestamp())
        assert tid.timestamp_seconds(tid.from_object_id(oid)) == expected


def test_from_object_id_timestamp_for_a_real_object_id() -> None:
    created = datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)
    oid = ObjectId.from_datetime(created)
    assert tid.timestamp_seconds(tid.from_object_id(oid)) == int(created.timestamp())
    assert oid.generation_time == created


def test_same_second_object_ids_do_not_collide() -> None:
    # 10,000 moods in one second (one nuke/un-nuke burst): counter bytes vary, time fixed.
    oids = [oid_at(SECOND, 0x0123456789 * 256 + i) for i in range(10_000)]
    assert len(set(oids)) == 10_000
    tids = [tid.from_object_id(oid) for oid in oids]
    assert len(set(tids)) == len(tids)
    assert {tid.timestamp_seconds(t) for t in tids} == {SECOND}


def test_tid_order_follows_object_id_time_across_seconds() -> None:
    rng = random.Random(11)
    oids = [oid_at(SECOND + s, rng.getrandbits(64)) for s in rng.sample(range(100_000), 2_000)]
    by_time = sorted(oids, key=lambda o: o.generation_time)
    tids = [tid.from_object_id(o) for o in by_time]
    assert tids == sorted(tids)  # string order is time order
    assert [tid.decode(t) for t in tids] == sorted(tid.decode(t) for t in tids)


def test_tid_order_for_adjacent_seconds_regardless_of_hash() -> None:
    # The last possible hash slot of second N still sorts before any slot of second N+1.
    for tail in range(200):
        earlier = tid.from_object_id(oid_at(SECOND, tail))
        later = tid.from_object_id(oid_at(SECOND + 1, 10_000 + tail))
        assert earlier < later


# -- is_record_key --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        "3jui7kd54zh2y",
        "self",
        "example.com",
        "~1.2-3_",
        "dHJ1ZQ",
        "pre:fix",
        "_",
        "a:b~c",
        "...",
        "a" * 512,
    ],
)
def test_is_record_key_accepts(value: str) -> None:
    assert tid.is_record_key(value)


@pytest.mark.parametrize(
    "value",
    [
        ".",
        "..",
        "",
        "a" * 513,
        "with space",
        "alpha/beta",
        "#extra",
        "@handle",
        "any+space",
        "number[3]",
        "number(3)",
        '"quote"',
        "dHJ1ZQ==",
        "caf\u00e9",
        None,
        42,
    ],
)
def test_is_record_key_rejects(value: object) -> None:
    assert not tid.is_record_key(value)


@pytest.mark.parametrize("value", ["abc\n", "a" * 512 + "\n"])
def test_is_record_key_rejects_trailing_newline(value: str) -> None:
    assert not tid.is_record_key(value)


# -- record keys the PDS refuses ----------------------------------------------------------------


def _planted(rng: random.Random) -> str:
    """A random TID with one of the refused shapes written into it somewhere."""
    word = rng.choice(["n", "m"]) + rng.choice("4ailoe") + rng.choice(["gg", "gq", "qq", "ga"])
    word += rng.choice(["l3t", "let", "3r", "er", "ar", "lt"]) + rng.choice(["", "s"])
    body = [rng.choice(tid._ALPHABET) for _ in range(13)]
    start = rng.randrange(1, 13 - len(word) + 1)
    body[start : start + len(word)] = word
    return "".join(body[:13])


def test_refused_keys_agree_with_the_reference_pds() -> None:
    import json
    import subprocess
    from pathlib import Path

    from replicator_dev.devstack import node

    if not node.pds_installed():
        node.ensure_pds_installed()
    rng = random.Random(11)
    keys = [_planted(rng) for _ in range(3000)]
    keys += [tid.encode(rng.getrandbits(64) >> 1) for _ in range(3000)]
    keys += ["3n3nenigg3ro2", "3n3nenillq62v"]  # seen: a derived key the PDS refused
    script = Path(__file__).parent / "js" / "record_keys.mjs"
    out = subprocess.run(
        [str(node.node_binary()), str(script), str(node.NODE_MODULES)],
        input=json.dumps(keys), capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    theirs = json.loads(out.stdout)
    ours = [tid.refused_by_pds(k) for k in keys]
    assert ours == theirs, [k for k, a, b in zip(keys, ours, theirs, strict=True) if a != b][:10]
    assert sum(theirs) > 500  # the planted shapes do hit the filter


def test_derived_keys_step_past_keys_the_pds_refuses() -> None:
    mood = ObjectId("6b0f54399a785f2822353744")  # its first derivation is refused
    assert tid.refused_by_pds(tid._derive(mood, 0))
    first, second = tid.from_object_id(mood), tid.from_object_id(mood, 1)
    assert first == tid._derive(mood, 1) and second == tid._derive(mood, 2)
    assert not tid.refused_by_pds(first) and not tid.refused_by_pds(second)
    assert tid.timestamp_seconds(first) == int.from_bytes(mood.binary[:4], "big")
