"""What ships: the wheel (and so the production image) is the `replicator` package alone, with
its lexicons; the working copy's `replicator_dev` (the local stack, the bench) reaches the CLI
through the `replicator.commands` entry points, and where it is not installed its commands are
absent and say so."""

from __future__ import annotations

import fnmatch
import os
import subprocess
import sys
import tomllib
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from replicator.cli import main

ROOT = Path(__file__).resolve().parent.parent
DEV_COMMANDS = {"dev", "setup", "bench"}
# The CLI where `replicator_dev` cannot be imported, as in the production image.
WITHOUT_DEV = (
    "import sys; sys.modules['replicator_dev'] = None; from replicator.cli import main; main()"
)


def _setuptools() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_the_wheel_is_the_replicator_package_alone() -> None:
    config = _setuptools()
    assert config["package-dir"] == {"": "."}  # an editable install puts the root on sys.path
    include = config["packages"]["find"]["include"]
    every = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for init in ROOT.rglob("__init__.py")
        if not {"node_modules", "build", ".venv"} & set(init.relative_to(ROOT).parts)
    }  # what setuptools' find_packages sees (setuptools may not be in the venv)
    packages = {p for p in every if any(fnmatch.fnmatchcase(p, pattern) for pattern in include)}
    assert "replicator_dev" in every and "replicator_dev.devstack" in every
    assert "replicator" in packages and "replicator.commands" in packages
    assert all(p == "replicator" or p.startswith("replicator.") for p in packages), packages


def test_the_lexicons_are_package_data() -> None:
    patterns = _setuptools()["package-data"]["replicator"]
    shipped = {p for pattern in patterns for p in (ROOT / "replicator").glob(pattern)}
    on_disk = set((ROOT / "replicator" / "lexicons").rglob("*.json"))
    assert on_disk and shipped == on_disk
    assert (ROOT / "lexicons").resolve() == (ROOT / "replicator" / "lexicons").resolve()


def test_the_working_copy_adds_its_commands() -> None:
    declared = {ep.name for ep in entry_points(group="replicator.commands")}
    assert declared == DEV_COMMANDS
    visible = {name for name, command in main.commands.items() if not command.hidden}
    assert visible >= DEV_COMMANDS


def test_the_installed_console_script_offers_them_from_anywhere(tmp_path: Path) -> None:
    """`pip install -e '.[dev]'`: the console script finds `replicator_dev` from any
    directory (the editable install's .pth of the repository root), not only from here."""
    script = Path(sys.executable).parent / "replicator"
    if not script.exists():
        pytest.skip(f"no console script next to {sys.executable}")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(
        [script, "--help"], cwd=tmp_path, env=env, capture_output=True, text=True, check=True
    ).stdout
    listed = {line.split()[0] for line in out.splitlines() if line.startswith("  ")}
    assert listed >= DEV_COMMANDS


def _without_dev(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "REPLICATOR_LOG_FORMAT": "text"}
    return subprocess.run(
        [sys.executable, "-c", WITHOUT_DEV, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_without_the_working_copy_they_are_absent_and_say_so() -> None:
    """As in the production image: `replicator_dev` is not importable."""
    listed = _without_dev("--help")
    assert listed.returncode == 0, listed.stderr
    assert "run" in listed.stdout
    assert not any(f"  {name} " in listed.stdout for name in DEV_COMMANDS)

    asked = _without_dev("dev", "--no-run")
    assert asked.returncode == 2
    assert "not in this installation: a development command" in asked.stderr
    assert len(asked.stderr.strip().splitlines()) == 1
