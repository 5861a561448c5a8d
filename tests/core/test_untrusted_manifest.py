"""A library's manifest and tree are untrusted: what `Library.open` refuses, what the held-out
record may name, what the sweep may delete, and which configs `read_adapter` refuses."""

import json
import os
import shutil
import time

import pytest
from conftest import library_snapshot

from lorlib_ui.core.adapters import read_adapter
from lorlib_ui.core.errors import LorlibError
from lorlib_ui.core.library import HeldOut, Library


def _edit(path, change):
    manifest = json.loads((path / "manifest.json").read_text())
    change(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    ("held_out", "kind", "source"),
    [
        (None, "default", "default"),
        ({"data": "default", "tasks": ["a"]}, "default", "default"),
        ({"data": "data.jsonl", "tasks": ["a"]}, "inside", "{lib}/data.jsonl"),
        ({"data": "/srv/data/tasks.csv", "tasks": []}, "path", "/srv/data/tasks.csv"),
        ({"data": "sordonia/flan-10k-flat", "tasks": ["a"]}, "hub", "sordonia/flan-10k-flat"),
    ],
)
def test_the_held_out_record_names_its_data(tiny_library, held_out, kind, source):
    _edit(tiny_library.path, lambda m: m.update(held_out=held_out) if held_out else m.pop("held_out", None))
    library = Library.open(tiny_library.path)
    assert library.held_out.kind == kind
    assert library.data_source() == source.format(lib=tiny_library.path)
    assert library.data_source("other.jsonl") == "other.jsonl"  # a command's own data comes first


@pytest.mark.parametrize(
    "held_out",
    [
        {"data": "../outside.csv", "tasks": []},
        {"data": "a/../../outside.csv", "tasks": []},
        {"data": 7, "tasks": []},
        {"data": "default", "tasks": "a"},
        "default",
    ],
)
def test_a_held_out_record_that_leaves_the_library_is_refused(tiny_library, held_out):
    _edit(tiny_library.path, lambda m: m.update(held_out=held_out))
    with pytest.raises(LorlibError, match="held"):
        Library.open(tiny_library.path)


def test_a_file_inside_that_looks_like_a_hub_id_is_the_file(tiny_library):
    (tiny_library.path / "owner").mkdir()
    (tiny_library.path / "owner" / "tasks.jsonl").write_text("{}\n")
    assert HeldOut("owner/tasks.jsonl").source(tiny_library.path) == str(tiny_library.path / "owner/tasks.jsonl")


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda m: m.update(side_files={"transfer": {"file": "../x.json"}}), "side file"),
        (lambda m: m.update(side_files={"../t": {"file": "../t.json"}}), "side file"),
        (lambda m: m.update(side_files={"transfer": "transfer.json"}), "side file"),
        (lambda m: m.update(side_files=[]), "must be JSON objects"),
        (lambda m: m.update(learned_routers={"r": {"file": "/etc/passwd"}}), "not in its routers/"),
        (lambda m: m.update(learned_routers={"r": {"file": "routers/../../x.safetensors"}}), "not in its routers/"),
        (lambda m: m["experts"][0].update(path="experts/task0/sub"), "not in its experts/"),
    ],
)
def test_a_manifest_naming_files_elsewhere_is_refused(tiny_library, change, match):
    _edit(tiny_library.path, change)
    with pytest.raises(LorlibError, match=match):
        Library.open(tiny_library.path)


@pytest.mark.parametrize("where", ["transfer.json", "experts/task1/gates.safetensors", "experts/task2"])
def test_links_anywhere_in_the_tree_are_refused(tiny_library, tmp_path, where):
    target = tmp_path / "elsewhere"
    target.mkdir()
    path = tiny_library.path / where
    shutil.rmtree(path, ignore_errors=True)
    path.symlink_to(target)
    with pytest.raises(LorlibError, match=f"{where} is a link"):
        Library.open(tiny_library.path)


def test_a_fifo_is_refused_at_once(tiny_library):
    os.mkfifo(tiny_library.path / "experts" / "task0" / "activations.safetensors")
    start = time.perf_counter()
    with pytest.raises(LorlibError, match="activations.safetensors is a special file"):
        Library.open(tiny_library.path)
    assert time.perf_counter() - start < 5


def test_the_sweep_deletes_only_the_temporaries_of_what_the_library_writes(tiny_library, tmp_path):
    root = tiny_library.path
    leftovers = [".manifest.json." + "a" * 32, ".transfer.json." + "b" * 32, ".prototypes.safetensors." + "c" * 32]
    kept = [".manifest.json.short", ".notes.txt." + "d" * 32, "notes.txt", ".transfer.json." + "e" * 31 + "g"]
    _edit(root, lambda m: m.update(side_files={"transfer": {"file": "transfer.json"}}))
    for name in leftovers + kept:
        (root / name).write_text("x")
    library = Library.open(root)
    library.mark_general(["task0"])  # any write sweeps
    assert not [n for n in leftovers if (root / n).exists()]
    assert all((root / n).exists() for n in kept)


def test_an_unusable_expert_is_reported_not_refused(tiny_library):
    _edit(tiny_library.path, lambda m: m["experts"][1].update(alpha=float("nan")))
    _edit(tiny_library.path, lambda m: m["experts"][2].update(rank=10**6))
    problems = Library.open(tiny_library.path).problems
    assert problems == {
        "task1": "its lora_alpha is nan, not a finite number",
        "task2": "its rank 1000000 is not between 1 and 64",
    }


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({"lora_alpha": True}, "lora_alpha must be a finite number"),
        ({"rank_pattern": {"x" * 301: 4}}, "longer than 300 characters"),
        ({"rank_pattern": {f"k{i}": 4 for i in range(1001)}}, "more than 1000"),
        ({"rank_pattern": {"q_proj": 0}}, r"rank_pattern\['q_proj'\] must be an integer between 1 and 64"),
        ({"rank_pattern": ["q_proj"]}, "rank_pattern must be a JSON object"),
        ({"use_rslora": "yes"}, "use_rslora must be true or false"),
        ({"r": 2**70}, "above the largest rank allowed"),
    ],
)
def test_config_numbers_and_patterns_are_checked(tiny_adapters, tmp_path, config, match):
    folder = tmp_path / "adapter"
    shutil.copytree(tiny_adapters[0], folder)
    data = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**data, **config}))
    before = library_snapshot(folder)
    with pytest.raises(LorlibError, match=match):
        read_adapter(folder)
    assert library_snapshot(folder) == before
