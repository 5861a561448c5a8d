"""Adapters from the hub, offline: a repo laid out in huggingface_hub's real cache, read by its
real download code, and every way a hub source can fail, in one line."""

import pytest
import torch
from hub_cache import publish

from lorlib_ui.core.adapters import CONFIG_FILE, WEIGHTS_FILE, read_adapter
from lorlib_ui.core.errors import LorlibError
from lorlib_ui.core.hub import HubSource, fetch_adapter, fetch_adapters, hub_source


@pytest.mark.parametrize(
    "text, expected",
    [
        ("alice/loras", HubSource("alice/loras")),
        ("alice/loras:experts/fox", HubSource("alice/loras", "experts/fox")),
        ("alice/loras@v1.0", HubSource("alice/loras", "", "v1.0")),
        ("alice/loras:fox@" + "a" * 40, HubSource("alice/loras", "fox", "a" * 40)),
        ("alice", None),
        ("alice/loras:../x", None),
        ("../alice/loras", None),
        ("/abs/path", None),
        ("alice/loras:a//b", None),
        ("alice/lo ras", None),
    ],
)
def test_hub_sources_parse(text, expected):
    assert HubSource.parse(text) == expected
    if expected is not None:
        assert str(expected) == text


def test_a_local_folder_is_never_a_hub_source(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "alice" / "loras").mkdir(parents=True)
    assert hub_source("alice/loras") is None
    assert hub_source("bob/loras") == HubSource("bob/loras")


def test_an_adapter_in_a_subfolder_is_fetched_as_plain_files(hub, tmp_path, tiny_adapters):
    folder = tiny_adapters[0]
    files = {f"experts/fox/{name}": (folder / name).read_bytes() for name in (CONFIG_FILE, WEIGHTS_FILE)}
    files["experts/fox/adapter_model.bin"] = b"a pickle that must never be read"
    commit = publish(hub, "alice/loras", files)
    fetched = fetch_adapter(HubSource.parse("alice/loras:experts/fox"), tmp_path / "got")
    assert fetched.commit == commit
    assert fetched.provenance() == {
        "hub": "alice/loras",
        "subfolder": "experts/fox",
        "revision": "main",
        "commit": commit,
    }
    assert sorted(p.name for p in fetched.folder.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
    assert not any(p.is_symlink() for p in fetched.folder.iterdir())
    got, original = read_adapter(fetched.folder), read_adapter(folder)
    assert all(torch.equal(got.factors[m][0], a) for m, (a, _) in original.factors.items())


def test_a_revision_resolves_to_its_commit(hub, tmp_path, tiny_adapters):
    first = {name: (tiny_adapters[0] / name).read_bytes() for name in (CONFIG_FILE, WEIGHTS_FILE)}
    second = {name: (tiny_adapters[1] / name).read_bytes() for name in (CONFIG_FILE, WEIGHTS_FILE)}
    old = publish(hub, "alice/one", first, revision="v1")
    new = publish(hub, "alice/one", second)
    assert fetch_adapter(HubSource.parse("alice/one@v1"), tmp_path / "a").commit == old
    assert fetch_adapter(HubSource.parse("alice/one"), tmp_path / "b").commit == new


def test_many_adapters_fetch_in_parallel_in_order(hub, tmp_path, tiny_adapters):
    sources = []
    for i, folder in enumerate(tiny_adapters[:4]):
        publish(hub, f"alice/task{i}", {n: (folder / n).read_bytes() for n in (CONFIG_FILE, WEIGHTS_FILE)})
        sources.append(HubSource(f"alice/task{i}"))
    seen = []
    fetched = fetch_adapters(sources, tmp_path / "many", done=lambda *count: seen.append(count))
    assert [f.source for f in fetched] == sources and sorted(seen) == [(i, 4) for i in range(1, 5)]
    for f, folder in zip(fetched, tiny_adapters):
        assert (f.folder / WEIGHTS_FILE).read_bytes() == (folder / WEIGHTS_FILE).read_bytes()


def test_failures_are_one_line_each(hub, tmp_path, tiny_adapters):
    config = (tiny_adapters[0] / CONFIG_FILE).read_bytes()
    publish(hub, "alice/pickled", {CONFIG_FILE: config, "adapter_model.bin": b"pickle"})
    publish(hub, "alice/noconfig", {WEIGHTS_FILE: (tiny_adapters[0] / WEIGHTS_FILE).read_bytes()})
    cases = {
        "bob/nothing": "not in the local hub cache, and the hub cannot be reached (offline)",
        "alice/pickled": "no adapter_model.safetensors there (lorlib loads weights only from safetensors",
        "alice/noconfig": "no adapter_config.json there",
        "alice/pickled@v9": "not in the local hub cache",
    }
    for source, message in cases.items():
        with pytest.raises(LorlibError) as caught:
            fetch_adapter(HubSource.parse(source), tmp_path / source.replace("/", "_"))
        assert message in str(caught.value) and "\n" not in str(caught.value)
        assert str(caught.value).startswith(f"hub adapter {source}: ")


def test_a_link_that_leaves_the_repo_cache_is_refused(hub, tmp_path, tiny_adapters):
    folder = tiny_adapters[0]
    commit = publish(hub, "alice/evil", {n: (folder / n).read_bytes() for n in (CONFIG_FILE, WEIGHTS_FILE)})
    outside = tmp_path / "secret.safetensors"
    outside.write_bytes((folder / WEIGHTS_FILE).read_bytes())
    link = hub / "models--alice--evil" / "snapshots" / commit / WEIGHTS_FILE
    link.unlink()
    link.symlink_to(outside)
    with pytest.raises(LorlibError, match="leads outside the hub cache"):
        fetch_adapter(HubSource("alice/evil"), tmp_path / "got")


def test_an_adapter_that_is_not_a_lora_is_refused_naming_its_source(hub, tiny_library, tiny_adapters):
    import json

    from conftest import library_snapshot

    from lorlib_ui.core.library import import_adapters

    folder = tiny_adapters[0]
    config = json.loads((folder / CONFIG_FILE).read_text()) | {"peft_type": "IA3"}
    files = {CONFIG_FILE: json.dumps(config).encode(), WEIGHTS_FILE: (folder / WEIGHTS_FILE).read_bytes()}
    publish(hub, "alice/ia3", files)
    before = library_snapshot(tiny_library.path)
    with pytest.raises(LorlibError) as caught:
        import_adapters(tiny_library.path, [HubSource("alice/ia3")])
    assert str(caught.value).startswith("hub adapter alice/ia3: ") and "LoRA" in str(caught.value)
    assert library_snapshot(tiny_library.path) == before
