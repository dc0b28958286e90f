"""`news-posts` → `computer.aesthetic.news` (AC-RECORD-TYPES.md, "news").

A post marked `status: "dead"` loses its record and gets it back under the same rkey when it
is live again. Posts ingested from Bluesky (`external`) carry an `atproto` that points at
someone else's post: not ours to mirror, and their `atproto` is never written. A post with no
user belongs to no repo: not mirrored either.
"""

from __future__ import annotations

from bson import ObjectId

from .base import Document, Record, RecordType
from .fields import text, when

NSID = "computer.aesthetic.news"


def dead(doc: Document) -> str | None:
    return "dead (status: 'dead')" if doc.get("status") == "dead" else None


def external(doc: Document) -> str | None:
    if doc.get("external") is None:
        return None
    return "ingested from elsewhere (external): not ours to mirror"


def build(doc: Document, post_id: ObjectId) -> Record:
    """`headline` ← `title`; `body` ← `text` and `link` ← `url`, each left out when empty;
    the lexicon's limits (headline ≤300, body ≤10,000, link a URI) are checked by the core."""
    record: Record = {"$type": NSID, "headline": text(doc, "title")}
    if (body := text(doc, "text", required=False)) is not None:
        record["body"] = body
    if (link := text(doc, "url", required=False)) is not None:
        record["link"] = link
    record["when"] = when(doc)
    record["ref"] = str(post_id)
    return record


NEWS = RecordType(
    name="news",
    collection="news-posts",
    nsid=NSID,
    build=build,
    deleted=dead,
    foreign=external,
    ownerless="skip",
    sources={"headline": "title", "body": "text", "link": "url"},
    fingerprint=("title", "text", "url", "when", "status", "external"),
    suffix="_news",
)
