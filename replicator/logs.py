"""Logging: readable on a terminal, JSON lines with `REPLICATOR_LOG_FORMAT=json`.

Every line passes through a filter that masks anything that looks like a credential, so a
password or token that slipped into an exception message never reaches the log.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Any

import stamina.instrumentation
from loguru import logger

_SECRET_PATTERNS = [
    re.compile(
        r"(?i)(password|passwd|pwd|accessJwt|refreshJwt|token|authorization|bearer"
        r"|ratelimit-bypass|bypass[_ ]key)"
        # a key and its value: `:` or `=` between them; only a bearer token follows a space
        r"(['\"]?\s*[:=]\s*|(?<=bearer)\s+|(?<=authorization)\s+)(?:(?:bearer|basic)\s+)?"
        # a quoted value whole (passwords may hold spaces and escaped quotes), else one word
        r"(\"(?:[^\"\\]|\\.)*\"?|'(?:[^'\\]|\\.)*'?|[^\s'\",}]+)"
    ),
    re.compile(r"eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*"),  # JWTs
    re.compile(r"(mongodb(?:\+srv)?://[^:/@\s]+:)([^@\s]+)(@)"),
]


def _mask(m: re.Match[str]) -> str:
    quote = m.group(3)[0] if m.group(3)[0] in "'\"" else ""
    return f"{m.group(1)}{m.group(2)}{quote}***{quote}"


_LITERALS: set[str] = set()  # secrets known by value (the rate-limit bypass key)


def add_secret(value: str) -> None:
    """A configured secret, masked wherever it appears, whatever surrounds it."""
    if len(value) >= 4:
        _LITERALS.add(value)


def redact(text: str) -> str:
    for secret in _LITERALS:
        text = text.replace(secret, "***")
    text = _SECRET_PATTERNS[0].sub(_mask, text)
    text = _SECRET_PATTERNS[1].sub("***", text)
    return _SECRET_PATTERNS[2].sub(r"\1***\3", text)


def redact_uri(uri: str) -> str:
    """`mongodb://user:secret@host` → `mongodb://user:***@host`, for logs and errors.

    Also without a scheme (a mistyped setting is echoed back) and with an unencoded `/` or
    `@` in the password: everything up to the last `@` before the query counts as credentials.
    """
    scheme, sep, rest = uri.partition("://")
    if not sep:
        scheme, rest = "", uri
    creds, at, _ = rest.split("?", 1)[0].rpartition("@")
    if not at:
        return uri
    user = creds.split(":", 1)[0]
    return f"{scheme}{sep}{user}:***@{rest[len(creds) + 1 :]}"


def _patch(record: Any) -> None:
    record["message"] = redact(record["message"])
    if record["exception"] is not None:
        exc = record["exception"]
        if exc.value is not None:
            record["extra"]["error"] = redact(f"{type(exc.value).__name__}: {exc.value}")
            record["exception"] = None  # tracebacks can hold local variables' secrets


def setup(level: str | None = None, fmt: str | None = None) -> None:
    level = level or os.environ.get("REPLICATOR_LOG_LEVEL", "INFO")
    fmt = fmt or os.environ.get("REPLICATOR_LOG_FORMAT", "text")
    logger.remove()
    logger.configure(patcher=_patch)
    # stamina would log each retry through the standard library, outside these sinks (not
    # JSON, not redacted); retries are counted and logged by our own hook instead.
    stamina.instrumentation.set_on_retry_hooks([])
    if fmt == "json":
        logger.add(sys.stderr, level=level, serialize=True)
    else:
        logger.add(sys.stderr, level=level, colorize=sys.stderr.isatty(), format=_text_format)


def _text_format(record: Any) -> str:
    """The bound fields (mood id, DID, error) after the message, and nothing when there are
    none (not an empty ` {}` on every line)."""
    extra = " <dim>{extra}</dim>" if record["extra"] else ""
    return "<green>{time:HH:mm:ss.SSS}</green> <level>{level: <8}</level> {message}" + extra + "\n"
