"""`replicator status [--json]`: where the replicator stands, read from Mongo alone.

Everything comes from the replicator's own collections, so it works from any machine that can
reach the database, whether or not a replicator runs: the checkpoint (position, time, events
applied), the live view the running process flushes every few seconds (lag, stream open,
ready), the ledger by state, dead letters, the last error, the lease, the accounts whose
writes are parked (deactivated, taken down, moved, erased but not cleanable:
`replicator_accounts`), the erasures done and under way, and the launch figures
(accounts, moods, records, sync success rate and latency, failures, repairs). Read-only: it
writes nothing and needs no PDS credentials.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import anyio
import click
import httpx
from pymongo import DESCENDING

from .. import metrics
from ..accounts import ParkedAccount
from ..logs import redact
from ..recordtypes import RecordType
from ..store import Names, Store, open_client
from .common import (
    empty_ok_option,
    mongo_from,
    mongo_options,
    pds_option,
    pds_url_from,
    rtypes_from,
)

__all__ = ["gather", "status"]


@click.command()
@mongo_options
@pds_option
@empty_ok_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object (scripts, launch reports).")
def status(as_json: bool, **kw: Any) -> None:
    """Checkpoint, lag, ledger, dead letters, last error, lease, parked accounts, launch.

    Read-only, from Mongo (PDS_URL, when set, is only probed for reachability).
    Exit: 0 shown, 1 MongoDB unreachable, 2 usage.
    """
    uri, names = mongo_from(kw)
    rtypes = rtypes_from(kw)
    report = anyio.run(_gather, uri, kw["db_name"], names, rtypes, pds_url_from(kw), kw["empty_ok"])
    click.echo(json.dumps(report, indent=2, default=str) if as_json else render(report))


async def _gather(
    uri: str,
    db: str,
    names: Names,
    rtypes: Sequence[RecordType],
    pds_url: str | None,
    empty_ok: bool,
) -> dict[str, Any]:
    async with open_client(uri) as client:
        store = Store(client, db, names, rtypes=rtypes)
        await store.require_collections(empty_ok=empty_ok)
        return await gather(store, pds_url)


async def gather(store: Store, pds_url: str | None = None) -> dict[str, Any]:
    now = time.time()
    state, moods = store.state, store.names.moods
    checkpoint = await store.load_checkpoint()
    shadow = await state.find_one({"_id": f"{store.checkpoint_name}:dry-run"})
    stats = await state.find_one({"_id": metrics.stats_id(moods)})
    lease = await state.find_one({"_id": f"lease:{moods}"})  # as runtime.Runtime names it
    types = {view.rtype.name: await _of_type(view) for view in store.views}
    ledger: Counter[str] = sum((Counter(t["ledger"]) for t in types.values()), Counter())
    dead_kinds: Counter[str] = Counter({"invalid": 0, "failed": 0})
    for t in types.values():
        dead_kinds.update({k: t["dead_letters"][k] for k in ("invalid", "failed")})
    dead_count = sum(t["dead_letters"]["count"] for t in types.values())
    records = sum(t["records"] for t in types.values())
    newest = [("last_at", DESCENDING)]
    latest = [d for v in store.views if (d := await v.dead_letters.find_one({}, sort=newest))]
    latest_dead = max(latest, key=lambda d: _epoch(d.get("last_at")) or 0.0, default=None)
    users_with_account = await store.users.count_documents({"atproto.did": {"$regex": "^did:"}})
    moods_total = sum(t["documents"] for t in types.values())
    parked = await store.parked_accounts()
    erasures = {"done": await store.erasure_count(),
                "under_way": len(await store.pending_erasures())}  # fmt: skip

    live = _live(stats, now)
    counters = _counters(stats, now)
    report: dict[str, Any] = {
        "at": _iso(now),
        "db": store.db.name,
        "collection": moods,
        "types": types,
        "checkpoint": _checkpoint(checkpoint, now),
        "shadow_checkpoint": _checkpoint(shadow, now) if shadow else None,
        "replicator": live,
        "lag_seconds": live["lag_seconds"] if live and live.get("fresh") else None,
        "lease": _lease(lease, now),
        "ledger": dict(sorted(ledger.items())),
        "dead_letters": {
            "count": dead_count,
            **dead_kinds,
            "latest": _dead_letter(latest_dead, now) if latest_dead else None,
        },
        "last_error": _last_error(stats, latest_dead),
        "parked_accounts": _parked_accounts(parked, now),
        "erasures": erasures,
        "pds": await _probe(pds_url) if pds_url else None,
        "counters": counters,
        "launch": {
            "users_with_account": users_with_account,
            "moods": moods_total,
            "records": records,  # per the ledger (every location it holds); `audit` lists repos
            "invalid": dead_kinds["invalid"],  # dead letters, every type
            "no_account": ledger.get("skipped", 0),
            **metrics.sync_figures(stats),
        },
    }
    return report


async def _of_type(view: Store) -> dict[str, Any]:
    """One record type's part of the report: its collection, documents, ledger, records."""
    kinds = await view.dead_letter_counts()
    return {
        "collection": view.collection,
        "nsid": view.rtype.nsid,
        "documents": await view.docs.count_documents({}),
        "ledger": dict(sorted((await view.ledger_counts()).items())),
        "records": await view.records_held(),
        "dead_letters": {"count": sum(kinds.values()), **kinds},
    }


def _iso(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _epoch(value: Any) -> float | None:
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()
    return None


def _checkpoint(doc: dict[str, Any] | None, now: float) -> dict[str, Any] | None:
    if doc is None:
        return None
    saved = _epoch(doc.get("saved_at"))
    last_event = _epoch(doc.get("last_event_at"))
    token = doc.get("token") or {}
    return {
        "position": token.get("_data", token) if isinstance(token, dict) else str(token),
        "saved_at": _iso(saved),
        "age_seconds": round(now - saved, 1) if saved else None,
        "events_applied": doc.get("events_applied"),
        "last_event_at": _iso(last_event),
        "generation": doc.get("generation"),
    }


def _live(stats: dict[str, Any] | None, now: float) -> dict[str, Any] | None:
    """The last view the running process flushed; `fresh` if it flushed recently enough to
    still be running (three missed flushes: it is gone or cannot reach Mongo)."""
    live = (stats or {}).get("live")
    if not live:
        return None
    flushed = _epoch(live.get("flushed_at")) or 0.0
    interval = float(live.get("interval") or 10.0)
    out = dict(live)
    out["flushed_at"] = _iso(flushed)
    out["started_at"] = _iso(_epoch(live.get("started_at")))
    out["fresh"] = bool(live.get("running", True)) and now - flushed <= 3 * interval + 5
    return out


def _counters(stats: dict[str, Any] | None, now: float) -> dict[str, Any]:
    """How old the figures flushed by the running process are (the live view, the sync and
    latency counters): it flushes every `interval` seconds, so they lag by up to that much;
    the ledger counts and the checkpoint are read live."""
    stats = stats or {}
    live = stats.get("live") or {}
    flushed = _epoch(stats.get("flushed_at")) or _epoch(live.get("flushed_at"))
    return {
        "flushed_at": _iso(flushed),
        "age_seconds": round(max(0.0, now - flushed), 1) if flushed is not None else None,
        "flush_interval_seconds": float(live.get("interval") or 10.0),
    }


def _lease(doc: dict[str, Any] | None, now: float) -> dict[str, Any] | None:
    if doc is None:
        return None
    expires = _epoch(doc.get("expires_at"))
    held = expires is not None and expires > now
    return {
        "held": held,
        "owner": doc.get("owner"),
        "generation": doc.get("generation"),
        "expires_in_seconds": round(expires - now, 1) if held and expires else None,
        "renewed_at": _iso(_epoch(doc.get("renewed_at"))),
    }


def _dead_letter(doc: dict[str, Any], now: float) -> dict[str, Any]:
    last = _epoch(doc.get("last_at"))
    return {
        "mood_id": str(doc.get("_id")),
        "user": doc.get("user"),
        "did": doc.get("did"),
        "reason": redact(str(doc.get("reason") or "")),
        "attempts": doc.get("attempts"),
        "last_at": _iso(last),
    }


def _parked_accounts(parked: list[ParkedAccount], now: float) -> dict[str, Any]:
    """Accounts whose writes wait until they can be written again, by reason (oldest first;
    at most 20 listed)."""
    by_reason: dict[str, int] = {}
    for p in parked:
        by_reason[p.reason] = by_reason.get(p.reason, 0) + 1
    listed = [
        {
            "did": p.did,
            "user": p.sub,
            "kind": p.kind,
            "reason": p.reason,
            "since": _iso(p.since),
            "checks": p.attempts,
            "next_check_in_seconds": round(max(0.0, p.next_check_at - now), 1),
        }
        for p in sorted(parked, key=lambda p: p.since)[:20]
    ]
    return {"count": len(parked), "by_reason": dict(sorted(by_reason.items())),
            "accounts": listed}  # fmt: skip


def _last_error(stats: dict[str, Any] | None, dead: dict[str, Any] | None) -> dict[str, Any] | None:
    """The newer of the process's last error and the latest dead letter's reason."""
    candidates: list[tuple[float, str, str]] = []
    error = (stats or {}).get("last_error")
    if error and _epoch(error.get("at")):
        candidates.append((_epoch(error["at"]) or 0.0, "replicator", str(error.get("message"))))
    if dead and _epoch(dead.get("last_at")):
        reason = f"mood {dead.get('_id')}: {dead.get('reason')}"
        candidates.append((_epoch(dead["last_at"]) or 0.0, "dead letter", reason))
    if not candidates:
        return None
    at, source, message = max(candidates)
    return {"at": _iso(at), "source": source, "message": redact(message)}


async def _probe(pds_url: str) -> dict[str, Any]:
    url = f"{pds_url.rstrip('/')}/xrpc/_health"
    try:
        async with httpx.AsyncClient(timeout=5) as http:
            resp = await http.get(url)
    except httpx.HTTPError as exc:
        return {"url": pds_url, "reachable": False, "error": type(exc).__name__}
    return {"url": pds_url, "reachable": resp.status_code == 200, "status": resp.status_code}


# -- text -------------------------------------------------------------------------------------


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"


def _pct(rate: float | None) -> str:
    return "n/a" if rate is None else f"{100 * rate:.2f}%"


def _secs(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}s"


def render(r: dict[str, Any]) -> str:
    lines = [f"replicator status: db {r['db']!r}, collection {r['collection']!r}, at {r['at']}"]
    cp = r["checkpoint"]
    if cp:
        lines.append(
            f"  checkpoint    saved {cp['saved_at']} ({_ago(cp['age_seconds'])}), "
            f"last event {cp['last_event_at'] or 'none yet'}, "
            f"{cp['events_applied'] or 0} events applied by the last process"
        )
    else:
        lines.append("  checkpoint    none: `replicator run` has not started here yet")
    live = r["replicator"]
    if live and live.get("fresh"):
        lines.append(
            f"  replicator    running ({live.get('mode')}) pid {live.get('pid')} on "
            f"{live.get('host')}; stream {'open' if live.get('stream_open') else 'CLOSED'}, "
            f"{'ready' if live.get('ready') else 'NOT READY'}, lag {_secs(r['lag_seconds'])} "
            f"(as of {_ago(r['counters']['age_seconds'])})"
        )
    elif live:
        lines.append(f"  replicator    not running (last seen {live.get('flushed_at')})")
    else:
        lines.append("  replicator    never reported (no stats yet)")
    lease = r["lease"]
    if lease is None:
        lines.append("  lease         none")
    elif lease["held"]:
        lines.append(
            f"  lease         held by {lease['owner']} (generation {lease['generation']}, "
            f"expires in {lease['expires_in_seconds']}s)"
        )
    else:
        lines.append(f"  lease         free (last holder {lease['owner']})")
    if r["shadow_checkpoint"]:
        sc = r["shadow_checkpoint"]
        lines.append(f"  dry run       shadow checkpoint saved {sc['saved_at']}")
    ledger = ", ".join(f"{k} {v}" for k, v in r["ledger"].items()) or "empty"
    lines.append(f"  ledger        {ledger}")
    if len(r.get("types") or {}) > 1:  # each type's part of the figures
        for name, t in r["types"].items():
            states = ", ".join(f"{k} {v}" for k, v in t["ledger"].items()) or "empty"
            lines.append(
                f"    {name:<11} {t['collection']}: {t['documents']} documents, "
                f"{t['records']} records, {t['dead_letters']['count']} dead letters; {states}"
            )
    dl = r["dead_letters"]
    latest = dl["latest"]
    kinds = (
        f" ({dl.get('invalid', 0)} invalid, {dl.get('failed', 0)} failed)" if dl["count"] else ""
    )
    tail = f"; latest: {latest['mood_id']} {latest['reason']}" if latest else ""
    lines.append(f"  dead letters  {dl['count']}{kinds}{tail}")
    pa = r.get("parked_accounts")
    if pa is not None:
        reasons = ", ".join(f"{reason} {n}" for reason, n in pa["by_reason"].items())
        plural = "" if pa["count"] == 1 else "s"
        lines.append(f"  parked        {pa['count']} account{plural} ({reasons})" if pa["count"]
                     else "  parked        none")  # fmt: skip
    er = r["erasures"]
    lines.append(
        f"  erasures      {er['done']} done (users forgotten), {er['under_way']} under way"
    )
    err = r["last_error"]
    lines.append(
        f"  last error    {err['at']} [{err['source']}] {err['message']}" if err else
        "  last error    none"
    )  # fmt: skip
    if r["pds"]:
        reachable = "reachable" if r["pds"]["reachable"] else "UNREACHABLE"
        lines.append(f"  pds           {r['pds']['url']} {reachable}")
    la, counters = r["launch"], r["counters"]
    age = (
        f"counters flushed {_ago(counters['age_seconds'])}, every "
        f"{counters['flush_interval_seconds']:.0f}s while a replicator runs"
        if counters["flushed_at"] else "no counters flushed yet"
    )  # fmt: skip
    lines += [
        f"  launch        ({age})",
        f"    users with an ATProto account  {la['users_with_account']}",
        f"    moods                          {la['moods']}",
        f"    records (per the ledger)       {la['records']}",
        f"    invalid                        {la['invalid']}",
        f"    no account                     {la['no_account']}",
        f"    sync success rate              {_pct(la['success_rate'])} "
        f"({la['synced']} synced, {la['failed']} failed)",
        f"    sync latency                   avg {_secs(la['latency_avg_seconds'])}, "
        f"p99 {_secs(la['latency_p99_seconds'])}",
        f"    repairs made                   {la['repairs']}",
    ]
    return "\n".join(lines)
