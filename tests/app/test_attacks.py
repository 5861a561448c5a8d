"""Attacks on a served explorer through its own endpoints, as a user of a class's LAN app could
make them. Each must fail with a visible one-line error, touch nothing outside the library, and
leave the server answering (a health call within a second while the attack runs)."""

import json
import os
import shutil
import threading
import time
import zipfile
from pathlib import Path

import httpx
import pytest

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

from conftest import build_library, explorer_module, free_port, library_snapshot  # noqa: E402
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

SECRET = "launch-code-0000"


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_base, tiny_adapters):
    """app.py's explorer over a folder of libraries (--libraries), as a class would be served.
    Yields (url, root of the libraries, a folder outside them holding a secret)."""
    top = tmp_path_factory.mktemp("served")
    root, outside, uploads = top / "libraries", top / "outside", top / "uploads"
    for folder in (root, outside, uploads):
        folder.mkdir()
    build_library(root / "lib", tiny_base, tiny_adapters[:3])
    (outside / "secrets.csv").write_text(f"task,input,output\nt,{SECRET},{SECRET}\n")
    (outside / "keep.txt").write_text("an unrelated file")
    explorer = explorer_module()
    args = explorer.parse_args(["--library", str(root / "lib"), "--libraries", str(root), "--device", "cpu"])
    old = os.environ.get("GRADIO_TEMP_DIR")
    os.environ["GRADIO_TEMP_DIR"] = str(uploads)
    app, worker = explorer.create(args, str(uploads))
    from lorlib_ui.app.layout import launch

    port = free_port()
    launch(app, "127.0.0.1", port, block=False, max_file_size=2 * 10**6)
    try:
        yield f"http://127.0.0.1:{port}/", root, outside, worker
    finally:
        app.close()
        worker.close()
        if old is None:
            os.environ.pop("GRADIO_TEMP_DIR", None)
        else:
            os.environ["GRADIO_TEMP_DIR"] = old


class Responsive:
    """Calls /health over and over on its own client while an attack runs; `check` asserts that
    every call answered within a second."""

    def __init__(self, url: str):
        self.client, self.times, self.errors = Client(url, verbose=False), [], []
        self.stop = threading.Event()

    def __enter__(self):
        assert self.client.predict(api_name="/health")["up"]  # the client's first call sets up its session: not timed

        def poll():
            while not self.stop.is_set():
                start = time.perf_counter()
                try:
                    assert self.client.predict(api_name="/health")["up"]
                except Exception as exc:  # reported by __exit__, in the test's thread
                    self.errors.append(exc)
                    return
                self.times.append(time.perf_counter() - start)
                time.sleep(0.05)

        self.thread = threading.Thread(target=poll, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(timeout=10)
        assert not self.errors, self.errors
        assert self.times, "no health call answered during the attack"
        assert max(self.times) < 1.0, f"health took {max(self.times):.2f} s during the attack"


def _one_line_error(call, match: str) -> str:
    with pytest.raises(AppError) as caught:
        call()
    message = str(caught.value)
    assert match in message and "\n" not in message.strip() and "unexpected" not in message, message
    return message


def _copy_library(root: Path, name: str) -> Path:
    shutil.copytree(root / "lib", root / name)
    return root / name


def _edit_manifest(path: Path, change) -> None:
    manifest = json.loads((path / "manifest.json").read_text())
    change(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))


def _zip(folder: Path, archive: Path) -> Path:
    with zipfile.ZipFile(archive, "w") as zf:
        for file in folder.iterdir():
            zf.write(file, f"{folder.name}/{file.name}")
    return archive


def _adapter(tmp_path: Path, source: Path, name: str, config=None, rename=None) -> Path:
    """A copy of a PEFT adapter folder with config fields changed and tensors renamed."""
    folder = tmp_path / name
    shutil.copytree(source, folder)
    if config:
        data = json.loads((folder / "adapter_config.json").read_text())
        data.update(config)
        (folder / "adapter_config.json").write_text(json.dumps(data))
    if rename:
        tensors = load_file(folder / "adapter_model.safetensors")
        save_file({rename(k): v for k, v in tensors.items()}, folder / "adapter_model.safetensors")
    return folder


def test_a_planted_upload_is_not_a_library(served):
    """POST a manifest to Gradio's upload route, then open the folder it landed in."""
    url, root, _, _ = served
    manifest = json.dumps({"format": "lorlib-library", "version": 1, "base_model": "x", "base_shapes": {}})
    response = httpx.post(url + "gradio_api/upload", files={"files": ("manifest.json", manifest.encode())})
    (uploaded,) = response.json()
    client = Client(url, verbose=False)
    with Responsive(url):
        _one_line_error(lambda: client.predict(str(Path(uploaded).parent), api_name="/open_library"), "not a library")
    for path in ("/etc", str(root.parent / "outside"), str(root / ".." / "outside"), "relative/lib", ""):
        _one_line_error(lambda p=path: client.predict(p, api_name="/open_library"), "")


def test_held_out_data_outside_the_library_is_never_read(served):
    url, root, outside, _ = served
    lib = _copy_library(root, "leaky")
    _edit_manifest(lib, lambda m: m.update(held_out={"data": str(outside / "secrets.csv"), "tasks": ["t"]}))
    client = Client(url, verbose=False)
    with Responsive(url):
        message = _one_line_error(lambda: client.predict(str(lib), api_name="/open_library"), "held-out data")
        assert SECRET not in message
        for data in ("../outside/secrets.csv", "a/../../outside/secrets.csv"):
            _edit_manifest(lib, lambda m, d=data: m.update(held_out={"data": d, "tasks": ["t"]}))
            _one_line_error(lambda: client.predict(str(lib), api_name="/open_library"), "held-out data")


@pytest.mark.parametrize("file", ["/../../../outside/keep.txt", "*", "transfer.json/../../outside", "[k]eep.txt"])
def test_side_files_name_only_files_in_the_library(served, file, tiny_adapters):
    from lorlib_ui.core.errors import LorlibError
    from lorlib_ui.core.library import import_adapters

    url, root, outside, _ = served
    lib = _copy_library(root, f"side-{abs(hash(file))}")
    _edit_manifest(lib, lambda m: m.update(side_files={"transfer": {"file": file}}))
    (outside / ".keep.txt.0123456789abcdef0123456789abcdef").write_text("looks like a leftover")
    before = library_snapshot(outside)
    client = Client(url, verbose=False)
    with Responsive(url):
        _one_line_error(lambda: client.predict(str(lib), api_name="/open_library"), "side file")
    # no write can reach the sweep either, from the command line's API included
    with pytest.raises(LorlibError, match="side file"):
        import_adapters(lib, [tiny_adapters[4]])
    assert library_snapshot(outside) == before


def test_a_fifo_in_a_library_is_refused_without_hanging(served):
    url, root, _, _ = served
    lib = _copy_library(root, "fifo")
    os.mkfifo(lib / "transfer.json")
    _edit_manifest(lib, lambda m: m.update(side_files={"transfer": {"file": "transfer.json"}}))
    client = Client(url, verbose=False)
    with Responsive(url):
        _one_line_error(lambda: client.predict(str(lib), api_name="/open_library"), "transfer.json is a special file")


def test_a_linked_experts_folder_is_refused_for_reading_and_writing(served, tiny_adapters):
    """experts/ itself a link: no export zips the target, no import writes or sweeps there."""
    from lorlib_ui.core.errors import LorlibError
    from lorlib_ui.core.library import import_adapters

    url, root, outside, worker = served
    lib = _copy_library(root, "linked")
    target = outside / "experts-elsewhere"
    shutil.move(str(lib / "experts"), str(target))
    (target / "unrelated").mkdir()
    (target / "unrelated" / "data.txt").write_text("not the library's")
    (lib / "experts").symlink_to(target)
    before = library_snapshot(outside)
    client = Client(url, verbose=False)
    with Responsive(url):
        _one_line_error(lambda: client.predict(str(lib), api_name="/open_library"), "experts is a link")
    with pytest.raises(LorlibError, match="experts is a link"):
        worker.export(str(lib), "task0")
    with pytest.raises(LorlibError, match="experts is a link"):
        import_adapters(lib, [tiny_adapters[4]])
    assert library_snapshot(outside) == before


def test_a_backtracking_pattern_cannot_hold_the_server(served, tmp_path, tiny_adapters):
    url, root, _, _ = served
    lib = _copy_library(root, "redos")
    client = Client(url, verbose=False)
    client.predict(str(lib), api_name="/open_library")
    before = library_snapshot(lib)
    # the attack: 28-character module names and (a+)+b; module names are checked first
    evil = _adapter(
        tmp_path,
        tiny_adapters[4],
        "evil",
        config={"rank_pattern": {"(a+)+b": 4}},
        rename=lambda k: k.replace("model.layers.0.self_attn.q_proj", "a" * 28),
    )
    # and a key that backtracks on the real module names: the matching has a deadline
    slow = _adapter(tmp_path, tiny_adapters[4], "slow", config={"rank_pattern": {r"(([a-z]|\w|\.)+)+\d": 4}})
    with Responsive(url):
        for folder, match in ((evil, "is not a linear layer of the base model"), (slow, "took too long")):
            start = time.perf_counter()
            archive = handle_file(str(_zip(folder, tmp_path / f"{folder.name}.zip")))
            _one_line_error(lambda a=archive: client.predict(a, api_name="/import_adapters"), match)
            assert time.perf_counter() - start < 5
    assert library_snapshot(lib) == before


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({"lora_alpha": float("nan")}, "lora_alpha must be a finite number"),
        ({"lora_alpha": float("inf")}, "lora_alpha must be a finite number"),
        ({"lora_alpha": 1e30}, "lora_alpha must be a finite number between"),
        ({"lora_alpha": "8"}, "lora_alpha must be a finite number"),
        ({"rank_pattern": {"(": 4}}, "is not a valid regular expression"),
        ({"alpha_pattern": {"q_proj": float("nan")}}, "must be a finite number"),
        ({"r": 6000}, "above the largest rank allowed"),
        ({"lora_dropout": 7}, "lora_dropout must be a finite number between 0 and 1"),
    ],
)
def test_poisoned_configs_are_one_plain_line(served, tmp_path, tiny_adapters, config, match):
    url, root, _, _ = served
    lib = root / "lib"
    before = library_snapshot(lib)
    client = Client(url, verbose=False)
    client.predict(str(lib), api_name="/open_library")
    archive = _zip(_adapter(tmp_path, tiny_adapters[4], "poison", config=config), tmp_path / "poison.zip")
    with Responsive(url):
        _one_line_error(lambda: client.predict(handle_file(str(archive)), api_name="/import_adapters"), match)
    assert library_snapshot(lib) == before
    assert "NaN" not in (lib / "manifest.json").read_text()


def test_a_library_holding_a_poisoned_expert_opens_names_it_and_loses_it(served):
    url, root, _, _ = served
    lib = _copy_library(root, "poisoned")
    _edit_manifest(lib, lambda m: m["experts"][1].update(alpha=float("nan")))
    config = lib / "experts" / "task1" / "adapter_config.json"
    config.write_text(config.read_text().replace('"lora_alpha": 8', '"lora_alpha": NaN'))
    client = Client(url, verbose=False)
    with Responsive(url):
        status, *_ = client.predict(str(lib), api_name="/open_library")
        assert "task1" in status and "cannot be used" in status
        _one_line_error(lambda: client.predict("the quick", "arrow", 2, 1.0, 2, api_name="/route"), "lora_alpha")
    status, *_ = client.predict("task1", api_name="/remove_expert")
    assert "cannot be used" not in status
    text, note, *_ = client.predict("the quick", "arrow", 2, 1.0, 2, api_name="/route")
    assert "done in" in note and "task1" not in (lib / "manifest.json").read_text()


def test_a_rank_beyond_the_layer_is_refused(served, tmp_path, tiny_adapters):
    """r larger than min(d_in, d_out): a padding attack on every expert at that layer."""
    import torch

    url, root, _, _ = served
    folder = _adapter(tmp_path, tiny_adapters[4], "wide", config={"r": 64, "lora_alpha": 64})
    tensors = load_file(folder / "adapter_model.safetensors")
    wide = {
        k: torch.zeros(65, v.shape[1]) if "lora_A" in k else torch.zeros(v.shape[0], 65) for k, v in tensors.items()
    }
    save_file(wide, folder / "adapter_model.safetensors")
    client = Client(url, verbose=False)
    client.predict(str(root / "lib"), api_name="/open_library")
    archive = handle_file(str(_zip(folder, tmp_path / "wide.zip")))
    with Responsive(url):
        _one_line_error(lambda: client.predict(archive, api_name="/import_adapters"), "above its size")


def test_only_the_fields_peft_needs_are_stored(served, tmp_path, tiny_adapters, tiny_base):
    """An upload's base model id, remote-code flags and auto_mapping are not passed on; the
    stored expert still loads with plain PEFT and computes what the upload computed."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    url, root, _, _ = served
    lib = _copy_library(root, "fields")
    extra = {
        "base_model_name_or_path": "attacker/evil-model",
        "trust_remote_code": True,
        "auto_mapping": {"base_model_class": "Evil", "parent_library": "evil"},
        "rank_pattern": {"v_proj": 4},
        "alpha_pattern": {"layers\\.1\\..*q_proj": 3.0},
        "target_modules": ".*(q|k|v|o)_proj",
    }
    upload = _adapter(tmp_path, tiny_adapters[4], "clean", config=extra)
    client = Client(url, verbose=False)
    client.predict(str(lib), api_name="/open_library")
    client.predict(handle_file(str(_zip(upload, tmp_path / "clean.zip"))), api_name="/import_adapters")
    stored = json.loads((lib / "experts" / "clean" / "adapter_config.json").read_text())
    manifest = json.loads((lib / "manifest.json").read_text())
    assert stored["base_model_name_or_path"] == manifest["base_model"]
    assert not {"trust_remote_code", "auto_mapping"} & set(stored)
    assert stored["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    outputs = []
    for folder in (upload, lib / "experts" / "clean"):
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), folder)
        with torch.no_grad():
            outputs.append(model(input_ids=ids).logits)
    assert torch.allclose(outputs[0], outputs[1], atol=1e-6)


def test_downloads_do_not_pile_up(served):
    """The worker's download zips go once they are a minute old (the app copied each as it
    returned it); the app's own copies expire with --download-ttl."""
    from lorlib_ui.worker.api import DOWNLOAD_KEEP_S

    url, root, _, worker = served
    client = Client(url, verbose=False)
    client.predict(str(root / "lib"), api_name="/open_library")
    for _ in range(3):
        assert Path(client.predict(api_name="/export_library")).stat().st_size > 0
    zips = list(Path(worker._tmp).rglob("*.zip"))
    assert len(zips) >= 3
    old = time.time() - DOWNLOAD_KEEP_S - 1
    for archive in zips:
        os.utime(archive, (old, old))
    assert Path(client.predict("task0", api_name="/export_expert")).stat().st_size > 0
    assert [p.name for p in Path(worker._tmp).rglob("*.zip")] == ["task0.zip"]


def test_an_upload_over_the_limit_is_refused(served, tmp_path):
    url, _, _, _ = served
    big = tmp_path / "big.zip"
    big.write_bytes(os.urandom(3 * 10**6))
    client = Client(url, verbose=False)
    with pytest.raises(Exception, match="(?i)file size|too large|exceed"):
        client.predict(handle_file(str(big)), api_name="/import_adapters")


def test_a_huge_prompt_is_cut_and_others_are_served(served):
    url, root, _, _ = served
    client = Client(url, verbose=False)
    client.predict(str(root / "lib"), api_name="/open_library")
    prompt = "fox " * 250_000  # 1 MB
    with Responsive(url):
        start = time.perf_counter()
        _, note, *_ = client.predict(prompt, "arrow", 2, 1.0, 2, api_name="/route")
    assert "cut from the left to fit this explorer's limit of 1024 tokens" in note
    assert time.perf_counter() - start < 30


def test_health_says_up_and_busy_and_no_more(served):
    url, _, _, _ = served
    assert Client(url, verbose=False).predict(api_name="/health") in (
        {"up": True, "busy": False},
        {"up": True, "busy": True},
    )


def _build_args(data: Path, detach: bool) -> tuple:
    """/build's inputs: families, tasks, data file, steps, rank, targets, shared, detach."""
    return [], [], handle_file(str(data)), 500, 2, ["q_proj"], False, detach


def _jobs(worker, state: str) -> list:
    return [j for j in worker._jobs.all() if j.state == state]


def _until(condition, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} within {timeout} s"
        time.sleep(0.1)


def test_a_job_ends_with_its_session_unless_detached(served, tasks_file):
    url, root, _, worker = served
    lib = _copy_library(root, "jobs")
    for detach in (False, True):
        client = Client(url, verbose=False)
        client.predict(str(lib), api_name="/open_library")
        client.submit(*_build_args(tasks_file, detach), api_name="/build")
        _until(lambda: _jobs(worker, "running"), "the build to start")
        (job,) = _jobs(worker, "running")
        client.close()  # the page is closed: its heartbeat stops
        if detach:
            time.sleep(3)
            assert worker.job(job.id).state == "running"  # a build asked to finish in the background
            worker.cancel(job.id)
        _until(lambda j=job: worker.job(j.id).state == "cancelled", "the job to end with its session")


def test_a_queued_job_cancelled_says_so(served, tasks_file):
    url, root, _, worker = served
    lib = _copy_library(root, "queue")
    first, second = Client(url, verbose=False), Client(url, verbose=False)
    for client in (first, second):
        client.predict(str(lib), api_name="/open_library")
    first.submit(*_build_args(tasks_file, False), api_name="/build")
    _until(lambda: _jobs(worker, "running"), "the first build to start")
    second.submit(*_build_args(tasks_file, False), api_name="/build")
    _until(lambda: _jobs(worker, "queued"), "the second build to queue")
    assert second.predict(api_name="/cancel_build") == "cancelled"
    assert first.predict(api_name="/cancel_build") in ("cancelling...", "cancelled")
    _until(lambda: not _jobs(worker, "running") and not _jobs(worker, "queued"), "both builds to end")
    assert Client(url, verbose=False).predict(api_name="/cancel_build") == "no job to cancel"


def test_a_read_only_explorer_writes_nothing(tiny_library, tmp_path, tiny_adapters):
    from lorlib_ui.app.layout import build_app, launch
    from lorlib_ui.worker.access import READ_ONLY, Access
    from lorlib_ui.worker.local import LocalWorker

    access = Access.serving([str(tiny_library.path)], read_only=True)
    app = build_app(LocalWorker(device="cpu", access=access), str(tiny_library.path), read_only=True)
    port = free_port()
    launch(app, "127.0.0.1", port, block=False)
    before = library_snapshot(tiny_library.path)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        status, *_ = client.predict(str(tiny_library.path), api_name="/open_library")
        archive = handle_file(str(_zip(_adapter(tmp_path, tiny_adapters[4], "new"), tmp_path / "new.zip")))
        _one_line_error(lambda: client.predict(archive, api_name="/import_adapters"), READ_ONLY)
        _one_line_error(lambda: client.predict("task0", api_name="/remove_expert"), READ_ONLY)
        text, note, *_ = client.predict("the quick", "arrow", 2, 1.0, 2, api_name="/route")
        assert "done in" in note
    finally:
        app.close()
    assert library_snapshot(tiny_library.path) == before


def test_a_job_reads_data_only_from_uploads(served, tasks_file, tmp_path):
    """A job's data file is an upload (or a file under the libraries), never any file of the server."""
    from lorlib_ui.core.errors import LorlibError
    from lorlib_ui.worker.api import JobRequest

    _, root, outside, worker = served
    lib = str(_copy_library(root, "jobdata"))
    for data in (str(outside / "secrets.csv"), "/etc/passwd", str(tasks_file)):
        with pytest.raises(LorlibError, match="must be the embedded data or an uploaded file"):
            worker.submit(JobRequest("build", lib, {"data": data, "steps": 1}))
    inbox = tmp_path / "inbox"  # where the Ray actor receives the files the app ships to it
    inbox.mkdir()
    shutil.copy(tasks_file, inbox / "tasks.jsonl")
    worker.accept_uploads(str(inbox))
    job = worker.submit(JobRequest("build", lib, {"data": str(inbox / "tasks.jsonl"), "tasks": ["copy0"], "steps": 1}))
    worker.cancel(job)
    _until(lambda: worker.job(job).state in ("cancelled", "done", "failed"), "the build to end")


def test_the_operators_own_library_keeps_its_data_file(tiny_library, tasks_file):
    """A library built from the command line names its data by path, outside any folder of
    libraries: served as --library it still opens; found under --libraries only, it does not."""
    from lorlib_ui.core.errors import LorlibError
    from lorlib_ui.core.library import Library
    from lorlib_ui.worker.access import Access

    path = tiny_library.path
    _edit_manifest(path, lambda m: m.update(held_out={"data": str(tasks_file), "tasks": ["copy0"]}))
    Access.serving([str(path)]).check_data(Library.open(path))
    with pytest.raises(LorlibError, match="held-out data"):
        Access.serving([], roots=[str(path.parent / "lib")]).check_data(Library.open(path))
