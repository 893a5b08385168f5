"""Render the kustomize trees under ``deploy/k8s`` with the real kustomize.

Uses a ``kustomize`` binary on PATH, else ``kubectl kustomize`` (kubectl has shipped
kustomize since 1.14). Renders from a copy of ``deploy/k8s``, so a test can edit a file
before rendering, and an overlay's git-ignored ``secrets.env`` is made from its
``secrets.env.example`` the way an operator starts.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
#: the kustomizations a user applies: the base and every overlay.
TREES = ("base", *sorted(p.parent.name for p in DEPLOY.glob("overlays/*/kustomization.yaml")))


def command() -> list[str] | None:
    """The command that renders a kustomization directory given after it, or None."""
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


MISSING = (
    "!!! neither `kustomize` nor `kubectl` is on PATH: the rendered base and overlays of "
    "deploy/k8s are NOT validated. Install kubectl (it ships kustomize) to run these tests. !!!"
)


def _tree_dir(root: Path, tree: str) -> Path:
    return root / "base" if tree == "base" else root / "overlays" / tree


def _local_secrets(directory: str, names: list[str]) -> list[str]:
    """An operator's own overlays/*/secrets.env: never read by the tests."""
    return ["secrets.env"] if Path(directory).parent.name == "overlays" else []


def render_copy(tree: str, edit: Callable[[Path], None] | None = None) -> list[dict[str, Any]]:
    """Every object kustomize renders for ``tree`` ("base", "dev", "prod"), in order.

    ``edit`` receives the root of the copy of ``deploy/k8s`` and may change files first.
    """
    cmd = command()
    assert cmd, MISSING
    with tempfile.TemporaryDirectory(prefix="tayori-k8s-") as tmp:
        root = Path(tmp) / "k8s"
        shutil.copytree(DEPLOY, root, ignore=_local_secrets)
        for example in root.glob("overlays/*/secrets.env.example"):
            shutil.copy(example, example.with_suffix(""))
        if edit:
            edit(root)
        done = subprocess.run(
            [*cmd, str(_tree_dir(root, tree))], capture_output=True, text=True, check=False
        )
    assert done.returncode == 0, f"{' '.join(cmd)} {tree} failed:\n{done.stderr}"
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc is not None]


@cache
def render(tree: str) -> tuple[dict[str, Any], ...]:
    """``render_copy(tree)`` of the files as they are, rendered once per test session."""
    return tuple(render_copy(tree))
