"""The Ray backend on a private local Ray: parallel builds, a killed training worker, the app's worker."""

import os
import re
import signal
from functools import partial
from pathlib import Path

import pytest
import torch
from conftest import run

ray = pytest.importorskip("ray", reason="the Ray backend needs ray: pip install -r requirements-ray.txt")
pytestmark = pytest.mark.ray

from lorlib_ui.core.library import Library  # noqa: E402
from lorlib_ui.training.building import BuildOptions, build_library  # noqa: E402
from lorlib_ui.training.config import TrainConfig  # noqa: E402
from lorlib_ui.training.reporter import Reporter  # noqa: E402
from lorlib_ui.worker.api import RouteRequest  # noqa: E402
from lorlib_ui.worker.local import LocalWorker  # noqa: E402
from lorlib_ui.worker.ray import RayTrainer, RayWorker, connect  # noqa: E402

SERVE = partial(LocalWorker, trainer_factory=RayTrainer)  # what app.py runs in the actor

LOOPBACK = {"0100007F", "00000000000000000000000001000000", "0000000000000000FFFF00000100007F"}


def _listening() -> set[tuple[str, int]]:
    """(address as the kernel writes it, port) of every listening TCP socket on this machine."""
    out = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A":  # LISTEN
                address, port = fields[1].rsplit(":", 1)
                out.add((address, int(port, 16)))
    return out


@pytest.fixture(scope="module")
def local_ray():
    """A private Ray for this module; yields the sockets it opened for listening."""
    before = _listening()
    connect(None)
    yield _listening() - before
    ray.shutdown()


def test_a_private_ray_listens_on_loopback_only(local_ray):
    assert local_ray, "no listening sockets seen"
    assert {address for address, _ in local_ray} <= LOOPBACK, sorted(local_ray)


def _same_experts(a, b) -> None:
    a, b = Library.open(a), Library.open(b)
    assert sorted(a.names) == sorted(b.names)
    for name in b.names:
        fa, fb = a.load_adapter(name).factors, b.load_adapter(name).factors
        assert sorted(fa) == sorted(fb)
        assert all(torch.equal(x, y) for m in fb for x, y in zip(fa[m], fb[m])), name


@pytest.fixture
def one_thread():
    """Torch on one thread, as in a Ray task of one CPU: a matmul split over two threads may round
    differently in the last bit (seen on copy0, 2e-9), and the comparison below is bit for bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_ray_build_and_cluster_match_the_sequential_ones(
    local_ray, one_thread, tmp_path, tiny_base, tasks_file, capsys
):
    args = ["--data", tasks_file, "--base-model", tiny_base, "--tasks", "copy0,pick0"]
    args += ["--steps", "8", "--shared-steps", "6", "--batch-size", "2", "--rank", "2"]
    code, _, err = run(capsys, "build", tmp_path / "seq", *args)
    assert code == 0, err
    code, out, err = run(capsys, "build", tmp_path / "par", *args, "--backend", "ray")
    assert code == 0, err
    assert "trained 3, skipped 0" in out
    _same_experts(tmp_path / "seq", tmp_path / "par")  # same seeds, same experts, bit for bit
    workers = {w.split(":")[-1] for w in re.findall(r" on (\S+:\d+)", err)}
    assert len(workers) >= 2, err  # the two private experts trained in two processes at once

    for lib, backend in (("seq", []), ("par", ["--backend", "ray"])):
        code, _, err = run(capsys, "cluster", tmp_path / lib, "--k", "2", "--steps", "4", *backend)
        assert code == 0, err
    _same_experts(tmp_path / "seq", tmp_path / "par")


def test_a_killed_training_worker_is_retried_and_the_library_completes(local_ray, tmp_path, tiny_base, tasks_file):
    killed, events = [], []

    def progress(event):
        events.append(event)
        if not killed and event.step >= 2 and event.worker:
            pid = int(event.worker.rsplit(":", 1)[1])
            os.kill(pid, signal.SIGKILL)  # the worker process dies mid-training
            killed.append((event.expert, event.worker))

    report = build_library(
        tmp_path / "lib",
        BuildOptions(data=str(tasks_file), shared=False, base_model=str(tiny_base)),
        TrainConfig(steps=150, batch_size=2, rank=2),
        trainer=RayTrainer(),
        reporter=Reporter(progress=progress),
    )
    assert killed
    expert, worker = killed[0]
    restarts = [e for e in events if e.expert == expert and e.step == 0 and e.worker != worker]
    assert restarts  # Ray ran the task again, in another worker
    names = [f"{kind}{t}" for kind in ("copy", "pick") for t in range(3)]
    assert sorted(report.trained) == names
    library = Library.open(tmp_path / "lib")
    assert sorted(library.names) == names
    assert all(library.load_adapter(n).factors for n in names)  # every expert whole
    assert not (library.path / ".staging").exists()


def test_the_app_worker_is_a_named_actor_that_a_new_app_reattaches_to(local_ray, tiny_library, tiny_routed):
    from lorlib_ui.core.generation import generate
    from lorlib_ui.core.routers import make_router

    worker = RayWorker(SERVE)
    updates = list(worker.route(RouteRequest(str(tiny_library.path), "the quick brown", "arrow", 2, max_new_tokens=5)))
    expected = generate(tiny_routed, "the quick brown", make_router("arrow", tiny_routed.experts, 2), max_new_tokens=5)
    assert updates[-1].done and updates[-1].text == expected.text
    assert updates[-1].record.tokens == expected.record.tokens
    first = worker.health()
    again = RayWorker(SERVE).health()  # what a restarted app does: the same actor, its model still loaded
    assert again["actor"] == first["actor"] and again["backend"] == "ray"
    assert str(tiny_library.path.resolve()) in again["libraries_loaded"]


def test_the_app_on_the_ray_backend_routes_a_prompt(local_ray, tiny_library, tiny_routed, monkeypatch, tmp_path):
    from conftest import explorer_module, free_port
    from gradio_client import Client

    from lorlib_ui.app.layout import launch
    from lorlib_ui.core.generation import generate
    from lorlib_ui.core.routers import make_router

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "uploads"))
    explorer = explorer_module()
    app, worker = explorer.create(explorer.parse_args(["--backend", "ray", "--library", str(tiny_library.path)]))
    port = free_port()
    launch(app, "127.0.0.1", port, block=False)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        text, note, *_ = client.predict("the quick brown", "arrow", 2, 1.0, 5, api_name="/route")
        expected = generate(tiny_routed, "the quick brown", make_router("arrow", tiny_routed.experts, 2), 5)
        assert text == expected.text and "done in" in note
        assert client.predict(api_name="/health") == {"up": True, "busy": False}
        assert worker.health()["backend"] == "ray"
    finally:
        app.close()


HEAD = """
import sys, ray
from lorlib_ui.worker.ray import connect
connect(None)
print(ray.get_runtime_context().gcs_address, flush=True)
sys.stdin.read()  # until the test closes stdin
ray.shutdown()
"""
APP = """
import json, sys
from functools import partial
from lorlib_ui.worker.api import RouteRequest
from lorlib_ui.worker.local import LocalWorker
from lorlib_ui.worker.ray import RayTrainer, RayWorker
worker = RayWorker(partial(LocalWorker, trainer_factory=RayTrainer), sys.argv[1])
if sys.argv[2:]:
    request = RouteRequest(sys.argv[2], "the quick brown", "arrow", 2, max_new_tokens=3)
    print(json.dumps({"text": list(worker.route(request))[-1].text}))
print(json.dumps(worker.health()))
"""


def test_a_restarted_app_reattaches_to_the_running_worker(tiny_library):
    """Two app processes, one after the other, on one Ray cluster: the second finds the worker the
    first started, with the library's model still loaded."""
    import json
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "text": True}
    head = subprocess.Popen([sys.executable, "-c", HEAD], cwd=root, **pipes)
    try:
        address = head.stdout.readline().strip()
        assert address, "the Ray head did not start"

        def app(*args):
            done = subprocess.run(
                [sys.executable, "-c", APP, address, *args], cwd=root, capture_output=True, text=True, timeout=300
            )
            assert done.returncode == 0, done.stderr[-2000:]
            return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]

        routed, first = app(str(tiny_library.path))
        (second,) = app()  # the restarted app only asks for health
        assert routed["text"] and second["actor"] == first["actor"]
        assert str(tiny_library.path.resolve()) in second["libraries_loaded"]
    finally:
        head.stdin.close()
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()


def test_files_cross_to_and_from_the_actor_as_bytes(local_ray, tiny_library, tiny_base, tmp_path):
    import zipfile

    from conftest import make_adapter

    from lorlib_ui.core.archives import zip_folder

    worker = RayWorker(SERVE)
    archive = zip_folder(make_adapter(tmp_path / "newcomer", tiny_base, seed=7), tmp_path / "newcomer.zip")
    assert worker.import_archive(str(tiny_library.path), str(archive)) == ["newcomer"]
    assert "newcomer" in Library.open(tiny_library.path).names
    download = Path(worker.export(str(tiny_library.path), "newcomer"))
    assert download.name == "newcomer.zip" and "adapter_model.safetensors" in str(zipfile.ZipFile(download).namelist())


def test_a_build_from_the_app_on_the_ray_backend_fans_out(
    local_ray, one_thread, tmp_path, tiny_base, tasks_file, capsys
):
    """The app's Build on the Ray backend: the worker actor trains each expert as a Ray task, and
    gets the experts the sequential command-line build gets."""
    import time

    from lorlib_ui.worker.api import JobRequest

    options = {"data": str(tasks_file), "tasks": ["copy0", "pick0"], "steps": 8, "shared_steps": 6}
    options |= {"batch_size": 2, "rank": 2, "base_model": str(tiny_base)}
    worker = RayWorker(SERVE)
    job_id = worker.submit(JobRequest("build", str(tmp_path / "par"), options))
    seen, messages, deadline = [], [], time.monotonic() + 300
    while (status := worker.job(job_id)).state in ("queued", "running"):
        assert time.monotonic() < deadline, f"the build did not finish in 300 s: {status}"
        seen.append(status.fraction)
        messages.append(status.message)
        time.sleep(0.05)
    assert status.state == "done", status.message
    assert sorted(status.result["trained"]) == ["copy0", "pick0", "shared"]
    args = ["--data", tasks_file, "--base-model", tiny_base, "--tasks", "copy0,pick0"]
    args += ["--targets", "q_proj,k_proj,v_proj,o_proj", "--steps", "8", "--shared-steps", "6"]
    args += ["--batch-size", "2", "--rank", "2"]
    code, _, err = run(capsys, "build", tmp_path / "seq", *args)
    assert code == 0, err
    _same_experts(tmp_path / "seq", tmp_path / "par")
    assert all(0 <= f <= 1 for f in seen)
    trainers = {int(m) for m in re.findall(r"\(on \S+:(\d+)\)", " ".join(messages))}
    assert trainers and worker.health()["actor"]["pid"] not in trainers  # Ray tasks, not the actor


def test_expert_detail_crosses_from_the_actor(local_ray, tiny_library):
    from lorlib_ui.core.errors import LorlibError

    path = str(tiny_library.path)
    remote = RayWorker(SERVE).expert_detail(path, "task2")
    local = LocalWorker(device="cpu").expert_detail(path, "task2")
    # the same dataclass; numbers to rounding (the actor's BLAS may split sums over other threads)
    assert type(remote) is type(local) and (remote.name, remote.modules) == (local.name, local.modules)
    assert [n for n, _ in remote.nearest] == [n for n, _ in local.nearest] and len(remote.nearest) == 5
    assert [c for _, c in remote.nearest] == pytest.approx([c for _, c in local.nearest], abs=1e-6)
    assert remote.norms == pytest.approx(local.norms, rel=1e-9) and remote.loss_curve is local.loss_curve is None
    with pytest.raises(LorlibError, match="unknown expert 'nobody'"):
        RayWorker(SERVE).expert_detail(path, "nobody")


def test_insight_crosses_from_the_actor(local_ray, built):
    from lorlib_ui.analysis.transfer import TransferOptions, transfer_library

    path = str(built)
    transfer_library(path, TransferOptions(tasks="held-out", limit=1))
    remote, local = RayWorker(SERVE).insight(path), LocalWorker(device="cpu").insight(path)
    assert (remote.tasks, remote.experts, remote.groups) == (local.tasks, local.experts, local.groups)
    assert remote.transfer == local.transfer and remote.transfer["rows"][0][0] == 1
    assert remote.routing == local.routing == {}
