"""The one table, the ratios (c)/(a) and (c)/(b), the targets of issue #6, and the JSON.

Besides the targets' ratios (burst against single commits, backfill and purge against
`applyWrites` of 200), the burst and the backfill are also divided by (a) at their own commit
shape: the PDS's capacity for commits of exactly the size and parallelism they sent. The
backfill also by (m), its MongoDB ceiling (the same command with a null PDS), and by the lower
of the two. (The burst has no such row: with no PDS to wait for, the stream's idle getMores
on the embedded server return at every oplog write, and its null-PDS run measured that.)"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from rich.console import Console
from rich.table import Table

from .shape import describe

# Issue #6's targets: figures for the note, not asserts.
BURST_OF_SINGLE = 0.8
BATCH_OF_APPLY_WRITES = 0.6
TIMES_OLD = 20.0
LAG_P99_MS = 1000.0
PEAK_RSS_MB = 200.0
CORE_EVENTS_PER_S = 20_000.0

CPU_COLUMNS = ("pds", "mongo", "replicator", "bench", "other", "machine")


def _num(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _get(results: Mapping[str, Any], key: str, field: str) -> float | None:
    row = results.get(key)
    if not isinstance(row, Mapping) or "error" in row:
        return None
    return _num(row.get(field))


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return round(a / b, 2)


def _lower(*ceilings: float | None) -> float | None:
    """The lower of the ceilings measured (None if none was)."""
    known = [c for c in ceilings if c is not None]
    return min(known) if known else None


def ratios(results: Mapping[str, Any]) -> dict[str, float | None]:
    single = _get(results, "a_single", "commits_per_s")
    batch = _get(results, "a_batch", "records_per_s")
    old = _get(results, "b_old", "moods_per_s")
    burst = _get(results, "c_burst", "records_per_s")
    purge = _get(results, "c_purge", "records_per_s")
    backfill = _get(results, "c_backfill", "records_per_s")
    burst_shape = _get(results, "a_burst_shape", "records_per_s")
    backfill_shape = _get(results, "a_backfill_shape", "records_per_s")
    backfill_mongo = _get(results, "m_backfill", "records_per_s")
    return {
        "burst/a_single": _ratio(burst, single),
        "burst/a_burst_shape": _ratio(burst, burst_shape),
        "backfill/a_backfill_shape": _ratio(backfill, backfill_shape),
        "backfill/m_backfill": _ratio(backfill, backfill_mongo),
        "backfill/lower_ceiling": _ratio(backfill, _lower(backfill_shape, backfill_mongo)),
        "purge/a_apply_writes": _ratio(purge, batch),
        "backfill/a_apply_writes": _ratio(backfill, batch),
        "burst/b_old": _ratio(burst, old),
        "purge/b_old": _ratio(purge, old),
        "backfill/b_old": _ratio(backfill, old),
    }


def targets(results: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Each target: its text, the measured value, and whether it is met (None: not measured)."""
    r = ratios(results)

    def at_least(value: float | None, floor: float) -> bool | None:
        return None if value is None else value >= floor

    def below(value: float | None, ceiling: float) -> bool | None:
        return None if value is None else value < ceiling

    lag = _get(results, "c_lag", "p99_ms")
    rss = _get(results, "c_backlog", "peak_rss_mb")
    core = _get(results, "c_core", "events_per_s")
    return {
        "burst": {"target": f">= {BURST_OF_SINGLE:.0%} of (a) single commits/s",
                  "value": r["burst/a_single"],
                  "met": at_least(r["burst/a_single"], BURST_OF_SINGLE)},
        "purge": {"target": f">= {BATCH_OF_APPLY_WRITES:.0%} of (a) applyWrites records/s",
                  "value": r["purge/a_apply_writes"],
                  "met": at_least(r["purge/a_apply_writes"], BATCH_OF_APPLY_WRITES)},
        "backfill": {"target": f">= {BATCH_OF_APPLY_WRITES:.0%} of (a) applyWrites records/s",
                     "value": r["backfill/a_apply_writes"],
                     "met": at_least(r["backfill/a_apply_writes"], BATCH_OF_APPLY_WRITES)},
        "vs_old": {"target": f">= {TIMES_OLD:.0f}x (b), burst",
                   "value": r["burst/b_old"], "met": at_least(r["burst/b_old"], TIMES_OLD)},
        "lag": {"target": f"p99 < {LAG_P99_MS:.0f} ms", "value": lag,
                "met": below(lag, LAG_P99_MS)},
        "rss": {"target": f"peak RSS < {PEAK_RSS_MB:.0f} MB", "value": rss,
                "met": below(rss, PEAK_RSS_MB)},
        "core": {"target": f">= {CORE_EVENTS_PER_S:,.0f} events/s", "value": core,
                 "met": at_least(core, CORE_EVENTS_PER_S)},
    }  # fmt: skip


def _fmt(value: Any, digits: int = 1) -> str:
    number = _num(value)
    if number is None:
        return "—" if value is None else str(value)
    if isinstance(value, int) or abs(number) >= 1000:
        return f"{number:,.0f}"
    return f"{number:,.{digits}f}"


def _mark(met: bool | None) -> str:
    return {True: "✓ met", False: "✗ missed", None: "—"}[met]


def rows(report: Mapping[str, Any]) -> list[dict[str, str]]:
    """The table as plain strings (also stored in the JSON)."""
    results: Mapping[str, Any] = report.get("results", {})
    goals = targets(results)
    out: list[dict[str, str]] = []

    def add(part: str, measure: str, key: str, result: str, detail: str,
            target: str = "", goal: str | None = None) -> None:  # fmt: skip
        row = results.get(key)
        if row is None:
            return
        if isinstance(row, Mapping) and "error" in row:
            result, detail = "failed", str(row["error"])[:120]
            if row.get("shape"):  # what it sent before it failed
                detail += f"; until then: {describe(row['shape'])}"
        met = _mark(goals[goal]["met"]) if goal else ""
        out.append({"part": part, "measure": measure, "result": result, "detail": detail,
                    "target": target, "met": met})  # fmt: skip

    def r(key: str) -> Mapping[str, Any]:
        row = results.get(key)
        return row if isinstance(row, Mapping) and "error" not in row else {}

    a1, a2, b = r("a_single"), r("a_batch"), r("b_old")
    a_bf, a_bu = r("a_backfill_shape"), r("a_burst_shape")
    c_burst, c_purge, c_backfill = r("c_burst"), r("c_purge"), r("c_backfill")
    c_lag, c_rss, c_core, c_pure = r("c_lag"), r("c_backlog"), r("c_core"), r("c_core_pure")
    single, batch = _num(a1.get("commits_per_s")), _num(a2.get("records_per_s"))
    shares = ratios(results)

    def of_shape(key: str) -> str:
        share = shares.get(key)
        return "" if share is None else f"; {share:.2f} of (a) at this shape"

    add(
        "a",
        f"PDS: single-record commits, {a1.get('repos', '?')} repos",
        "a_single",
        f"{_fmt(a1.get('commits_per_s'))} commits/s",
        f"createRecord, {a1.get('concurrency')} in flight, {_fmt(a1.get('seconds'))} s; "
        f"p50 {_fmt(a1.get('latency_ms_p50'))} ms; errors {a1.get('errors')}",
    )
    add(
        "a",
        f"PDS: applyWrites of {a2.get('batch', 200)} creates",
        "a_batch",
        f"{_fmt(a2.get('records_per_s'))} records/s",
        f"{_fmt(a2.get('commits_per_s'), 2)} commits/s, {a2.get('concurrency')} in flight, "
        f"{_fmt(a2.get('seconds'))} s; errors {a2.get('errors')}",
    )
    for key, row, scenario in (("a_backfill_shape", a_bf, "backfill"),
                               ("a_burst_shape", a_bu, "burst")):  # fmt: skip
        calls = ", ".join(f"{n:,} {k}" for k, n in (row.get("calls") or {}).items())
        add(
            "a",
            f"PDS at the {scenario}'s shape: {_fmt(row.get('shape_records_per_commit'))} "
            f"records/commit, {row.get('concurrency', '?')} repos in flight"
            + (f" (partial: the {scenario} failed)" if row.get("partial_shape") else ""),
            key,
            f"{_fmt(row.get('records_per_s'))} records/s",
            f"{_fmt(row.get('commits_per_s'), 2)} commits/s ({calls}), "
            f"{_fmt(row.get('seconds'))} s over {row.get('repos')} repos; p50 "
            f"{_fmt(row.get('latency_ms_p50'))} ms; errors {row.get('errors')}",
        )
    m_bf = r("m_backfill")
    add(
        "m",
        "MongoDB ceiling: the backfill with a null PDS",
        "m_backfill",
        f"{_fmt(m_bf.get('records_per_s'))} records/s",
        "the same command, every PDS call answered at once in its process: the MongoDB work "
        f"alone; {_fmt(m_bf.get('seconds'))} s",
    )
    add(
        "b",
        "old: createSession + createRecord per mood, sequential",
        "b_old",
        f"{_fmt(b.get('moods_per_s'), 2)} moods/s",
        f"{b.get('moods')} moods; login p50 {_fmt(b.get('login_ms_p50'))} ms, "
        f"write p50 {_fmt(b.get('write_ms_p50'))} ms",
    )
    add(
        "c",
        f"backfill: {_fmt(c_backfill.get('moods'))} moods, {c_backfill.get('users')} users",
        "c_backfill",
        f"{_fmt(c_backfill.get('records_per_s'))} records/s",
        f"{_fmt(c_backfill.get('seconds'))} s (wall {_fmt(c_backfill.get('wall_seconds'))} s); "
        f"{describe(c_backfill.get('shape'))}{of_shape('backfill/a_backfill_shape')}",
        _target(BATCH_OF_APPLY_WRITES, batch, "(a) applyWrites"),
        "backfill",
    )
    add(
        "c",
        f"burst: {_fmt(c_burst.get('moods'))} inserts, {c_burst.get('users')} users",
        "c_burst",
        f"{_fmt(c_burst.get('records_per_s'))} records/s",
        f"{_fmt(c_burst.get('seconds'))} s first insert → last record on the PDS; "
        f"{describe(c_burst.get('shape'))}{of_shape('burst/a_burst_shape')}",
        _target(BURST_OF_SINGLE, single, "(a) single"),
        "burst",
    )
    add(
        "c",
        f"purge: {_fmt(c_purge.get('moods'))} moods of {c_purge.get('users')} users",
        "c_purge",
        f"{_fmt(c_purge.get('records_per_s'))} deletes/s",
        f"{_fmt(c_purge.get('seconds'))} s to the last delete; ledger settled at "
        f"{_fmt(c_purge.get('ledger_settled_seconds'))} s; {describe(c_purge.get('shape'))}",
        _target(BATCH_OF_APPLY_WRITES, batch, "(a) applyWrites"),
        "purge",
    )
    add(
        "c",
        f"lag at {_fmt(c_lag.get('rate'), 0)} inserts/s for "
        f"{_fmt(c_lag.get('window_seconds'), 0)} s",
        "c_lag",
        f"p50 {_fmt(c_lag.get('p50_ms'), 0)} / p95 {_fmt(c_lag.get('p95_ms'), 0)} / "
        f"p99 {_fmt(c_lag.get('p99_ms'), 0)} ms",
        f"insert → record on the PDS firehose; max {_fmt(c_lag.get('max_ms'), 0)} ms, "
        f"missing {c_lag.get('missing')}, achieved {_fmt(c_lag.get('achieved_rate'))}/s",
        f"p99 < {LAG_P99_MS:.0f} ms",
        "lag",
    )
    drained = (
        f"drained in {_fmt(c_rss.get('drain_seconds'))} s"
        if c_rss.get("caught_up", True)
        else f"NOT caught up: {_fmt(c_rss.get('mirrored'))} mirrored in "
        f"{_fmt(c_rss.get('drain_seconds'))} s"
    )
    add(
        "c",
        f"peak RSS, {_fmt(c_rss.get('moods'))}-mood backlog",
        "c_backlog",
        f"{_fmt(c_rss.get('peak_rss_mb'))} MB",
        f"VmHWM of `replicator run`; {drained} ({_fmt(c_rss.get('records_per_s'))} "
        "records/s); inserted while it was stopped, then started",
        f"< {PEAK_RSS_MB:.0f} MB",
        "rss",
    )
    add(
        "c",
        "core: stream → desired → ledger diff (Mongo, null PDS)",
        "c_core",
        f"{_fmt(c_core.get('events_per_s'))} events/s",
        f"{_fmt(c_core.get('events'))} events in {_fmt(c_core.get('seconds'))} s (each insert, "
        f"then its write-back; backlog of {_fmt(c_core.get('moods'))} inserts"
        + (")" if c_core.get("caught_up", True) else ", not drained by then)"),
        f">= {CORE_EVENTS_PER_S:,.0f} events/s",
        "core",
    )
    add(
        "c",
        "core, pure: desired_state + plan_user",
        "c_core_pure",
        f"{_fmt(c_pure.get('events_per_s'))} events/s",
        f"in memory, {_fmt(c_pure.get('moods'))} moods; replay (nothing to write) "
        f"{_fmt(c_pure.get('replay_events_per_s'))} events/s",
    )
    return out


def _target(share: float, base: float | None, what: str) -> str:
    text = f">= {share:.0%} of {what}"
    return f"{text} = {_fmt(base * share)}/s" if base is not None else text


def print_report(report: Mapping[str, Any], console: Console | None = None) -> None:
    console = console or Console(width=160)
    table = Table(title="replicator bench (issue #6)", show_lines=False, expand=False)
    for name, kw in (("", {}), ("measure", {}), ("result", {"justify": "right"}),
                     ("detail", {"overflow": "fold"}), ("target", {}), ("", {})):  # fmt: skip
        table.add_column(name, **kw)  # type: ignore[arg-type]
    for row in report.get("table", rows(report)):
        table.add_row(row["part"], row["measure"], row["result"], row["detail"],
                      row["target"], row["met"])  # fmt: skip
    console.print(table)

    console.print("[bold]ratios[/bold]")
    r = report.get("ratios", {})
    labels = {
        "burst/a_single": ("burst / (a) single commits", f"target >= {BURST_OF_SINGLE}"),
        "burst/a_burst_shape": ("burst / (a) at the burst's own commit shape",
                                "the real limit for its commits"),
        "backfill/a_apply_writes": ("backfill / (a) applyWrites records",
                                    f"target >= {BATCH_OF_APPLY_WRITES}"),
        "backfill/a_backfill_shape": ("backfill / (a) at the backfill's own commit shape",
                                      "the real limit for its commits"),
        "backfill/m_backfill": ("backfill / (m) its MongoDB ceiling", "the same work, null PDS"),
        "backfill/lower_ceiling": ("backfill / the lower of (a) at its shape and (m)", ""),
        "purge/a_apply_writes": ("purge / (a) applyWrites records",
                                 f"target >= {BATCH_OF_APPLY_WRITES}"),
        "burst/b_old": ("burst / (b) old", f"target >= {TIMES_OLD:.0f}"),
        "purge/b_old": ("purge / (b) old", ""),
        "backfill/b_old": ("backfill / (b) old", ""),
    }  # fmt: skip
    for key, (label, note) in labels.items():
        value = r.get(key)
        shown = "—" if value is None else f"{value:.2f}"
        console.print(f"  {label + ':':<52}{shown:>7}   {note}".rstrip(), highlight=False)

    cpu_rows = [
        (key, row["cpu"])
        for key, row in report.get("results", {}).items()
        if isinstance(row, Mapping) and isinstance(row.get("cpu"), Mapping)
    ]
    if cpu_rows:
        cpu = Table(title="where the CPU went (cores busy on average; this machine has "
                    f"{report.get('machine', {}).get('cpus', '?')})")  # fmt: skip
        cpu.add_column("scenario")
        for column in CPU_COLUMNS:
            cpu.add_column(column, justify="right")
        for key, values in cpu_rows:
            cpu.add_row(key, *(_fmt(values.get(c), 2) for c in CPU_COLUMNS))
        console.print(cpu)
    for note in report.get("notes", []):
        console.print(f"note: {note}", highlight=False)
    code = report.get("code") or {}
    if code.get("commit"):
        dirty = code.get("uncommitted") or []
        console.print(f"measured: commit {code['commit']}"
                      + (f" + uncommitted changes in {', '.join(dirty)}" if dirty else ""),
                      highlight=False)  # fmt: skip
