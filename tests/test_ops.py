"""The operations files: dashboard, alert rules, Prometheus config, compose file, Dockerfile.

No Docker engine runs here, so what can be checked without one is: every file parses, every
metric and label they name is one the code exports, every file they reference exists, the
alert rules pass `promtool` (check and unit tests) and the compose file passes
`docker-compose config`, where those tools are installed (skipped with the reason otherwise).
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from replicator import metrics

ROOT = Path(__file__).resolve().parent.parent
OPS = ROOT / "ops"
DASHBOARD = OPS / "grafana" / "dashboard.json"
ALERTS = OPS / "prometheus" / "alerts.yml"
PROMETHEUS = OPS / "prometheus" / "prometheus.yml"
COMPOSE = ROOT / "compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"
DATASOURCE = OPS / "grafana" / "provisioning" / "datasources" / "prometheus.yml"

# What the issue asks the alerts to cover → the alert that does.
REQUIRED_ALERTS = {
    "sync failure rate > 5%": "ReplicatorSyncFailureRate",
    "lag > 60 s": "ReplicatorLagHigh",
    "checkpoint stale": "ReplicatorCheckpointStale",
    "dead letters growing": "ReplicatorDeadLettersGrowing",
    "PDS 5xx rate": "ReplicatorPdsErrors",
    "replicator down": "ReplicatorDown",
    "an erased user's records still public": "ReplicatorErasureBlocked",
}
PROMETHEUS_OWN = {"up": {"job", "instance"}}  # made by Prometheus, not by the code
TARGET_LABELS = {"job", "instance"}
METRIC_RE = re.compile(r"\b((?:replicator|process)_[a-z0-9_]+|up)\b(\{[^}]*\})?")
GROUPING_RE = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")


def exported() -> dict[str, set[str]]:
    """Every sample name the registry exposes → its label names. From the metric families,
    so a labelled metric counts even before its first observation."""
    labels = {
        m._name: set(m._labelnames)
        for m in vars(metrics).values()
        if isinstance(m, MetricWrapperBase)
    }
    labels["replicator"] = {"version", "mode"}  # the Info metric's values
    suffixes = {
        "counter": ["_total", "_created"],
        "histogram": ["_bucket", "_count", "_sum", "_created"],
        "info": ["_info"],
    }
    out: dict[str, set[str]] = {}
    for family in metrics.REGISTRY.collect():
        names = labels.get(family.name, set())
        for suffix in suffixes.get(family.type, [""]):
            out[family.name + suffix] = names | ({"le"} if suffix == "_bucket" else set())
    return out


def dashboard_exprs() -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    exprs = []
    for panel in doc["panels"]:
        exprs += [t["expr"] for t in panel.get("targets", [])]
        for inner in panel.get("panels", []):
            exprs += [t["expr"] for t in inner.get("targets", [])]
    return exprs


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def check_expr(expr: str, known: dict[str, set[str]]) -> list[str]:
    """Problems in one PromQL expression: unknown metrics, unknown labels."""
    problems = []
    used: set[str] = set()
    for name, matchers in METRIC_RE.findall(expr):
        allowed = known.get(name)
        if allowed is None:
            problems.append(f"{name!r} is not exported")
            continue
        used |= allowed
        for matcher in filter(None, (m.strip() for m in matchers.strip("{}").split(","))):
            label = re.split(r"=~|!~|!=|=", matcher, maxsplit=1)[0].strip()
            if label not in allowed | TARGET_LABELS:
                problems.append(f"{name!r} has no label {label!r}")
    for group in GROUPING_RE.findall(expr):
        for label in filter(None, (g.strip() for g in group.split(","))):
            if label not in used | TARGET_LABELS:
                problems.append(f"grouping by {label!r}, which no metric here has")
    return [f"{p} in: {expr}" for p in problems]


def test_dashboard_and_alerts_name_only_exported_metrics_and_labels() -> None:
    known = {**exported(), **PROMETHEUS_OWN}
    exprs = dashboard_exprs() + [str(r["expr"]) for r in alert_rules()]
    assert len(exprs) > 20
    problems = [p for expr in exprs for p in check_expr(expr, known)]
    assert problems == []
    # And the check itself catches a typo and a wrong label.
    assert check_expr("rate(replicator_event_total[5m])", known)
    assert check_expr('replicator_events_total{status="x"}', known)
    assert check_expr("sum by (did) (replicator_events_total)", known)


def test_dashboard_is_a_grafana_dashboard_on_a_provisioned_datasource() -> None:
    doc = json.loads(DASHBOARD.read_text())
    assert doc["uid"] and doc["title"] and doc["schemaVersion"] >= 36
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids))
    for panel in doc["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "${datasource}"
    variables = {v["name"]: v for v in doc["templating"]["list"]}
    assert variables["datasource"]["current"]["value"] == "prometheus"
    provisioned = yaml.safe_load(DATASOURCE.read_text())
    assert provisioned["datasources"][0]["uid"] == "prometheus"


def test_alert_rules_cover_the_issue_and_link_the_runbook() -> None:
    rules = {r["alert"]: r for r in alert_rules()}
    assert set(REQUIRED_ALERTS.values()) <= set(rules)
    runbook = (ROOT / "docs" / "runbook.md").read_text()
    anchors = {
        re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-")
        for h in re.findall(r"^#+ (.+)$", runbook, re.M)
    }
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in ("critical", "warning"), name
        assert rule["annotations"]["summary"], name
        link = rule["annotations"]["runbook"]
        path, _, anchor = link.partition("#")
        assert (ROOT / path).exists(), link
        assert anchor in anchors, f"{name}: no heading for #{anchor} in docs/runbook.md"
    assert "0.05" in rules["ReplicatorSyncFailureRate"]["expr"]
    assert "> 60" in rules["ReplicatorLagHigh"]["expr"]


def test_prometheus_config_scrapes_the_replicator_and_loads_the_rules() -> None:
    config = yaml.safe_load(PROMETHEUS.read_text())
    for rule_file in config["rule_files"]:
        assert (PROMETHEUS.parent / rule_file).exists()
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    (target,) = jobs["replicator"]["static_configs"][0]["targets"]
    compose = yaml.safe_load(COMPOSE.read_text())
    host, port = target.split(":")
    assert host in compose["services"]
    addr = compose["services"]["replicator"]["environment"]["REPLICATOR_HTTP_ADDR"]
    assert addr == f"0.0.0.0:{port}"


promtool = shutil.which("promtool")


@pytest.mark.skipif(promtool is None, reason="promtool not installed (apt-get install prometheus)")
@pytest.mark.parametrize(
    "args",
    [
        "check rules alerts.yml",
        "test rules alerts.test.yml",
        "check config prometheus.yml",
    ],
)
def test_promtool_accepts_the_rules_and_their_unit_tests(args: str) -> None:
    assert promtool is not None
    out = subprocess.run(
        [promtool, *shlex.split(args)],
        cwd=PROMETHEUS.parent,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def compose_doc() -> dict[str, Any]:
    return dict(yaml.safe_load(COMPOSE.read_text()))


def dockerfile_stages() -> dict[str, list[tuple[str, str]]]:
    """Stage name → its instructions (continuation lines joined)."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    stages: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            current = []
            name = rest.split(" AS ")[-1].strip() if " AS " in rest else rest
            stages[name] = current
        current.append((keyword, rest.strip()))
    return stages


def test_compose_has_the_stack_and_references_files_that_exist() -> None:
    doc = compose_doc()
    services = doc["services"]
    assert {"mongo", "pds", "replicator", "prometheus", "grafana"} <= set(services)
    for name in ("prometheus", "grafana"):
        assert services[name]["profiles"] == ["monitoring"]
    for name in ("mongo", "pds", "replicator"):
        assert "profiles" not in services[name]
    # A single-node replica set, initiated automatically, and the replicator uses it.
    mongo = services["mongo"]
    replset = mongo["command"][mongo["command"].index("--replSet") + 1]
    assert "rs.initiate" in " ".join(mongo["healthcheck"]["test"])
    env = services["replicator"]["environment"]
    assert f"replicaSet={replset}" in env["MONGODB_CONNECTION_STRING"]
    assert env["PDS_URL"].startswith("http://pds:")
    assert services["replicator"]["depends_on"]["mongo"]["condition"] == "service_healthy"
    # Every bind mount and build target exists.
    stages = dockerfile_stages()
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (ROOT / source).exists(), f"{name}: {source} does not exist"
        if "build" in service:
            assert (ROOT / service["build"]["context"] / "Dockerfile").exists()
            assert service["build"]["target"] in stages, name
    # Grafana finds the dashboard where its provisioning looks.
    provider = yaml.safe_load((OPS / "grafana/provisioning/dashboards/replicator.yml").read_text())
    path = provider["providers"][0]["options"]["path"]
    mounts = [v.split(":")[1] for v in services["grafana"]["volumes"]]
    assert any(m.startswith(path + "/") and m.endswith(".json") for m in mounts)
    datasource = yaml.safe_load(DATASOURCE.read_text())
    assert "//prometheus:9090" in datasource["datasources"][0]["url"]


compose_tool = shutil.which("docker-compose")


@pytest.mark.skipif(compose_tool is None, reason="docker-compose not installed")
def test_docker_compose_accepts_the_file() -> None:
    assert compose_tool is not None
    out = subprocess.run(
        [compose_tool, "-f", str(COMPOSE), "--profile", "monitoring", "config", "-q"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_dockerfile_is_slim_non_root_and_runs_the_sidecar() -> None:
    stages = dockerfile_stages()
    runtime = dict(stages["runtime"])
    assert "slim" in open_arg("PYTHON_IMAGE")
    assert runtime["USER"] not in ("root", "0")
    assert json.loads(runtime["ENTRYPOINT"]) == ["replicator"]
    assert json.loads(runtime["CMD"]) == ["run"]
    assert runtime["EXPOSE"] == "9464"
    assert "REPLICATOR_HTTP_ADDR=0.0.0.0:9464" in runtime["ENV"]
    assert "/healthz" in runtime["HEALTHCHECK"]
    assert dict(stages["devpds"])["USER"] not in ("root", "0")
    # What the build copies from the context exists and is not ignored.
    ignored = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".git", ".venv", ".state", "replicator_dev/devstack/pds/node_modules"} <= ignored
    for stage in stages.values():
        for keyword, rest in stage:
            if keyword == "COPY" and not rest.startswith("--from"):
                *sources, _dest = rest.split()
                for source in sources:
                    assert (ROOT / source).exists(), source
                    assert source not in ignored, source


def open_arg(name: str) -> str:
    match = re.search(rf"^ARG {name}=(\S+)$", DOCKERFILE.read_text(), re.M)
    assert match, name
    return match.group(1)


def test_readme_keeps_its_commands_first_and_has_an_operating_section() -> None:
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```sh\n(.*?)```", readme, re.S)
    assert blocks[0].strip().startswith("python3 -m venv .venv")
    assert blocks[1].strip() == ".venv/bin/pytest"
    assert "\n## Operating it\n" in readme
