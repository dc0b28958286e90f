"""News posts as the second declared type: document → record, soft delete, what is not ours."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from bson import ObjectId

from replicator.desired import desired_state
from replicator.errors import ConfigError
from replicator.lexicon import validate_record
from replicator.model import State
from replicator.recordtypes import NEWS, TYPES, enabled

POST = ObjectId("65a1b2c3d4e5f60718293a4b")
RKEY = "3kabcdefghij2"
WHEN = datetime(2026, 2, 12, 9, 30, 1, 250000, tzinfo=UTC)


def post(**fields: Any) -> dict[str, Any]:
    doc = {"_id": POST, "user": "auth0|news", "title": "A headline", "text": "The body",
           "url": "https://aesthetic.computer/news", "when": WHEN, "status": "live"}  # fmt: skip
    doc.update(fields)
    return {k: v for k, v in doc.items() if v is not ...}


def test_a_live_post_maps_title_text_url_when_and_ref() -> None:
    d = desired_state(NEWS, POST, post(), has_account=True)
    assert d.state is State.PRESENT
    assert d.record == {
        "$type": "computer.aesthetic.news",
        "headline": "A headline",
        "body": "The body",
        "link": "https://aesthetic.computer/news",
        "when": "2026-02-12T09:30:01.250Z",
        "ref": str(POST),
    }
    assert d.record is not None
    validate_record(d.record, "computer.aesthetic.news")


@pytest.mark.parametrize("empty", [..., None, "", "  \n"])
def test_empty_body_and_link_are_left_out(empty: Any) -> None:
    d = desired_state(NEWS, POST, post(text=empty, url=empty), has_account=True)
    assert d.state is State.PRESENT and d.record is not None
    assert "body" not in d.record and "link" not in d.record


def test_dead_deletes_and_live_again_restores_under_the_same_rkey() -> None:
    dead = desired_state(NEWS, POST, post(status="dead", atproto={"rkey": RKEY}), has_account=True)
    assert dead.state is State.ABSENT and dead.doc_rkey == RKEY
    assert dead.reason is not None and "dead" in dead.reason
    live = desired_state(NEWS, POST, post(atproto={"rkey": RKEY}), has_account=True)
    assert live.state is State.PRESENT and live.doc_rkey == RKEY


def test_a_post_ingested_from_bluesky_is_not_ours_and_its_atproto_is_not_read() -> None:
    theirs = {"rkey": RKEY, "uri": f"at://did:plc:someone/app.bsky.feed.post/{RKEY}"}
    d = desired_state(NEWS, POST, post(external={"source": "bsky"}, atproto=theirs),
                      has_account=True)  # fmt: skip
    assert d.state is State.SKIPPED and d.doc_rkey is None and d.record is None
    assert d.reason is not None and "external" in d.reason


@pytest.mark.parametrize("user", [..., None, ""])
def test_a_post_without_a_user_is_not_mirrored(user: Any) -> None:
    d = desired_state(NEWS, POST, post(user=user), has_account=True)
    assert d.state is State.SKIPPED and d.user is None and d.record is None


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"title": ...}, "title: missing"),
        ({"title": None}, "title: missing (null)"),
        ({"title": "  "}, "title: empty (only whitespace)"),
        ({"title": 7}, "title: expected a string, got int 7"),
        ({"title": "x" * 301}, "title (headline): longer than maxLength 300 UTF-8 bytes (301)"),
        ({"text": "y" * 10_001}, "text (body): longer than maxLength 10000 UTF-8 bytes (10001)"),
        ({"url": "not a uri"}, "url (link): 'not a uri' is not a valid uri"),
        ({"when": ...}, "when: missing"),
        (
            {"when": "2026-02-12"},
            "when: expected a date, got str '2026-02-12'; the app stores dates, not strings",
        ),
    ],
)
def test_a_post_the_lexicon_refuses_is_invalid_with_its_reason(
    fields: dict[str, Any], reason: str
) -> None:
    d = desired_state(NEWS, POST, post(**fields), has_account=True)
    assert (d.state, d.reason) == (State.INVALID, reason)


def test_a_headline_of_exactly_300_bytes_is_valid() -> None:
    d = desired_state(NEWS, POST, post(title="é" * 150), has_account=True)
    assert d.state is State.PRESENT


def test_record_types_are_named_in_order_and_unknown_ones_refused() -> None:
    assert enabled(["news", "mood", "news"]) == (TYPES["news"], TYPES["mood"])
    with pytest.raises(ConfigError, match=r"unknown 'paintings' \(known: mood, news\)"):
        enabled(["mood", "paintings"])
