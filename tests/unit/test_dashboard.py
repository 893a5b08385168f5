"""The Grafana dashboard shipped in deploy/k8s (ConfigMap tayori-dashboards).

Valid JSON that Grafana's sidecar can load; every panel has a title and a Prometheus data
source; every PromQL expression parses into metric names and labels that the code exports
(:mod:`libs.common.metrics`); and the dashboard covers what issue 19 asks an operator to see.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.unit.test_deploy import TARGET_LABELS, _exported_series

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "k8s" / "base" / "dashboards"
DASHBOARD_FILE = DASHBOARD / "tayori.json"

#: PromQL words that are not metric names: functions, aggregations, keywords.
PROMQL_WORDS = {
    "sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk", "bottomk", "quantile",
    "count_values", "group", "by", "without", "on", "ignoring", "group_left", "group_right",
    "and", "or", "unless", "offset", "bool", "rate", "irate", "increase", "delta", "idelta",
    "histogram_quantile", "abs", "clamp_min", "clamp_max", "time", "vector", "scalar",
    "absent", "absent_over_time", "max_over_time", "min_over_time", "avg_over_time",
    "sum_over_time", "last_over_time", "label_replace", "label_join", "sort", "sort_desc",
    "round", "ceil", "floor", "inf", "nan", "resets", "changes", "deriv", "predict_linear",
    "timestamp",
}  # fmt: skip


def _series() -> dict[str, set[str]]:
    return _exported_series()


def _dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD_FILE.read_text())


def _panels() -> list[dict[str, Any]]:
    found = []
    for panel in _dashboard()["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))  # panels inside a collapsed row
    return found


def _queries() -> list[tuple[str, str]]:
    return [
        (panel["title"], target["expr"])
        for panel in _panels()
        if panel["type"] != "row"
        for target in panel["targets"]
    ]


def parse_promql(expr: str) -> tuple[set[str], dict[str, set[str]], set[str]]:
    """(metric names, labels matched per metric, labels grouped on) of a PromQL expression.

    Not a full parser: enough for the expressions a dashboard holds. Grafana variables
    ($namespace, ${datasource}) stand in quoted values or ranges and are removed with them.
    """
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # quoted strings may hold anything
    text = re.sub(r"\[[^\]]*\]", "", text)  # range and subquery durations
    matchers: dict[str, set[str]] = {}
    for name, body in re.findall(r"([a-zA-Z_:][\w:]*)?\s*\{([^}]*)\}", text):
        labels = set(re.findall(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)", body))
        matchers.setdefault(name, set()).update(labels)
    text = re.sub(r"\{[^}]*\}", " ", text)
    grouped: set[str] = set()
    for clause in re.findall(
        r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", text
    ):
        grouped.update(part.strip() for part in clause.split(",") if part.strip())
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    words = set(re.findall(r"(?<![\w.$])([a-zA-Z_:][\w:]*)(?![\w(])(?!\s*\()", text))
    names = {word for word in words if word not in PROMQL_WORDS}
    assert "" not in matchers, f"a selector without a metric name in {expr!r}"
    return names, matchers, grouped


def test_parse_promql_finds_names_and_labels() -> None:
    names, matchers, grouped = parse_promql(
        "histogram_quantile(0.95, sum by (le, route) (rate(tayori_http_request_seconds_bucket"
        '{namespace=~"$namespace", route!="/x{y}"}[5m]))) / on (route) up'
    )
    assert names == {"tayori_http_request_seconds_bucket", "up"}
    assert matchers == {"tayori_http_request_seconds_bucket": {"namespace", "route"}}
    assert grouped == {"le", "route"}


def test_dashboard_is_valid_json_for_the_sidecar() -> None:
    dashboard = _dashboard()
    assert dashboard["uid"] and dashboard["title"].strip()
    assert isinstance(dashboard["schemaVersion"], int)
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [panel["id"] for panel in _panels()]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    # Japanese first for people-facing labels, English beside.
    assert re.search(r"[\u3040-\u30ff\u4e00-\u9fff].* / [A-Za-z]", dashboard["title"])


@pytest.mark.parametrize(
    "panel", [p for p in _panels() if p["type"] != "row"], ids=lambda p: p["title"]
)
def test_every_panel_has_a_title_a_datasource_and_queries(panel: dict[str, Any]) -> None:
    assert re.search(r"[\u3040-\u30ff\u4e00-\u9fff].* / [A-Za-z]", panel["title"]), panel["title"]
    assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
    assert panel["targets"], "a panel without a query"
    ref_ids = [target["refId"] for target in panel["targets"]]
    assert len(ref_ids) == len(set(ref_ids))
    for target in panel["targets"]:
        assert target["datasource"] == panel["datasource"]
        assert target["expr"].strip()
    grid = panel["gridPos"]
    assert grid["x"] + grid["w"] <= 24 and grid["h"] > 0


@pytest.mark.parametrize("query", _queries(), ids=lambda q: q[0])
def test_queries_name_only_metrics_and_labels_that_exist(query: tuple[str, str]) -> None:
    title, expr = query
    series = _series()
    names, matchers, grouped = parse_promql(expr)
    assert names, f"{title}: no metric in {expr!r}"
    for name in names:
        assert name in series, f"{title}: {name} is not a metric in libs/common/metrics.py"
    for name, labels in matchers.items():
        unknown = labels - series[name] - TARGET_LABELS
        assert not unknown, f"{title}: {name} has no label {sorted(unknown)}"
    available = TARGET_LABELS.union(*(series[name] for name in names))
    assert grouped <= available, f"{title}: grouped on {sorted(grouped - available)}"
    # Every query follows the namespace chosen at the top of the dashboard.
    assert all('namespace=~"$namespace"' in m for m in re.findall(r"\{[^}]*\}", expr)), title


def test_dashboard_covers_what_operators_watch() -> None:
    exprs = "\n".join(expr for _, expr in _queries())
    for metric, what in {
        "tayori_sender_sends_total": "campaign throughput and errors",
        "tayori_bounces_total": "bounces and complaints",
        "tayori_unsubscribe_requests_total": "unsubscribes",
        "tayori_consumer_lag_records": "consumer lag",
        "tayori_outbox_backlog": "outbox backlog",
        "tayori_messages_dead_lettered_total": "dead letters",
        "tayori_http_request_seconds_bucket": "HTTP latency",
        "tayori_db_pool_connections": "database pool saturation",
        "tayori_deliverability_domain_hour": "delivered and deferred per domain",
        "tayori_deliverability_domain_complaint_rate": "complaint rate per domain",
        "tayori_deliverability_domain_policy": "policy state per domain",
        "tayori_sender_domain_waits_total": "the sender's waits per domain",
        "tayori_sender_domain_throttles_total": "the sender's throttles per domain",
        "tayori_sender_domain_gave_up_total": "the sender's give-ups per domain",
        "tayori_deliverability_campaign_guards_total": "campaign complaint guards",
    }.items():
        assert metric in exprs, f"no panel on {what} ({metric})"
    assert re.search(
        r"by \([^)]*\broute\b[^)]*\) \(rate\(tayori_http_request_seconds_bucket", exprs
    )
    assert 'classification="spam"' in exprs, "no complaints panel"


def test_queries_parse_as_promql(tmp_path: Path) -> None:
    """promtool parses every query (as recording rules), with $namespace filled in."""
    if shutil.which("promtool") is None:
        pytest.skip(
            "!!! promtool is not on PATH (Debian package prometheus): the dashboard's PromQL "
            "is NOT parsed. apt-get install prometheus to run this test. !!!"
        )
    rules = [
        {"record": f"tayori:dashboard_query_{i}", "expr": expr.replace("$namespace", "tayori")}
        for i, (_, expr) in enumerate(_queries())
    ]
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    done = subprocess.run(
        ["promtool", "check", "rules", str(path)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(rules)} rules found" in done.stdout


def test_the_complaint_rate_panel_draws_the_bulk_sender_limit() -> None:
    """0.3%: the line past which the large providers throttle or junk a bulk sender, and
    the deliverability service pauses the domain (DELIVERABILITY_COMPLAINT_RATE)."""
    (panel,) = [
        p
        for p in _panels()
        if p["type"] != "row"
        and any("tayori_deliverability_domain_complaint_rate" in t["expr"] for t in p["targets"])
    ]
    defaults = panel["fieldConfig"]["defaults"]
    assert defaults["unit"] == "percentunit"
    assert defaults["custom"]["thresholdsStyle"]["mode"] == "line"
    assert 0.003 in [step["value"] for step in defaults["thresholds"]["steps"]]
