"""Every metric family has one owner, and each service exports only the common families and
its own (libs/common/metrics.py: COMMON, OWNED; tests/integration/test_metrics.py checks the
/metrics answers of the running services)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client.metrics import MetricWrapperBase

from libs.common import metrics
from tayori.services import SERVICES, service_parts

ROOT = Path(__file__).resolve().parents[2]


def test_every_family_has_exactly_one_owner() -> None:
    declared = [v for v in vars(metrics).values() if isinstance(v, MetricWrapperBase)]
    owned = list(metrics.every())
    assert len(owned) == len({id(f) for f in owned}), "a family is listed twice"
    assert {id(f) for f in declared} == {id(f) for f in owned}, [
        next(iter(f.describe())).name for f in declared if all(f is not o for o in owned)
    ]
    assert set(metrics.OWNED) == set(SERVICES)


@pytest.mark.parametrize("name", SERVICES)
def test_a_service_declares_its_families_and_uses_no_others(name: str) -> None:
    app, settings_cls = service_parts(name)
    runtime = app.build(settings_cls())
    assert runtime.metrics == metrics.OWNED[name]
    allowed = {id(f) for f in metrics.COMMON + metrics.OWNED[name]}
    families = {k: v for k, v in vars(metrics).items() if isinstance(v, MetricWrapperBase)}
    for path in sorted((ROOT / "services" / name).rglob("*.py")):
        tree = ast.parse(path.read_text())
        used = {
            alias.name
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module == "libs.common.metrics"
            for alias in node.names
        } | {
            node.attr
            for node in ast.walk(tree)
            if isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id == "metrics"
        }
        for family in used & families.keys():
            assert id(families[family]) in allowed, f"{path.name} uses {family}, not {name}'s"


def test_importing_every_service_registers_no_family_in_the_default_registry() -> None:
    """Nothing is exported by accident, whatever a process imports: a service's /metrics
    serves its own registry."""
    code = (
        "import importlib\n"
        "from prometheus_client import REGISTRY, generate_latest\n"
        f"for name in {SERVICES!r}:\n"
        "    importlib.import_module(f'services.{name}.app')\n"
        "print(generate_latest(REGISTRY).decode())\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert "process_" in done.stdout
    assert "tayori_" not in done.stdout
