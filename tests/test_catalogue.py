"""The catalogue of bad inputs, each tried through the command line, the Python API and the app.

Every entry must give a clear message (CLI: one line on stderr, exit 1, no traceback; Python: a
LorlibError; app: an error the client sees, the app still serving) and leave the library's files
byte for byte as they were. README.md, "Reliability", summarises what is tried here.
"""

import json
import os
import pickle
import shutil
import zipfile

import pytest
import torch
from conftest import build_library, free_port, library_snapshot, run
from safetensors.torch import load_file, save_file

from lorlib_ui.adapters import CONFIG_FILE, WEIGHTS_FILE
from lorlib_ui.errors import LorlibError

gradio_client = pytest.importorskip("gradio_client")
from gradio_client.exceptions import AppError  # noqa: E402

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"


@pytest.fixture(scope="module")
def library(tmp_path_factory, tiny_base, tiny_adapters):
    return build_library(tmp_path_factory.mktemp("catalogue") / "lib", tiny_base, tiny_adapters[:4])


@pytest.fixture(scope="module")
def client(library):
    """The explorer on the catalogue's library, served for the whole module."""
    from lorlib_ui.local_worker import LocalWorker
    from lorlib_ui.ui import build_app, launch

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
    assert client.predict(api_name="/health")["backend"] == "local"


def _one_line_error(code, out, err, message):
    assert code == 1, (out, err)
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert message in err, err


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
    "adapter for another base model": (lambda f: _weights(f, _other_base), "an adapter for another base model?"),
    "IA3 adapter": (lambda f: _config(f, peft_type="IA3"), "it is a IA3 adapter; only LoRA"),
    "prefix-tuning adapter": (lambda f: _config(f, peft_type="PREFIX_TUNING"), "PREFIX_TUNING adapter; only LoRA"),
    "config without weights": (lambda f: (f / WEIGHTS_FILE).unlink(), "adapter_model.safetensors is missing"),
    "weights without config": (lambda f: (f / CONFIG_FILE).unlink(), "adapter_config.json is missing"),
    "NaN weights": (lambda f: _weights(f, lambda t: _first(t, float("nan"))), "contains NaN or Inf"),
    "Inf weights": (lambda f: _weights(f, lambda t: _first(t, float("inf"))), "contains NaN or Inf"),
    "rank 0": (lambda f: _config(f, r=0), "rank r must be a positive integer"),
    "pickled .bin": (_pickled("adapter_model.bin"), "weights are pickled (adapter_model.bin)"),
    "pickled .pt": (_pickled("adapter_model.pt"), "weights are pickled (adapter_model.pt)"),
    "pickled .ckpt": (_pickled("adapter_model.ckpt"), "weights are pickled (adapter_model.ckpt)"),
}


# In a zip, a folder without adapter_config.json is not recognised as an adapter at all.
APP_MESSAGES = {"weights without config": "no PEFT adapter (adapter_config.json) in the archive"}


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
    from lorlib_ui.library import import_adapters

    folder, message, _ = bad_adapter
    with pytest.raises(LorlibError, match=message.replace("(", r"\(").replace(")", r"\)")):
        import_adapters(library.path, [folder])


def test_bad_adapter_app(bad_adapter, library, client, unchanged, tmp_path):
    from lorlib_ui.archives import zip_folder

    folder, _, message = bad_adapter
    archive = zip_folder(folder, tmp_path / "newcomer.zip")
    with pytest.raises(AppError) as info:
        client.predict(gradio_client.handle_file(str(archive)), api_name="/import_adapters")
    assert message in str(info.value)


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
    from lorlib_ui.library import import_adapters

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
    from lorlib_ui.library import import_adapters

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
