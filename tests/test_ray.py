"""The Ray backend on a private local Ray: parallel builds, a killed training worker, the app's worker."""

import os
import signal

import pytest
import torch
from conftest import run

ray = pytest.importorskip("ray", reason="the Ray backend needs ray: pip install -r requirements-ray.txt")
pytestmark = pytest.mark.ray

from lorlib_ui.building import build_library  # noqa: E402
from lorlib_ui.library import Library  # noqa: E402
from lorlib_ui.ray_backend import RayTrainer, RayWorker, connect  # noqa: E402
from lorlib_ui.training import TrainConfig  # noqa: E402
from lorlib_ui.worker import RouteRequest  # noqa: E402


@pytest.fixture(scope="module")
def local_ray():
    connect(None)  # private, on 127.0.0.1
    yield
    ray.shutdown()


def _same_experts(a, b) -> None:
    a, b = Library.open(a), Library.open(b)
    assert sorted(a.names) == sorted(b.names)
    for name in b.names:
        fa, fb = a.load_adapter(name).factors, b.load_adapter(name).factors
        assert sorted(fa) == sorted(fb)
        assert all(torch.equal(x, y) for m in fb for x, y in zip(fa[m], fb[m])), name


def test_ray_build_and_cluster_match_the_sequential_ones(local_ray, tmp_path, tiny_base, tasks_file, capsys):
    args = ["--data", tasks_file, "--base-model", tiny_base, "--tasks", "copy0,pick0"]
    args += ["--steps", "8", "--shared-steps", "6", "--batch-size", "2", "--rank", "2"]
    code, _, err = run(capsys, "build", tmp_path / "seq", *args)
    assert code == 0, err
    code, out, err = run(capsys, "build", tmp_path / "par", *args, "--backend", "ray")
    assert code == 0, err
    assert "trained 3, skipped 0" in out
    _same_experts(tmp_path / "seq", tmp_path / "par")  # same seeds, same experts, bit for bit
    workers = {w.split(":")[-1] for w in __import__("re").findall(r" on (\S+:\d+)", err)}
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
        data=str(tasks_file),
        config=TrainConfig(steps=150, batch_size=2, rank=2),
        shared=False,
        base_model=str(tiny_base),
        trainer=RayTrainer(),
        progress=progress,
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
    from lorlib_ui.generation import generate
    from lorlib_ui.routers import make_router

    worker = RayWorker()
    updates = list(worker.route(RouteRequest(str(tiny_library.path), "the quick brown", "arrow", 2, max_new_tokens=5)))
    expected = generate(tiny_routed, "the quick brown", make_router("arrow", tiny_routed.experts, 2), max_new_tokens=5)
    assert updates[-1].done and updates[-1].text == expected.text
    assert updates[-1].record.tokens == expected.record.tokens
    first = worker.health()
    again = RayWorker().health()  # what a restarted app does: the same actor, its model still loaded
    assert again["actor"] == first["actor"] and again["backend"] == "ray"
    assert str(tiny_library.path.resolve()) in again["libraries_loaded"]
