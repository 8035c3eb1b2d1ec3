"""The layering contract (pyproject.toml [tool.importlinter], docs/architecture.md) holds.

cli -> stages -> core, and no import cycle between the modules of any package.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"]


def _lint(cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(LINT, cwd=cwd, capture_output=True, text=True, timeout=300)


def test_the_import_contracts_hold():
    r = _lint(ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "0 broken" in r.stdout


def test_the_contracts_catch_a_back_edge_and_a_cycle(tmp_path):
    # A copy of the package with a core module importing a stage, and two sibling modules
    # importing each other: both contracts must break (so a passing run above means something).
    shutil.copytree(ROOT / "edge_vla", tmp_path / "edge_vla", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    with open(tmp_path / "edge_vla" / "tokens" / "action.py", "a") as f:
        f.write("\n\ndef _back_edge():\n    from edge_vla.export import steps  # noqa: F401\n")
    with open(tmp_path / "edge_vla" / "io.py", "a") as f:
        f.write("\n\ndef _cycle():\n    from edge_vla import errors  # noqa: F401\n")
    with open(tmp_path / "edge_vla" / "errors.py", "a") as f:
        f.write("\n\ndef _cycle():\n    from edge_vla import io  # noqa: F401\n")
    r = subprocess.run(LINT, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert r.returncode != 0
    assert "cli -> stages -> core BROKEN" in r.stdout
    assert "edge_vla.tokens.action -> edge_vla.export.steps" in r.stdout
    assert "no import cycles between the modules of any package BROKEN" in r.stdout
