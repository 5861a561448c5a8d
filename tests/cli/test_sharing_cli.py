"""The sharing commands end to end, offline: import-peft by hub id, pull, push --to-folder, card,
export, and hf:// wherever a library is taken; every refusal one line, nothing changed."""

import html
import json

import torch
from conftest import library_snapshot, make_adapter, run
from hub_cache import publish

from lorlib_ui.core.adapters import CONFIG_FILE, WEIGHTS_FILE
from lorlib_ui.core.library import Library


def _one_line_error(code, out, err, message):
    """Exit 1 and one line of error last on stderr (after the fetch bar, where one was drawn)."""
    last = err.rstrip("\n").rsplit("\n", 1)[-1]
    assert code == 1 and last.startswith("error: ") and err.count("error:") == 1 and "Traceback" not in err, err
    assert message in last, err


def _publish_adapter(hub, tmp_path, tiny_base, repo, seed, subfolder=""):
    folder = make_adapter(tmp_path / repo.replace("/", "_") / (subfolder or "."), tiny_base, seed=seed)
    prefix = f"{subfolder}/" if subfolder else ""
    return publish(hub, repo, {prefix + n: (folder / n).read_bytes() for n in (CONFIG_FILE, WEIGHTS_FILE)})


def test_import_peft_takes_hub_ids_and_a_file_of_them(capsys, hub, tmp_path, tiny_base):
    commit = _publish_adapter(hub, tmp_path, tiny_base, "alice/fox", 1)
    _publish_adapter(hub, tmp_path, tiny_base, "alice/zoo", 2, subfolder="experts/owl")
    listed = tmp_path / "ids.txt"
    listed.write_text("# two more\nalice/zoo:experts/owl\n\n")
    code, out, err = run(
        capsys, "import-peft", tmp_path / "lib", "alice/fox", "--from-file", listed, "--base-model", tiny_base
    )
    assert code == 0, err
    assert f"imported fox (rank 4, k_proj, o_proj, q_proj, v_proj) from alice/fox@{commit[:12]}" in out
    assert "imported owl" in out
    library = Library.open(tmp_path / "lib")
    assert library.expert("owl").source["subfolder"] == "experts/owl"


def test_import_peft_by_hub_id_refuses_in_one_line_and_changes_nothing(capsys, hub, tmp_path, tiny_base, tiny_library):
    _publish_adapter(hub, tmp_path, tiny_base, "alice/fox", 1)
    publish(hub, "alice/pickle", {CONFIG_FILE: (make_adapter(tmp_path / "p", tiny_base, 3) / CONFIG_FILE).read_bytes()})
    before = library_snapshot(tiny_library.path)
    cases = [
        (["alice/fox", "bob/gone"], "hub adapter bob/gone: not in the local hub cache, and the hub cannot be reached"),
        (["alice/pickle"], "no adapter_model.safetensors there (lorlib loads weights only from safetensors"),
        (["alice/fox@v2"], "hub adapter alice/fox@v2: not in the local hub cache"),
    ]
    for sources, message in cases:
        _one_line_error(*run(capsys, "import-peft", tiny_library.path, *sources), message)
    assert library_snapshot(tiny_library.path) == before


def test_push_pull_and_routing_a_hub_library(capsys, hub, tmp_path, tiny_library):
    code, out, err = run(
        capsys, "push", tiny_library.path, "alice/lib", "--to-folder", tmp_path / "up", "--license", "mit"
    )
    assert code == 0 and "nothing was uploaded" in out, err
    commit = publish(hub, "alice/lib", tmp_path / "up")
    code, out, err = run(capsys, "info", "hf://alice/lib", "--json")
    assert code == 0 and [e["name"] for e in json.loads(out)["experts"]] == tiny_library.names, err
    code, out, err = run(capsys, "route", "hf://alice/lib", "--prompt", "the fox", "--max-new-tokens", 2, "--json")
    assert code == 0 and json.loads(out)["router"].startswith("arrow"), err
    _one_line_error(
        *run(capsys, "mark-general", "hf://alice/lib", tiny_library.names[0]),
        f"read-only snapshot from the hub; `lorlib pull hf://alice/lib@{commit} DIR`",
    )
    code, out, err = run(capsys, "pull", "hf://alice/lib", tmp_path / "mine")
    assert code == 0 and f"pulled {len(tiny_library.names)} experts of hf://alice/lib" in out, err
    assert run(capsys, "mark-general", tmp_path / "mine", tiny_library.names[0])[0] == 0
    _one_line_error(*run(capsys, "pull", "hf://alice/nothing", tmp_path / "other"), "not in the local hub cache")
    assert not (tmp_path / "other").exists()


def test_card_and_export_from_the_command_line(capsys, tmp_path, tiny_library, tiny_base):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    code, out, err = run(capsys, "card", tiny_library.path)
    assert code == 0 and (tiny_library.path / "README.md").is_file(), err
    code, out, err = run(capsys, "export", tiny_library.path, "--router", "uniform", "--out", tmp_path / "u")
    assert code == 0 and "as a PEFT adapter" in out, err
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), str(tmp_path / "u"))
    assert isinstance(model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight, torch.Tensor)
    _one_line_error(
        *run(capsys, "export", tiny_library.path, "--router", "arrow", "--out", tmp_path / "a"),
        "deploy it with PEFT's Arrow",
    )
    _one_line_error(
        *run(capsys, "export", tiny_library.path, "--router", "uniform", "--out", tmp_path / "u"),
        "exists and is not an empty folder",
    )


def test_explain_from_the_command_line(capsys, tiny_library):
    code, out, err = run(
        capsys, "explain", tiny_library.path, "--prompt", "the quick", "--answer", "brown fox", "--json", "--per-layer"
    )
    assert code == 0, err
    shown = json.loads(out)
    layers = shown["top_experts_by_layer"]
    assert len(layers) == 8 and all(len(rows) == len(shown["tokens"]) for rows in layers.values())
    assert shown["answer"] == "brown fox" and len(shown["gain"]) == len(shown["tokens"])
    assert abs(sum(shown["gain"]) - shown["total_gain"]) < 1e-4 and shown["credit"]
    code, out, err = run(capsys, "explain", tiny_library.path, "--prompt", "the quick", "--compare", "uniform")
    assert code == 0 and "total gain over the base model" in out and "against uniform" in out, err
    _one_line_error(*run(capsys, "explain", tiny_library.path, "--prompt", " "), "--prompt is empty")


def test_route_batch_from_the_command_line(capsys, tmp_path, tiny_library):
    import csv

    prompts = tmp_path / "prompts.csv"
    prompts.write_text('prompt\nthe quick brown\n""\nlazy dog\n')
    code, out, err = run(
        capsys, "route-batch", tiny_library.path, prompts, "--out", tmp_path / "r.csv", "--max-new-tokens", 3
    )
    assert code == 0 and "routed 2 prompts (1 rows with errors)" in out and "row 2: empty prompt" in err, err
    rows = list(csv.DictReader((tmp_path / "r.csv").open()))
    assert [r["error"] for r in rows] == ["", "empty prompt", ""] and rows[0]["top_experts"]
    _one_line_error(*run(capsys, "route-batch", tiny_library.path, tmp_path / "none.jsonl"), "cannot read")


def test_route_writes_its_html_page_and_csv_record(capsys, tmp_path, tiny_library):
    import pandas as pd

    code, out, err = run(
        capsys,
        "route",
        tiny_library.path,
        "--prompt",
        "the quick",
        "--max-new-tokens",
        3,
        "--html",
        tmp_path / "r.html",
        "--csv",
        tmp_path / "r.csv",
        "--json",
    )
    assert code == 0, err
    routed = json.loads(out)
    table = pd.read_csv(tmp_path / "r.csv")
    assert len(table) == len(routed["tokens"]) * len(routed["layers"])
    assert list(table.columns[4:]) == routed["experts"]
    page = (tmp_path / "r.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "Routing with arrow" in page and html.escape(routed["text"]) in page
