"""The library's store of derived data: where each shape lives, staleness by weights hash,
atomic replacement, refusals, and a sweep that deletes only the store's own leftovers."""

import json

import pytest
import torch
from conftest import make_adapter

from lorlib_ui.core.adapters import read_adapter
from lorlib_ui.core.derived import KEY_SETS, KINDS
from lorlib_ui.core.errors import LorlibError
from lorlib_ui.core.library import Library, expert_from_adapter


def test_every_kind_has_one_shape_and_the_key_sets_are_the_per_expert_kinds():
    assert {kind.shape for kind in KINDS.values()} == {"tensors", "json", "per_expert", "named"}
    assert KEY_SETS == ("gates", "activations")
    assert all(kind.folder for kind in KINDS.values() if kind.shape == "named")


def test_a_kind_is_used_only_in_its_shape(tiny_library):
    with pytest.raises(ValueError, match="not a kind of derived data of shape tensors"):
        tiny_library.derived.read("gates")
    with pytest.raises(ValueError, match="not a kind"):
        tiny_library.derived.read_json("nothing-like-it")


def test_tensors_over_many_experts_round_trip_and_a_damaged_file_reads_as_absent(tiny_library):
    store = tiny_library.derived
    store.write("mbc-gram", {"gram": torch.eye(3)}, {"hashes": "[]"})
    tensors, metadata = store.read("mbc-gram")
    assert torch.equal(tensors["gram"], torch.eye(3)) and metadata == {"hashes": "[]"}
    (tiny_library.path / "mbc-gram.safetensors").write_bytes(b"\x00" * 40)
    assert store.read("mbc-gram") is None


def test_per_expert_data_is_stale_once_the_expert_changes(tiny_library, tiny_base, tmp_path):
    first = tiny_library.experts[0]
    keys = {m: torch.full((8,), 2.0) for m in ("model.layers.0.self_attn.q_proj",)}
    tiny_library.derived.write_expert("gates", first.name, keys, {"steps": 3}, first.weights_hash)
    assert tiny_library.derived.expert_info("gates") == {first.name: {"steps": 3}}
    assert torch.equal(
        tiny_library.derived.read_experts("gates")[first.name]["model.layers.0.self_attn.q_proj"],
        keys["model.layers.0.self_attn.q_proj"],
    )
    assert tiny_library.derived.lacking("gates") == tiny_library.names[1:]
    replacement = read_adapter(make_adapter(tmp_path / "new", tiny_base, seed=77))
    tiny_library.add_experts([(expert_from_adapter(first.name, replacement, "tiny"), replacement)], force=True)
    assert first.name not in tiny_library.derived.expert_info("gates")
    with pytest.raises(LorlibError, match="changed while its gates were computed"):
        tiny_library.derived.write_expert("gates", first.name, keys, {}, first.weights_hash)


def test_json_side_files_carry_a_summary_in_the_manifest(tiny_library):
    tiny_library.derived.update_json("transfer", lambda stored, current: ({"cells": [stored]}, {"cells": 1}))
    tiny_library.derived.update_json("transfer", lambda stored, current: ({"cells": [stored]}, {"cells": 2}))
    again = Library.open(tiny_library.path)
    assert again.derived.read_json("transfer") == {"cells": [{"cells": [None]}]}
    assert again.extra["side_files"]["transfer"]["file"] == "transfer.json"
    assert again.extra["side_files"]["transfer"]["cells"] == 2


def _record(current, file):
    return {"method": "poly-router", "experts": [], "hashes": [], "file": file}


def test_named_entries_replace_only_with_force_and_leave_no_old_file(tiny_library):
    store = tiny_library.derived
    first = store.store_entry("learned_routers", "r1", {"x": torch.ones(2)}, _record)
    assert first["file"].startswith("routers/r1-") and (tiny_library.path / first["file"]).is_file()
    with pytest.raises(LorlibError, match="already has a learned router 'r1' \\(use --force"):
        store.store_entry("learned_routers", "r1", {"x": torch.zeros(2)}, _record)
    second = store.store_entry("learned_routers", "r1", {"x": torch.zeros(2)}, _record, force=True)
    assert second["content"] != first["content"]
    assert sorted(p.name for p in (tiny_library.path / "routers").iterdir()) == [second["file"].split("/")[1]]
    assert torch.equal(Library.open(tiny_library.path).derived.read_entry("learned_routers", "r1")["x"], torch.zeros(2))
    store.remove_entry("learned_routers", "r1")
    assert list((tiny_library.path / "routers").iterdir()) == []
    with pytest.raises(LorlibError, match="has no learned router 'r1'"):
        store.remove_entry("learned_routers", "r1")


def test_a_refused_entry_writes_nothing(tiny_library):
    before = json.loads((tiny_library.path / "manifest.json").read_text())

    def refuse(current, file):
        raise LorlibError("expert task0 changed while the router was learned; run again")

    with pytest.raises(LorlibError, match="changed while the router was learned"):
        tiny_library.derived.store_entry("learned_routers", "r2", {"x": torch.ones(2)}, refuse)
    assert json.loads((tiny_library.path / "manifest.json").read_text()) == before
    assert not (tiny_library.path / "routers").exists()


def test_the_sweep_deletes_the_store_leftovers_and_nothing_else(tiny_library):
    expert = tiny_library.path / tiny_library.experts[0].path
    leftovers = [
        tiny_library.path / f".prototypes.safetensors.{'a' * 32}",
        expert / f".gates.safetensors.{'b' * 32}",
    ]
    kept = [
        tiny_library.path / f".notes.txt.{'c' * 32}",  # not a name the store writes
        expert / "README.md",
    ]
    for path in leftovers + kept:
        path.write_text("x")
    tiny_library.mark_general([])  # any write sweeps
    assert not any(p.exists() for p in leftovers)
    assert all(p.exists() for p in kept)


def test_the_library_opens_its_store_over_itself_without_knowing_a_kind(tiny_library):
    """The library names no kind of derived data: what it keeps beside the experts is the store's."""
    import inspect

    from lorlib_ui.core import library

    source = inspect.getsource(library)
    assert not any(f'"{name}' in source for name in KINDS)
    assert "routers/" not in source


def test_changes_name_the_experts_added_removed_or_retrained_and_say_so_in_words():
    from lorlib_ui.core.derived import Changes, changes

    changed = changes({"a": "1", "b": "2", "c": "3"}, {"a": "1", "b": "9", "d": "4"})
    assert changed == Changes(added=("d",), removed=("c",), retrained=("b",))
    assert changed.describe() == "1 expert added, 1 retrained and 1 removed since"
    assert Changes(added=("x",)).describe() == "1 expert added since"
    assert Changes(retrained=("x", "y")).describe() == "2 experts retrained since"
    assert not changes({"a": "1"}, {"a": "1"}) and changed


def test_stale_keys_are_told_from_keys_never_computed_and_still_read_as_absent(tiny_library, tiny_base, tmp_path):
    """Keys computed for task0..task2; then task0 is replaced (retrained) and a new expert is
    added: the store says which lack keys since and why, task3..task5 (never given keys) are in
    neither, and the normal reads, which routers use, still treat the stale ones as absent."""
    import time

    for seconds, e in zip((10.0, 30.0, 20.0), tiny_library.experts[:3]):
        keys = {"model.layers.0.self_attn.q_proj": torch.ones(8)}
        tiny_library.derived.write_expert("gates", e.name, keys, {"seconds": seconds}, e.weights_hash)
    time.sleep(1.1)  # the new expert is created a second after the keys: expert times count to the second
    retrained = read_adapter(make_adapter(tmp_path / "retrained", tiny_base, seed=70))
    extra = read_adapter(make_adapter(tmp_path / "extra", tiny_base, seed=71))
    tiny_library.add_experts([(expert_from_adapter("task0", retrained, "tiny"), retrained)], force=True)
    tiny_library.add_experts([(expert_from_adapter("extra", extra, "tiny"), extra)])
    store = Library.open(tiny_library.path).derived
    assert sorted(store.lacking("gates")) == ["extra", "task0", "task3", "task4", "task5"]
    changed = store.key_changes("gates")
    assert changed.added == ("task0", "extra") and not changed.retrained  # a replaced expert is stored anew
    assert changed.describe(added="added or replaced") == "2 experts added or replaced since"
    assert store.key_changes("gates", ["task3", "task4"]) == type(changed)()  # never computed: not stale
    assert store.seconds_per_expert("gates") == 25.0  # the median of task1's and task2's recorded times


def test_the_time_per_expert_comes_from_the_history_where_the_files_record_none(tiny_library):
    for e in tiny_library.experts[:3]:
        keys = {"model.layers.0.self_attn.q_proj": torch.ones(8)}
        tiny_library.derived.write_expert("activations", e.name, keys, {"examples": 100}, e.weights_hash)
    assert tiny_library.derived.seconds_per_expert("activations") is None  # nothing measured
    tiny_library.record_history("python -m lorlib_ui gates LIB", 999.0)  # another key set's run
    tiny_library.record_history("python -m lorlib_ui activations LIB --experts private", 90.0)
    assert Library.open(tiny_library.path).derived.seconds_per_expert("activations") == 30.0
