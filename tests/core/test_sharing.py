"""Libraries in and out of the hub, offline: what `push` would upload, checked file by file; a
`pull` of it (laid out in huggingface_hub's cache) reproduces the library; hf:// libraries open
read-only; the cards parse."""

import json
import shutil

import pytest
import torch
import yaml
from conftest import make_adapter
from hub_cache import publish

from lorlib_ui.core.adapters import CONFIG_FILE, WEIGHTS_FILE
from lorlib_ui.core.errors import LorlibError
from lorlib_ui.core.library import Library, import_adapters
from lorlib_ui.core.sharing import expert_card, library_card, pull, stage, write_cards


def _front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    header, _, _ = text[4:].partition("\n---\n")
    return yaml.safe_load(header)


@pytest.fixture
def published(tiny_library, tmp_path):
    """The tiny library with a history entry, gates for one expert, and a transfer side file."""
    tiny_library.record_history("build /home/someone/private/data.jsonl", 1.0)
    first = tiny_library.experts[0]
    gates = {m: torch.ones(64) for m in tiny_library.load_adapter(first.name).factors}
    tiny_library.derived.write_expert("gates", first.name, gates, {"steps": 2}, first.weights_hash)
    tiny_library.derived.update_json("transfer", lambda stored, current: ({"cells": []}, {"cells": 0}))
    return Library.open(tiny_library.path)


def test_push_writes_exactly_the_library_and_its_cards(published, tiny_base, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    files = stage(published, tmp_path / "upload", license="apache-2.0", repo="alice/lib")
    upload = tmp_path / "upload"
    experts = {f"{e.path}/{n}" for e in published.experts for n in (CONFIG_FILE, WEIGHTS_FILE, "README.md")}
    first = published.experts[0].path
    expected = {"manifest.json", "README.md", "prototypes.safetensors", "transfer.json", f"{first}/gates.safetensors"}
    assert set(files) == experts | expected
    manifest = json.loads((upload / "manifest.json").read_text())
    assert "history" not in manifest and manifest["experts"] == published.manifest()["experts"]
    card = (upload / "README.md").read_text()
    header = _front_matter(card)
    assert header["library_name"] == "peft" and header["base_model"] == published.base_model
    assert header["license"] == "apache-2.0" and {"lora", "peft", "arrow", "mixture-of-experts"} <= set(header["tags"])
    assert all(f"| {e.name} |" in card for e in published.experts)
    assert "create_arrow_model" in card and "python -m lorlib_ui route hf://alice/lib" in card
    assert 'PeftModel.from_pretrained(base, "alice/lib", subfolder=' in (upload / first / "README.md").read_text()
    for e in published.experts:
        assert _front_matter((upload / e.path / "README.md").read_text())["base_model"] == published.base_model
        base = AutoModelForCausalLM.from_pretrained(tiny_base)
        model = PeftModel.from_pretrained(base, str(upload), subfolder=e.path)
        assert model.peft_config["default"].r == e.rank
        assert (upload / e.path / WEIGHTS_FILE).read_bytes() == (published.path / e.path / WEIGHTS_FILE).read_bytes()


def test_a_pull_of_what_push_wrote_reproduces_the_library(published, hub, tmp_path):
    stage(published, tmp_path / "upload")
    commit = publish(hub, "alice/lib", tmp_path / "upload")
    pulled = pull("hf://alice/lib", tmp_path / "mine")
    assert pulled.names == published.names and pulled.groups() == published.groups()
    for e in published.experts:
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            assert (pulled.path / e.path / name).read_bytes() == (published.path / e.path / name).read_bytes()
    assert pulled.derived.expert_info("gates") == published.derived.expert_info("gates")
    assert pulled.derived.read_json("transfer") == {"cells": []}
    assert pulled.extra["history"][-1]["command"] == f"pull hf://alice/lib@{commit}"
    assert pulled.snapshot_of is None
    pulled.mark_general([pulled.names[0]])  # a pulled library is yours to change
    with pytest.raises(LorlibError, match="exists and is not an empty folder"):
        pull("hf://alice/lib", tmp_path / "mine")


def test_a_hub_library_opens_read_only_and_says_how_to_change_it(published, hub, tmp_path):
    stage(published, tmp_path / "upload")
    commit = publish(hub, "alice/lib", tmp_path / "upload")
    library = Library.open("hf://alice/lib")
    assert library.names == published.names and library.snapshot_of == f"hf://alice/lib@{commit}"
    assert Library.open(f"hf://alice/lib@{commit}").path == library.path  # one snapshot per commit
    before = {p: p.read_bytes() for p in library.path.rglob("*") if p.is_file()}
    with pytest.raises(
        LorlibError, match=f"read-only snapshot from the hub; `lorlib pull hf://alice/lib@{commit} DIR`"
    ):
        library.mark_general([library.names[0]])
    with pytest.raises(LorlibError, match="read-only snapshot"):
        import_adapters("hf://alice/lib", [tmp_path / "upload" / library.experts[0].path], names=["again"])
    assert {p: p.read_bytes() for p in library.path.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize(
    "ref, message",
    [
        ("hf://bob/missing", "hub library hf://bob/missing: not in the local hub cache, and the hub cannot be reached"),
        ("hf://bob", "is not a hub library: write hf://owner/repo"),
        ("hf://bob/x:sub", "is not a hub library"),
    ],
)
def test_hub_libraries_that_cannot_be_had_fail_in_one_line(hub, ref, message):
    with pytest.raises(LorlibError) as caught:
        Library.open(ref)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_a_repo_without_a_manifest_is_not_a_library(hub, tiny_adapters):
    files = {n: (tiny_adapters[0] / n).read_bytes() for n in (CONFIG_FILE, WEIGHTS_FILE)}
    publish(hub, "alice/just-an-adapter", files)
    with pytest.raises(LorlibError, match="has no manifest.json, so it is not a lorlib library"):
        Library.open("hf://alice/just-an-adapter")


def test_held_out_data_named_by_a_local_path_travels_as_a_copy(tiny_library, tmp_path):
    data = tmp_path / "elsewhere" / "tasks.jsonl"
    data.parent.mkdir()
    data.write_text('{"task": "t", "input": "a", "output": "b"}\n')
    with tiny_library.edit() as current:
        current.extra["held_out"] = {"data": str(data), "tasks": ["t"]}
    stage(Library.open(tiny_library.path), tmp_path / "upload")
    manifest = json.loads((tmp_path / "upload" / "manifest.json").read_text())
    assert manifest["held_out"] == {"data": "held_out_data.jsonl", "tasks": ["t"]}
    assert (tmp_path / "upload" / "held_out_data.jsonl").read_bytes() == data.read_bytes()
    assert str(tmp_path) not in (tmp_path / "upload" / "manifest.json").read_text()


def test_cards_of_the_shipped_library_hold_its_clusters_and_evaluation(tmp_path):
    from lorlib_ui.core.assets import asset

    shutil.copytree(asset("library"), tmp_path / "lib")
    library = Library.open(tmp_path / "lib")
    written = write_cards(library, license="apache-2.0")
    assert len(written) == len(library.experts) + 1
    card = (tmp_path / "lib" / "README.md").read_text()
    assert _front_matter(card)["license"] == "apache-2.0"
    assert "## MBC clusters" in card and "## Evaluation" in card
    arrow = next(line for line in card.splitlines() if line.startswith("| arrow |"))
    assert arrow.count("[") == 3  # each measure with its interval
    again = Library.open(tmp_path / "lib")
    assert again.names == library.names  # the cards change no expert
    on_disk = (tmp_path / "lib" / again.experts[0].path / "README.md").read_text()
    assert on_disk == expert_card(again, again.experts[0], "apache-2.0")
    assert library_card(again).startswith("---\n")


def test_an_expert_imported_from_the_hub_records_where_from(tmp_path, tiny_base, hub):
    folder = make_adapter(tmp_path / "fox", tiny_base, seed=3)
    commit = publish(hub, "alice/fox-lora", {n: (folder / n).read_bytes() for n in (CONFIG_FILE, WEIGHTS_FILE)})
    (stored,) = import_adapters(tmp_path / "lib", ["alice/fox-lora"], base_model=str(tiny_base))
    assert stored.name == "fox-lora"
    expected = {"hub": "alice/fox-lora", "subfolder": "", "revision": "main", "commit": commit}
    assert Library.open(tmp_path / "lib").expert("fox-lora").source == expected
    assert f"imported from `alice/fox-lora` at commit `{commit}`" in expert_card(Library.open(tmp_path / "lib"), stored)
