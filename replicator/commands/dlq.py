"""`replicator dlq list|retry|drop`: the dead letters, for the people who deal with them.

A dead letter is a mood that could not be mirrored for a lasting reason: a document that cannot
become a valid record (`mood` empty, `when` not a date, ...), work the PDS refused, an `_id`
that is not an ObjectId. They live in `replicator_dead_letters`, one per mood, keyed by the
mood id in hex (or the repr of an `_id` that is not an ObjectId), with the user, DID, reason,
attempts and first/last time (epoch seconds). See docs/bad-input.md.

`retry` goes through the one apply path (`Applier.apply_ids`), exactly as the sidecar would;
`drop` only forgets entries and never touches a mood. Nothing printed carries a password or a
token: reasons pass through the same redaction as the logs.
"""

from __future__ import annotations

import ast
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Any

import anyio
import click
import orjson
from bson import ObjectId
from pymongo import DESCENDING

from ..config import Settings
from ..desired import bad_id_reason
from ..logs import redact
from ..model import LedgerEntry, State
from ..runtime import open_runtime
from ..store import Doc, LetterKind, Names, Store, letter_kind, open_client
from .backfill import CLI_RETRY_TIMEOUT
from .common import (
    connection_options,
    empty_ok_option,
    index_option,
    mongo_from,
    mongo_options,
    rtypes_from,
    settings_from,
)

__all__ = ["dlq"]

EXIT_REMAIN = 1
RETRY_CHUNK = 500
STILL_FAILING = (State.INVALID, State.PARKED)


@click.group()
def dlq() -> None:
    """Dead letters: moods that could not be mirrored for a lasting reason.

    Each entry names the mood (its id), the user, the DID, the reason, how many times it
    was attempted and since when. Fix the cause (usually the mood document), then `retry`;
    `drop` forgets entries you have dealt with otherwise. `audit` and `status` count them.
    """


# -- list ---------------------------------------------------------------------------------------


@dlq.command(name="list")
@mongo_options
@empty_ok_option
@click.option("--user", "who", metavar="SUB|@HANDLE", help="Only this user's dead letters.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (epoch-second times).")
@click.option(
    "--limit", type=click.IntRange(1), default=50, show_default=True, help="Show at most N."
)
def list_command(who: str | None, as_json: bool, limit: int, **kw: Any) -> None:
    """Show dead letters, most recently failed first: id, user, DID, attempts, age, reason.

    AGE is the time since the first failure. Reads MongoDB only (no PDS needed).
    Exit: 0 shown, 2 error.
    """
    uri, names = mongo_from(kw)
    report = _run(_list, uri, kw["db_name"], names, kw, who, limit)
    if as_json:
        click.echo(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
        return
    click.echo(render(report, width=_width()))


async def _list(store: Store, who: str | None, limit: int) -> dict[str, Any]:
    query: dict[str, Any] = {}
    if who is not None:
        sub = await store.resolve_user(who)
        if sub is None:
            raise click.UsageError(f"unknown user {who!r} (no such handle)")
        query["user"] = sub
    kinds = {"invalid": 0, "failed": 0}
    docs: list[tuple[str, Doc]] = []
    for view in store.views:
        async for d in view.dead_letters.find(query, {"kind": 1, "reason": 1}):
            kinds[letter_kind(d)] += 1
        cursor = view.dead_letters.find(query).sort([("last_at", DESCENDING), ("_id", 1)])
        docs += [(view.rtype.name, d) async for d in cursor.limit(limit)]
    docs.sort(key=lambda td: (-(_seconds(td[1].get("last_at")) or 0.0), str(td[1]["_id"])))
    docs = docs[:limit]
    subs = sorted({d["user"] for _, d in docs if isinstance(d.get("user"), str)})
    handles = {}
    if subs:
        async for h in store.handles.find({"_id": {"$in": subs}}):
            if isinstance(h.get("handle"), str):
                handles[str(h["_id"])] = f"@{h['handle']}"
    now = time.time()
    entries = []
    for rtype, d in docs:
        first = _seconds(d.get("first_at"))
        entries.append(
            {
                "id": str(d["_id"]),
                **({"type": rtype} if len(store.rtypes) > 1 else {}),
                "kind": letter_kind(d),
                "user": d.get("user"),
                "handle": handles.get(d.get("user") or ""),
                "did": d.get("did"),
                "attempts": int(d.get("attempts") or 0),
                "first_at": first,
                "last_at": _seconds(d.get("last_at")),
                "age_seconds": round(now - first, 1) if first is not None else None,
                "reason": redact(str(d.get("reason") or "")),
            }
        )
    total = sum(kinds.values())  # every letter has a kind
    return {"total": total, **kinds, "shown": len(entries), "dead_letters": entries}


def render(report: dict[str, Any], *, width: int | None = None) -> str:
    """A plain table; the reason is cut to the terminal width only on a terminal."""
    entries = report["dead_letters"]
    if not entries:
        return "no dead letters"
    header = ("ID", "USER", "DID", "ATTEMPTS", "AGE", "REASON")
    rows = [
        (
            e["id"],
            e["handle"] or e["user"] or "-",
            e["did"] or "-",
            str(e["attempts"]),
            human_age(e["age_seconds"]),
            e["reason"],
        )
        for e in entries
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(5)]
    lines = []
    for row in [header, *rows]:
        head = "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row[:5]))
        reason = row[5]
        if width is not None:
            room = max(20, width - len(head) - 2)
            if len(reason) > room:
                reason = reason[: room - 1] + "…"
        lines.append(f"{head}  {reason}".rstrip())
    total, shown = report["total"], report["shown"]
    lines.append("")
    lines.append(
        f"{total} dead letter{'s' if total != 1 else ''} ({report.get('invalid', 0)} invalid, "
        f"{report.get('failed', 0)} failed)"
        + (f"; showing {shown}, raise --limit for more" if shown < total else "")
    )
    return "\n".join(lines)


def human_age(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = max(0, int(seconds))
    if s < 90:
        return f"{s}s"
    if s < 90 * 60:
        return f"{s // 60}m"
    if s < 36 * 3600:
        return f"{s // 3600}h"
    return f"{s // 86400}d"


# -- retry --------------------------------------------------------------------------------------


@dataclass
class RetryResult:
    key: str
    cleared: bool
    detail: str
    attempts: int | None = None


@dlq.command()
@connection_options
@empty_ok_option
@click.argument("ids", nargs=-1, metavar="[ID]...")
@click.option("--all", "all_", is_flag=True, help="Retry every dead letter.")
@index_option
def retry(ids: tuple[str, ...], all_: bool, **kw: Any) -> None:
    """Apply these moods again (IDs as `dlq list` shows them, or --all).

    Each mood goes through the same apply path as the sidecar: one that is now fine (fixed
    document, deleted, nuked, account restored) leaves the queue; one still failing stays,
    with its attempts counted up and the current reason. Needs MONGODB_CONNECTION_STRING and
    PDS_URL. Exit: 0 all cleared, 1 some remain (or an ID is not in the queue), 2 error.
    """
    if bool(ids) == all_:
        raise click.UsageError("give the IDs to retry, or --all (not both)")
    settings = settings_from(kw)
    results, missing = anyio.run(_retry, settings, list(ids), all_, kw["empty_ok"])
    for r in results:
        if r.cleared:
            click.echo(f"{r.key}: cleared ({r.detail})")
        else:
            click.echo(f"{r.key}: still failing (attempt {r.attempts}): {redact(r.detail)}")
    for key in missing:
        click.echo(f"{key}: not in the dead-letter queue", err=True)
    cleared = sum(r.cleared for r in results)
    remain = len(results) - cleared
    click.echo(
        f"retried {len(results)}: {cleared} cleared, {remain} still failing"
        + (f", {len(missing)} not found" if missing else "")
    )
    sys.exit(EXIT_REMAIN if remain or missing else 0)


async def _retry(
    settings: Settings, keys: list[str], all_: bool, empty_ok: bool
) -> tuple[list[RetryResult], list[str]]:
    async with open_runtime(
        settings, retry_timeout=CLI_RETRY_TIMEOUT, require_pds=True, require_moods=not empty_ok
    ) as rt:
        if all_:
            letters = [(view, d) for view in rt.store.views
                       async for d in view.dead_letters.find({}).sort("first_at", 1)]  # fmt: skip
            missing: list[str] = []
        else:
            letters, missing = await _letters(rt.store, keys)
        results: list[RetryResult] = []
        for view in rt.store.views:
            mine = [d for v, d in letters if v is view]
            by_oid = {ObjectId(str(d["_id"])): d for d in mine if _is_oid(d["_id"])}
            oids = list(by_oid)
            for i in range(0, len(oids), RETRY_CHUNK):
                chunk = oids[i : i + RETRY_CHUNK]
                await rt.applier.apply_ids(chunk, rtype=view.rtype)
                ledger = await view.ledger_by_id(chunk)
                docs = await view.moods_by_id(chunk)
                for oid in chunk:
                    results.append(await _settle(view, by_oid[oid], ledger.get(oid), oid in docs))
            for letter in mine:
                if not _is_oid(letter["_id"]):
                    results.append(await _retry_not_oid(view, letter))
        return results, missing


async def _settle(
    store: Store, letter: Doc, entry: LedgerEntry | None, doc_exists: bool
) -> RetryResult:
    """After the apply: clear the entry if the mood is fine now, else count the attempt."""
    key = str(letter["_id"])
    if entry is not None and entry.state not in STILL_FAILING:
        await store.dead_letters.delete_one({"_id": key})
        detail = entry.state.value + (f": {entry.reason}" if entry.reason else "")
        return RetryResult(key, True, detail)
    if entry is None and not doc_exists:
        await store.dead_letters.delete_one({"_id": key})
        return RetryResult(key, True, "document gone")
    reason = (entry.reason if entry else None) or str(letter.get("reason") or "not applied")
    # A parked write, or an invalid mood whose reason changed, was counted by the apply
    # itself; an invalid mood that failed the same way again is counted here.
    current = await store.dead_letters.find_one({"_id": key})
    counted = current is not None and int(current.get("attempts") or 0) > int(
        letter.get("attempts") or 0
    )
    if not counted:
        did = entry.did if entry is not None else None
        kind: LetterKind = letter_kind(letter)
        if entry is not None and entry.state in STILL_FAILING:
            kind = "failed" if entry.state is State.PARKED else "invalid"
        await store.dead_letter(
            ObjectId(key), letter.get("user"), did or letter.get("did"), reason, kind
        )
    current = await store.dead_letters.find_one({"_id": key}) or letter
    return RetryResult(key, False, reason, int(current.get("attempts") or 0))


async def _retry_not_oid(store: Store, letter: Doc) -> RetryResult:
    """An `_id` that is not an ObjectId can never be mirrored; gone, it leaves the queue."""
    key = str(letter["_id"])
    try:
        original = ast.literal_eval(key)
    except (ValueError, SyntaxError):
        original = None
    else:
        if await store.docs.find_one({"_id": original}, {"_id": 1}) is None:
            await store.dead_letters.delete_one({"_id": key})
            return RetryResult(key, True, "document gone")
    reason = bad_id_reason(original, store.rtype) if original is not None else str(letter["reason"])
    await store.dead_letters.update_one(
        {"_id": key}, {"$set": {"reason": reason, "last_at": time.time()}, "$inc": {"attempts": 1}}
    )
    return RetryResult(key, False, reason, int(letter.get("attempts") or 0) + 1)


# -- drop ---------------------------------------------------------------------------------------


@dlq.command()
@mongo_options
@empty_ok_option
@click.argument("ids", nargs=-1, metavar="[ID]...")
@click.option("--all", "all_", is_flag=True, help="Drop every dead letter (needs --yes).")
@click.option("--yes", is_flag=True, help="Confirm --all.")
def drop(ids: tuple[str, ...], all_: bool, yes: bool, **kw: Any) -> None:
    """Forget dead letters (IDs as `dlq list` shows them, or --all --yes).

    Only the entries go: the moods, the ledger and the PDS are untouched. A mood that is
    still invalid is not reported again until its document changes; parked work is still
    retried by the sidecar. Exit: 0 dropped, 1 an ID was not in the queue, 2 error.
    """
    if bool(ids) == all_:
        raise click.UsageError("give the IDs to drop, or --all --yes (not both)")
    if all_ and not yes:
        raise click.UsageError("--all drops every dead letter: add --yes to confirm")
    uri, names = mongo_from(kw)
    dropped, missing = _run(_drop, uri, kw["db_name"], names, kw, list(ids), all_)
    for key in missing:
        click.echo(f"{key}: not in the dead-letter queue", err=True)
    click.echo(f"dropped {dropped} dead letter{'s' if dropped != 1 else ''}")
    sys.exit(EXIT_REMAIN if missing else 0)


async def _drop(store: Store, keys: list[str], all_: bool) -> tuple[int, list[str]]:
    dropped = 0
    letters, missing = ([], []) if all_ else await _letters(store, keys)
    for view in store.views:
        query = {} if all_ else {"_id": {"$in": [d["_id"] for v, d in letters if v is view]}}
        dropped += (await view.dead_letters.delete_many(query)).deleted_count
    return dropped, missing


# -- helpers ------------------------------------------------------------------------------------


def _run(fn: Any, uri: str, db: str, names: Names, kw: dict[str, Any], *args: Any) -> Any:
    async def go() -> Any:
        async with open_client(uri) as client:
            store = Store(client, db, names, rtypes=rtypes_from(kw))
            await store.require_collections(empty_ok=kw["empty_ok"])
            return await fn(store, *args)

    return anyio.run(go)


async def _letters(store: Store, keys: list[str]) -> tuple[list[tuple[Store, Doc]], list[str]]:
    """The dead letters these IDs name (of any type mirrored, with its store), and the IDs
    that name none. A document whose `_id` is not an ObjectId is filed under its repr
    (`'mood-1'`); typed bare (`mood-1`) it is found too."""
    keys = list(dict.fromkeys(keys))
    either = {key: (key, repr(key)) for key in keys}
    wanted = [k for pair in either.values() for k in pair]
    letters: list[tuple[Store, Doc]] = []
    missing = set(keys)
    for view in store.views:
        found = {str(d["_id"]): d async for d in view.dead_letters.find({"_id": {"$in": wanted}})}
        for key, pair in either.items():
            hit = next((found[k] for k in pair if k in found), None)
            if hit is not None and all(hit is not d for _, d in letters):
                letters.append((view, hit))
                missing.discard(key)
    return letters, [k for k in keys if k in missing]


def _is_oid(key: Any) -> bool:
    return isinstance(key, str) and len(key) == 24 and ObjectId.is_valid(key)


def _seconds(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) else None


def _width() -> int | None:
    return shutil.get_terminal_size((120, 24)).columns if sys.stdout.isatty() else None
