"""LoraHub: the weighted merge, its few-shot search, the stored expert and its per-task evaluation."""

import json
import shutil
from dataclasses import replace

import pytest
import torch
from conftest import build_library as library_of
from conftest import library_snapshot, make_adapter

from lorlib_ui.core.adapters import read_adapter
from lorlib_ui.core.errors import LorlibError
from lorlib_ui.core.library import Library, expert_from_adapter
from lorlib_ui.core.routed_model import MERGED_CACHE, RoutedModel
from lorlib_ui.core.routers import help_text, make_router, menu, presets
from lorlib_ui.core.routers.lorahub import LoraHubRouter, WeightedMerge
from lorlib_ui.training.data import load_tasks
from lorlib_ui.training.lorahub import (
    LoraHubOptions,
    draw_shots,
    few_shot_context,
    lorahub_expert,
    plan_lorahub,
    shot_loss,
)
from lorlib_ui.training.reporter import Reporter
from lorlib_ui.training.training import Cancelled

NEW_TASK = "name-the-fox"  # no expert was trained on it, but the fox expert knows its answer


@pytest.fixture(scope="module")
def hub(tmp_path_factory, tiny_base, tiny_adapters):
    """A library of three private experts: one trained to say "fox" and two random ones, and data
    with a new task whose answer is always "fox". One expert is right, two are wrong."""
    from lorlib_ui.training.building import BuildOptions, build_library
    from lorlib_ui.training.config import TrainConfig

    root = tmp_path_factory.mktemp("hub")
    rows = [{"task": "fox", "input": f"say a word {i}", "output": "fox"} for i in range(30)]
    rows += [{"task": NEW_TASK, "input": f"say a word, please {i}", "output": "fox"} for i in range(30)]
    data = root / "animals.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    config = TrainConfig(steps=30, batch_size=4, learning_rate=5e-2, rank=4, targets=("q_proj", "v_proj"))
    options = BuildOptions(data=str(data), tasks=("fox",), shared=False, base_model=str(tiny_base))
    build_library(root / "lib", options, config)
    library = Library.open(root / "lib")
    noise = {f"noise{i}": read_adapter(folder) for i, folder in enumerate(tiny_adapters[:2])}
    library.add_experts([(expert_from_adapter(n, a, library.base_model, kind="private"), a) for n, a in noise.items()])
    return root / "lib", data


@pytest.fixture
def hub_copy(hub, tmp_path):
    path, data = hub
    return shutil.copytree(path, tmp_path / "lib"), data


def test_lorahub_beats_uniform_weights_on_a_task_one_expert_knows(hub):
    path, data = hub
    rm = RoutedModel.load(Library.open(path), device="cpu")
    context = few_shot_context(rm, load_tasks(data), NEW_TASK, shots=4, seed=0)
    router = make_router("lorahub", rm.experts, groups=rm.library.groups(), per_task=True)
    merge, result = LoraHubRouter(budget=8).search(context)
    assert isinstance(router, LoraHubRouter) and result.evaluations == 8
    assert result.loss < result.uniform_loss - 0.1, result
    weights = dict(zip(rm.experts, result.weights))
    assert max(weights, key=lambda name: abs(weights[name])) == "fox", weights
    # the loss reported is the merge's loss, with the penalty on top in the objective
    assert context.loss(merge) == pytest.approx(result.loss, abs=1e-6)
    assert result.objective == pytest.approx(result.loss + 0.05 * sum(abs(w) for w in result.weights))
    assert LoraHubRouter(budget=8).search(context)[1] == result  # seeded: the same search again
    assert all(len(layer._merged) <= MERGED_CACHE for layer in rm.layers.values())  # 9 merges folded, 8 kept


def test_the_stored_expert_scores_the_loss_the_search_reported(hub_copy):
    path, data = hub_copy
    events = []
    options = LoraHubOptions(task=NEW_TASK, data=str(data), shots=4, budget=8)
    report = lorahub_expert(path, options, Reporter(progress=events.append))
    assert not report.reused and [e.step for e in events] == list(range(1, 9))
    assert {(e.expert, e.steps) for e in events} == {(f"lorahub-{NEW_TASK}-k4-s0", 8)}
    library = Library.open(path)  # from disk: the merge is a plain expert now
    expert = library.expert(f"lorahub-{NEW_TASK}-k4-s0")
    training = expert.training
    assert expert.kind == "lorahub" and expert.tasks == [NEW_TASK] and expert.name == report.expert.name
    assert {k: training[k] for k in ("method", "task", "shots", "seed", "budget")} == {
        "method": "lorahub",
        "task": NEW_TASK,
        "shots": 4,
        "seed": 0,
        "budget": 8,
    }
    assert set(training["weights"]) == {"fox", "noise0", "noise1"} and training["loss"] < training["loss_uniform"]
    rows, picked = draw_shots(load_tasks(data), NEW_TASK, 4, seed=0)
    assert training["shot_rows"] == picked
    rm = RoutedModel.load(library, device="cpu")
    stored = shot_loss(rm, rows)(make_router(f"expert:{expert.name}", rm.experts))
    assert stored == pytest.approx(training["loss"], abs=1e-4)
    # again: the stored expert is reused, nothing is searched or written
    before = library_snapshot(path)
    again = lorahub_expert(path, options, Reporter(progress=events.append))
    assert again.reused and again.expert.name == expert.name and len(events) == 8
    assert library_snapshot(path) == before
    assert plan_lorahub(path, options).reuse.name == expert.name  # the plan finds it: no data, no model
    assert plan_lorahub(path, replace(options, force=True)).reuse is None


def test_the_merge_is_the_weighted_sums_of_the_experts_factors(tmp_path, tiny_base, tiny_adapters):
    """A = Σ w_e A_e and B = Σ w_e s_e B_e per module, over experts of different ranks, scales and
    targets (one adapts no v_proj: it adds nothing there), stored with scale 1 at one rank."""
    folders = [
        tiny_adapters[0],
        make_adapter(tmp_path / "small", tiny_base, seed=7, rank=2, targets=["q_proj"], alpha=6),
        tiny_adapters[1],
    ]
    library = library_of(tmp_path / "lib", tiny_base, folders, names=["a", "small", "b"])
    rm = RoutedModel.load(library, device="cpu")
    weights = (0.7, -1.2, 0.0)
    merge = WeightedMerge(subset=(0, 1, 2), values=weights)
    adapter = rm.merged_adapter(merge)
    experts = [read_adapter(folder) for folder in folders]
    assert adapter.rank == 4 and set(adapter.scales.values()) == {1.0} and adapter.config["lora_alpha"] == 4
    assert set(adapter.factors) == set(rm.modules)
    for module, (a, b) in adapter.factors.items():
        want_a, want_b = torch.zeros_like(a), torch.zeros_like(b)
        for w, expert in zip(weights, experts):
            if module in expert.factors:
                a_e, b_e = (f.float() for f in expert.factors[module])
                want_a[: a_e.shape[0]] += w * a_e
                want_b[:, : b_e.shape[1]] += w * expert.scales[module] * b_e
        assert torch.allclose(a, want_a, atol=1e-6) and torch.allclose(b, want_b, atol=1e-6), module


def test_lorahub_runs_only_where_resolved_per_task():
    experts, groups = ["e1", "e2"], {"private": ["e1", "e2"]}
    with pytest.raises(LorlibError, match="use it with evaluate, or store one with `lorahub LIBRARY --task T`"):
        make_router("lorahub", experts, groups=groups)
    assert make_router("lorahub@private", experts, groups=groups, per_task=True).subset == (0, 1)
    with pytest.raises(LorlibError, match="no task experts"):
        make_router("lorahub", experts, groups={"cluster": ["e1", "e2"]}, per_task=True)
    with pytest.raises(LorlibError, match="--budget must be at least 1, got 0"):
        LoraHubRouter(budget=0)
    specs, missing = menu(experts, groups)
    assert "lorahub" not in help_text() and "lorahub" not in " ".join(specs + list(missing))
    assert "lorahub" not in presets()  # a search per task: run by name, not by default


def test_evaluate_runs_lorahub_per_task_and_it_beats_the_uniform_merge(hub_copy):
    from lorlib_ui.analysis.evaluation import EvaluateOptions, evaluate_library

    path, data = hub_copy
    options = EvaluateOptions(tasks=(NEW_TASK,), routers=("lorahub", "uniform"), data=str(data), limit=3, shots=4)
    record, _ = evaluate_library(str(path), options)
    by = {row["router"]: row for row in record["summary"]}
    assert record["shots"] == 4 and by["lorahub"]["loglik"] > by["uniform"]["loglik"], by
    score = next(s for s in record["scores"] if s["router"] == "lorahub")
    assert score["expert"] == "lorahub (4 shots, seed 0)"
    with pytest.raises(LorlibError, match="--shots 30 is more than the 24 training rows"):
        evaluate_library(str(path), EvaluateOptions(tasks=(NEW_TASK,), routers=("lorahub",), data=str(data), shots=30))


def test_a_lorahub_plan_draws_the_shots_and_writes_nothing(hub_copy, no_model_loads):
    path, data = hub_copy
    before = library_snapshot(path)
    options = LoraHubOptions(task=NEW_TASK, data=str(data), shots=4, budget=8)
    plan = plan_lorahub(path, options)
    rows, picked = draw_shots(load_tasks(data), NEW_TASK, 4, seed=0)
    assert plan.reuse is None and (plan.rows, plan.picked) == (rows, picked)
    assert plan.name == f"lorahub-{NEW_TASK}-k4-s0" and plan.router.budget == 8
    for changes, message in [
        ({"shots": 30}, "--shots 30 is more than the 24 training rows"),
        ({"task": "nope"}, "no task 'nope'"),
        ({"experts": "cluster"}, "no experts in group 'cluster'"),
    ]:
        with pytest.raises(LorlibError, match=message):
            plan_lorahub(path, replace(options, **changes))
    for changes, message in [({"budget": 0}, "--budget must be at least 1, got 0"), ({"shots": 0}, "--shots must")]:
        with pytest.raises(LorlibError, match=message):
            replace(options, **changes)
    assert library_snapshot(path) == before


def test_the_reporters_cancel_stops_the_search_and_stores_nothing(hub_copy):
    path, data = hub_copy
    events = []
    reporter = Reporter(progress=events.append, cancelled=lambda: len(events) >= 2)
    with pytest.raises(Cancelled):
        lorahub_expert(path, LoraHubOptions(task=NEW_TASK, data=str(data), shots=4, budget=8), reporter)
    assert [e.step for e in events] == [1, 2] and Library.open(path).names == ["fox", "noise0", "noise1"]
