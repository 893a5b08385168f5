"""The alerts of ``deploy/k8s/base/prometheusrule.yaml`` fire when they should.

``promtool test rules`` runs ``deploy/k8s/alerts_test.yaml`` (series for every alert, the
cases that used to miss an event after a restart among them) against the rule groups of the
PrometheusRule, and ``promtool check rules`` checks every expression and annotation
template. promtool comes with Debian's ``prometheus`` package (``.ci/run`` installs it);
without it those two tests skip, saying so. Without promtool this module still checks that
every alert has a firing case, a runbook section and series that the code exports.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from libs.common import metrics

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
RULES = K8S / "base" / "prometheusrule.yaml"
ALERT_TESTS = K8S / "alerts_test.yaml"
RUNBOOK = K8S / "RUNBOOK.md"
#: the name alerts_test.yaml gives the rule file it loads (rule_files).
RULE_FILE = "tayori-rules.yaml"
#: labels Prometheus adds to every scraped series (and `up`'s own).
TARGET_LABELS = {"namespace", "pod", "job", "instance", "service", "container", "endpoint"}
RUNBOOK_URL = re.compile(r"^https://\S+/deploy/k8s/RUNBOOK\.md#([a-z0-9-]+)$")
NO_PROMTOOL = (
    "PROMTOOL NOT INSTALLED: THE ALERT RULES ARE NOT TESTED. Install Debian's `prometheus` "
    "package (apt-get install --no-install-recommends prometheus; .ci/run does) and run again."
)


def _spec() -> dict[str, Any]:
    (doc,) = [d for d in yaml.safe_load_all(RULES.read_text()) if d]
    assert doc["kind"] == "PrometheusRule"
    spec: dict[str, Any] = doc["spec"]
    return spec


def _alerts() -> dict[str, dict[str, Any]]:
    return {
        rule["alert"]: rule
        for group in _spec()["groups"]
        for rule in group["rules"]
        if "alert" in rule
    }


def _tests() -> list[dict[str, Any]]:
    tests: list[dict[str, Any]] = yaml.safe_load(ALERT_TESTS.read_text())["tests"]
    return tests


def _promtool() -> str:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip(NO_PROMTOOL)
    return promtool


def _run(*args: str, cwd: Path) -> None:
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{' '.join(args)}:\n{done.stdout}\n{done.stderr}"


def test_promtool_accepts_every_rule_and_template(tmp_path: Path) -> None:
    promtool = _promtool()
    (tmp_path / RULE_FILE).write_text(yaml.safe_dump(_spec()))
    _run(promtool, "check", "rules", RULE_FILE, cwd=tmp_path)


def test_alert_rules_pass_their_promtool_tests(tmp_path: Path) -> None:
    """The expressions, ``for`` and labels; annotations are left out (their templates are
    checked above), so a reworded summary does not break a test of when an alert fires."""
    promtool = _promtool()
    spec = _spec()
    for group in spec["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (tmp_path / RULE_FILE).write_text(yaml.safe_dump(spec))
    shutil.copy(ALERT_TESTS, tmp_path / ALERT_TESTS.name)
    _run(promtool, "test", "rules", ALERT_TESTS.name, cwd=tmp_path)


def test_every_alert_has_a_case_that_fires() -> None:
    assert yaml.safe_load(ALERT_TESTS.read_text())["rule_files"] == [RULE_FILE]
    firing = {
        check["alertname"]
        for test in _tests()
        for check in test.get("alert_rule_test", [])
        if check.get("exp_alerts")
    }
    assert set(_alerts()) <= firing, f"no firing case for {sorted(set(_alerts()) - firing)}"
    assert firing <= set(_alerts()), f"cases for unknown alerts {sorted(firing - set(_alerts()))}"


def test_alert_tests_use_series_the_code_exports() -> None:
    """Each input series is a sample the code can export, with its labels (plus the ones
    Prometheus adds): a renamed metric or label breaks this, not only production."""
    samples: dict[str, set[str]] = {"up": set()}
    for family in metrics.every():
        for metric in family.collect():
            names = {
                "counter": [metric.name + "_total"],
                "gauge": [metric.name],
                "histogram": [metric.name + s for s in ("_bucket", "_sum", "_count")],
            }[metric.type]
            for name in names:
                samples[name] = set(family._labelnames) | ({"le"} if "_bucket" in name else set())
    for test in _tests():
        for series in test["input_series"]:
            match = re.fullmatch(r"(\w+)\{(.*)\}", series["series"])
            assert match, series["series"]
            name, labels = match.group(1), set(re.findall(r'(\w+)="', match.group(2)))
            assert name in samples, f"{test['name']}: no metric {name} in libs/common/metrics.py"
            unknown = labels - samples[name] - TARGET_LABELS
            assert not unknown, f"{test['name']}: {name} has no label {sorted(unknown)}"


def test_every_alert_links_its_runbook_section() -> None:
    runbook = RUNBOOK.read_text()
    sections = {
        heading.strip().lower(): body
        for heading, body in re.findall(r"^## (\S+)\n(.*?)(?=^## |\Z)", runbook, re.M | re.S)
    }
    for name, rule in _alerts().items():
        url = rule["annotations"].get("runbook_url", "")
        match = RUNBOOK_URL.match(url)
        assert match, f"{name}: runbook_url {url!r} is not a link to a RUNBOOK.md section"
        assert match.group(1) == name.lower(), f"{name}: runbook_url points at {match.group(1)}"
        body = sections.get(name.lower())
        assert body is not None, f"RUNBOOK.md has no section '## {name}'"
        for part in ("What it means", "What to check", "What to do"):
            assert f"**{part}**" in body, f"RUNBOOK.md {name}: no '{part}'"
    assert set(sections) == {n.lower() for n in _alerts()}, "RUNBOOK.md has sections of no alert"


def test_alerts_watch_lag_commits_and_saturation() -> None:
    exprs = "\n".join(rule["expr"] for rule in _alerts().values())
    for metric in (
        "tayori_consumer_lag_records",
        "tayori_consumer_seconds_since_commit",
        "tayori_db_pool_connections",
    ):
        assert metric in exprs, f"no alert on {metric}"
    lag = _alerts()["TayoriConsumerLagGrowing"]["expr"]
    assert re.search(r"by \([^)]*\bgroup\b", lag), "the lag alert is not one per consumer group"
