"""The preflight's verdicts (`replicator.preflight`), without servers."""

from __future__ import annotations

import json

from pymongo.errors import OperationFailure, ServerSelectionTimeoutError

from replicator.errors import AuthFailed, Transient
from replicator.preflight import (
    Result,
    exit_code,
    fail,
    judge_accounts,
    judge_clock,
    judge_index,
    judge_lexicons,
    judge_oplog,
    judge_pds,
    judge_preimages,
    judge_replica_set,
    ok,
    render,
    render_json,
    token_time,
    warn,
)
from replicator.probes import mongo_error, pds_error

HOUR = 3600.0
NOW = 1_800_000_000.0


def test_exit_code_fails_only_on_a_failure() -> None:
    assert exit_code([ok("a", "x"), warn("b", "y")]) == 0
    assert exit_code([ok("a", "x"), fail("b", "y")]) == 1
    assert exit_code([]) == 0


def test_replica_set_or_not() -> None:
    assert judge_replica_set({"setName": "rs0", "isWritablePrimary": True}).status == "ok"
    assert judge_replica_set({"msg": "isdbgrid"}).status == "ok"
    standalone = judge_replica_set({"isWritablePrimary": True})
    assert standalone.status == "fail" and "--replSet" in (standalone.fix or "")


def test_token_time_reads_mongods_keystring_timestamp() -> None:
    # A mongod 6 resume token: 0x82, then seconds 0x63515EAC and increment 2.
    token = {"_data": "8263515EAC000000022B022C0100296E5A1004A5F3D1B2C3"}
    assert token_time(token) == float(0x63515EAC)
    assert token_time({"_data": "30000000107300010000"}) is None  # another format
    assert token_time({"_data": "82zz"}) is None
    assert token_time(None) is None
    assert token_time({}) is None


def test_oplog_hours_left_is_checkpoint_minus_first_entry() -> None:
    result = judge_oplog(NOW - 48 * HOUR, NOW, NOW - 2 * HOUR, "its resume token's time", 24)
    assert result.status == "ok"
    assert "reaches back 48.0 h" in result.detail
    assert "2.0 h old: 46.0 h left" in result.detail


def test_oplog_short_window_warns_and_lost_checkpoint_fails() -> None:
    short = judge_oplog(NOW - 5 * HOUR, NOW, NOW - 1 * HOUR, "x", 24)
    assert short.status == "warn" and "4.0 h left" in short.detail
    assert "oplogMinRetentionHours" in (short.fix or "")
    lost = judge_oplog(NOW - 5 * HOUR, NOW, NOW - 6 * HOUR, "x", 24)
    assert lost.status == "fail" and "already out of history" in lost.detail
    assert judge_oplog(NOW - 5 * HOUR, NOW, None, "", 1).status == "ok"
    fresh = judge_oplog(NOW - 0.25 * HOUR, NOW, NOW - 60, "x", 0)
    assert fresh.status == "ok" and "reaches back 15 min" in fresh.detail
    assert "1 min old: 14 min left" in fresh.detail
    assert judge_oplog(NOW - 5 * HOUR, NOW, None, "", 24).status == "warn"
    refused = judge_oplog(None, NOW, None, "", 24, error="Unauthorized: not authorized")
    assert refused.status == "warn" and "local.oplog.rs" in (refused.fix or "")


def test_clock_skew_warns_above_a_few_seconds() -> None:
    assert judge_clock(NOW + 1.0, NOW, NOW + 0.1).status == "ok"
    ahead = judge_clock(NOW + 30.0, NOW, NOW + 0.1)
    assert ahead.status == "warn" and "ahead" in ahead.detail
    behind = judge_clock(NOW - 30.0, NOW, NOW + 0.1)
    assert behind.status == "warn" and "behind" in behind.detail


def test_preimages_are_advised_not_required() -> None:
    assert judge_preimages({"changeStreamPreAndPostImages": {"enabled": True}}, "moods").status == (
        "ok"
    )
    off = judge_preimages({}, "moods")
    assert off.status == "warn"
    assert (
        off.fix
        == 'db.runCommand({collMod: "moods", changeStreamPreAndPostImages: {enabled: true}})'
    )
    assert judge_preimages(None, "moods").status == "fail"


def test_index_present_created_or_refused() -> None:
    assert judge_index(True, False, None, "moods").status == "ok"
    assert "created" in judge_index(False, True, None, "moods").detail
    refused = judge_index(False, False, "Unauthorized: no", "moods")
    assert refused.status == "fail"
    assert 'db.getCollection("moods").createIndex({user: 1})' in (refused.fix or "")
    not_tried = judge_index(False, False, None, "moods")  # --no-create-indexes
    assert not_tried.status == "warn" and "--no-create-indexes" in not_tried.detail
    assert 'db.getCollection("moods").createIndex({user: 1})' in (not_tried.fix or "")


def test_pds_accounts_and_lexicons() -> None:
    assert "version 0.4.1" in judge_pds({"version": "0.4.1"}, None, "http://p").detail
    assert judge_pds(None, "no answer", "http://p").status == "fail"
    assert judge_accounts([("a.test", None), ("b.test", None)], 3).status == "ok"
    bad = judge_accounts([("a.test", None), ("b.test", "refused")], 3)
    assert bad.status == "fail" and "b.test: refused" in bad.detail and "a.test" not in bad.detail
    assert judge_accounts([], 3).status == "warn"
    assert judge_accounts([], 0).status == "ok"
    assert judge_lexicons({"a.b.c": "same"}, "lex.test").status == "ok"
    assert judge_lexicons({}, None).status == "warn"
    mixed = judge_lexicons({"a.b.c": "missing", "a.b.d": "differs"}, "lex.test")
    assert mixed.status == "fail"
    assert (
        "not published: a.b.c" in mixed.detail and "differs from lexicons/: a.b.d" in mixed.detail
    )
    assert "replicator lexicon publish" in (mixed.fix or "")


def test_render_gives_the_fix_under_what_is_not_ok_and_masks_secrets() -> None:
    results = [
        ok("mongodb", "reachable"),
        fail("pds", "refused password=hunter2", "check PDS_URL"),
        Result("clock", "warn", "off by 9 s", "sync the clock"),
    ]
    text = render(results)
    lines = text.splitlines()
    assert lines[0].startswith("ok    mongodb")
    assert lines[1].startswith("fail  pds") and "hunter2" not in text
    assert lines[2].strip() == "fix: check PDS_URL"
    assert lines[-1] == "some checks failed (1 warning(s))"
    payload = json.loads(render_json(results, NOW))
    assert payload["ok"] is False
    assert [c["status"] for c in payload["checks"]] == ["ok", "fail", "warn"]
    assert "hunter2" not in json.dumps(payload)


def test_errors_are_one_short_line_without_secrets() -> None:
    refused = OperationFailure("x", 13, {"codeName": "Unauthorized", "errmsg": "not authorized"})
    assert mongo_error(refused) == "Unauthorized: not authorized"
    timeout = ServerSelectionTimeoutError("db:27017: [Errno 111] refused, Timeout: 10s, ...")
    assert mongo_error(timeout) == "no server reachable (db:27017: [Errno 111] refused)"
    dumped = ServerSelectionTimeoutError(
        "db:27017: [Errno 111] refused (configured timeouts: socketTimeoutMS: 20000.0ms)"
    )
    assert mongo_error(dumped) == "no server reachable (db:27017: [Errno 111] refused)"
    login = AuthFailed("com.atproto.server.createSession", 401, "AuthenticationRequired",
                       'Invalid identifier or password "hunter2"')  # fmt: skip
    assert pds_error(login) == "the PDS refused its credentials (AuthenticationRequired)"
    down = Transient("_health", 0, "ConnectError", "All connection attempts failed")
    assert pds_error(down) == "ConnectError: All connection attempts failed"
