"""Every link in README.md and docs/*.md leads to something in this repository.

A reader of a fresh clone (or of the repository on GitHub) must never land on a missing file,
a missing heading, or a machine-local path; and the README, the first page anyone reads,
links only inside the repository. And the deploy guide's manifests agree with the process.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from replicator.config import Settings

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Inline links and images, `[text](target)`; code spans and fenced blocks are dropped first.
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
REFERENCE = re.compile(r"^\s*\[[^\]]+\]:\s*(\S+)", re.MULTILINE)
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)  # http:, https:, mailto:, file:


def _strip_fences(text: str) -> str:
    return re.sub(r"^```.*?^```", "", text, flags=re.DOTALL | re.MULTILINE)


def _prose(text: str) -> str:
    return re.sub(r"`[^`\n]*`", "", _strip_fences(text))


def links(page: Path) -> list[str]:
    prose = _prose(page.read_text())
    return LINK.findall(prose) + REFERENCE.findall(prose)


def anchors(page: Path) -> set[str]:
    """GitHub's heading ids: lower case, punctuation dropped, spaces to hyphens."""
    out = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*$", _strip_fences(page.read_text()), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        out.add(slug)
    return out


def test_the_pages_have_links_to_check() -> None:
    assert (ROOT / "docs/deploy.md") in PAGES
    assert "docs/deploy.md" in links(ROOT / "README.md")


def test_the_checker_sees_what_it_must() -> None:
    page = 'See [a](x.md), ![b](img/y.png "t"), `[not](code.md)`, [c](https://e.org/z).\n'
    page += "```\n[fenced](f.md)\n```\n[ref]: ../r.md\n"
    prose = _prose(page)
    assert LINK.findall(prose) + REFERENCE.findall(prose) == [
        "x.md", "img/y.png", "https://e.org/z", "../r.md",
    ]  # fmt: skip
    assert {"the-moods-collection-dropped-or-renamed-exit-4"} <= anchors(ROOT / "docs/runbook.md")


def test_no_readme_link_leaves_the_repository() -> None:
    outside = [t for t in links(ROOT / "README.md") if EXTERNAL.match(t) or t.startswith("/")]
    assert outside == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page: Path) -> None:
    broken = []
    for target in links(page):
        if EXTERNAL.match(target):
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.is_relative_to(ROOT) or not resolved.exists():
            broken.append(f"{target}: no such file in the repository")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target}: no heading #{anchor} in {resolved.relative_to(ROOT)}")
    assert broken == []


def test_the_deploy_guides_manifests_match_the_process() -> None:
    """The Kubernetes Deployment in docs/deploy.md: probes on the endpoints `run` serves, and
    time enough for a SIGTERM (the batch abandoned after `shutdown_grace`, then at most
    `shutdown_grace` + 5 s more to close: `cli._exit_within`)."""
    text = (ROOT / "docs/deploy.md").read_text()
    found = re.findall(r"^```yaml\n(.*?)^```", text, re.S | re.M)
    blocks = [doc for block in found for doc in yaml.safe_load_all(block)]
    (deployment,) = [b for b in blocks if b.get("kind") == "Deployment"]
    secret = deployment["spec"]["template"]["spec"]["containers"][0]["envFrom"]
    (job,) = [b for b in blocks if b.get("kind") == "Job"]
    (cron,) = [b for b in blocks if b.get("kind") == "CronJob"]
    cron_pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    for pod, command in ((job["spec"]["template"]["spec"], "backfill"), (cron_pod, "audit")):
        (one,) = pod["containers"]
        assert one["args"][0] == command and one["envFrom"] == secret
        assert pod["restartPolicy"] == "Never"  # exit 1 is a finding: not restarted in place
    spec = deployment["spec"]
    assert spec["strategy"]["type"] == "Recreate" and spec["replicas"] == 1
    pod = spec["template"]["spec"]
    abandon = Settings(mongodb_uri="mongodb://x").shutdown_grace  # then the hard-exit timer:
    closing = abandon + 5.0  # `cli._exit_within(settings.shutdown_grace + 5.0, ...)`
    assert pod["terminationGracePeriodSeconds"] > abandon + closing
    (container,) = pod["containers"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["ports"][0]["containerPort"] == int(Settings.http_addr.rsplit(":", 1)[1])
    (compose,) = [b for b in blocks if "services" in b]
    assert compose["services"]["replicator"]["stop_grace_period"] == "30s"
