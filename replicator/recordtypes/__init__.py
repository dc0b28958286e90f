"""The record types this release can mirror, by name (`--record-types`)."""

from __future__ import annotations

from collections.abc import Iterable

from ..errors import ConfigError
from .base import Document, Record, RecordType
from .fields import InvalidDocument
from .mood import MOOD
from .news import NEWS

TYPES: dict[str, RecordType] = {t.name: t for t in (MOOD, NEWS)}

__all__ = [
    "MOOD",
    "NEWS",
    "TYPES",
    "Document",
    "InvalidDocument",
    "Record",
    "RecordType",
    "enabled",
]


def enabled(names: Iterable[str]) -> tuple[RecordType, ...]:
    """The types named (in the order given), or `ConfigError` naming the unknown ones."""
    names = list(dict.fromkeys(names))
    if unknown := [n for n in names if n not in TYPES]:
        raise ConfigError(
            f"record types: unknown {', '.join(map(repr, unknown))} (known: {', '.join(TYPES)})"
        )
    if not names:
        raise ConfigError(f"record types: none given (known: {', '.join(TYPES)})")
    return tuple(TYPES[n] for n in names)
