"""README.md's examples run as written: every Python block and every short command, against the
shipped library and the embedded model (and the app, where a block talks to it). The long runs
(builds, evaluations, adaptation, a Ray cluster) are listed in NOT_RUN with the reason; a block
that is neither run nor listed fails the test, so a new example cannot go untested."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.embedded

# the first line of each block that is not run, and why
NOT_RUN = {
    "# set up, then open the explorer": "serves until stopped; the app's tests start it (tests/app)",
    "# set up and run the tests": "the test command itself (.ci/run runs it)",
    "python -m lorlib_ui build my-lib": "a build: 60 training steps per expert, minutes each on a CPU",
    "python -m lorlib_ui.cli.default_library": "the shipped library's recipe: 83 minutes",
    "cp -r assets/library /tmp/lib": "four evaluations of the shipped library: 11 to 24 minutes each",
    "python -m lorlib_ui transfer assets/library": "computes what the shipped library stores: minutes to 30 minutes",
    "python -m lorlib_ui adapt assets/library": "supervised adaptation: minutes per method and task",
    "cp -r assets/library /tmp/adapt": "the adaptation study: about eight hours",
    "# head node": "starts a Ray cluster",
    "python app.py --backend ray": "needs a Ray cluster",
    "python app.py --read-only": "serves until stopped; tests/app/test_attacks.py serves the app read-only",
    'A="--backend ray': "a FLAN build on a cluster",
    "# experts from the hub": "needs the Hugging Face Hub; tests/cli/test_sharing_cli.py runs these commands offline",
}


def blocks() -> list[tuple[int, str, str]]:
    """(line, language, text) of every fenced code block of the README."""
    text = (ROOT / "README.md").read_text()
    return [
        (text[: m.start()].count("\n") + 1, m.group(1), m.group(2))
        for m in re.finditer(r"```(\w*)\n(.*?)```", text, re.S)
    ]


def _block(first_line: str) -> str:
    (found,) = [body for _, lang, body in blocks() if lang and body.startswith(first_line)]
    return found


def _shell(commands: str, cwd: Path) -> list[subprocess.CompletedProcess]:
    """Each line of a bash block as its own command (so each one's output can be checked)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = []
    for line in commands.strip().splitlines():
        command = re.sub(r"^python ", f"{sys.executable} ", line)
        result = subprocess.run(command, shell=True, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"{line}\n{result.stderr[-2000:]}"
        done.append(result)
    return done


def test_every_block_is_run_or_listed():
    run = {
        "python -m lorlib_ui route assets/library",
        "from gradio_client import Client",
        "python -m lorlib_ui import-peft my-library",
        "from lorlib_ui.core.library import Library",
        "cp -r assets/library shared-lib",
        "python -m lorlib_ui explain assets/library",
    }
    for line, lang, body in blocks():
        if not lang:
            continue  # a folder tree, not code
        first = body.splitlines()[0]
        known = [key for key in (*run, *NOT_RUN) if first.startswith(key)]
        assert len(known) == 1, f"README line {line}: the block {first!r} is neither run nor listed in NOT_RUN"


def test_the_route_command(tmp_path):
    (result,) = _shell(_block("python -m lorlib_ui route assets/library"), ROOT)
    assert result.stdout.strip()  # the answer
    assert "arrow" in result.stderr.lower() or "weight" in result.stderr  # the experts Arrow chose most


def test_the_commands_on_a_library_of_ones_own(tmp_path):
    """import-peft, info, route and score, with two of the shipped experts as the adapter folders;
    then the Python API block on the library they made."""
    adapters = tmp_path / "path" / "to"
    adapters.mkdir(parents=True)
    for name, expert in (("adapter_a", "color.hcl"), ("adapter_b", "arithmetic.1_digit_addition")):
        shutil.copytree(ROOT / "assets" / "library" / "experts" / expert, adapters / name)
    imported, info, route, score = _shell(_block("python -m lorlib_ui import-peft my-library"), tmp_path)
    assert "adapter_a" in imported.stdout and "2 experts" in info.stdout
    routed = json.loads(route.stdout)
    assert {"text", "experts", "layers", "layer_expert_weights", "tokens", "top_expert"} <= set(routed)
    assert routed["experts"] == ["adapter_a", "adapter_b"]
    scored = json.loads(score.stdout)
    assert scored["logprobs"][0] is None and len(scored["logprobs"]) == len(scored["tokens"])

    code = _block("from lorlib_ui.core.library import Library")
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        namespace: dict = {}
        exec(compile(code, "README.md", "exec"), namespace)
    finally:
        os.chdir(cwd)
    result = namespace["result"]
    assert isinstance(result.text, str) and result.record.weights.shape[1] == len(result.record.tokens)


def test_the_gradio_client_block(tmp_path):
    """The block as written, against the explorer on the shipped library (on a free port)."""
    from conftest import free_port

    from lorlib_ui.app.layout import build_app, launch
    from lorlib_ui.worker.local import LocalWorker

    library = str(ROOT / "assets" / "library")
    app = build_app(LocalWorker(device="cpu"), library, {})
    port = free_port()
    launch(app, "127.0.0.1", port, block=False)
    try:
        code = _block("from gradio_client import Client").replace("127.0.0.1:7860", f"127.0.0.1:{port}")
        namespace: dict = {}
        exec(compile(code, "README.md", "exec"), namespace)
    finally:
        app.close()
    assert namespace["text"].strip() and "done in" in namespace["timing"]
    assert json.loads(namespace["heatmap"]["plot"])["data"][0]["type"] == "heatmap"


def test_the_offline_sharing_commands(tmp_path):
    """card, push --to-folder and export on a copy of the shipped library, as written."""
    import yaml

    (tmp_path / "assets").symlink_to(ROOT / "assets")
    _, card, push, export = _shell(_block("cp -r assets/library shared-lib"), tmp_path)
    header = (tmp_path / "shared-lib" / "README.md").read_text().split("---\n")[1]
    experts = len(json.loads((ROOT / "assets" / "library" / "manifest.json").read_text())["experts"])
    assert yaml.safe_load(header)["license"] == "apache-2.0" and f"wrote {experts + 1} cards" in card.stdout
    assert "nothing was uploaded" in push.stdout and (tmp_path / "upload" / "manifest.json").is_file()
    assert (tmp_path / "uniform-adapter" / "adapter_model.safetensors").is_file() and "PEFT adapter" in export.stdout


def test_explain_and_route_batch_on_the_shipped_library(tmp_path):
    import csv

    (tmp_path / "assets").symlink_to(ROOT / "assets")
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "What is 12 + 30?"}\n{"prompt": "Name a colour."}\n')
    explained, batch = _shell(_block("python -m lorlib_ui explain assets/library"), tmp_path)
    assert "total gain over the base model" in explained.stdout and "against expert:shared" in explained.stdout
    assert "without " in explained.stdout  # the credit of the chosen experts
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert len(rows) == 2 and all(r["answer"] and r["top_experts"] and not r["error"] for r in rows)
