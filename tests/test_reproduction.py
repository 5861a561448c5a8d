"""REPRODUCTION.md's tables can be checked without running a model: every script under
docs/reproduction/ prints its tables from the committed records (issue #31), and every record
they name is committed. A script whose records are missing, or that crashes on them (as top_k.py
once did on a record with `top_k: None`), fails here."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "docs" / "reproduction"
RECORDS = SCRIPTS / "records"
# scripts whose every printed table row appears, as printed, in a document
VERBATIM = {
    "top_k.py": "REPRODUCTION.md",
    "ablations.py": "REPRODUCTION.md",
    "seeds.py": "REPRODUCTION.md",
    "seen_tasks.py": "REPRODUCTION.md",
    "unused_tasks.py": "REPRODUCTION.md",
    "own_expert.py": "REPRODUCTION.md",
    "other_routers.py": "README.md",
    "adaptation.py": "README.md",
}
# scripts that read no record of their own: they compute from the shipped library's committed files
FROM_LIBRARY = {
    "cluster_experts.py": "the shipped library's transfer matrix (transfer.json)",
    "mbc_stability.py": "the shipped library's weights (about a minute of k-means)",
    "records.py": "the helpers the others share",
}


def scripts() -> list[str]:
    return sorted(p.name for p in SCRIPTS.glob("*.py") if p.name not in FROM_LIBRARY)


@pytest.mark.parametrize("script", scripts())
def test_a_script_prints_its_tables_from_the_committed_records(script):
    done = subprocess.run(
        [sys.executable, str(SCRIPTS / script)], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "|---" in done.stdout  # at least one Markdown table
    assert "Traceback" not in done.stderr
    if script in VERBATIM:  # the document shows exactly what the records print
        shown = _plain((ROOT / VERBATIM[script]).read_text())
        rows = [line.strip() for line in done.stdout.splitlines() if line.startswith("| ") and "---" not in line]
        differ = [row for row in rows if _plain(row) not in shown]
        assert not differ, f"{VERBATIM[script]} does not show these rows as {script} prints them: {differ[:3]}"


def test_a_script_without_its_record_says_so_in_one_line(tmp_path):
    """A checkout without the records (or a record not made yet) gets the command to make it, not
    a traceback: the scripts run from a folder with no records beside them."""
    folder = tmp_path / "docs" / "reproduction"
    folder.mkdir(parents=True)
    for name in ("adaptation.py", "records.py"):
        shutil.copy(SCRIPTS / name, folder / name)
    done = subprocess.run(
        [sys.executable, str(folder / "adaptation.py")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode != 0 and "no record" in done.stderr and "Traceback" not in done.stderr, done.stderr


def _plain(text: str) -> str:
    return text.replace("\u2212", "-")  # the document writes minus signs as U+2212


def test_every_record_the_reproduction_names_is_committed_and_reads():
    text = (ROOT / "REPRODUCTION.md").read_text()
    named = set(re.findall(r"records/([\w.-]+\.json)", text))
    assert named, "REPRODUCTION.md names no record"
    for name in sorted(named):
        assert (RECORDS / name).exists(), f"REPRODUCTION.md names records/{name}, which is not committed"
    for path in RECORDS.glob("*.json"):
        json.loads(path.read_text())  # every committed record is whole JSON
