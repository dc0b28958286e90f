"""`replicator bench`: `--quick --only core` and a tiny burst run end to end and write the JSON
they promise; a commit shape is counted from the calls and replayed in its proportions.

Smoke tests: no timing is asserted (the figures are for the benchmark note, issue #6)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from replicator.cli import main
from replicator_dev.bench.pds_capacity import replay_order
from replicator_dev.bench.shape import Call, in_flight, summarize
from replicator_dev.devstack.stack import LocalStack

RATIOS = {
    "burst/a_single", "burst/a_burst_shape", "purge/a_apply_writes",
    "backfill/a_apply_writes", "backfill/a_backfill_shape",
    "burst/b_old", "purge/b_old", "backfill/b_old", "backfill/m_backfill",
    "backfill/lower_ceiling",
}  # fmt: skip


def test_shape_counts_commits_and_repos_in_flight() -> None:
    aw, put, lst = ("com.atproto.repo.applyWrites", "com.atproto.repo.putRecord",
                    "com.atproto.repo.listRecords")  # fmt: skip
    calls = [
        Call(lst, "did:a", 0, True, 0.0, 0.5),  # a read: counted as a call, not a commit
        Call(aw, "did:a", 10, True, 1.0, 2.0),
        Call(aw, "did:b", 10, True, 1.5, 3.0),
        Call(put, "did:a", 1, True, 2.0, 2.5),  # did:a again, right after its last commit
        Call(aw, "did:c", 10, False, 4.0, 5.0),  # refused: in flight, but no commit
    ]
    shape = summarize(calls)
    assert shape["calls"] == {"applyWrites": 3, "listRecords": 1, "putRecord": 1}
    assert shape["commits"] == 3 and shape["records"] == 21 and shape["failed_write_calls"] == 1
    assert shape["records_per_commit"] == 7.0 and shape["records_per_apply_writes"] == 10.0
    assert shape["commit_sizes"] == {"applyWrites 10": 2, "putRecord 1": 1}
    assert shape["repos"] == 2 and shape["single_write_commits"] == 1
    # 1.0-1.5: 1 repo; 1.5-2.5: 2; 2.5-3.0: 1; 3.0-4.0: 0; 4.0-5.0: 1 → 4.0 repo-seconds / 4 s
    assert shape["repos_in_flight"] == {"max": 2, "mean": 1.0, "busy_share": 0.75,
                                        "seconds": 4.0}  # fmt: skip
    assert summarize(calls, since=1.8)["commits"] == 1  # only the putRecord started after
    assert in_flight([])["max"] is None


def test_a_shape_is_replayed_in_its_proportions() -> None:
    order = replay_order({"applyWrites 50": 6, "putRecord 1": 2})
    assert sorted(order) == [("applyWrites", 50)] * 6 + [("putRecord", 1)] * 2
    assert order[:4].count(("putRecord", 1)) == 1  # any half of the cycle holds half of each


@pytest.mark.integration
def test_bench_quick_core_writes_the_report(
    stack: LocalStack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert stack.mongodb_uri is not None
    monkeypatch.setenv("REPLICATOR_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.delenv("PDS_URL", raising=False)
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(
        main,
        ["bench", "--quick", "--only", "core", "--moods", "200", "--users", "5",
         "--mongodb-uri", stack.mongodb_uri, "--json", str(out)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())

    assert report["only"] == ["core"]
    assert {"sizes", "machine", "stack", "results", "ratios", "targets", "table", "notes"} <= set(
        report
    )
    core, pure = report["results"]["c_core"], report["results"]["c_core_pure"]
    assert core["moods"] == 400 and core["events"] >= 800  # each insert, then its write-back
    assert core["ledger_present"] == 400
    for value in (core["events_per_s"], core["seconds"], pure["events_per_s"],
                  pure["replay_events_per_s"]):  # fmt: skip
        assert isinstance(value, int | float) and value > 0
    assert pure["writes_planned"] == 400 and pure["replay_writes_planned"] == 0
    assert report["targets"]["core"]["value"] == core["events_per_s"]
    assert set(report["ratios"]) == RATIOS
    assert [row["measure"].split(":")[0] for row in report["table"]] == ["core", "core, pure"]
    assert "replicator bench" in result.output  # the table's title


@pytest.mark.integration
def test_bench_burst_measures_its_shape_and_the_pds_at_it(
    stack: LocalStack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The burst's commits are counted from the replicator's own calls and (a) replays them."""
    report = _bench_on_the_stack(stack, tmp_path, monkeypatch, "burst")
    assert report["only"] == ["burst"]
    burst, at_shape = report["results"]["c_burst"], report["results"]["a_burst_shape"]
    shape = burst["shape"]
    assert shape["records"] == 40 and shape["failed_write_calls"] == 0
    assert shape["repos"] == 4 and 1 <= shape["repos_in_flight"]["max"] <= 4
    assert sum(int(k.split()[1]) * n for k, n in shape["commit_sizes"].items()) == 40
    assert burst["commits"] == shape["commits"] == burst["firehose_commits"]
    assert at_shape["concurrency"] == shape["repos_in_flight"]["max"]
    assert at_shape["shape_records_per_commit"] == shape["records_per_commit"]
    assert at_shape["records"] > 0 and at_shape["errors"] == 0
    assert set(at_shape["calls"]) <= {"applyWrites", "putRecord"}
    assert set(report["ratios"]) == RATIOS
    assert report["ratios"]["burst/a_burst_shape"] == round(
        burst["records_per_s"] / at_shape["records_per_s"], 2
    )
    measures = [row["measure"] for row in report["table"]]
    assert measures[0].startswith("PDS at the burst's shape") and measures[1].startswith("burst")


@pytest.mark.integration
def test_bench_backfill_measures_its_mongodb_ceiling(
    stack: LocalStack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The backfill again with a null PDS (its MongoDB work alone), and the ratio against the
    lower of that and the PDS at the backfill's shape."""
    report = _bench_on_the_stack(stack, tmp_path, monkeypatch, "backfill")
    real, ceiling = report["results"]["c_backfill"], report["results"]["m_backfill"]
    assert real["written"] == ceiling["written"] == 40
    assert ceiling["firehose_commits"] == 0  # nothing reached the PDS: answered in-process
    assert ceiling["commits"] == real["commits"]  # the same commands
    lower = min(ceiling["records_per_s"], report["results"]["a_backfill_shape"]["records_per_s"])
    assert report["ratios"]["backfill/lower_ceiling"] == round(real["records_per_s"] / lower, 2)
    assert "MongoDB ceiling: the backfill" in [r["measure"] for r in report["table"]][1]


def _bench_on_the_stack(
    stack: LocalStack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, only: str
) -> dict[str, Any]:
    """`replicator bench --quick --only ONLY` (40 moods over 4 users) against the session's
    stack; its JSON report."""
    assert stack.mongodb_uri is not None and stack.pds_url is not None
    monkeypatch.setenv("REPLICATOR_STATE_DIR", str(tmp_path / "state"))
    if stack.pds_admin_password:
        monkeypatch.setenv("PDS_ADMIN_PASSWORD", stack.pds_admin_password)
    if stack.plc_url:
        monkeypatch.setenv("REPLICATOR_PLC_URL", stack.plc_url)
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(
        main,
        ["bench", "--quick", "--only", only, "--moods", "40", "--users", "4",
         "--seconds", "1", "--mongodb-uri", stack.mongodb_uri, "--pds-url", stack.pds_url,
         "--json", str(out)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report: dict[str, Any] = json.loads(out.read_text())
    return report
