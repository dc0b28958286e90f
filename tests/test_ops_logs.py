"""Logs: JSON lines with `REPLICATOR_LOG_FORMAT=json`, text otherwise, and never a secret."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from loguru import logger

from replicator import logs

JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJkaWQ6cGxjOmFiYyJ9.c2lnbmF0dXJlLXBhcnQ"
DID = "did:plc:abcdefghijklmnopqrstuvwx"
MOOD = "6650f0c2a1b2c3d4e5f60718"


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    yield
    logs.setup()


def json_lines(err: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in err.splitlines() if line.strip()]


def test_json_mode_emits_one_json_object_per_line_with_mood_and_did(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REPLICATOR_LOG_FORMAT", "json")
    logs.setup()
    logger.bind(mood_id=MOOD, did=DID).warning("parked: {}", "PDS refused the write")
    logger.info("multi-line\nmessage ✨")
    lines = json_lines(capsys.readouterr().err)
    assert len(lines) == 2
    record = lines[0]["record"]
    assert isinstance(record, dict)
    assert record["message"] == "parked: PDS refused the write"
    assert record["level"]["name"] == "WARNING"
    assert record["extra"] == {"mood_id": MOOD, "did": DID}
    second = lines[1]["record"]
    assert isinstance(second, dict) and second["message"] == "multi-line\nmessage ✨"


@pytest.mark.parametrize(
    ("message", "secret"),
    [
        ("login failed: {'identifier': 'x', 'password': 'hunter2'}", "hunter2"),
        ('body {"password": "two words \\" and a quote"}', "two words"),
        (f"refresh with {JWT}", JWT),
        (f"accessJwt={JWT}", JWT),
        ("authorization: Bearer opaque-token-123", "opaque-token-123"),
        ("mongodb://app:s3cr3t@db.example:27017/aesthetic", "s3cr3t"),
        ("GET with Bearer opaque-token-456", "opaque-token-456"),
        ("password = 'hunter3'", "hunter3"),
    ],
)
def test_secrets_in_messages_are_redacted(
    capsys: pytest.CaptureFixture[str], message: str, secret: str
) -> None:
    for fmt in ("json", "text"):
        logs.setup(fmt=fmt)
        logger.bind(mood_id=MOOD, did=DID).error("{}", message)
        err = capsys.readouterr().err
        assert secret not in err
        assert "***" in err


@pytest.mark.parametrize(
    "message",
    [
        "PDS refused the account's password (AuthenticationRequired)",
        "the session token expired; logging in again",
        "no password stored for this user",
    ],
)
def test_words_after_password_or_token_are_not_secrets(
    capsys: pytest.CaptureFixture[str], message: str
) -> None:
    """Only a value given to the key (`:` or `=`, or a bearer token) is masked: the reason
    that follows the word "password" in a sentence is what an operator needs to read."""
    logs.setup(fmt="text")
    logger.error("{}", message)
    assert message in capsys.readouterr().err


def test_an_exception_is_logged_without_traceback_or_secret(
    capsys: pytest.CaptureFixture[str],
) -> None:
    logs.setup(fmt="json")
    password = "do-not-log-me"  # a local a traceback with variables would show
    try:
        raise RuntimeError(f"createSession failed for password={password}")
    except RuntimeError:
        logger.bind(did=DID).exception("session")
    err = capsys.readouterr().err
    assert password not in err
    (line,) = json_lines(err)
    record = line["record"]
    assert isinstance(record, dict)
    assert record["exception"] is None
    assert record["extra"]["error"] == "RuntimeError: createSession failed for password=***"
    assert record["extra"]["did"] == DID


def test_text_mode_is_readable_and_carries_the_ids(capsys: pytest.CaptureFixture[str]) -> None:
    logs.setup(fmt="text")
    logger.bind(mood_id=MOOD, did=DID).warning("invalid mood: {}", "too long")
    err = capsys.readouterr().err
    assert "WARNING" in err and "invalid mood: too long" in err
    assert MOOD in err and DID in err
    with pytest.raises(json.JSONDecodeError):
        json.loads(err.splitlines()[0])


def log_calls() -> list[tuple[str, int, str, set[str]]]:
    """(file, line, message, keys bound with `logger.bind`) for every literal log message."""
    import ast
    from pathlib import Path

    root = Path(logs.__file__).parent
    out = []
    for path in sorted(root.rglob("*.py")):
        if {"bench", "devstack"} & set(path.relative_to(root).parts):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            if node.func.attr not in ("debug", "info", "warning", "error", "critical", "exception"):
                continue
            first = node.args[0] if node.args else None
            if not (isinstance(first, ast.Constant) and isinstance(first.value, str)):
                continue
            base = node.func.value
            bound: set[str] = set()
            if isinstance(base, ast.Call) and getattr(base.func, "attr", None) == "bind":
                bound = {k.arg for k in base.keywords if k.arg}
            out.append((path.name, node.lineno, first.value, bound))
    return out


def test_every_line_about_one_mood_carries_its_id_and_did() -> None:
    """A message about one mood (`mood {}`, `invalid mood`, a bound `mood_id`) binds both ids;
    the only exception is a document whose `_id` is unusable, which has no user or DID."""
    import re

    calls = log_calls()
    assert calls
    problems = []
    for name, line, message, bound in calls:
        about_one = "mood_id" in bound or re.search(r"\bmood\b", message)
        if not about_one or "every mood" in message:
            continue
        if message.startswith(("bad mood document", "bad {} document")):
            continue
        if not {"mood_id", "did"} <= bound:
            problems.append(f"{name}:{line} {message!r} binds {sorted(bound)}")
    assert problems == []
