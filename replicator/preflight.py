"""`replicator check`'s verdicts: plain values in, one `Result` out, no I/O.

A preflight is only worth running if its verdict can be trusted before the first production
start, so the judging is kept apart from the probing (`replicator.probes` gathers the facts
from MongoDB and the PDS): every threshold and every "how to fix it" line is decided here and
unit-tested without servers. A `Result` never carries a secret: the probes pass only names,
times and error names in, and `render` redacts once more on the way out.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from .identity import host_of, same_host
from .logs import redact

Status = Literal["ok", "warn", "fail"]

# Above this, lease expiry (judged on MongoDB's clock) and the local deadline that fences a
# paused writer (lease.py) drift apart by more than the lease's safety margin.
CLOCK_SKEW_WARN_SECONDS = 5.0
# The outage the oplog should outlast by default: a weekend is 48 h, a night 12 h; one day is
# the floor Atlas's own guidance starts from. `--outage-hours` sets the operator's own.
DEFAULT_OUTAGE_HOURS = 24.0
# Mongod's KeyString type byte for a Timestamp, the first byte of a resume token's `_data`.
_KEYSTRING_TIMESTAMP = 0x82

PREIMAGES_FIX = (
    'db.runCommand({{collMod: "{moods}", changeStreamPreAndPostImages: {{enabled: true}}}})'
)


@dataclass(frozen=True)
class Result:
    """One line of the preflight: what was checked, the verdict, what was seen, how to fix it."""

    name: str
    status: Status
    detail: str
    fix: str | None = None


def ok(name: str, detail: str) -> Result:
    return Result(name, "ok", detail)


def warn(name: str, detail: str, fix: str | None = None) -> Result:
    return Result(name, "warn", detail, fix)


def fail(name: str, detail: str, fix: str | None = None) -> Result:
    return Result(name, "fail", detail, fix)


def exit_code(results: Sequence[Result]) -> int:
    """0 when nothing failed (warnings are advice), 1 otherwise."""
    return 1 if any(r.status == "fail" for r in results) else 0


# -- MongoDB ------------------------------------------------------------------------------------


def judge_replica_set(hello: Mapping[str, Any]) -> Result:
    """Change streams exist only on a replica set (or a sharded cluster, through mongos)."""
    name = "mongodb"
    if hello.get("msg") == "isdbgrid":
        return ok(name, "reachable, a sharded cluster (mongos)")
    set_name = hello.get("setName")
    if not set_name:
        return fail(
            name,
            "reachable, but not a replica set (hello has no setName): change streams need one",
            "run mongod with --replSet and rs.initiate() it, or use an Atlas cluster",
        )
    primary = "writable primary" if hello.get("isWritablePrimary") else "NOT the primary"
    return ok(name, f"reachable, replica set {set_name!r} ({primary})")


def judge_privilege(name: str, error: str | None, fix: str, done: str = "granted") -> Result:
    """`error` None: the operation was tried and went through."""
    if error is None:
        return ok(name, done)
    return fail(name, error, fix)


def judge_index(present: bool, created: bool, error: str | None, moods: str) -> Result:
    """`moods.user`: the backfill, the audit and the purge sweep read a user's moods by it."""
    name = f"index {moods}.user"
    command = f'db.getCollection("{moods}").createIndex({{user: 1}})'
    if present:
        return ok(name, "present")
    if created:
        return ok(name, "created (as `replicator run` does at start)")
    if error is None:  # not tried: --no-create-indexes
        return warn(name, "missing (not created: --no-create-indexes)",
                    f"create it yourself: {command}")  # fmt: skip
    return fail(
        name,
        f"missing, and it could not be created: {error}",
        f"grant createIndex on {moods}, or create it yourself: {command}",
    )


def judge_preimages(options: Mapping[str, Any] | None, moods: str) -> Result:
    """Advised, not required: the pre-image of a purged mood names its user, so records the
    ledger never knew (the old inline writer's) are deleted at once, not at the next sweep."""
    name = "pre-images"
    if options is None:
        return fail(
            name,
            f"the {moods} collection does not exist in this database",
            "check MONGODB_NAME / --db and REPLICATOR_MOODS_COLLECTION",
        )
    setting = options.get("changeStreamPreAndPostImages") or {}
    if isinstance(setting, Mapping) and setting.get("enabled"):
        return ok(name, f"enabled on {moods}")
    return warn(
        name,
        f"off on {moods} (advised: a delete of a mood the ledger never knew then names its user)",
        PREIMAGES_FIX.format(moods=moods),
    )


def token_time(token: Mapping[str, Any] | None) -> float | None:
    """The cluster time (epoch seconds) in a MongoDB resume token, or None if it is not in
    mongod's format: `_data` is hex KeyString whose first value is the event's Timestamp
    (type byte 0x82, then 4 bytes of seconds and 4 of increment, big-endian)."""
    data = (token or {}).get("_data")
    if not isinstance(data, str) or len(data) < 18:
        return None
    try:
        raw = bytes.fromhex(data[:18])
    except ValueError:
        return None
    if raw[0] != _KEYSTRING_TIMESTAMP:
        return None
    return float(int.from_bytes(raw[1:5], "big"))


def _span(hours: float) -> str:
    return f"{hours * 60:.0f} min" if abs(hours) < 1 else f"{hours:.1f} h"


def judge_oplog(
    first_entry_at: float | None,
    now: float,
    checkpoint_at: float | None,
    checkpoint_source: str,
    outage_hours: float,
    error: str | None = None,
) -> Result:
    """The oplog holds changes since `first_entry_at`; a checkpoint older than that can no
    longer be resumed (history lost: every user is reconciled, or exit 3). With the window
    steady, the checkpoint falls out `checkpoint_at - first_entry_at` from now if the
    replicator stays down."""
    name = "oplog window"
    sizing = (
        "size the oplog for the longest outage to survive (Atlas: minimum oplog window, "
        "`oplogMinRetentionHours`; docs/deploy.md)"
    )
    if error is not None:
        return warn(
            name,
            f"not checked: {error}",
            "grant find on local.oplog.rs to the replicator's user (docs/deploy.md)",
        )
    if first_entry_at is None:
        return warn(name, "not checked: local.oplog.rs is empty or absent", sizing)
    window_h = max(0.0, now - first_entry_at) / 3600
    window = f"the oplog reaches back {_span(window_h)}"
    if checkpoint_at is None:
        if window_h < outage_hours:
            return warn(
                name,
                f"{window}, less than --outage-hours {outage_hours:g}; no checkpoint yet",
                sizing,
            )
        return ok(name, f"{window}; no checkpoint yet")
    age_h = max(0.0, now - checkpoint_at) / 3600
    left_h = (checkpoint_at - first_entry_at) / 3600
    seen = f"{window}; the checkpoint ({checkpoint_source}) is {_span(age_h)} old"
    if left_h < 0:
        return fail(
            name,
            f"{seen}: it is already out of history",
            "`replicator run` will reconcile every user (or exit 3 with "
            "--on-history-lost=fail); then size the oplog: " + sizing,
        )
    detail = f"{seen}: {_span(left_h)} left before it falls out of history"
    if left_h < outage_hours:
        return warn(name, f"{detail}, less than --outage-hours {outage_hours:g}", sizing)
    return ok(name, detail)


def judge_clock(server_at: float, sent_at: float, received_at: float) -> Result:
    """The server's `localTime` against ours at the middle of the round trip."""
    skew = server_at - (sent_at + received_at) / 2
    rtt = received_at - sent_at
    detail = f"MongoDB's clock is {abs(skew):.1f} s {'ahead' if skew > 0 else 'behind'}"
    if abs(skew) > CLOCK_SKEW_WARN_SECONDS + rtt / 2:
        return warn(
            "clock",
            f"{detail} (over {CLOCK_SKEW_WARN_SECONDS:g} s)",
            "sync this host's clock (NTP, chrony)",
        )
    return ok("clock", f"{detail} (round trip {rtt * 1000:.0f} ms)")


# -- the PDS ------------------------------------------------------------------------------------


def judge_pds(health: Mapping[str, Any] | None, error: str | None, url: str) -> Result:
    if error is not None or health is None:
        return fail("pds", f"{url}: {error}", "check PDS_URL / --pds-url and that the PDS runs")
    version = health.get("version")
    return ok("pds", f"{url} reachable, version {version or 'not reported'}")


def judge_directory(
    plc_url: str, pds_url: str, did: str | None, endpoint: str | None, error: str | None
) -> Result:
    """One account's DID document, fetched from REPLICATOR_PLC_URL. Advisory: `run` writes
    on whatever it says (or does not), so nothing here fails the preflight."""
    name = "did directory"
    if did is None:
        if error is not None:
            return warn(name, f"no DID could be read from users: {error}")
        return ok(name, f"{plc_url}: not tried (no user has a did:plc account yet)")
    if error is not None:
        return warn(
            name,
            f"{plc_url} did not answer for {did} ({error}): `run` writes on, to each account's "
            "last known PDS (else PDS_URL), and notices moved accounts only once it answers",
            "check REPLICATOR_PLC_URL / --plc-url and that this machine reaches it "
            "(https://plc.directory in production; the dev stack's own PLC locally)",
        )
    if endpoint is None:
        return warn(
            name,
            f"{plc_url} has no document for {did}",
            "point REPLICATOR_PLC_URL at the directory that registered the accounts",
        )
    if not same_host(endpoint, pds_url):
        return warn(
            name,
            f"{did}'s document names {host_of(endpoint)}, not PDS_URL ({host_of(pds_url)}): "
            "`run` parks such accounts as moved",
            "set PDS_URL to the PDS's public URL, as the DID documents name it",
        )
    return ok(name, f"{plc_url} answers: {did} is on {host_of(endpoint)}")


def judge_accounts(sampled: Sequence[tuple[str, str | None]], asked: int) -> Result:
    """`sampled`: (account label, error or None) per account tried."""
    name = "accounts"
    if asked == 0:
        return ok(name, "not sampled (--sample-accounts 0)")
    if not sampled:
        return warn(
            name,
            "no user in the users collection has ATProto credentials",
            "nothing is mirrored until users have `atproto.did` and `atproto.password`",
        )
    failed = [f"{who}: {error}" for who, error in sampled if error is not None]
    if failed:
        return fail(
            name,
            f"{len(failed)} of {len(sampled)} sampled could not get a session: "
            + "; ".join(failed),
            "make `users.atproto.password` of those users the account's PDS password, "
            "or fix the account on the PDS",
        )
    return ok(
        name, f"{len(sampled)} sampled, each has a session: " + ", ".join(who for who, _ in sampled)
    )


def judge_lexicons(
    compared: Mapping[str, Literal["same", "differs", "missing"]],
    where: str | None,
    error: str | None = None,
) -> Result:
    """`compared`: NSID → how the published schema record compares with lexicons/."""
    name = "lexicon"
    publish = 'replicator lexicon publish (docs/runbook.md, "Publishing the lexicons")'
    if where is None:
        return warn(
            name,
            "not checked: no lexicon authority given",
            "set REPLICATOR_LEXICON_IDENTIFIER (or --lexicon-identifier)",
        )
    if error is not None:
        return fail(name, f"{where}: {error}", publish)
    missing = sorted(n for n, v in compared.items() if v == "missing")
    differs = sorted(n for n, v in compared.items() if v == "differs")
    if missing or differs:
        parts = [f"not published: {', '.join(missing)}"] if missing else []
        parts += [f"published but differs from lexicons/: {', '.join(differs)}"] if differs else []
        return fail(name, f"{where}: " + "; ".join(parts), publish)
    return ok(name, f"{where}: {', '.join(sorted(compared))} published and equal to lexicons/")


# -- output -------------------------------------------------------------------------------------


def render(results: Sequence[Result]) -> str:
    """One line per check, and under a line that is not ok, how to fix it."""
    width = max((len(r.name) for r in results), default=0)
    lines = []
    for r in results:
        lines.append(redact(f"{r.status:<4}  {r.name:<{width}}  {r.detail}"))
        if r.fix and r.status != "ok":
            lines.append(redact(f"      {'':<{width}}  fix: {r.fix}"))
    verdict = {0: "all checks passed", 1: "some checks failed"}[exit_code(results)]
    warned = sum(r.status == "warn" for r in results)
    lines.append(f"{verdict}{f' ({warned} warning(s))' if warned else ''}")
    return "\n".join(lines)


def render_json(results: Sequence[Result], at: float) -> str:
    payload = {
        "ok": exit_code(results) == 0,
        "at": datetime.fromtimestamp(at, UTC).isoformat(timespec="seconds"),
        "checks": [asdict(r) for r in results],
    }
    return redact(json.dumps(payload, indent=2))
