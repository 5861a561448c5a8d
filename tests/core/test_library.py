import json
import shutil

import pytest
import torch
from conftest import build_library, library_snapshot, make_adapter
from safetensors.torch import load_file, save_file

from lorlib_ui.core.adapters import WEIGHTS_FILE, read_adapter
from lorlib_ui.core.base_model import base_model_info
from lorlib_ui.core.derived import KINDS
from lorlib_ui.core.errors import LorlibError
from lorlib_ui.core.library import Library, check_name, expert_from_adapter
from lorlib_ui.core.prototypes import expert_prototypes, stored_prototypes


def _entry(name, folder, base="tiny"):
    adapter = read_adapter(folder)
    return expert_from_adapter(name, adapter, base, tasks=[name], family="fam"), adapter


def test_round_trip(tiny_library, tiny_adapters):
    again = Library.open(tiny_library.path)
    assert again.manifest() == tiny_library.manifest()
    assert again.names == [p.name for p in tiny_adapters]
    for name, folder in zip(again.names, tiny_adapters):
        stored, original = again.load_adapter(name), read_adapter(folder)
        assert stored.scales == original.scales
        for module, (a, b) in original.factors.items():
            assert torch.equal(stored.factors[module][0], a) and torch.equal(stored.factors[module][1], b)
    expert = again.expert(again.names[0])
    assert expert.rank == 4 and expert.target_modules == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert expert.kind == "imported" and expert.weights_hash and expert.created


def test_expert_folders_load_with_plain_peft(tiny_library, tiny_base):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    folder = tiny_library.path / tiny_library.expert(tiny_library.names[0]).path
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), folder)
    assert model.peft_config["default"].r == 4


def cached_by_hash(library: Library) -> dict[str, dict[str, torch.Tensor]]:
    """The prototype cache as weights hash -> module -> prototype."""
    return stored_prototypes(library)


def test_prototype_cache_is_keyed_by_weights(tiny_library, tiny_base, tmp_path):
    cached = cached_by_hash(tiny_library)
    assert set(cached) == {e.weights_hash for e in tiny_library.experts}
    for e in tiny_library.experts:
        assert len(cached[e.weights_hash]) == len(tiny_library.load_adapter(e.name).factors)
    # replacing an expert's weights gives it a new hash and new prototypes; the old ones are dropped
    name = tiny_library.names[0]
    old_hash = tiny_library.expert(name).weights_hash
    tiny_library.add_experts([_entry(name, make_adapter(tmp_path / "new", tiny_base, seed=99))], force=True)
    new_hash = tiny_library.expert(name).weights_hash
    assert new_hash != old_hash
    cached = cached_by_hash(Library.open(tiny_library.path))
    assert old_hash not in cached and new_hash in cached
    assert (
        len(load_file(tiny_library.path / KINDS["prototypes"].file)) == 8
    )  # one matrix per module: q, k, v, o of 2 layers
    # the replaced folder is gone; only the manifest's folders remain
    on_disk = {p.name for p in (tiny_library.path / "experts").iterdir()}
    assert on_disk == {e.path.split("/")[-1] for e in tiny_library.experts}


def test_damaged_prototype_cache_is_recomputed(tiny_library):
    expected = expert_prototypes(tiny_library)
    (tiny_library.path / KINDS["prototypes"].file).write_bytes(b"garbage")
    again = expert_prototypes(Library.open(tiny_library.path))
    name = tiny_library.names[0]
    for module, vector in expected[name].items():
        assert torch.allclose(again[name][module], vector)


@pytest.mark.parametrize("name", ["../evil", "a/b", "a\\b", "..", ".hidden", "", "x" * 101, "tab\tname", "nul\x00"])
def test_bad_names_are_refused(name):
    with pytest.raises(LorlibError, match="invalid expert name"):
        check_name(name)


def _refused(library, entries, message, **kwargs):
    before = library_snapshot(library.path)
    with pytest.raises(LorlibError, match=message):
        library.add_experts(entries, **kwargs)
    assert library_snapshot(library.path) == before
    assert Library.open(library.path).manifest() == library.manifest()


def test_refusals_leave_library_unchanged(tiny_library, tiny_adapters, tmp_path):
    first = tiny_library.names[0]
    _refused(tiny_library, [_entry(first, tiny_adapters[1])], "already has an expert named")
    _refused(tiny_library, [_entry("../up", tiny_adapters[1])], "invalid expert name")
    _refused(tiny_library, [_entry("twice", tiny_adapters[1]), _entry("twice", tiny_adapters[2])], "duplicate")


def test_wrong_shape_adapter_is_refused(tiny_library, tmp_path):
    from conftest import build_tiny_llama

    other_base = build_tiny_llama(tmp_path / "wide", hidden=96)
    wide = make_adapter(tmp_path / "wide_adapter", other_base, seed=0)
    _refused(
        tiny_library,
        [_entry("wide", wide)],
        r"k_proj is 48x96 in the adapter but 32x64 in the base model \(an adapter for another base model\?\)",
    )


def test_failed_write_leaves_previous_state(tiny_library, tiny_adapters, monkeypatch):
    """A crash (here: a full disk) while writing an expert leaves the library as it was."""
    import lorlib_ui.core.library as library_module

    before_manifest = tiny_library.manifest()

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(library_module, "write_adapter", disk_full)
    with pytest.raises(LorlibError, match="could not write \\(No space left on device\\); the library is unchanged"):
        tiny_library.add_experts([_entry("new_one", tiny_adapters[1])])
    assert not (tiny_library.path / ".staging").exists()
    monkeypatch.undo()
    reopened = Library.open(tiny_library.path)
    assert reopened.manifest() == before_manifest
    for name in reopened.names:
        reopened.load_adapter(name)
    # the next successful write sweeps any leftovers
    reopened.add_experts([_entry("new_one", tiny_adapters[1])])
    assert not (tiny_library.path / ".staging").exists()
    assert "new_one" in Library.open(tiny_library.path).names


def test_crash_after_folder_before_manifest(tiny_library, tiny_adapters, monkeypatch):
    import lorlib_ui.core.library as library_module

    def crash(self):
        raise KeyboardInterrupt  # stands for a kill between the folder rename and the manifest write

    monkeypatch.setattr(library_module.Library, "save_manifest", crash)
    with pytest.raises(KeyboardInterrupt):
        tiny_library.add_experts([_entry("late", tiny_adapters[1])])
    monkeypatch.undo()
    reopened = Library.open(tiny_library.path)
    assert "late" not in reopened.names and len(reopened.names) == 6


def test_open_refuses_corrupt_manifest(tmp_path):
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(LorlibError, match="manifest.json is unreadable"):
        Library.open(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(LorlibError, match="manifest.json is unreadable"):
        Library.open(tmp_path)
    with pytest.raises(LorlibError, match="no library at"):
        Library.open(tmp_path / "missing")


def test_create_refuses_non_empty_folder(tmp_path, tiny_base):
    (tmp_path / "stuff.txt").write_text("x")
    with pytest.raises(LorlibError, match="not an empty folder"):
        Library.create(tmp_path, base_model_info(str(tiny_base)))


def test_base_model_must_fit(tiny_library, tmp_path):
    from conftest import build_tiny_llama

    other = base_model_info(str(build_tiny_llama(tmp_path / "wide", hidden=96)))
    with pytest.raises(LorlibError, match="does not fit library"):
        tiny_library.check_base(other)


def test_mixed_library_round_trip(tmp_path, tiny_base):
    dirs = [
        make_adapter(tmp_path / "r2", tiny_base, seed=1, rank=2, targets=["q_proj"]),
        make_adapter(tmp_path / "r16", tiny_base, seed=2, rank=16, targets=["v_proj", "o_proj"]),
    ]
    library = build_library(tmp_path / "lib", tiny_base, dirs)
    reopened = Library.open(library.path)
    assert [e.rank for e in reopened.experts] == [2, 16]
    assert reopened.expert("r16").target_modules == ["o_proj", "v_proj"]


def test_weights_file_corruption_detected_on_load(tiny_library):
    folder = tiny_library.path / tiny_library.expert(tiny_library.names[0]).path
    data = (folder / WEIGHTS_FILE).read_bytes()
    (folder / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(LorlibError, match="not a valid safetensors file"):
        tiny_library.load_adapter(tiny_library.names[0])


def test_import_keeps_original_dtype(tmp_path, tiny_base, tiny_adapters, tiny_library):
    half = tmp_path / "half"
    shutil.copytree(tiny_adapters[0], half)
    tensors = {k: v.to(torch.bfloat16) for k, v in load_file(half / WEIGHTS_FILE).items()}
    save_file(tensors, half / WEIGHTS_FILE)
    tiny_library.add_experts([_entry("half", half)])
    stored = tiny_library.load_adapter("half")
    assert next(iter(stored.factors.values()))[0].dtype == torch.bfloat16


def test_general_experts_are_a_group_beside_the_kinds(tiny_library, tiny_adapters):
    """Experts of kind general are general; a marked expert keeps its kind (and its mark when
    replaced); manifests written before the mark existed read as unmarked."""
    first, second = tiny_library.names[:2]
    tiny_library.mark_general([second])
    again = Library.open(tiny_library.path)
    assert again.groups()["general"] == [second] and second in again.groups()["imported"]
    again.add_experts([_entry(second, tiny_adapters[5])], force=True)
    assert Library.open(tiny_library.path).groups()["general"] == [second]
    adapter = read_adapter(tiny_adapters[0])
    assert expert_from_adapter("g", adapter, "tiny", kind="general").general
    manifest = json.loads((tiny_library.path / "manifest.json").read_text())
    for entry in manifest["experts"]:
        del entry["general"]
    (tiny_library.path / "manifest.json").write_text(json.dumps(manifest))
    assert Library.open(tiny_library.path).groups()["general"] == []


def test_remove_expert(tiny_library):
    name = tiny_library.names[2]
    folder = tiny_library.path / tiny_library.expert(name).path
    tiny_library.remove_expert(name)
    reopened = Library.open(tiny_library.path)
    assert name not in reopened.names and len(reopened.names) == 5 and not folder.exists()
    with pytest.raises(LorlibError, match=f"unknown expert '{name}'"):
        reopened.remove_expert(name)


def test_library_files_follow_the_umask(tmp_path, tiny_base, tiny_adapters, monkeypatch):
    """safetensors creates files 0600; a library's weights, keys and caches must be as readable as
    the manifest beside them (a library in a shared folder is read by other users). The umask is
    set to 022 here, so that the test fails whatever the umask it runs under."""
    import os
    import stat

    from lorlib_ui.core import atomic

    MBC_GRAM = KINDS["mbc-gram"].file

    previous = os.umask(0o022)
    monkeypatch.setattr(atomic, "_UMASK", 0o022)
    try:
        library = build_library(tmp_path / "lib", tiny_base, tiny_adapters[:2])
        first = library.experts[0]
        gates = {m: torch.ones(8) for m in first.target_modules}
        library.derived.write_expert("gates", first.name, gates, {}, first.weights_hash)
        library.derived.write("mbc-gram", {"gram": torch.eye(2)}, {"hashes": "[]"})
    finally:
        os.umask(previous)
    files = [p for p in library.path.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert {KINDS["prototypes"].file, MBC_GRAM, "gates.safetensors", WEIGHTS_FILE, "manifest.json"} <= names
    modes = {p.relative_to(library.path).as_posix(): stat.S_IMODE(os.stat(p).st_mode) for p in files}
    assert modes == dict.fromkeys(modes, 0o644)
