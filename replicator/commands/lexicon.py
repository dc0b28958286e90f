"""`replicator lexicon`: check lexicon documents and records, and publish the lexicons.

`check` is the replicator's own validation (`replicator.lexicon`), so a schema change or a
hand-made fixture can be checked before it meets a PDS. `publish` puts each lexicon into the
repo of its authority's account as a `com.atproto.lexicon.schema` record (rkey = the NSID),
which is how other services resolve `computer.aesthetic.*` (with a DNS TXT record
`_lexicon.aesthetic.computer` → `did=<that account's DID>`).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import anyio
import click

from replicator.config import BYPASS_ENV, Settings, check_url
from replicator.errors import Rejected, TokenRejected
from replicator.lexicon import (
    LEXICON_DIR,
    SCHEMA_NSID,
    LexiconError,
    lexicon_files,
    load_lexicons,
    schema_record,
    validate_lexicon,
    validate_record,
)
from replicator.logs import redact
from replicator.pds import Pds, XrpcError

SCHEMA_LOGIN = "com.atproto.server.createSession"
# A command, not the sidecar: give up on a PDS that stays unreachable.
PUBLISH_RETRY_TIMEOUT = 60.0

__all__ = ["SCHEMA_NSID", "lexicon"]


class _EnvironmentError(click.ClickException):
    """Nothing could be checked (unreadable file, broken lexicon directory).

    Exit 2, like a usage error, so scripts can tell "the data is invalid" (1) from "the
    check did not run".
    """

    exit_code = 2


@dataclass(frozen=True)
class _Result:
    name: str
    kind: str  # "lexicon", "record" or "unknown"
    ok: bool
    error: str | None = None


@click.group(name="lexicon")
def lexicon() -> None:
    """Check lexicon documents, and records against the lexicons in lexicons/.

    Records go through replicator.lexicon.validate_record, the replicator's own check.
    """


@lexicon.command(name="check")
@click.argument(
    "files",
    nargs=-1,
    metavar="[FILE]...",
    type=click.Path(exists=True, dir_okay=False, readable=True, path_type=Path),
)
@click.option(
    "--lexicons",
    "lexicon_dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help=f"Lexicon directory: checked when no FILE is given, and the schemas records "
    f"are validated against.  [default: {LEXICON_DIR}]",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of lines.")
def check(files: tuple[Path, ...], lexicon_dir: Path | None, as_json: bool) -> None:
    """Validate lexicon documents and records.

    With no FILE, validates every lexicon file under the lexicon directory.

    Each FILE holds JSON: a lexicon document (has "lexicon" and "id"), a record (has
    "$type", validated against the lexicon with that id), or an array of either.

    \b
    Prints one line per document or record:
      ok  <name>
      FAIL <name>: <reason>
    Array items are named <file>[<index>].

    \b
    Exit status: 0 all valid, 1 something invalid, 2 usage or I/O error.

    \b
    Examples:
      replicator lexicon check
      replicator lexicon check mood-record.json
      replicator lexicon check --json records.json
    """
    results = _check_files(files, lexicon_dir) if files else _check_lexicon_dir(lexicon_dir)

    ok = all(r.ok for r in results)
    if as_json:
        click.echo(json.dumps({"ok": ok, "results": [asdict(r) for r in results]}, indent=2))
    else:
        for r in results:
            click.echo(f"ok  {r.name}" if r.ok else f"FAIL {r.name}: {r.error}")
    click.get_current_context().exit(0 if ok else 1)


def _check_lexicon_dir(directory: Path | None) -> list[_Result]:
    try:
        paths = lexicon_files(directory)
    except OSError as exc:
        raise _EnvironmentError(str(exc)) from exc
    if not paths:
        raise _EnvironmentError(f"no lexicon files under {directory or LEXICON_DIR}")

    results: list[_Result] = []
    seen: dict[str, str] = {}
    for path in paths:
        name = _display(path)
        try:
            doc = _read_json(path)
            validate_lexicon(doc)
        except LexiconError as exc:
            results.append(_Result(name, "lexicon", False, str(exc)))
            continue
        # Two files with one id would make the validator keep whichever loads last.
        if doc["id"] in seen:
            error = f"duplicate lexicon id {doc['id']!r} (also in {seen[doc['id']]})"
            results.append(_Result(name, "lexicon", False, error))
            continue
        seen[doc["id"]] = name
        results.append(_Result(name, "lexicon", True))
    return results


def _check_files(files: tuple[Path, ...], lexicon_dir: Path | None) -> list[_Result]:
    results: list[_Result] = []
    records_loaded = False
    for path in files:
        name = _display(path)
        try:
            data = _read_json(path)
        except LexiconError as exc:
            results.append(_Result(name, "unknown", False, str(exc)))
            continue
        if isinstance(data, list):
            items = [(f"{name}[{i}]", item) for i, item in enumerate(data)]
            if not items:
                results.append(_Result(name, "unknown", False, "empty array, nothing to check"))
        else:
            items = [(name, data)]
        for item_name, item in items:
            kind = _kind(item)
            if kind == "record" and not records_loaded:
                _require_lexicons(lexicon_dir)
                records_loaded = True
            results.append(_check_item(item_name, kind, item, lexicon_dir))
    return results


def _kind(item: Any) -> str:
    if isinstance(item, dict) and "lexicon" in item and "id" in item:
        return "lexicon"
    if isinstance(item, dict) and "$type" in item:
        return "record"
    return "unknown"


def _check_item(name: str, kind: str, item: Any, lexicon_dir: Path | None) -> _Result:
    try:
        if kind == "lexicon":
            validate_lexicon(item)
        elif kind == "record":
            nsid = item["$type"]
            if not isinstance(nsid, str):
                raise LexiconError(f"$type: must be a string NSID, got {nsid!r}")
            validate_record(item, nsid, lexicons=lexicon_dir)
        else:
            raise LexiconError(
                'neither a lexicon document (needs "lexicon" and "id") nor a record (needs "$type")'
            )
    except LexiconError as exc:
        return _Result(name, kind, False, str(exc))
    return _Result(name, kind, True)


def _require_lexicons(lexicon_dir: Path | None) -> None:
    """Records can only be judged against a sound lexicon set; a broken one is not the
    record's fault, so it stops the run (exit 2) instead of failing every record."""
    try:
        load_lexicons(lexicon_dir)
    except (OSError, LexiconError) as exc:
        raise _EnvironmentError(f"cannot load lexicons: {exc}") from exc


def _read_json(path: Path) -> Any:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise _EnvironmentError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LexiconError(f"invalid JSON: {exc}") from exc


def _display(path: Path) -> str:
    """Paths relative to the working directory where possible, to keep lines short."""
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


# -- publish ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Published:
    nsid: str
    action: str  # "created", "updated", "unchanged", or with --dry-run "would create"...
    uri: str
    dns: str  # the TXT record that makes the NSID's authority resolve to this repo


@lexicon.command(name="publish")
@click.option(
    "--pds-url",
    envvar="PDS_URL",
    show_envvar=True,
    required=True,
    help="The PDS hosting the authority's account.",
)
@click.option(
    "--identifier",
    envvar="REPLICATOR_LEXICON_IDENTIFIER",
    show_envvar=True,
    required=True,
    metavar="HANDLE|DID",
    help="The lexicon authority's account (for computer.aesthetic.*: the account "
    "that _lexicon.aesthetic.computer points to).",
)
@click.option(
    "--password",
    envvar="REPLICATOR_LEXICON_PASSWORD",
    show_envvar=True,
    required=True,
    help="Its password (prefer the variable: flags show in `ps`).",
)
@click.option(
    "--lexicons",
    "lexicon_dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help=f"Lexicon directory  [default: {LEXICON_DIR}]",
)
@click.option("--dry-run", is_flag=True, help="Say what would change; write nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of lines.")
def publish(
    pds_url: str,
    identifier: str,
    password: str,
    lexicon_dir: Path | None,
    dry_run: bool,
    as_json: bool,
) -> None:  # fmt: skip
    """Publish every lexicon as a com.atproto.lexicon.schema record (rkey = its NSID).

    Idempotent: a record that already holds the same document is left alone, so running it
    again changes nothing. Lexicons are validated first; an invalid one publishes nothing.

    \b
    Exit status: 0 published or unchanged, 1 the PDS refused a write, 2 usage, invalid
    lexicons, or the login failed.
    """
    check_url("PDS_URL (--pds-url)", pds_url)
    try:
        docs = load_lexicons(lexicon_dir)
    except (OSError, LexiconError) as exc:
        raise _EnvironmentError(f"cannot load lexicons: {exc}") from exc
    try:
        results = anyio.run(_publish_cli, pds_url, identifier, password, docs, dry_run)
    except _LoginFailed as exc:
        raise _EnvironmentError(str(exc)) from None
    except XrpcError as exc:
        click.echo(f"publish failed: {redact(str(exc))}", err=True)
        click.get_current_context().exit(1)
    if as_json:
        click.echo(json.dumps({"results": [asdict(r) for r in results]}, indent=2))
    else:
        for r in results:
            click.echo(f"{r.action:<14} {r.nsid}  {r.uri}")
        for dns in sorted({r.dns for r in results}):
            click.echo(f"resolution: {dns}")


class _LoginFailed(Exception):
    pass


async def _publish_cli(
    pds_url: str, identifier: str, password: str, docs: list[dict[str, Any]], dry_run: bool
) -> list[Published]:
    pds = Pds(pds_url, timeout=Settings.http_timeout, retry_timeout=PUBLISH_RETRY_TIMEOUT,
              bypass_key=os.environ.get(BYPASS_ENV) or None)  # fmt: skip
    try:
        return await publish_lexicons(pds, identifier, password, docs, dry_run=dry_run)
    finally:
        await pds.aclose()


async def publish_lexicons(
    pds: Pds,
    identifier: str,
    password: str,
    docs: list[dict[str, Any]],
    *,
    dry_run: bool = False,
) -> list[Published]:
    """Log in once, then for each lexicon: read the record, put it only if it differs."""
    try:
        session = await pds.retrying(
            lambda: pds.xrpc(SCHEMA_LOGIN, body={"identifier": identifier, "password": password})
        )
    except (TokenRejected, Rejected) as exc:
        raise _LoginFailed(f"login as {identifier} refused: {exc.error or exc.status}") from None
    did, token = str(session["did"]), str(session["accessJwt"])
    results = []
    for doc in sorted(docs, key=lambda d: str(d["id"])):
        nsid = str(doc["id"])
        record = schema_record(doc)
        current = await pds.get_record(did, SCHEMA_NSID, nsid)
        uri = f"at://{did}/{SCHEMA_NSID}/{nsid}"
        if current == record:
            action = "unchanged"
        else:
            action = "created" if current is None else "updated"
            if dry_run:
                action = f"would {action.removesuffix('d')}"
            else:
                body = {"repo": did, "collection": SCHEMA_NSID, "rkey": nsid, "record": record}
                await pds.retrying(
                    lambda b=body: pds.xrpc("com.atproto.repo.putRecord", body=b, token=token)  # type: ignore[misc]
                )
        results.append(Published(nsid, action, uri, _dns_record(nsid, did)))
    return results


def _dns_record(nsid: str, did: str) -> str:
    """NSID `computer.aesthetic.mood` → authority `aesthetic.computer` → its TXT record."""
    authority = ".".join(reversed(nsid.split(".")[:-1]))
    return f'_lexicon.{authority} TXT "did={did}"'
