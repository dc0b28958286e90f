"""`replicator bench --quick --only core`: runs end to end and writes the JSON it promises.

A smoke test: no timing is asserted (the figures are for the benchmark note, issue #6)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from replicator.cli import main
from replicator.devstack.stack import LocalStack

pytestmark = pytest.mark.integration


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
    assert set(report["ratios"]) == {
        "burst/a_single", "purge/a_apply_writes", "backfill/a_apply_writes",
        "burst/b_old", "purge/b_old", "backfill/b_old",
    }  # fmt: skip
    assert [row["measure"].split(":")[0] for row in report["table"]] == ["core", "core, pure"]
    assert "replicator bench" in result.output  # the table's title
