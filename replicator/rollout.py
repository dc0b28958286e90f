"""Gradual rollout: the allowlist (`--only-user`, `REPLICATOR_ONLY_USERS`) and the dry run.

With an allowlist, moods of other users are not written; the first time one is seen it gets
a ledger entry `skipped` / `not enabled` (by `Applier`), so `replicator backfill` mirrors it
once its user is enabled. A dry run (`--dry-run`) reads the stream and plans every change but
writes nothing, and keeps its own checkpoint (`Store.checkpoint_name` + `:dry-run`), so a
shadow run next to the real replicator never moves the real position.
"""

from __future__ import annotations

from collections.abc import Iterable

import click

from .store import Store

NOT_ENABLED = "not enabled"


class UnknownUser(click.UsageError):
    """An allowlist entry names no user: a typo must not silently enable nobody (exit 2)."""


def split_users(values: Iterable[str]) -> tuple[str, ...]:
    """Repeated flags and the env var (separated by spaces or commas) → one tuple, in order."""
    out: list[str] = []
    for value in values:
        out.extend(part for part in value.replace(",", " ").split() if part)
    return tuple(dict.fromkeys(out))


async def resolve_allowlist(store: Store, who: Iterable[str]) -> frozenset[str] | None:
    """Subs stay as they are; `@handle` is looked up. None: no allowlist (everyone)."""
    entries = split_users(who)
    if not entries:
        return None
    subs: set[str] = set()
    for entry in entries:
        sub = await store.resolve_user(entry)
        if sub is None:
            raise UnknownUser(f"--only-user {entry}: no such handle in {store.names.handles!r}")
        subs.add(sub)
    return frozenset(subs)
