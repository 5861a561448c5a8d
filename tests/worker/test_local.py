"""The in-process model worker: streamed routing with records, clusters, imports and long jobs."""

import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import library_snapshot

from lorlib_ui.core.errors import LorlibError
from lorlib_ui.core.generation import generate
from lorlib_ui.core.routers import make_router
from lorlib_ui.worker.api import JobRequest, RouteRequest
from lorlib_ui.worker.local import LocalWorker


@pytest.fixture
def worker():
    return LocalWorker(device="cpu")


def _final(updates):
    updates = list(updates)
    assert updates[-1].done and all(not u.done for u in updates[:-1])
    return updates


def test_route_streams_text_and_ends_with_the_record(worker, tiny_library, tiny_routed):
    request = RouteRequest(str(tiny_library.path), "the quick brown", router="arrow", top_k=2, max_new_tokens=5)
    updates = _final(worker.route(request))
    final = updates[-1]
    expected = generate(tiny_routed, "the quick brown", make_router("arrow", tiny_routed.experts, top_k=2), 5)
    assert final.text == expected.text and len(updates) == len(expected.new_ids) + 1
    assert [u.text for u in updates[:-1]][-1] == expected.text  # streamed text grows to the answer
    record = final.record
    assert record.weights.shape == (len(tiny_routed.modules), len(expected.prompt_ids) + 5, 6)
    assert np.allclose(record.weights.sum(-1), 1.0, atol=1e-5)
    assert np.allclose(record.weights, expected.record.weights, atol=1e-6)
    assert final.n_prompt_tokens == len(expected.prompt_ids) and final.first_token_s <= final.total_s


@pytest.mark.parametrize("spec", ["arrow", "phatgoose", "poly:mix"])
def test_a_route_request_opens_the_library_once(worker, tiny_library, monkeypatch, spec):
    """The worker opens the library a request names once and hands it down: the routed model's
    cache, the learned router's weights and the key checks read that one opening."""
    import torch

    from lorlib_ui.core.learned_routers import LearnedRouter, store_learned_router
    from lorlib_ui.core.library import Library

    for e in tiny_library.experts:
        gates = {m: torch.ones(tiny_library.base_shapes[m][1]) for m in tiny_library.load_adapter(e.name).factors}
        tiny_library.derived.write_expert("gates", e.name, gates, {}, e.weights_hash)
    mixed = ["task0", "task2"]
    modules = sorted(tiny_library.load_adapter("task0").factors)
    record = LearnedRouter("mix", "poly-router", mixed, [tiny_library.expert(x).weights_hash for x in mixed])
    store_learned_router(tiny_library, record, {f"{m}.logits": torch.tensor([0.2, -0.1]) for m in modules})
    request = RouteRequest(str(tiny_library.path), "the fox", router=spec, max_new_tokens=2)
    _final(worker.route(request))  # the routed model is built and cached
    opened = []
    real_open = Library.open.__func__
    monkeypatch.setattr(Library, "open", classmethod(lambda cls, path: opened.append(path) or real_open(cls, path)))
    assert _final(worker.route(request))[-1].record.router.startswith(spec)
    assert len(opened) == 1


def test_concurrent_requests_get_their_own_records(worker, tiny_library):
    prompts = ["the quick brown fox", "routing tokens", "a library of lora adapters over one", "one"]
    results = {}

    def ask(prompt):
        updates = list(worker.route(RouteRequest(str(tiny_library.path), prompt, max_new_tokens=4)))
        results[prompt] = updates[-1]

    threads = [threading.Thread(target=ask, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for prompt, final in results.items():
        alone = list(worker.route(RouteRequest(str(tiny_library.path), prompt, max_new_tokens=4)))[-1]
        assert final.record.tokens == alone.record.tokens and final.text == alone.text
        assert "".join(final.record.tokens[: final.n_prompt_tokens]) == prompt
        assert np.allclose(final.record.weights, alone.record.weights, atol=1e-6)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"prompt": "  "}, "the prompt is empty"),
        ({"router": "nonsense"}, "unknown router"),
        ({"top_k": 0}, "top-k must be between 1"),
        ({"temperature": -1.0}, "temperature must be positive"),
        ({"max_new_tokens": 0}, "max new tokens must be between 1"),
        ({"library": "/nonexistent/lib"}, "no library at /nonexistent/lib"),
    ],
)
def test_bad_route_requests_are_one_line_errors(worker, tiny_library, change, message):
    fields = {"library": str(tiny_library.path), "prompt": "the quick", "max_new_tokens": 3, **change}
    request = RouteRequest(**fields)
    with pytest.raises(LorlibError, match=message):
        list(worker.route(request))
    assert list(worker.route(RouteRequest(str(tiny_library.path), "the quick", max_new_tokens=2)))[-1].done


def test_library_changes_are_picked_up(worker, tiny_library, tiny_base, tmp_path):
    from conftest import make_adapter

    path = str(tiny_library.path)
    list(worker.route(RouteRequest(path, "the quick", max_new_tokens=2)))
    extra = make_adapter(tmp_path / "fresh", tiny_base, seed=99)
    assert worker.import_adapters(path, [str(extra)]) == ["fresh"]
    final = list(worker.route(RouteRequest(path, "the quick", router="expert:fresh", max_new_tokens=2)))[-1]
    assert final.record.experts[-1] == "fresh" and final.record.weights[:, :, -1].min() == 1.0
    assert worker.library(path).experts[-1]["name"] == "fresh"


def test_refused_import_leaves_library_unchanged(worker, tiny_library, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text('{"peft_type": "IA3"}')
    before = library_snapshot(tiny_library.path)
    with pytest.raises(LorlibError):
        worker.import_adapters(str(tiny_library.path), [str(bad)])
    assert library_snapshot(tiny_library.path) == before


def _until(condition, what: str, timeout: float = 120, poll: float = 0.01):
    """Wait for `condition()` to be true, failing with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} within {timeout} s"
        time.sleep(poll)


def _wait(worker, job_id, timeout=120):
    _until(lambda: worker.job(job_id).state not in ("queued", "running"), f"job {job_id} to finish", timeout)
    return worker.job(job_id)


def test_build_cluster_evaluate_jobs(worker, tmp_path, tiny_base, tasks_file):
    path = str(tmp_path / "lib")
    options = {"data": str(tasks_file), "holdout_per_family": 1, "steps": 2, "rank": 2, "batch_size": 2}
    options |= {"targets": ["q_proj", "v_proj"], "shared_steps": 2, "base_model": str(tiny_base)}
    seen = []
    job_id = worker.submit(JobRequest("build", path, options))

    def finished() -> bool:
        status = worker.job(job_id)
        seen.append(status.fraction)
        return status.state not in ("queued", "running")

    _until(finished, "the build to finish")
    status = worker.job(job_id)
    assert status.state == "done", status.message
    assert sorted(status.result["trained"]) == sorted(e["name"] for e in worker.library(path).experts)
    assert all(0 <= f <= 1 for f in seen) and seen == sorted(seen)
    status = _wait(worker, worker.submit(JobRequest("cluster", path, {"k": 2, "steps": 2})))
    assert status.state == "done", status.message
    assert len(status.result["clusters"]["members"]) == 2
    status = _wait(worker, worker.submit(JobRequest("evaluate", path, {"limit": 1, "routers": ["base", "oracle"]})))
    assert status.state == "done", status.message
    info = worker.library(path)
    assert [r["router"] for r in info.evaluation["summary"]] == ["base", "oracle"]
    assert [h["command"].split()[1] for h in info.history] == ["build", "cluster", "evaluate"]


def test_cancelled_build_keeps_finished_experts(worker, tmp_path, tiny_base, tasks_file):
    path = str(tmp_path / "lib")
    options = {"data": str(tasks_file), "steps": 200, "batch_size": 2, "rank": 2, "base_model": str(tiny_base)}
    job_id = worker.submit(JobRequest("build", path, options))

    def second_expert() -> bool:  # 6 private + the shared expert
        status = worker.job(job_id)
        assert status.state in ("queued", "running"), status.message
        return status.message.startswith("expert 2/7 copy1")

    _until(second_expert, "the second expert to start training")
    worker.cancel(job_id)
    status = _wait(worker, job_id)
    assert status.state == "cancelled" and "cancelled" in status.message
    assert [e["name"] for e in worker.library(path).experts] == ["copy0"]


def test_routing_is_served_while_a_build_runs(worker, tmp_path, tiny_library, tiny_base, tasks_file):
    """A long job runs beside the model, not under its lock: another user's route is answered
    before the build ends."""
    options = {"data": str(tasks_file), "steps": 400, "batch_size": 2, "rank": 2, "base_model": str(tiny_base)}
    job_id = worker.submit(JobRequest("build", str(tmp_path / "lib"), options))
    _until(lambda: worker.job(job_id).message.startswith("expert"), "training to start")
    updates = _final(worker.route(RouteRequest(str(tiny_library.path), "the quick brown", "arrow", 2)))
    assert updates[-1].record.tokens
    assert worker.job(job_id).state == "running"
    worker.cancel(job_id)
    _wait(worker, job_id)


def test_bad_jobs_are_refused(worker, tiny_library):
    with pytest.raises(LorlibError, match="unknown job"):
        worker.submit(JobRequest("train", str(tiny_library.path)))
    with pytest.raises(LorlibError, match="no library"):
        worker.submit(JobRequest("cluster", "/nonexistent", {"k": 2}))
    status = _wait(worker, worker.submit(JobRequest("cluster", str(tiny_library.path), {"k": 99})))
    assert status.state == "failed" and "k must be between 1 and the number of clustered experts" in status.message
    with pytest.raises(LorlibError, match="no job"):
        worker.job("nope")


def test_clusters_view(worker, tiny_library):
    view = worker.clusters(str(tiny_library.path), 2)
    assert view.coords.shape == (6, 2) and np.isfinite(view.coords).all()
    assert sorted(set(view.labels)) == [0, 1] and view.similarity.shape == (6, 6)
    assert sorted(view.clustered) == sorted(view.names) and set(view.silhouette) == {2, 3, 4, 5}
    ordered = [view.labels[view.names.index(n)] for n in view.clustered]
    assert ordered == sorted(ordered)  # the similarity matrix is ordered by cluster
    with pytest.raises(LorlibError, match="k must be between 1"):
        worker.clusters(str(tiny_library.path), 7)


def test_warm_up_loads_the_library_in_the_background(worker, tiny_library):
    worker.warm_up(str(tiny_library.path))
    _until(lambda: not worker.health()["warming_up"], "the warm-up to end", timeout=60)
    assert str(tiny_library.path.resolve()) in worker.health()["libraries_loaded"]
    worker.warm_up("/nonexistent")  # a bad path is reported by the first real request, not here
    with pytest.raises(LorlibError, match="no library"):
        worker.library("/nonexistent")


def test_opening_five_libraries_keeps_at_most_two_routed_models(
    worker, tmp_path, tiny_base, tiny_adapters, monkeypatch
):
    """The worker keeps the routed models of the last two libraries routed (LRU); the others are
    freed, not merely forgotten: no reference to them stays behind."""
    import gc
    import weakref

    from conftest import build_library

    from lorlib_ui.core.routed_model import RoutedModel

    assert worker.max_models == 2
    alive = []
    built = RoutedModel.__init__

    def tracked(self, *args, **kwargs):
        built(self, *args, **kwargs)
        alive.append(weakref.ref(self))

    paths = [build_library(tmp_path / f"lib{i}", tiny_base, tiny_adapters[i : i + 2]).path for i in range(5)]
    monkeypatch.setattr(RoutedModel, "__init__", tracked)
    for path in paths:
        assert list(worker.route(RouteRequest(str(path), "the quick", max_new_tokens=2)))[-1].done
    gc.collect()
    assert len(alive) == 5 and sum(ref() is not None for ref in alive) == 2
    assert worker.health()["libraries_loaded"] == [str(p.resolve()) for p in paths[-2:]]


def test_the_number_of_models_kept_is_a_setting(monkeypatch):
    monkeypatch.setenv("LORLIB_MAX_MODELS", "3")
    assert LocalWorker(device="cpu").max_models == 3
    assert LocalWorker(device="cpu", max_models=1).max_models == 1
    monkeypatch.setenv("LORLIB_MAX_MODELS", "many")
    with pytest.raises(LorlibError, match="LORLIB_MAX_MODELS must be a positive integer"):
        LocalWorker(device="cpu")
    with pytest.raises(LorlibError, match="at least one routed model"):
        LocalWorker(device="cpu", max_models=0)


def test_jobs_train_with_the_injected_trainer(tmp_path, tiny_base, tasks_file):
    """The worker's build jobs use the trainer its factory makes (the Ray backend injects its own)."""
    from lorlib_ui.training.trainers import LocalTrainer

    made = []

    def factory():
        made.append(LocalTrainer("cpu"))
        return made[-1]

    worker = LocalWorker(device="cpu", trainer_factory=factory)
    options = {"data": str(tasks_file), "tasks": ["copy0"], "steps": 2, "rank": 2, "batch_size": 2}
    options |= {"shared": False, "base_model": str(tiny_base)}
    status = _wait(worker, worker.submit(JobRequest("build", str(tmp_path / "lib"), options)))
    assert status.state == "done" and status.result["trained"] == ["copy0"] and len(made) == 1


def _dense_delta(library, name: str, module: str) -> np.ndarray:
    adapter = library.load_adapter(name)
    a, b = adapter.factors[module]
    return adapter.scales[module] * b.double().numpy() @ a.double().numpy()


def test_expert_detail_spectrum_nearest_and_missing_curve(worker, tiny_library):
    path = str(tiny_library.path)
    detail = worker.expert_detail(path, "task3")
    assert (detail.name, detail.kind, detail.tasks, detail.family) == ("task3", "imported", [], None)
    # the model's order: layer 0's q, k, v, o, then layer 1's (sorted names would put k before q)
    assert detail.modules == [
        m for m in tiny_library.base_shapes if m.endswith(("q_proj", "k_proj", "v_proj", "o_proj"))
    ]
    assert detail.modules != sorted(detail.modules) and len(detail.modules) == 8
    for module, norm, values in zip(detail.modules, detail.norms, detail.singular_values):
        dense = _dense_delta(tiny_library, "task3", module)
        np.testing.assert_allclose(values, np.linalg.svd(dense, compute_uv=False)[:4], rtol=1e-5)
        np.testing.assert_allclose(norm, np.linalg.norm(dense), rtol=1e-5)
    # nearest: the other five task experts by the cluster view's cosine, most similar first
    view = worker.clusters(path, 2)
    row = view.similarity[view.clustered.index("task3")]
    expected = sorted(((n, row[i]) for i, n in enumerate(view.clustered) if n != "task3"), key=lambda p: -p[1])
    assert [n for n, _ in detail.nearest] == [n for n, _ in expected]
    np.testing.assert_allclose([c for _, c in detail.nearest], [c for _, c in expected], atol=1e-12)
    assert detail.loss_curve is None and detail.metrics == {} and detail.nearest_note == ""


def test_expert_detail_refuses_an_unknown_expert_in_one_line(worker, tiny_library):
    with pytest.raises(LorlibError, match="unknown expert 'nobody'") as caught:
        worker.expert_detail(str(tiny_library.path), "nobody")
    assert "\n" not in str(caught.value)


def test_expert_detail_and_cluster_view_share_one_embedding(worker, tiny_library, monkeypatch):
    from lorlib_ui.training import clusters

    calls = []
    embed = clusters.embed_library
    monkeypatch.setattr(clusters, "embed_library", lambda *a, **kw: calls.append(1) or embed(*a, **kw))
    path = str(tiny_library.path)
    worker.expert_detail(path, "task0")
    view = worker.clusters(path, 3)  # UMAP and silhouettes are added to the cached embedding
    worker.expert_detail(path, "task1")
    assert len(calls) == 1 and view.coords.shape == (6, 2) and set(view.silhouette) == {2, 3, 4, 5}


def test_expert_detail_of_a_built_library_shows_its_loss_curve(worker, built):
    import json

    manifest = {e["name"]: e for e in json.loads((built / "manifest.json").read_text())["experts"]}
    private = next(n for n, e in manifest.items() if e["kind"] == "private")
    detail = worker.expert_detail(str(built), private)
    assert detail.loss_curve == manifest[private]["metrics"]["loss_curve"] and len(detail.loss_curve) == 3
    assert "loss_curve" not in detail.metrics and detail.metrics["steps"] == 3
    others = sorted(n for n, e in manifest.items() if e["kind"] == "private" and n != private)
    assert sorted(n for n, _ in detail.nearest) == others  # fewer than five: all the other private ones
    shared = worker.expert_detail(str(built), "shared")
    assert len(shared.loss_curve) == 2 and shared.nearest == []
    assert shared.nearest_note == "no nearest experts: MBC embeds private and imported experts, and shared is shared"
    assert [len(v) for v in shared.singular_values] == [2] * len(shared.modules)  # rank 2 (conftest.TRAIN)


def _published_adapter(hub, tmp_path, tiny_base, repo="alice/fox-lora", seed=11):
    from conftest import make_adapter
    from hub_cache import publish

    folder = make_adapter(tmp_path / repo.replace("/", "_"), tiny_base, seed=seed)
    files = {n: (folder / n).read_bytes() for n in ("adapter_config.json", "adapter_model.safetensors")}
    return publish(hub, repo, files)


def test_hub_imports_take_hub_ids_only_never_a_local_folder(tiny_library, tiny_base, tmp_path, hub, monkeypatch):
    """An id in the hub box that is also a folder on the server is still fetched from the hub, so a
    request cannot make the worker read the server's own folders."""
    from conftest import make_adapter

    monkeypatch.chdir(tmp_path)
    make_adapter(tmp_path / "alice" / "local", tiny_base, seed=5)  # ./alice/local is an adapter folder
    worker = LocalWorker(device="cpu")
    before = library_snapshot(tiny_library.path)
    with pytest.raises(LorlibError, match="hub adapter alice/local: not in the local hub cache"):
        worker.import_hub(str(tiny_library.path), ["alice/local"])
    with pytest.raises(LorlibError, match="'../x' is not a hub id"):
        worker.import_hub(str(tiny_library.path), ["../x"])
    assert library_snapshot(tiny_library.path) == before
    _published_adapter(hub, tmp_path, tiny_base)
    assert worker.import_hub(str(tiny_library.path), ["alice/fox-lora"]) == ["fox-lora"]


def test_a_served_explorer_reaches_the_hub_only_when_allowed(tiny_library, tiny_base, tmp_path, hub):
    from hub_cache import publish

    from lorlib_ui.core.sharing import stage
    from lorlib_ui.worker.access import NO_HUB, Access

    _published_adapter(hub, tmp_path, tiny_base)
    stage(tiny_library, tmp_path / "upload")
    publish(hub, "alice/lib", tmp_path / "upload")
    closed = LocalWorker(device="cpu", access=Access.serving([str(tiny_library.path)]))
    for call in (
        lambda: closed.import_hub(str(tiny_library.path), ["alice/fox-lora"]),
        lambda: closed.library("hf://alice/lib"),
    ):
        with pytest.raises(LorlibError, match=NO_HUB.split("(")[0].strip()):
            call()
    opened = LocalWorker(device="cpu", access=Access.serving([str(tiny_library.path)], hub=True))
    assert [e["name"] for e in opened.library("hf://alice/lib").experts] == tiny_library.names
    read_only = LocalWorker(device="cpu", access=Access.serving([str(tiny_library.path)], read_only=True, hub=True))
    with pytest.raises(LorlibError, match="read-only"):
        read_only.import_hub(str(tiny_library.path), ["alice/fox-lora"])


def test_export_merge_zips_the_adapter_and_refuses_per_token_routers(worker, tiny_library):
    import zipfile

    from lorlib_ui.core.adapters import read_adapter

    archive = worker.export_merge(str(tiny_library.path), "ties", density=0.5)
    with zipfile.ZipFile(archive) as zf:
        assert {"ties/adapter_config.json", "ties/adapter_model.safetensors"} <= set(zf.namelist())
        zf.extractall(Path(archive).parent / "unpacked")
    assert read_adapter(Path(archive).parent / "unpacked" / "ties").rank >= 4
    with pytest.raises(LorlibError, match="token by token"):
        worker.export_merge(str(tiny_library.path), "arrow")


def test_route_batch_reads_only_an_upload_in_a_served_explorer(tiny_library, tmp_path):
    from lorlib_ui.worker.access import Access

    prompts = tmp_path / "elsewhere.jsonl"
    prompts.write_text('{"prompt": "the quick"}\n')
    served = LocalWorker(device="cpu", access=Access.serving([str(tiny_library.path)]))
    request = RouteRequest(str(tiny_library.path), "-", router="arrow", max_new_tokens=2)
    with pytest.raises(LorlibError, match="must be the embedded data or an uploaded file"):
        list(served.route_batch(request, str(prompts)))
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    (uploads / "p.jsonl").write_text(prompts.read_text())
    served.accept_uploads(str(uploads))
    *progress, last = served.route_batch(request, str(uploads / "p.jsonl"))
    assert last["total"] == 1 and last["errors"] == 0 and Path(last["file"]).read_text().startswith("row,prompt")
