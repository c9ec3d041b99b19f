"""The layer contract (``[tool.importlinter]`` in pyproject.toml): each layer imports only the
layers below it. Checked with import-linter on the package, and shown to fail on a copy of the
package with one deliberate upward import."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LINT = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
        "sys.exit(lint_imports_command())"]


def lint(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(LINT, cwd=root, env=env, capture_output=True, text=True, timeout=120)


def test_layers_only_import_downward():
    result = lint(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout


def test_an_upward_import_breaks_the_contract(tmp_path):
    shutil.copytree(REPO / "evomerge", tmp_path / "evomerge", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    plan = tmp_path / "evomerge" / "engine" / "plan.py"
    plan.write_text(plan.read_text() + "\nfrom evomerge.search.driver import Search  # noqa: E402,F401\n")
    result = lint(tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Layers only import downward BROKEN" in result.stdout
    assert "evomerge.engine.plan -> evomerge.search.driver" in result.stdout
