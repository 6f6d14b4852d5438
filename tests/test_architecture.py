"""Kiln's layers hold: import-linter checks the contracts in pyproject.toml ([tool.importlinter]).

The layers (docs/design.md): entry > drivers > backends > steps > rules and front ends > base; imports
only go down, ``schedules/`` imports nothing from ``compiler``, ``targets/`` only ``compiler.errors``,
and no modules import each other around a loop. A change that adds an upward import or a cycle fails here.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


#: Runs import-linter on the packages under argv[1] with the contracts in the pyproject.toml there.
_LINT = textwrap.dedent("""
    import sys
    root = sys.argv[1]
    sys.path.insert(0, root)
    sys.argv = ["lint-imports", root + "/pyproject.toml"]
    from importlinter.cli import lint_imports_command
    sys.exit(lint_imports_command())
""")


def _lint(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _LINT, str(root)], cwd=root, capture_output=True, text=True,
                          timeout=300)


def test_layer_contracts_are_kept():
    pytest.importorskip("importlinter")
    result = _lint(ROOT)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert "BROKEN" not in result.stdout and "4 kept, 0 broken" in result.stdout, result.stdout


def test_the_contract_catches_an_upward_import(tmp_path):
    """The check can fail: the same contract over a copy of the packages in which a base module
    (``compiler.errors``) imports a driver is broken."""
    pytest.importorskip("importlinter")
    import shutil

    for pkg in ("compiler", "schedules", "targets"):
        shutil.copytree(ROOT / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("runner", "__pycache__"))
    errors = tmp_path / "compiler" / "errors.py"
    errors.write_text(errors.read_text() + "\n\ndef _upward():\n    from . import driver  # noqa: F401\n")
    (tmp_path / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
    result = _lint(tmp_path)
    assert result.returncode != 0, result.stdout
    assert "compiler.errors is not allowed to import compiler.driver" in result.stdout, result.stdout
