"""The layout's arrows (core <- training <- analysis <- worker <- app, cli on top, and the layers
inside core) hold: import-linter checks the contracts in pyproject.toml, and a wrong arrow fails them."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _lint(root: Path) -> subprocess.CompletedProcess:
    """`lint-imports` on the package under `root`, with its pyproject.toml, no cache."""
    code = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    command = [sys.executable, "-c", code, "--no-cache"]
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(command, cwd=root, capture_output=True, text=True, env=env, timeout=300)


def test_the_import_contracts_are_kept():
    done = _lint(ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "5 kept, 0 broken" in done.stdout


def test_a_wrong_arrow_breaks_them(tmp_path):
    """core importing the worker, the UI importing a builder, training importing analysis and the
    library importing the routed model: each contract reports its arrow."""
    copy = tmp_path / "repo"
    shutil.copytree(ROOT / "lorlib_ui", copy / "lorlib_ui", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", copy / "pyproject.toml")
    record = copy / "lorlib_ui" / "core" / "record.py"
    record.write_text(record.read_text() + "\nimport lorlib_ui.worker.api  # noqa\n")
    route = copy / "lorlib_ui" / "app" / "route.py"
    route.write_text(route.read_text() + "\nimport lorlib_ui.training.data  # noqa\n")
    data = copy / "lorlib_ui" / "training" / "data.py"
    data.write_text(data.read_text() + "\nimport lorlib_ui.analysis.stats  # noqa\n")
    library = copy / "lorlib_ui" / "core" / "library.py"
    library.write_text(library.read_text() + "\nimport lorlib_ui.core.routed_model  # noqa\n")
    done = _lint(copy)
    assert done.returncode != 0
    assert "lorlib_ui.core.record -> lorlib_ui.worker.api" in done.stdout
    assert "lorlib_ui.app.route -> lorlib_ui.training.data" in done.stdout
    assert "lorlib_ui.training.data -> lorlib_ui.analysis.stats" in done.stdout
    assert "lorlib_ui.core.library -> lorlib_ui.core.routed_model" in done.stdout
