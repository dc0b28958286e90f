"""Desired state vs ledger / PDS listing → writes, ledger entries and findings."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from bson import ObjectId

from replicator import tid
from replicator.desired import desired_state, record_of
from replicator.model import Account, Desired, LedgerEntry, RemoteRecord, State, Write
from replicator.plan import MoodPlan, RemoteIndex, choose_rkey, plan_mood, plan_user
from replicator.recordtypes import MOOD

USER = "auth0|66db1c30aa0000000000beef"
ACCOUNT = Account(sub=USER, did="did:plc:moodsuser000000000000", handle="moods.test", password="pw")
OTHER_DID = "did:plc:previous0000000000000000"
WHEN = datetime(2024, 1, 2, 3, 4, 5, 678000)
derive = tid.from_object_id


def oid(n: int) -> ObjectId:
    return ObjectId((1_704_164_645 + n).to_bytes(4, "big") + n.to_bytes(8, "big"))


def pds_rkey(n: int) -> str:
    """A PDS-assigned TID (2020-ish), unlike any derived from the ObjectIds above."""
    return tid.encode(((1_600_000_000 + n) * 1_000_000 + 123_456) << 10 | 7)


def make_doc(mood_id: ObjectId, text: str = "feeling fine", **fields: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"_id": mood_id, "user": USER, "mood": text, "when": WHEN}
    doc.update(fields)
    return doc


def want(doc: dict[str, Any] | None, mood_id: ObjectId | None = None, *, account: bool = True):
    mid = mood_id if mood_id is not None else doc["_id"]  # type: ignore[index]
    return desired_state(MOOD, mid, doc, has_account=account)


def present(d: Desired, rkey: str, did: str = ACCOUNT.did) -> LedgerEntry:
    """The ledger entry for `d`'s record stored on the PDS at (did, rkey)."""
    return LedgerEntry(d.mood_id, USER, State.PRESENT, did, rkey, d.hash, "bafycid")


def remote(rkey: str, mood_id: ObjectId | None, text: str = "feeling fine", **kw: Any):
    """A listed record; `legacy` uses the old `mongoId` field instead of `ref`."""
    legacy = kw.pop("legacy", False)
    value = record_of(MOOD, make_doc(mood_id or oid(999)), mood_id or oid(999))[0]
    value["mood"] = text
    if mood_id is None:
        del value["ref"]
    elif legacy:
        value["mongoId"] = value.pop("ref")
    return RemoteRecord(rkey, f"bafy{rkey}", value)


def plan(d: Desired, entry: LedgerEntry | None = None, **kw: Any) -> MoodPlan:
    account = kw.pop("account", ACCOUNT)
    records = kw.pop("records", None)
    index = RemoteIndex(records) if records is not None else None
    return plan_mood(d, entry, account, index, derive, **kw)


def kinds(p: MoodPlan) -> list[str]:
    return [f.kind for f in p.findings]


# -- ledger mode (change events) ------------------------------------------------------------


def test_new_mood_is_one_create_at_the_derived_rkey() -> None:
    d = want(make_doc(oid(1)))
    p = plan(d)
    rkey = derive(oid(1))
    assert len(p.writes) == 1
    w = p.writes[0]
    assert (w.action, w.did, w.rkey, w.mood_id) == ("put", ACCOUNT.did, rkey, oid(1))
    assert w.record == d.record
    assert w.exists is not True  # create, or unknown; never claims an update
    assert p.entry.state is State.PRESENT
    assert (p.entry.did, p.entry.rkey, p.entry.hash) == (ACCOUNT.did, rkey, d.hash)
    assert p.entry.user == USER
    assert p.writeback == rkey


def test_plan_is_deterministic_across_calls() -> None:
    d = want(make_doc(oid(1)))
    assert plan(d).writes == plan(d).writes


def test_write_back_echo_costs_nothing() -> None:
    # Event 1: the insert. Apply, store the entry, `$set atproto.rkey`.
    first = plan(want(make_doc(oid(1))))
    assert first.writeback is not None
    entry = first.entry
    # Event 2: the update caused by our own write-back.
    echoed = make_doc(oid(1), atproto={"rkey": first.writeback})
    second = plan(want(echoed), entry)
    assert second.writes == []
    assert second.writeback is None
    assert second.entry == entry
    assert not second.changes_ledger
    assert second.findings == []


def test_same_desired_as_ledger_is_no_write() -> None:
    rkey = derive(oid(1))
    d = want(make_doc(oid(1), atproto={"rkey": rkey}))
    entry = present(d, rkey)
    p = plan(d, entry)
    assert p.writes == []
    assert p.entry.state is State.PRESENT
    assert (p.entry.did, p.entry.rkey, p.entry.hash, p.entry.cid) == (
        entry.did,
        entry.rkey,
        entry.hash,
        entry.cid,
    )


def test_replayed_event_before_write_back_is_no_write() -> None:
    d = want(make_doc(oid(1)))  # document not yet carrying atproto.rkey
    rkey = derive(oid(1))
    p = plan(d, present(d, rkey))
    assert p.writes == []
    assert p.entry.rkey == rkey


def test_text_change_is_one_update_at_the_same_rkey() -> None:
    rkey = derive(oid(1))
    old = want(make_doc(oid(1), atproto={"rkey": rkey}))
    new = want(make_doc(oid(1), "feeling better", atproto={"rkey": rkey}))
    p = plan(new, present(old, rkey))
    assert len(p.writes) == 1
    w = p.writes[0]
    assert (w.action, w.did, w.rkey, w.exists) == ("put", ACCOUNT.did, rkey, True)
    assert w.record is not None and w.record["mood"] == "feeling better"
    assert p.entry.hash == new.hash
    assert p.entry.rkey == rkey
    assert p.writeback is None


def test_nuke_deletes_at_the_ledger_rkey_and_keeps_it() -> None:
    rkey = derive(oid(1))
    live = want(make_doc(oid(1)))
    nuked = want(make_doc(oid(1), deleted=True))
    p = plan(nuked, present(live, rkey))
    assert p.writes == [
        Write("delete", ACCOUNT.did, rkey, oid(1), exists=True, why="not desired", cid="bafycid")
    ]
    assert p.entry.state is State.ABSENT
    assert p.entry.rkey == rkey
    assert p.entry.did == ACCOUNT.did
    assert p.entry.hash is None
    assert p.writeback is None


def test_record_in_another_dids_repo_is_reported_not_written() -> None:
    """The account's credentials cannot write another DID's repo: report, never misdirect."""
    live = want(make_doc(oid(1)))
    p = plan(want(make_doc(oid(1), deleted=True)), present(live, "3kabcdefghij2", OTHER_DID))
    assert p.writes == []
    assert [(f.kind, f.did, f.rkey) for f in p.findings] == [("stale", OTHER_DID, "3kabcdefghij2")]
    # Not confirmed gone: the ledger must not say `absent` while the record may be there.
    assert p.entry.state is State.STRANDED
    assert p.entry.held == ((OTHER_DID, "3kabcdefghij2"),)


def test_a_user_without_an_account_keeps_their_records_held_never_absent() -> None:
    """Mongo no longer naming an account is no confirmation: the record is still held."""
    live = want(make_doc(oid(1)))
    p = plan(want(None, oid(1)), present(live, "3kabcdefghij2"), account=None)
    assert p.writes == []
    assert p.entry.state is State.STRANDED
    assert p.entry.held == ((ACCOUNT.did, "3kabcdefghij2"),)


def test_deleted_mood_known_only_from_a_pre_image_is_recorded_under_its_owner() -> None:
    p = plan_user(USER, ACCOUNT, [want(None, oid(1))], {}, derive)
    assert p.moods[0].entry.user == USER


def test_nuke_twice_is_no_write() -> None:
    rkey = derive(oid(1))
    nuked = want(make_doc(oid(1), deleted=True))
    first = plan(nuked, present(want(make_doc(oid(1))), rkey))
    second = plan(nuked, first.entry)
    assert second.writes == []
    assert second.entry.state is State.ABSENT
    assert second.entry.rkey == rkey


def test_un_nuke_restores_the_same_rkey() -> None:
    rkey = pds_rkey(1)  # whatever it was, e.g. assigned by the old inline writer
    entry = LedgerEntry(oid(1), USER, State.ABSENT, ACCOUNT.did, rkey)
    d = want(make_doc(oid(1)))  # the document carries no atproto
    p = plan(d, entry)
    assert len(p.writes) == 1
    w = p.writes[0]
    assert (w.action, w.rkey) == ("put", rkey)
    assert w.exists is not True
    assert p.entry.state is State.PRESENT
    assert p.entry.rkey == rkey
    assert p.writeback == rkey


def test_nuke_then_un_nuke_round_trip() -> None:
    created = plan(want(make_doc(oid(1))))
    rkey = created.entry.rkey
    nuked = plan(want(make_doc(oid(1), deleted=True, atproto={"rkey": rkey})), created.entry)
    restored = plan(want(make_doc(oid(1), deleted=False, atproto={"rkey": rkey})), nuked.entry)
    assert [(w.action, w.rkey) for w in restored.writes] == [("put", rkey)]
    assert restored.entry.hash == created.entry.hash


def test_doc_rkey_wins_over_derivation() -> None:
    doc_rkey = pds_rkey(5)
    d = want(make_doc(oid(1), atproto={"rkey": doc_rkey}))
    assert choose_rkey(d, None, None, derive) == doc_rkey
    p = plan(d)
    assert [(w.action, w.rkey) for w in p.writes] == [("put", doc_rkey)]
    assert p.entry.rkey == doc_rkey
    assert p.writeback is None  # already on the document


def test_doc_rkey_wins_over_ledger_rkey_moves_the_record() -> None:
    old_rkey = derive(oid(1))
    new_rkey = pds_rkey(5)
    entry = present(want(make_doc(oid(1))), old_rkey)
    d = want(make_doc(oid(1), atproto={"rkey": new_rkey}))
    p = plan(d, entry)
    actions = [(w.action, w.did, w.rkey) for w in p.writes]
    assert ("put", ACCOUNT.did, new_rkey) in actions
    assert ("delete", ACCOUNT.did, old_rkey) in actions
    assert len(actions) == 2
    put = next(w for w in p.writes if w.action == "put")
    assert put.exists is not True  # nothing is at the new rkey yet
    assert p.entry.rkey == new_rkey
    assert p.entry.state is State.PRESENT


def test_choose_rkey_order() -> None:
    d = want(make_doc(oid(1)))
    entry = LedgerEntry(oid(1), USER, State.ABSENT, ACCOUNT.did, pds_rkey(2))
    index = RemoteIndex([remote(pds_rkey(3), oid(1))])
    assert choose_rkey(d, None, None, derive) == derive(oid(1))
    assert choose_rkey(d, None, index, derive) == pds_rkey(3)
    assert choose_rkey(d, entry, index, derive) == pds_rkey(2)
    with_doc = want(make_doc(oid(1), atproto={"rkey": pds_rkey(4)}))
    assert choose_rkey(with_doc, entry, index, derive) == pds_rkey(4)


def test_no_account_is_skipped_without_writes() -> None:
    d = want(make_doc(oid(1)), account=False)
    assert d.state is State.SKIPPED
    p = plan(d, account=None)
    assert p.writes == []
    assert p.entry.state is State.SKIPPED
    assert kinds(p) == ["skipped"]


def test_invalid_keeps_what_the_pds_has() -> None:
    rkey = derive(oid(1))
    good = want(make_doc(oid(1)))
    entry = present(good, rkey)
    bad = want(make_doc(oid(1), ""))
    assert bad.state is State.INVALID
    p = plan(bad, entry)
    assert p.writes == []
    assert p.entry.state is State.INVALID
    assert (p.entry.did, p.entry.rkey, p.entry.hash) == (ACCOUNT.did, rkey, good.hash)
    assert p.entry.on_pds
    assert p.entry.reason == bad.reason
    assert kinds(p) == ["invalid"]
    # Fixing the text back is free; nuking it still removes the record the PDS holds.
    assert plan(good, p.entry).writes == []
    nuked = plan(want(make_doc(oid(1), "", deleted=True)), p.entry)
    assert [(w.action, w.rkey) for w in nuked.writes] == [("delete", rkey)]


def test_invalid_new_mood_is_no_write() -> None:
    p = plan(want(make_doc(oid(1), "x" * 5001)))
    assert p.writes == []
    assert p.entry.state is State.INVALID
    assert not p.entry.on_pds


def test_hard_delete_removes_the_record() -> None:
    rkey = derive(oid(1))
    p = plan(want(None, oid(1)), present(want(make_doc(oid(1))), rkey))
    assert [(w.action, w.did, w.rkey) for w in p.writes] == [("delete", ACCOUNT.did, rkey)]
    assert p.entry.state is State.ABSENT
    assert p.entry.user == USER  # the ledger remembers whose it was


def test_hard_delete_of_unknown_mood_is_no_write() -> None:
    p = plan(want(None, oid(1)))
    assert p.writes == []
    assert p.entry.state is State.ABSENT


# -- remote mode (backfill, audit, recovery) ------------------------------------------------


def test_adopts_record_found_by_ref_when_equal() -> None:
    rkey = pds_rkey(1)
    d = want(make_doc(oid(1)))
    p = plan(d, records=[remote(rkey, oid(1))])
    assert p.writes == []
    assert p.entry.state is State.PRESENT
    assert p.entry.rkey == rkey
    assert p.entry.hash == d.hash
    assert p.entry.cid == f"bafy{rkey}"
    assert p.writeback == rkey
    assert p.findings == []


def test_adopts_record_found_by_ref_and_rewrites_when_different() -> None:
    rkey = pds_rkey(1)
    d = want(make_doc(oid(1), "feeling better"))
    p = plan(d, records=[remote(rkey, oid(1), "feeling fine")])
    assert len(p.writes) == 1
    w = p.writes[0]
    assert (w.action, w.rkey, w.exists, w.record) == ("put", rkey, True, d.record)
    assert kinds(p) == ["mismatch"]
    assert p.entry.rkey == rkey
    assert p.writeback == rkey


def test_adopts_legacy_mongo_id_record_and_rewrites_it() -> None:
    rkey = pds_rkey(1)
    d = want(make_doc(oid(1)))
    p = plan(d, records=[remote(rkey, oid(1), legacy=True)])
    assert [(w.action, w.rkey, w.exists) for w in p.writes] == [("put", rkey, True)]
    assert p.writes[0].record == d.record  # now with `ref`
    assert kinds(p) == ["mismatch"]
    assert p.writeback == rkey


def test_remote_index_by_ref_sorts_oldest_first() -> None:
    index = RemoteIndex(
        [remote(pds_rkey(9), oid(1)), remote(pds_rkey(2), oid(1), legacy=True), remote("x", None)]
    )
    assert index.by_ref[str(oid(1))] == [pds_rkey(2), pds_rkey(9)]
    assert set(index.by_rkey) == {pds_rkey(9), pds_rkey(2), "x"}


def test_duplicates_keep_the_oldest_and_delete_the_rest_with_fix() -> None:
    old, new = pds_rkey(1), pds_rkey(2)
    assert old < new
    d = want(make_doc(oid(1)))
    records = [remote(new, oid(1)), remote(old, oid(1))]
    p = plan(d, records=records, fix=True)
    assert [(w.action, w.rkey) for w in p.writes] == [("delete", new)]
    assert [(f.kind, f.rkey) for f in p.findings] == [("duplicate", new)]
    assert p.entry.rkey == old
    assert p.writeback == old


def test_duplicates_are_reported_but_kept_without_fix() -> None:
    old, new = pds_rkey(1), pds_rkey(2)
    d = want(make_doc(oid(1)))
    p = plan(d, records=[remote(old, oid(1)), remote(new, oid(1))], fix=False)
    assert p.writes == []
    assert [(f.kind, f.rkey) for f in p.findings] == [("duplicate", new)]


def test_duplicates_keep_the_doc_rkey_one() -> None:
    old, new = pds_rkey(1), pds_rkey(2)
    d = want(make_doc(oid(1), atproto={"rkey": new}))
    p = plan(d, records=[remote(old, oid(1)), remote(new, oid(1))], fix=True)
    assert [(w.action, w.rkey) for w in p.writes] == [("delete", old)]
    assert [(f.kind, f.rkey) for f in p.findings] == [("duplicate", old)]
    assert p.entry.rkey == new
    assert p.writeback is None


def test_missing_on_pds_while_ledger_says_present_is_put_again() -> None:
    rkey = derive(oid(1))
    d = want(make_doc(oid(1), atproto={"rkey": rkey}))
    p = plan(d, present(d, rkey), records=[])
    assert len(p.writes) == 1
    w = p.writes[0]
    assert (w.action, w.rkey, w.record) == ("put", rkey, d.record)
    assert w.exists is False
    assert [(f.kind, f.rkey) for f in p.findings] == [("missing", rkey)]
    assert p.entry.state is State.PRESENT


def test_in_sync_with_listing_is_no_write() -> None:
    rkey = derive(oid(1))
    d = want(make_doc(oid(1), atproto={"rkey": rkey}))
    p = plan(d, present(d, rkey), records=[remote(rkey, oid(1))])
    assert p.writes == []
    assert p.findings == []


def test_stale_record_of_deleted_mood_is_deleted() -> None:
    rkey = pds_rkey(1)
    d = want(make_doc(oid(1), deleted=True))
    p = plan(d, records=[remote(rkey, oid(1))])
    assert [(w.action, w.did, w.rkey) for w in p.writes] == [("delete", ACCOUNT.did, rkey)]
    assert [(f.kind, f.rkey) for f in p.findings] == [("stale", rkey)]
    assert p.entry.state is State.ABSENT
    assert p.entry.rkey == rkey  # kept for an un-nuke


def test_stale_records_of_hard_deleted_mood_are_all_deleted() -> None:
    d = want(None, oid(1))
    p = plan(d, records=[remote(pds_rkey(1), oid(1)), remote(pds_rkey(2), oid(1), legacy=True)])
    assert sorted(w.rkey for w in p.writes if w.action == "delete") == [pds_rkey(1), pds_rkey(2)]
    assert kinds(p) == ["stale", "stale"]


# -- plan_user ------------------------------------------------------------------------------


def user_plan(desired: list[Desired], records: list[RemoteRecord] | None, **kw: Any):
    ledger = kw.pop("ledger", {})
    return plan_user(USER, ACCOUNT, desired, ledger, derive, remote=records, **kw)


def test_orphan_is_reported_and_swept_only_for_whole_user_with_fix() -> None:
    d = want(make_doc(oid(1)))
    records = [remote(derive(oid(1)), oid(1)), remote(pds_rkey(7), oid(77))]

    partial = user_plan([d], records, whole_user=False, fix=True)
    assert partial.sweep == [] and partial.findings == []
    assert partial.writes == []

    audit = user_plan([d], records, whole_user=True, fix=False)
    assert [(f.kind, f.rkey, f.detail) for f in audit.findings] == [
        ("orphan", pds_rkey(7), str(oid(77)))
    ]
    assert audit.sweep == []
    assert audit.writes == []

    fixed = user_plan([d], records, whole_user=True, fix=True)
    assert [(f.kind, f.rkey) for f in fixed.findings] == [("orphan", pds_rkey(7))]
    assert fixed.sweep == [Write("delete", ACCOUNT.did, pds_rkey(7), exists=True, why="orphan")]
    assert fixed.writes == fixed.sweep


def test_record_without_ref_is_an_orphan() -> None:
    p = user_plan([], [remote("3kabcdefghij2", None)], whole_user=True, fix=True)
    assert [w.rkey for w in p.sweep] == ["3kabcdefghij2"]
    assert [f.kind for f in p.findings] == ["orphan"]


def test_purged_user_ends_with_an_empty_collection() -> None:
    records = [remote(pds_rkey(i), oid(i)) for i in range(5)] + [remote(pds_rkey(9), None)]
    gone = [want(None, oid(i)) for i in range(3)]  # documents deleted, ledger knew them
    p = user_plan(gone, records, whole_user=True, fix=True)
    deleted = {w.rkey for w in p.writes if w.action == "delete"}
    assert deleted == {r.rkey for r in records}
    assert not [w for w in p.writes if w.action == "put"]
    assert len(p.writes) == len(deleted)  # each record deleted once


def test_records_of_planned_moods_are_not_orphans() -> None:
    live = want(make_doc(oid(1)))
    nuked = want(make_doc(oid(2), deleted=True))
    records = [
        remote(pds_rkey(1), oid(1)),
        remote(pds_rkey(2), oid(1)),  # duplicate of mood 1
        remote(pds_rkey(3), oid(2)),  # stale
    ]
    p = user_plan([live, nuked], records, whole_user=True, fix=False)
    assert p.findings == []
    assert p.sweep == []
    assert sorted(f.kind for m in p.moods for f in m.findings) == ["duplicate", "stale"]
    # Stale deletes are not gated by `fix`; duplicate deletes are.
    assert [(w.action, w.rkey) for w in p.writes] == [("delete", pds_rkey(3))]


def test_backfill_of_consistent_user_is_no_write() -> None:
    desired = [want(make_doc(oid(i), f"mood {i}")) for i in range(20)]
    records = [remote(derive(oid(i)), oid(i), f"mood {i}") for i in range(20)]
    p = user_plan(desired, records, whole_user=True, fix=True)
    assert p.writes == []
    assert p.findings == []
    assert all(m.findings == [] for m in p.moods)
    assert [m.entry.rkey for m in p.moods] == [derive(oid(i)) for i in range(20)]


def test_plan_user_ledger_mode_uses_the_ledger() -> None:
    a = want(make_doc(oid(1)))
    b = want(make_doc(oid(2)))
    ledger = {oid(1): present(a, derive(oid(1)))}
    p = plan_user(USER, ACCOUNT, [a, b], ledger, derive)
    assert [(w.action, w.rkey) for w in p.writes] == [("put", derive(oid(2)))]
    assert p.sweep == []


# -- found bugs -----------------------------------------------------------------------------


def test_invalid_mood_seen_on_pds_is_still_deleted_after_a_nuke() -> None:
    rkey = pds_rkey(1)
    # Backfill: the old inline writer made the record; the document is now invalid.
    invalid = want(make_doc(oid(1), ""))
    backfill = plan(invalid, None, records=[remote(rkey, oid(1))])
    assert backfill.writes == []  # keep what the PDS has
    # Change event: the user nukes their moods.
    nuke = plan(want(make_doc(oid(1), "", deleted=True)), backfill.entry)
    assert [(w.action, w.rkey) for w in nuke.writes] == [("delete", rkey)]
