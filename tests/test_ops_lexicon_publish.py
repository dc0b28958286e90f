"""`replicator lexicon publish` against the local reference PDS."""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from click.testing import CliRunner

from replicator.commands.lexicon import SCHEMA_NSID, lexicon
from replicator.lexicon import LEXICON_DIR
from replicator_dev.devstack.seed import create_account
from replicator_dev.devstack.stack import LocalStack

from .harness import changed_lexicons


@pytest.fixture
def authority(stack: LocalStack) -> dict[str, str]:
    assert stack.pds_url
    handle = f"lex{secrets.token_hex(4)}.test"
    password = secrets.token_urlsafe(16)
    did = anyio.run(create_account, stack.pds_url, handle, password)
    return {"PDS_URL": stack.pds_url, "REPLICATOR_LEXICON_IDENTIFIER": handle,
            "REPLICATOR_LEXICON_PASSWORD": password, "did": did}  # fmt: skip


def publish(env: dict[str, str], *args: str) -> Any:
    runner = CliRunner()
    env = {k: v for k, v in env.items() if k != "did"}
    return runner.invoke(lexicon, ["publish", *args], env=env, catch_exceptions=False)


def get_record(pds_url: str, did: str, nsid: str) -> dict[str, Any]:
    resp = httpx.get(
        f"{pds_url}/xrpc/com.atproto.repo.getRecord",
        params={"repo": did, "collection": SCHEMA_NSID, "rkey": nsid},
    )
    resp.raise_for_status()
    return dict(resp.json())


def test_publish_is_idempotent_and_updates_a_changed_lexicon(
    authority: dict[str, str], tmp_path: Path
) -> None:
    did, pds_url = authority["did"], authority["PDS_URL"]
    mood = json.loads((LEXICON_DIR / "computer/aesthetic/mood.json").read_text())

    first = publish(authority, "--json")
    assert first.exit_code == 0, first.output
    results = {r["nsid"]: r for r in json.loads(first.output)["results"]}
    assert set(results) == {"computer.aesthetic.mood", "computer.aesthetic.news"}
    result = results["computer.aesthetic.mood"]
    assert result == {
        "nsid": "computer.aesthetic.mood",
        "action": "created",
        "uri": f"at://{did}/{SCHEMA_NSID}/computer.aesthetic.mood",
        "dns": f'_lexicon.aesthetic.computer TXT "did={did}"',
    }
    stored = get_record(pds_url, did, "computer.aesthetic.mood")
    assert stored["uri"] == result["uri"]
    assert stored["value"] == {"$type": SCHEMA_NSID, **mood}
    cid = stored["cid"]

    again = publish(authority)
    assert again.exit_code == 0, again.output
    assert again.output.startswith("unchanged")
    assert "_lexicon.aesthetic.computer" in again.output
    assert get_record(pds_url, did, "computer.aesthetic.mood")["cid"] == cid  # no new write

    changed = changed_lexicons(tmp_path, "A mood, described anew.")
    dry = publish(authority, "--lexicons", str(changed), "--dry-run")
    assert dry.exit_code == 0 and dry.output.startswith("would update"), dry.output
    assert get_record(pds_url, did, "computer.aesthetic.mood")["cid"] == cid
    update = publish(authority, "--lexicons", str(changed))
    assert update.exit_code == 0 and update.output.startswith("updated"), update.output
    stored = get_record(pds_url, did, "computer.aesthetic.mood")
    assert stored["value"]["defs"]["main"]["description"] == "A mood, described anew."


def test_a_wrong_password_fails_cleanly_without_echoing_it(authority: dict[str, str]) -> None:
    env = dict(authority, REPLICATOR_LEXICON_PASSWORD="wrong-password-xyz")
    out = publish(env)
    assert out.exit_code == 2
    assert "login" in out.output and "refused" in out.output
    assert "wrong-password-xyz" not in out.output


def test_an_invalid_lexicon_publishes_nothing(authority: dict[str, str], tmp_path: Path) -> None:
    bad = tmp_path / "lexicons"
    bad.mkdir()
    (bad / "broken.json").write_text(json.dumps({"lexicon": 1, "id": "computer.aesthetic.x"}))
    out = publish(authority, "--lexicons", str(bad))
    assert out.exit_code == 2
    assert "cannot load lexicons" in out.output
    resp = httpx.get(
        f"{authority['PDS_URL']}/xrpc/com.atproto.repo.listRecords",
        params={"repo": authority["did"], "collection": SCHEMA_NSID},
    )
    assert resp.json()["records"] == []
