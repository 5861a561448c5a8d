"""The catalogue of bad inputs, each tried through the command line, the Python API and the app.

Every entry must give a clear message (CLI: one line on stderr, exit 1, no traceback; Python: a
LorlibError; app: an error the client sees, the app still serving) and leave the library's files
byte for byte as they were. README.md, "Reliability", summarises what is tried here.
"""

import json
import os
import pickle
import re
import shutil
import zipfile

import gradio_client  # noqa: E402
import pytest
import torch
from conftest import TRAIN, build_library, free_port, library_snapshot, run
from gradio_client.exceptions import AppError  # noqa: E402
from safetensors.torch import load_file, save_file

from lorlib_ui.core.adapters import CONFIG_FILE, WEIGHTS_FILE
from lorlib_ui.core.errors import LorlibError

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"


@pytest.fixture(scope="module")
def library(tmp_path_factory, tiny_base, tiny_adapters):
    return build_library(tmp_path_factory.mktemp("catalogue") / "lib", tiny_base, tiny_adapters[:4])


@pytest.fixture(scope="module")
def client(library):
    """The explorer on the catalogue's library, served for the whole module."""
    from lorlib_ui.app.layout import build_app, launch
    from lorlib_ui.worker.local import LocalWorker

    app = build_app(LocalWorker(device="cpu"), str(library.path), {})
    port = free_port()
    launch(app, "127.0.0.1", port, block=False)
    yield gradio_client.Client(f"http://127.0.0.1:{port}/", verbose=False)
    app.close()


@pytest.fixture
def unchanged(library, client):
    """Checks, after the test, that the library is byte for byte as before and the app serves."""
    before = library_snapshot(library.path)
    yield
    assert library_snapshot(library.path) == before
    assert client.predict(api_name="/health")["up"]


def _one_line_error(code, out, err, message):
    assert code == 1, (out, err)
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert re.search(message, err), err


# ---- adapters -------------------------------------------------------------------------------------


def _config(folder, **changes):
    config = json.loads((folder / CONFIG_FILE).read_text())
    (folder / CONFIG_FILE).write_text(json.dumps({**config, **changes}))


def _weights(folder, change):
    tensors = load_file(folder / WEIGHTS_FILE)
    change(tensors)
    save_file(tensors, folder / WEIGHTS_FILE)


def _first(tensors, value):
    key = sorted(tensors)[0]
    tensors[key] = tensors[key].clone()
    tensors[key][0, 0] = value


def _other_base(tensors):  # as if trained on a model with wider layers
    for key in list(tensors):
        if "lora_A" in key:
            tensors[key] = torch.zeros(tensors[key].shape[0], tensors[key].shape[1] * 2)


def _pickled(name):
    def make(folder):
        (folder / WEIGHTS_FILE).unlink()
        # unpickling this would create a file: the test checks that it never appears
        payload = pickle.dumps(_Trap(str(folder / "UNPICKLED")))
        (folder / name).write_bytes(payload)

    return make


class _Trap:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


BAD_ADAPTERS = {
    "truncated safetensors": (
        lambda f: (f / WEIGHTS_FILE).write_bytes((f / WEIGHTS_FILE).read_bytes()[:200]),
        "is not a valid safetensors file",
    ),
    "corrupt safetensors": (lambda f: (f / WEIGHTS_FILE).write_bytes(os.urandom(4096)), "not a valid safetensors file"),
    "adapter for another base model": (lambda f: _weights(f, _other_base), r"an adapter for another base model\?"),
    "IA3 adapter": (lambda f: _config(f, peft_type="IA3"), "it is a IA3 adapter; only LoRA"),
    "prefix-tuning adapter": (lambda f: _config(f, peft_type="PREFIX_TUNING"), "PREFIX_TUNING adapter; only LoRA"),
    "config without weights": (lambda f: (f / WEIGHTS_FILE).unlink(), "adapter_model.safetensors is missing"),
    "weights without config": (lambda f: (f / CONFIG_FILE).unlink(), "adapter_config.json is missing"),
    "NaN weights": (lambda f: _weights(f, lambda t: _first(t, float("nan"))), "contains NaN or Inf"),
    "Inf weights": (lambda f: _weights(f, lambda t: _first(t, float("inf"))), "contains NaN or Inf"),
    "rank 0": (lambda f: _config(f, r=0), "rank r must be a positive integer"),
    "pickled .bin": (_pickled("adapter_model.bin"), r"weights are pickled \(adapter_model.bin\)"),
    "pickled .pt": (_pickled("adapter_model.pt"), r"weights are pickled \(adapter_model.pt\)"),
    "pickled .ckpt": (_pickled("adapter_model.ckpt"), r"weights are pickled \(adapter_model.ckpt\)"),
}


# In a zip, a folder without adapter_config.json is not recognised as an adapter at all.
APP_MESSAGES = {"weights without config": r"no PEFT adapter \(adapter_config.json\) in the archive"}


@pytest.fixture(params=sorted(BAD_ADAPTERS))
def bad_adapter(request, tmp_path, tiny_adapters):
    folder = tmp_path / "newcomer"
    shutil.copytree(tiny_adapters[5], folder)
    make, message = BAD_ADAPTERS[request.param]
    make(folder)
    yield folder, message, APP_MESSAGES.get(request.param, message)
    assert not (folder / "UNPICKLED").exists(), "a pickle was loaded"


def test_bad_adapter_cli(bad_adapter, library, unchanged, capsys):
    folder, message, _ = bad_adapter
    _one_line_error(*run(capsys, "import-peft", library.path, folder), message)


def test_bad_adapter_python(bad_adapter, library, unchanged):
    from lorlib_ui.core.library import import_adapters

    folder, message, _ = bad_adapter
    with pytest.raises(LorlibError, match=message):
        import_adapters(library.path, [folder])


def test_bad_adapter_app(bad_adapter, library, client, unchanged, tmp_path):
    from lorlib_ui.core.archives import zip_folder

    folder, _, message = bad_adapter
    archive = zip_folder(folder, tmp_path / "newcomer.zip")
    with pytest.raises(AppError) as info:
        client.predict(gradio_client.handle_file(str(archive)), api_name="/import_adapters")
    assert re.search(message, str(info.value))


# ---- names ----------------------------------------------------------------------------------------

BAD_NAMES = {
    "path separator": ("a/b", "invalid expert name"),
    "parent folder": ("..", "invalid expert name"),
    "control character": ("bad\x07name", "invalid expert name"),
    "an existing expert's name": ("task0", "already has an expert named 'task0'"),
}


def _zip_tree(root, archive):
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(root.rglob("*")):
            zf.write(path, path.relative_to(root))
    return archive


@pytest.mark.parametrize("case", sorted(BAD_NAMES))
def test_bad_names(case, library, client, unchanged, tiny_adapters, capsys, tmp_path):
    from lorlib_ui.core.library import import_adapters

    name, message = BAD_NAMES[case]
    _one_line_error(*run(capsys, "import-peft", library.path, tiny_adapters[5], "--name", name), message)
    with pytest.raises(LorlibError, match=message):
        import_adapters(library.path, [tiny_adapters[5]], names=[name])
    if name not in ("a/b", ".."):  # through the app: a zip of a folder of that name (where one can exist)
        shutil.copytree(tiny_adapters[5], tmp_path / "tree" / name)
        with pytest.raises(AppError, match=message):
            archive = _zip_tree(tmp_path / "tree", tmp_path / "upload.zip")
            client.predict(gradio_client.handle_file(str(archive)), api_name="/import_adapters")


def test_duplicate_names_in_one_import(library, client, unchanged, tiny_adapters, capsys, tmp_path):
    from lorlib_ui.core.library import import_adapters

    twins = [tmp_path / "tree" / side / "twin" for side in ("a", "b")]
    for twin, source in zip(twins, tiny_adapters[4:6]):
        shutil.copytree(source, twin)
    message = "duplicate expert names"
    _one_line_error(*run(capsys, "import-peft", library.path, *twins), message)
    with pytest.raises(LorlibError, match=message):
        import_adapters(library.path, twins)
    with pytest.raises(AppError, match=message):
        archive = _zip_tree(tmp_path / "tree", tmp_path / "upload.zip")
        client.predict(gradio_client.handle_file(str(archive)), api_name="/import_adapters")


# ---- zip uploads (the app and the Python API; the command line imports folders) -------------------


def _zip_entries(archive, entries):
    with zipfile.ZipFile(archive, "w") as zf:
        for name, data in entries:
            zf.writestr(name, data)
    return archive


def _zip_symlink(archive):
    with zipfile.ZipFile(archive, "w") as zf:
        link = zipfile.ZipInfo("adapter/adapter_config.json")
        link.external_attr = 0o120777 << 16  # a symlink to a file outside
        zf.writestr(link, "/etc/passwd")
    return archive


def _zip_too_big(archive):
    """Over the 512 MiB unpacked limit, though small on disk: 513 MiB of zeros."""
    block, deflate = bytes(2**20), zipfile.ZIP_DEFLATED
    with zipfile.ZipFile(archive, "w", compression=deflate) as zf, zf.open("big/x.bin", "w", force_zip64=True) as out:
        for _ in range(513):
            out.write(block)
    return archive


BAD_ZIPS = {
    "path traversal": (lambda a: _zip_entries(a, [("../evil/adapter_config.json", "{}")]), "outside its folder"),
    "absolute path": (lambda a: _zip_entries(a, [("/tmp/evil/adapter_config.json", "{}")]), "outside its folder"),
    "symlink": (_zip_symlink, "is a link or special file"),
    "over the size limit": (_zip_too_big, "unpacks to more than"),
    "not a zip": (lambda a: (a.write_bytes(b"PK\x03\x04 not really"), a)[1], "not a zip archive"),
}


@pytest.mark.parametrize("case", sorted(BAD_ZIPS))
def test_bad_zip_uploads(case, library, client, unchanged, tmp_path):
    from lorlib_ui.worker.local import LocalWorker

    make, message = BAD_ZIPS[case]
    archive = make(tmp_path / "upload.zip")
    with pytest.raises(LorlibError, match=message):
        LocalWorker(device="cpu").import_archive(str(library.path), str(archive))
    with pytest.raises(AppError, match=message):
        client.predict(gradio_client.handle_file(str(archive)), api_name="/import_adapters")
    assert not (tmp_path.parent / "evil").exists() and not os.path.exists("/tmp/evil")


# ---- prompts and router settings ------------------------------------------------------------------

BAD_ROUTES = {  # (prompt, router, top-k, temperature) -> message
    "empty prompt": (("", "arrow", 2, 1.0), "is empty"),
    "blank prompt": (("  \n\t", "arrow", 2, 1.0), "is empty"),
    "top-k 0": (("hello", "arrow", 0, 1.0), "top-k must be between 1 and"),
    "top-k above the experts": (("hello", "arrow", 5, 1.0), r"top-k must be between 1 and the number of experts \(4\)"),
    "temperature 0": (("hello", "arrow", 2, 0.0), "temperature must be positive"),
    "negative temperature": (("hello", "arrow", 2, -1.0), "temperature must be positive"),
    "unknown router": (("hello", "nonsense", 2, 1.0), "unknown router"),
    "unknown expert": (("hello", "expert:nobody", 2, 1.0), "nobody"),
}


# The app's sliders refuse what is below their minimum before the worker sees it, in Gradio's words.
APP_ROUTE_MESSAGES = {
    "top-k 0": "Value 0 is less than minimum value 1",
    "temperature 0": "Value 0.0 is less than minimum value 0.1",
    "negative temperature": "Value -1.0 is less than minimum value 0.1",
}


@pytest.mark.parametrize("case", sorted(BAD_ROUTES))
def test_bad_routes(case, library, client, unchanged, capsys):
    from lorlib_ui.core.generation import generate
    from lorlib_ui.core.routed_model import RoutedModel
    from lorlib_ui.core.routers import make_router

    (prompt, router, top_k, temperature), message = BAD_ROUTES[case]
    argv = ["route", library.path, "--prompt", prompt, "--router", router, "--top-k", top_k]
    _one_line_error(*run(capsys, *argv, "--temperature", temperature), message)
    with pytest.raises(LorlibError, match=message):
        rm = RoutedModel.load(library, device="cpu")
        generate(rm, prompt, make_router(router, rm.experts, top_k, temperature), max_new_tokens=2)
    with pytest.raises(AppError, match=APP_ROUTE_MESSAGES.get(case, message)):
        client.predict(prompt, router, top_k, temperature, 2, api_name="/route")


@pytest.mark.parametrize("prompt", ["\x00\x01\x02 \ufffd\x7f binary", "word " * 400], ids=["binary", "too long"])
def test_binary_and_overlong_prompts_are_answered(prompt, library, client, unchanged, capsys):
    """A binary prompt is text like any other; one beyond the model's context (256 tokens here)
    is cut from the left, with a notice."""
    code, out, err = run(capsys, "route", library.path, "--prompt", prompt, "--max-new-tokens", "2")
    assert code == 0, err
    assert ("notice: the prompt was longer than the model's context" in err) == (prompt.startswith("word"))
    _, note, *_ = client.predict(prompt, "arrow", 2, 1.0, 2, api_name="/route")
    assert "done in" in note
    assert ("the prompt was cut from the left to fit" in note) == (prompt.startswith("word"))


# ---- clusters and empty libraries -----------------------------------------------------------------


@pytest.mark.parametrize("k", [0, 5, 99])
def test_k_out_of_range(k, library, client, unchanged, capsys):
    from lorlib_ui.training.clusters import cluster_library

    message = "k must be between 1 and the number of"
    _one_line_error(*run(capsys, "cluster", library.path, "--k", k, "--no-train"), message)
    with pytest.raises(LorlibError, match=message):
        cluster_library(library, k)
    slider = {0: "Value 0 is less than minimum value 1", 99: "Value 99 is greater than maximum value 16"}
    with pytest.raises(AppError, match=slider.get(k, message)):  # the slider's bounds, in Gradio's words
        client.predict(k, "cluster", api_name="/clusters")


def test_an_empty_library(tmp_path, tiny_base, library, client, capsys):
    from lorlib_ui.core.base_model import base_model_info
    from lorlib_ui.core.library import Library
    from lorlib_ui.core.routers import make_router

    empty = Library.create(tmp_path / "empty", base_model_info(str(tiny_base)))
    before = library_snapshot(empty.path)
    for argv, message in [
        (["route", empty.path, "--prompt", "hi"], "needs experts, but the library is empty"),
        (["cluster", empty.path, "--k", "2"], r"has 0 private expert\(s\); clustering needs 2 or more"),
        (["evaluate", empty.path], "has no experts to evaluate"),
    ]:
        _one_line_error(*run(capsys, *argv), message)
    with pytest.raises(LorlibError, match="needs experts"):
        make_router("arrow", empty.names)
    client.predict(str(empty.path), api_name="/open_library")  # opens: an empty library is a library
    try:
        with pytest.raises(AppError, match="needs experts, but the library is empty"):
            client.predict("hi", "arrow", 2, 1.0, 2, api_name="/route")
        with pytest.raises(AppError, match="clustering needs 2 or more"):
            client.predict(2, "cluster", api_name="/clusters")
    finally:  # this client's session goes back to the catalogue's library
        client.predict(str(library.path), api_name="/open_library")
    assert library_snapshot(empty.path) == before


# ---- data files for a build -----------------------------------------------------------------------

BAD_DATA = {
    "missing output column": ('{"task": "t", "input": "a", "answer": "b"}\n', "no output column"),
    "bad encoding": (b'{"task": "t", "input": "caf\xe9", "output": "b"}\n', "is not valid UTF-8"),
    "empty file": ("", "no rows"),
    "an empty task name": ('{"task": "", "input": "a", "output": "b"}\n', "column 'task': empty"),
    "a task without training rows": (
        '{"task": "t", "input": "a", "output": "b", "split": "train"}\n'
        '{"task": "u", "input": "a", "output": "b", "split": "test"}\n',
        "task 'u' has no training rows",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_bad_data_files(case, library, client, unchanged, tmp_path, capsys):
    from lorlib_ui.training.building import BuildOptions, build_library
    from lorlib_ui.training.config import TrainConfig

    content, message = BAD_DATA[case]
    data = tmp_path / "data.jsonl"
    data.write_bytes(content if isinstance(content, bytes) else content.encode())
    _one_line_error(*run(capsys, "build", library.path, "--data", data, *TRAIN), message)
    with pytest.raises(LorlibError, match=message):
        build_library(library.path, BuildOptions(data=str(data)), TrainConfig(steps=2, batch_size=2, rank=2))
    with pytest.raises(AppError, match=message):
        client.predict([], [], gradio_client.handle_file(str(data)), 2, 2, ["q_proj"], False, api_name="/build")
