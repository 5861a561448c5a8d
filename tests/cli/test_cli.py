import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import build_tiny_llama, library_snapshot, make_adapter

from lorlib_ui.cli.main import main

ROOT = Path(__file__).resolve().parents[2]


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def cli_library(tmp_path, tiny_base, tiny_adapters, capsys):
    path = tmp_path / "lib"
    code, out, err = run(capsys, "import-peft", path, *tiny_adapters[:4], "--base-model", tiny_base)
    assert code == 0, err
    assert out.count("imported ") == 4
    return path


def test_info(cli_library, capsys):
    code, out, _ = run(capsys, "info", cli_library)
    assert code == 0 and "4 experts" in out and "task3" in out
    code, out, _ = run(capsys, "info", cli_library, "--json")
    manifest = json.loads(out)
    assert [e["name"] for e in manifest["experts"]] == ["task0", "task1", "task2", "task3"]
    assert manifest["experts"][0]["rank"] == 4


def test_an_unusable_expert_is_named_and_removed(cli_library, capsys):
    """A library written elsewhere with a NaN alpha opens, says which expert, and loses it."""
    manifest = json.loads((cli_library / "manifest.json").read_text())
    manifest["experts"][2]["alpha"] = float("nan")
    (cli_library / "manifest.json").write_text(json.dumps(manifest))
    code, out, _ = run(capsys, "info", cli_library)
    assert code == 0 and "warning: expert task2 cannot be used: its lora_alpha is nan" in out
    code, _, err = run(capsys, "remove", cli_library, "task2", "nope")
    assert code == 1 and "unknown expert 'nope'" in err and "task2" in (cli_library / "manifest.json").read_text()
    code, out, _ = run(capsys, "remove", cli_library, "task2")
    assert code == 0 and "removed task2" in out
    code, out, _ = run(capsys, "info", cli_library)
    assert "warning" not in out and "3 experts" in out
    assert "NaN" not in (cli_library / "manifest.json").read_text()
    assert not (cli_library / "experts" / "task2").exists()  # swept with the manifest's change


def test_route_json_contract(cli_library, capsys):
    code, out, err = run(
        capsys,
        "route",
        cli_library,
        "--prompt",
        "the quick brown",
        "--top-k",
        "2",
        "--max-new-tokens",
        "5",
        "--json",
        "--device",
        "cpu",
    )
    assert code == 0, err
    result = json.loads(out)
    assert {"text", "experts", "layers", "layer_expert_weights", "tokens", "top_expert"} <= result.keys()
    assert result["experts"] == ["task0", "task1", "task2", "task3"]
    assert len(result["layers"]) == 8 and result["layers"][0] == "model.layers.0.self_attn.q_proj"
    weights = result["layer_expert_weights"]
    assert len(weights) == 8 and all(len(row) == 4 and abs(sum(row) - 1) < 1e-4 for row in weights)
    assert len(result["top_expert"]) == len(result["tokens"])
    assert all(len(row) == 8 and set(row) <= set(result["experts"]) for row in result["top_expert"])


def test_route_and_score_with_ties(cli_library, capsys):
    """TIES from the command line: its density reaches the router, and changes the merge."""
    scores = {}
    for density in ("0.2", "1"):
        code, out, err = run(
            capsys,
            "score",
            cli_library,
            "--text",
            "the quick brown fox",
            "--router",
            "ties",
            "--density",
            density,
            "--json",
        )
        assert code == 0, err
        scores[density] = json.loads(out)
    assert scores["0.2"]["logprobs"] != scores["1"]["logprobs"]
    code, out, err = run(capsys, "route", cli_library, "--prompt", "dog", "--router", "ties", "--max-new-tokens", "2")
    assert code == 0, err


def test_route_single_expert_and_base(cli_library, capsys):
    code, out, _ = run(
        capsys, "route", cli_library, "--prompt", "dog", "--router", "expert:task2", "--max-new-tokens", "3", "--json"
    )
    result = json.loads(out)
    assert code == 0 and all(row == ["task2"] * 8 for row in result["top_expert"])
    code, out, _ = run(
        capsys, "route", cli_library, "--prompt", "dog", "--router", "base", "--max-new-tokens", "3", "--json"
    )
    assert code == 0 and all(v is None for row in json.loads(out)["top_expert"] for v in row)


def test_score_json(cli_library, capsys):
    code, out, err = run(capsys, "score", cli_library, "--text", "the lazy dog", "--router", "uniform", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert len(result["tokens"]) == len(result["logprobs"]) >= 2
    assert result["logprobs"][0] is None and all(lp < 0 for lp in result["logprobs"][1:])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["route", "{missing}", "--prompt", "hi"], "no library at"),
        (["route", "{lib}", "--prompt", "hi", "--router", "expert:nobody"], "unknown expert 'nobody'"),
        (["route", "{lib}", "--prompt", ""], "--prompt is empty"),
        (["route", "{lib}", "--prompt", "hi", "--top-k", "0"], "top-k must be between 1 and the number of experts"),
        (["route", "{lib}", "--prompt", "hi", "--top-k", "5"], "top-k must be between 1 and the number of experts"),
        (["route", "{lib}", "--prompt", "hi", "--temperature", "0"], "temperature must be positive"),
        (["route", "{lib}", "--prompt", "hi", "--router", "ties", "--density", "0"], "density must be in (0, 1]"),
        (["score", "{lib}", "--text", "hi", "--router", "ties", "--density", "1.5"], "density must be in (0, 1]"),
        (["route", "{lib}", "--prompt", "hi", "--max-new-tokens", "0"], "max new tokens must be between"),
        (["route", "{lib}", "--prompt", "hi", "--max-new-tokens", "513"], "between 1 and 512, got 513"),
        (["route", "{lib}", "--prompt", "hi", "--router", "oracle"], "picks its expert per evaluated task"),
        (["route", "{lib}", "--prompt", "hi", "--router", "lorahub"], "route with expert:NAME"),
        (["route", "{lib}", "--prompt", "hi", "--base-model", "{wide}"], "does not fit library"),
        (["route", "{lib}", "--prompt", "hi", "--top-k", "two"], "invalid int value"),
        (["score", "{lib}", "--text", " "], "--text is empty"),
        (["info", "{missing}"], "no library at"),
        (["nonsense"], "invalid choice"),
    ],
)
def test_bad_input_is_one_line(cli_library, tmp_path, capsys, argv, message):
    wide = build_tiny_llama(tmp_path / "wide", hidden=96)
    fill = {"{lib}": str(cli_library), "{missing}": str(tmp_path / "nowhere"), "{wide}": str(wide)}
    before = library_snapshot(cli_library)
    code, out, err = run(capsys, *[fill.get(a, a) for a in argv])
    assert code != 0 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err
    assert library_snapshot(cli_library) == before


def test_lorahub_stores_a_merge_that_routes_as_an_expert_and_reuses_it(cli_library, tasks_file, capsys):
    argv = ["lorahub", cli_library, "--task", "copy0", "--data", tasks_file, "--shots", "3", "--budget", "6"]
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    assert "expert lorahub-copy0-k3-s0: stored" in out and "on 3 training rows of copy0" in out
    assert "Traceback" not in err
    code, out, _ = run(capsys, "info", cli_library, "--json")
    stored = [e for e in json.loads(out)["experts"] if e["kind"] == "lorahub"]
    assert [e["name"] for e in stored] == ["lorahub-copy0-k3-s0"]
    assert set(stored[0]["training"]["weights"]) == {"task0", "task1", "task2", "task3"}
    before = library_snapshot(cli_library)
    code, out, err = run(capsys, *argv, "--json")
    assert code == 0 and json.loads(out)["reused"] and library_snapshot(cli_library) == before
    code, out, err = run(capsys, "score", cli_library, "--text", "repeat fox", "--router", "expert:lorahub-copy0-k3-s0")
    assert code == 0, err


def test_lorahub_takes_its_examples_from_a_file_of_the_tasks_rows(cli_library, tmp_path, capsys):
    rows = tmp_path / "mine.jsonl"  # no task column: every row is the named task's
    rows.write_text("".join(json.dumps({"input": f"repeat {w}", "output": w}) + "\n" for w in ["fox", "dog"] * 5))
    argv = ["lorahub", cli_library, "--task", "mine", "--data", rows, "--shots", "2", "--budget", "2"]
    code, _, err = run(capsys, *argv)
    assert code == 0, err
    code, out, _ = run(capsys, "info", cli_library, "--json")
    training = next(e for e in json.loads(out)["experts"] if e["kind"] == "lorahub")["training"]
    assert training["task"] == "mine" and training["data"] == str(rows) and len(training["shot_rows"]) == 2


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--shots", "0"], "--shots must be at least 1, got 0"),
        (["--shots", "11"], "--shots 11 is more than the 10 training rows of task 'copy0'"),
        (["--budget", "0"], "--budget must be at least 1, got 0"),
        (["--task", "nope"], "no task 'nope'"),
        (["--experts", "cluster"], "no experts in group 'cluster'"),
    ],
)
def test_lorahub_refusals_are_one_line_and_change_nothing(cli_library, tasks_file, capsys, extra, message):
    before = library_snapshot(cli_library)
    code, out, err = run(capsys, "lorahub", cli_library, "--task", "copy0", "--data", tasks_file, *extra)
    assert code == 1 and out == "" and err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert library_snapshot(cli_library) == before


def test_evaluate_runs_lorahub_with_its_shots(cli_library, tasks_file, capsys):
    before = library_snapshot(cli_library)
    argv = ["evaluate", cli_library, "--tasks", "copy0", "--data", tasks_file, "--routers", "lorahub,base"]
    code, _, err = run(capsys, *argv, "--shots", "0")
    assert code == 1 and err.count("\n") == 1 and "--shots must be at least 1, got 0" in err
    assert library_snapshot(cli_library) == before
    code, out, err = run(capsys, *argv, "--shots", "2", "--limit", "1", "--json")
    assert code == 0, err
    record = json.loads(out)
    assert record["shots"] == 2 and [row["router"] for row in record["summary"]] == ["lorahub", "base"]
    assert record["scores"][0]["expert"] == "lorahub (2 shots, seed 0)"


def test_refused_imports_leave_library_unchanged(cli_library, tmp_path, tiny_base, tiny_adapters, capsys):
    wide_base = build_tiny_llama(tmp_path / "wide", hidden=96)
    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny_adapters[4], corrupt)
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    non_lora = tmp_path / "nonlora"
    shutil.copytree(tiny_adapters[4], non_lora)
    config = json.loads((non_lora / "adapter_config.json").read_text())
    (non_lora / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "IA3"}))
    cases = [
        (
            [make_adapter(tmp_path / "wide_ad", wide_base, seed=0)],
            [],
            "in the base model (an adapter for another base model?)",
        ),
        ([corrupt], [], "not a valid safetensors file"),
        ([non_lora], [], "only LoRA adapters are supported"),
        ([tiny_adapters[4]], ["--name", "../escape"], "invalid expert name"),
        ([tiny_adapters[4]], ["--name", "a/b"], "invalid expert name"),
        ([tiny_adapters[0]], [], "already has an expert named 'task0'"),
        ([tiny_adapters[4], tiny_adapters[5]], ["--name", "one"], "--name can only be used with a single adapter"),
        ([tiny_adapters[4], corrupt], [], "not a valid safetensors file"),  # all or nothing
        ([tiny_adapters[4]], ["--base-model", wide_base], "does not fit library"),
    ]
    for adapters, extra, message in cases:
        before = library_snapshot(cli_library)
        code, _, err = run(capsys, "import-peft", cli_library, *adapters, *extra)
        assert code != 0 and message in err and err.count("\n") == 1, (message, err)
        assert library_snapshot(cli_library) == before, message


def test_import_force_replaces(cli_library, tiny_adapters, capsys):
    code, _, err = run(capsys, "import-peft", cli_library, tiny_adapters[5], "--name", "task0", "--force")
    assert code == 0, err
    code, out, _ = run(capsys, "info", cli_library, "--json")
    assert [e["name"] for e in json.loads(out)["experts"]] == ["task1", "task2", "task3", "task0"]


def test_general_experts_by_import_or_mark(cli_library, tmp_path, tiny_base, tiny_adapters, capsys):
    """`import-peft --kind general` and `mark-general` make general experts, which arrow_gks
    subtracts and never routes to; a marked expert keeps its kind, and its mark when replaced."""

    def general():
        experts = json.loads(run(capsys, "info", cli_library, "--json")[1])["experts"]
        return {e["name"]: (e["kind"], e["general"]) for e in experts}

    code, _, err = run(
        capsys, "import-peft", cli_library, make_adapter(tmp_path / "gen", tiny_base, 40), "--kind", "general"
    )
    assert code == 0, err
    code, out, err = run(capsys, "mark-general", cli_library, "task3")
    assert code == 0 and out == f"task3 is now general in {cli_library}\n", err
    assert general() == {
        "task0": ("imported", False),
        "task1": ("imported", False),
        "task2": ("imported", False),
        "task3": ("imported", True),
        "gen": ("general", True),
    }
    assert "imported (general)" in run(capsys, "info", cli_library)[1]
    argv = ["route", cli_library, "--prompt", "dog", "--router", "arrow_gks", "--max-new-tokens", "3", "--json"]
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    chosen = {name for row in json.loads(out)["top_expert"] for name in row}
    assert chosen and chosen <= {"task0", "task1", "task2"}
    # the mark stays with the name when the expert is replaced, until it is taken off
    assert run(capsys, "import-peft", cli_library, tiny_adapters[5], "--name", "task3", "--force")[0] == 0
    assert general()["task3"] == ("imported", True)
    code, out, _ = run(capsys, "mark-general", cli_library, "task3", "--unmark")
    assert code == 0 and out == f"task3 is no longer general in {cli_library}\n"
    assert general()["task3"] == ("imported", False)
    before = library_snapshot(cli_library)
    code, out, err = run(capsys, "mark-general", cli_library, "gen", "--unmark")
    assert code == 1 and out == "" and err.count("\n") == 1 and "gen is of kind general: it stays general" in err
    assert library_snapshot(cli_library) == before


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["route", "{lib}", "--prompt", "hi", "--router", "arrow_gks"], "arrow_gks needs experts of kind general"),
        (["mark-general", "{lib}", "nobody"], "unknown expert 'nobody'"),
        (["mark-general", "{lib}", "task0", "nobody"], "unknown expert 'nobody'"),  # all or nothing
        (["mark-general", "{lib}"], "the following arguments are required: NAME"),
        (["mark-general", "{missing}", "task0"], "no library at"),
    ],
)
def test_bad_general_input_is_one_line_and_changes_nothing(cli_library, tmp_path, capsys, argv, message):
    fill = {"{lib}": str(cli_library), "{missing}": str(tmp_path / "nowhere")}
    before = library_snapshot(cli_library)
    code, out, err = run(capsys, *[fill.get(a, a) for a in argv])
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err
    assert library_snapshot(cli_library) == before


def test_refused_new_library_is_not_created(tmp_path, tiny_base, tiny_adapters, capsys):
    code, _, err = run(
        capsys, "import-peft", tmp_path / "new", tiny_adapters[0], "--name", "..", "--base-model", tiny_base
    )
    assert code != 0 and not (tmp_path / "new").exists()


def test_subprocess_exit_code_and_no_traceback(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "lorlib_ui", "route", str(tmp_path / "missing"), "--prompt", "hi"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"error: no library at {tmp_path / 'missing'} (manifest.json not found)"
    ]


def test_new_library_then_import(tmp_path, tiny_base, tiny_adapters, capsys):
    path = tmp_path / "fresh"
    code, out, _ = run(capsys, "new", path, "--base-model", tiny_base)
    assert code == 0 and "created empty library" in out
    code, _, err = run(capsys, "new", path, "--base-model", tiny_base)
    assert code == 1 and "a library already exists" in err
    code, out, _ = run(capsys, "new", path, "--base-model", tiny_base, "--exist-ok")
    assert code == 0 and "exists: 0 experts" in out
    code, out, _ = run(capsys, "route", path, "--prompt", "dog", "--router", "base", "--max-new-tokens", "2", "--json")
    assert code == 0 and json.loads(out)["experts"] == []
    code, _, err = run(capsys, "route", path, "--prompt", "dog")
    assert code == 1 and "library is empty" in err
    assert run(capsys, "import-peft", path, tiny_adapters[0])[0] == 0
    code, out, _ = run(capsys, "info", path)
    assert "1 experts" in out


def test_plain_route_output(cli_library, capsys):
    code, out, err = run(capsys, "route", cli_library, "--prompt", "dog", "--router", "base", "--max-new-tokens", "2")
    assert code == 0 and out.strip() and err == ""
    code, out, err = run(capsys, "route", cli_library, "--prompt", "dog", "--top-k", "2", "--max-new-tokens", "2")
    assert code == 0 and "mean routing weight per expert" in err and err.count("task") == 4


def test_ray_backend_without_ray_says_how_to_install_it(tmp_path, tiny_base, tasks_file, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if ray were not installed
    args = ["--data", tasks_file, "--base-model", tiny_base, "--backend", "ray"]
    code, _, err = run(capsys, "build", tmp_path / "lib", *args)
    assert code == 1 and err.strip() == "error: the Ray backend needs ray: pip install -r requirements-ray.txt"
    assert not (tmp_path / "lib").exists()
    code, _, err = run(capsys, "build", tmp_path / "lib", "--data", tasks_file, "--address", "10.0.0.1:6379")
    assert code == 1 and "use it with --backend ray" in err


def test_app_on_the_ray_backend_without_ray_says_how_to_install_it(capsys, monkeypatch, tmp_path):
    from conftest import explorer_module

    monkeypatch.setitem(sys.modules, "ray", None)
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path))
    explorer = explorer_module()
    assert explorer.main(["--backend", "ray"]) == 1
    assert capsys.readouterr().err.strip() == "error: the Ray backend needs ray: pip install -r requirements-ray.txt"


def test_a_reader_that_leaves_early_gets_no_error(cli_library):
    """`info | head`: when the reader closes the pipe, the command stops quietly."""
    reader, writer = os.pipe()
    os.close(reader)  # nobody reads: every write fails with EPIPE
    done = subprocess.run(
        [sys.executable, "-m", "lorlib_ui", "info", str(cli_library)], stdout=writer, stderr=subprocess.PIPE, cwd=ROOT
    )
    os.close(writer)
    assert done.stderr == b"" and done.returncode == 141


def test_the_lorlib_command_is_python_m_lorlib_ui(cli_library):
    """`pip install -e .` (requirements-test.txt) installs the `lorlib` console script."""
    beside = Path(sys.executable).parent / "lorlib"  # where pip puts scripts, shims or not
    lorlib = str(beside) if beside.is_file() else shutil.which("lorlib")
    assert lorlib, "the lorlib command is not installed: pip install -e ."
    ours = subprocess.run([lorlib, "info", str(cli_library), "--json"], capture_output=True, text=True, cwd=ROOT)
    module = subprocess.run(
        [sys.executable, "-m", "lorlib_ui", "info", str(cli_library), "--json"], capture_output=True, text=True
    )
    assert ours.returncode == module.returncode == 0 and ours.stdout == module.stdout
    assert json.loads(ours.stdout)["experts"]


def test_every_router_routes_from_the_command_line(tmp_path, tiny_base, tiny_adapters, capsys):
    from conftest import PROMPT_ROUTERS, build_library, with_every_key

    library = with_every_key(build_library(tmp_path / "lib", tiny_base, tiny_adapters))
    for spec in PROMPT_ROUTERS:
        code, out, err = run(
            capsys, "route", library.path, "--prompt", "the quick", "--router", spec, "--max-new-tokens", 2, "--json"
        )
        assert code == 0, (spec, err)
        assert len(json.loads(out)["layer_expert_weights"]) == 8, spec  # 2 layers x q, k, v, o
        code, out, err = run(capsys, "score", library.path, "--text", "the quick brown", "--router", spec, "--json")
        scored = json.loads(out) if code == 0 else {}
        assert code == 0 and scored["logprobs"][0] is None and len(scored["logprobs"]) == len(scored["tokens"]), spec


# Every command's flags as argparse declared them by hand, before the options dataclasses made them
# (`lorlib_ui.training.options`): the same flags, required ones and choices, and defaults that mean the same;
# since then, import-peft takes --from-file and the commands pull, push, card and export are new.
FLAGS = {
    "fetch-model": "--base-model",
    "new": "library --base-model --exist-ok",
    "import-peft": "library adapters --from-file --base-model --name --kind --tasks --family --force",
    "pull": "ref folder",
    "push": "library repo --private --to-folder --license",
    "card": "library --license",
    "export": "library --router --format --out --mix --density --base-model",
    "explain": "library --prompt --answer --compare --max-new-tokens --raw --per-layer --router --top-k "
    "--temperature --mix --density --base-model --device --dtype --json",
    "route-batch": "library file --out --column --max-new-tokens --batch-size --raw --router --top-k --temperature "
    "--mix --density --base-model --device --dtype",
    "mark-general": "library names --unmark",
    "remove": "library names",
    "info": "library --json",
    "route": "library --prompt --max-new-tokens --raw --html --csv --router --top-k --temperature --mix --density "
    "--base-model --device --dtype --json",
    "build": "library --data --tasks --families --holdout-per-family --holdout-seed --steps --rank --targets "
    "--batch-size --learning-rate --seed --device --bf16 --backend --address --cpus-per-task --shared-steps "
    "--no-shared --force --base-model --gates",
    "gates": "library --experts --data --gate-steps/--steps --seed --device --force",
    "activations": "library --experts --data --examples --seed --device --force",
    "cluster": "library --k --steps --no-train --seed --keep-quantile --data --device --bf16 --backend --address "
    "--cpus-per-task --force --grouping --json",
    "evaluate": "library --tasks --data --limit --routers --shots --split --top-k --density --temperature --mix "
    "--device --dtype --json --stored",
    "lorahub": "library --task --data --shots --budget --seed --experts --force --device --dtype --json",
    "adapt": "library --task --data --shots --methods --steps --budget --seed --limit --force --device --json",
    "transfer": "library --tasks --data --limit --experts --exact-match --device --dtype --json",
    "routing-stats": "library --tasks --data --limit --router --top-k --temperature --mix --density --base-model "
    "--device --dtype --json",
    "score": "library --text --router --top-k --temperature --mix --density --base-model --device --dtype --json",
}
REQUIRED = {
    "explain": ["--prompt"],
    "export": ["--router", "--out"],
    "route": ["--prompt"],
    "cluster": ["--k"],
    "lorahub": ["--task"],
    "adapt": ["--task"],
    "score": ["--text"],
}
CHOICES = {
    ("import-peft", "--kind"): ("private", "cluster", "shared", "imported", "general"),
    ("export", "--format"): ("peft", "merged"),
    ("build", "--bf16"): ("auto", "on", "off"),
    ("build", "--backend"): ("local", "ray"),
    ("cluster", "--bf16"): ("auto", "on", "off"),
    ("cluster", "--backend"): ("local", "ray"),
    ("cluster", "--grouping"): ("mbc", "random"),
    ("evaluate", "--split"): ("test", "validation"),
    **{
        (name, "--mix"): ("outputs", "parameters")
        for name in ("route", "routing-stats", "score", "explain", "route-batch", "evaluate")
    },
}


@pytest.mark.parametrize("name", sorted(FLAGS))
def test_the_options_dataclasses_make_the_flags_each_command_had(name, capsys):
    import argparse
    import re

    from lorlib_ui.cli.main import build_parser

    with pytest.raises(SystemExit) as done:  # `lorlib NAME --help`
        main([name, "--help"])
    shown = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", capsys.readouterr().out)) - {"--help"}
    assert done.value.code == 0 and shown == {f for f in re.split(r"[ /]", FLAGS[name]) if f.startswith("--")}
    (commands,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    actions = [a for a in commands.choices[name]._actions if not isinstance(a, argparse._HelpAction)]
    assert sorted("/".join(a.option_strings) or a.dest for a in actions) == sorted(FLAGS[name].split())
    assert [a.option_strings[0] for a in actions if a.required and a.option_strings] == REQUIRED.get(name, [])
    assert {(name, a.option_strings[0]): tuple(a.choices) for a in actions if a.choices} == {
        key: value for key, value in CHOICES.items() if key[0] == name
    }


def test_the_flags_defaults_are_the_options_defaults(monkeypatch):
    from lorlib_ui.analysis.adaptation_runs import AdaptOptions
    from lorlib_ui.analysis.evaluation import EvaluateOptions
    from lorlib_ui.analysis.routing_stats import RoutingStatsOptions
    from lorlib_ui.analysis.transfer import TransferOptions
    from lorlib_ui.cli.main import build_parser
    from lorlib_ui.training.building import BuildOptions
    from lorlib_ui.training.config import TrainConfig
    from lorlib_ui.training.keys import GatesOptions
    from lorlib_ui.training.lorahub import LoraHubOptions
    from lorlib_ui.training.options import from_namespace

    monkeypatch.setenv("LORLIB_BACKEND", "ray")  # read when the flags are made
    monkeypatch.delenv("LORLIB_RAY_ADDRESS", raising=False)
    parse = build_parser().parse_args
    build = parse(["build", "lib"])
    assert from_namespace(BuildOptions, build) == BuildOptions() and from_namespace(TrainConfig, build) == TrainConfig()
    assert (build.backend, build.address, build.cpus_per_task, build.bf16, build.gates) == (
        "ray",
        None,
        1,
        "auto",
        False,
    )
    assert BuildOptions().shared and BuildOptions().data == "default" and TrainConfig().steps == 100
    assert from_namespace(BuildOptions, parse(["build", "lib", "--no-shared"])) == BuildOptions(shared=False)
    adapt = from_namespace(AdaptOptions, parse(["adapt", "lib", "--task", "t"]))
    assert (adapt.shots, adapt.budget, adapt.steps, adapt.limit) == ((32,), 40, None, None)
    lorahub = from_namespace(LoraHubOptions, parse(["lorahub", "lib", "--task", "t"]))
    assert (lorahub.shots, lorahub.budget) == (10, 40) == (LoraHubOptions.shots, LoraHubOptions.budget)
    evaluate = from_namespace(EvaluateOptions, parse(["evaluate", "lib"]))
    assert evaluate == EvaluateOptions() and (evaluate.tasks, evaluate.shots, evaluate.limit) == ("held-out", 10, None)
    assert from_namespace(TransferOptions, parse(["transfer", "lib"])).limit == 20
    stats = from_namespace(RoutingStatsOptions, parse(["routing-stats", "lib"]))
    assert (stats.router, stats.limit, stats.tasks) == ("arrow@private", 20, "held-out")
    assert from_namespace(GatesOptions, parse(["gates", "lib", "--steps", "7"])).steps == 7
    assert from_namespace(GatesOptions, parse(["gates", "lib"])).steps == 100
