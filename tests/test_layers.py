"""The house's layering: the import-linter contract in pyproject.toml (CLIs, ``train``, ``eval``, ``speak``,
``checkpoint``, ``model``, ``data | nn``, ``ops``; no import, at module level or inside a function, runs back up,
and every room of the package is listed; ``lint-imports`` run in the repository root checks the same), and no
circle of imports inside a room."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LINT = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` on the package and pyproject.toml in ``root`` (the package found first on the path)."""
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run([sys.executable, "-c", LINT, "--no-cache"], cwd=root, env=env, capture_output=True,
                          text=True, timeout=120)


def test_no_import_runs_back_up():
    res = lint_imports(REPO)
    assert res.returncode == 0, f"an import runs back up the layers (pyproject.toml):\n{res.stdout}{res.stderr}"
    assert "1 kept, 0 broken" in res.stdout, res.stdout


def test_an_upward_import_breaks_the_contract(tmp_path):
    """The contract is not empty: a copy of the package where the checkpoint room reaches into the trainer fails,
    naming the import."""
    skip = shutil.ignore_patterns("__pycache__", "*.so")
    shutil.copytree(REPO / "genlip_fast", tmp_path / "genlip_fast", ignore=skip)
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    with open(tmp_path / "genlip_fast" / "checkpoint" / "format.py", "a") as f:
        f.write("\n\ndef _upward():\n    from ..train.config import JobConfig\n\n    return JobConfig\n")
    res = lint_imports(tmp_path)
    assert res.returncode != 0 and "genlip_fast.checkpoint.format -> genlip_fast.train.config" in res.stdout, (
        res.stdout + res.stderr)


def test_no_circle_of_imports():
    """No module reaches itself through its imports (function-level ones included), e.g. two modules of one room
    that import each other, which the layers contract does not see."""
    import grimp  # import-linter's graph

    graph = grimp.build_graph("genlip_fast", cache_dir=None)
    on_a_circle = sorted(m for m in graph.modules if any(
        d == m or m in graph.find_upstream_modules(d) for d in graph.find_modules_directly_imported_by(m)))
    assert not on_a_circle, f"modules on an import circle: {on_a_circle}"
