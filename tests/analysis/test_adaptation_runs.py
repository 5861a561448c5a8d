"""Supervised adaptation: each method on a tiny task, what it stores, resuming, refusals."""

import json
import shutil
from dataclasses import replace

import pytest
import torch
from conftest import build_library as library_of
from conftest import library_snapshot, relative_error, routed_logits, routing_ids
from conftest import run as cli

from lorlib_ui.analysis.adaptation_runs import AdaptOptions, adapt_library, adapted_name, plan_adaptation
from lorlib_ui.analysis.evaluation import evaluate_task
from lorlib_ui.core.adapters import read_adapter
from lorlib_ui.core.errors import LorlibError
from lorlib_ui.core.learned_routers import learned_routers
from lorlib_ui.core.library import Library, expert_from_adapter
from lorlib_ui.core.routed_model import RoutedModel
from lorlib_ui.core.routers import make_router
from lorlib_ui.training.adaptation_methods import mu_adapter, train_poly, trainable_numbers
from lorlib_ui.training.config import ADAPT_METHODS, TrainConfig
from lorlib_ui.training.data import load_tasks
from lorlib_ui.training.reporter import Reporter
from lorlib_ui.training.training import start_lora

NEW_TASK = "name-the-animal"
WORDS = ["fox", "dog", "cat", "owl"]
STEPS = 12


@pytest.fixture(scope="module")
def source(tmp_path_factory, tiny_base, tiny_adapters):
    """A library of three private experts (one trained on a task like the new one, two random) and
    a shared expert, and data with a new multiple-choice task of 40 rows (32 train, 4 test)."""
    from lorlib_ui.training.building import BuildOptions, build_library

    root = tmp_path_factory.mktemp("adapt")
    rows = [{"task": "fox", "input": f"say a word {i}", "output": "fox"} for i in range(30)]
    for i in range(40):
        word = WORDS[i % len(WORDS)]
        rows.append({"task": NEW_TASK, "input": f"the animal is {word}, {i}", "output": word, "options": WORDS})
    data = root / "animals.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    config = TrainConfig(steps=20, batch_size=4, learning_rate=5e-2, rank=4, targets=("q_proj", "v_proj"))
    options = BuildOptions(data=str(data), tasks=("fox",), shared_steps=5, base_model=str(tiny_base))
    build_library(root / "lib", options, config)
    library = Library.open(root / "lib")
    noise = {f"noise{i}": read_adapter(folder) for i, folder in enumerate(tiny_adapters[:2])}
    library.add_experts([(expert_from_adapter(n, a, library.base_model, kind="private"), a) for n, a in noise.items()])
    return root / "lib", data


@pytest.fixture(scope="module")
def adapted(source, tmp_path_factory):
    """The library after `adapt` ran every method on 8 shots of the new task, and what it reported."""
    path = shutil.copytree(source[0], tmp_path_factory.mktemp("adapted") / "lib")
    events = []
    options = AdaptOptions(task=NEW_TASK, data=str(source[1]), shots=(8,), steps=STEPS, budget=6)
    record, notes = adapt_library(path, options, Reporter(progress=events.append))
    return path, source[1], record, notes, events


@pytest.fixture
def copy(source, tmp_path):
    return shutil.copytree(source[0], tmp_path / "lib"), source[1]


def test_every_method_is_trained_stored_and_scored(adapted):
    path, _, record, notes, events = adapted
    assert notes == []
    runs = {run["method"]: run for run in record["runs"]}
    assert sorted(runs) == sorted(["scratch", "mu", "shared", "poly-router", "poly-full", "lorahub"])
    library = Library.open(path)
    for method in ("scratch", "mu", "shared"):
        expert = library.expert(runs[method]["name"])
        assert expert.kind == "adapted" and expert.tasks == [NEW_TASK]
        assert expert.training["method"] == method and expert.training["shots"] == 8
        assert expert.training["steps"] == STEPS and len(expert.training["shot_rows"]) == 8
    assert library.expert(runs["shared"]["name"]).training["init"] == "shared"
    routers = learned_routers(library)
    assert routers[runs["poly-router"]["name"]].experts == ["fox", "noise0", "noise1"]
    assert routers[runs["poly-full"]["name"]].trains_experts
    assert library.expert(runs["lorahub"]["name"]).kind == "lorahub"
    # scored beside zero-shot Arrow and the base model, with intervals and paired differences
    summary = {row["router"]: row for row in record["summary"]}
    assert {"arrow", "base", "scratch/8", "poly-full/8"} <= set(summary)
    assert summary["scratch/8"]["loglik_ci"] is not None and summary["scratch/8"]["mc_tasks"] == 1
    assert {(d["a"], d["b"]) for d in record["differences"]} >= {("mu/8", "arrow"), ("mu/8", "scratch/8")}
    assert library.extra["adaptation"][NEW_TASK]["runs"] == record["runs"]
    trained = {e.expert for e in events}
    assert trained == {"scratch/8", "mu/8", "shared/8", "poly-router/8", "poly-full/8", "lorahub/8"}


def test_every_gradient_method_lowers_its_training_loss(adapted):
    _, _, record, _, _ = adapted
    for run in record["runs"]:
        if run["method"] == "lorahub":
            assert run["training"]["loss"] <= run["training"]["loss_uniform"]
            continue
        assert len(run["loss_curve"]) == STEPS
        assert run["final_loss"] < run["first_loss"], run["method"]


def test_a_stored_result_reloads_and_scores_the_same(adapted):
    path, data, record, _, _ = adapted
    rm = RoutedModel.load(Library.open(path), device="cpu")
    loaded = load_tasks(str(data))
    for run in record["runs"]:
        if run["method"] in ("scratch", "poly-full"):
            score = evaluate_task(rm, loaded, NEW_TASK, run["router"])
            assert score.rows == run["score"]["rows"], run["method"]


def test_a_rerun_trains_nothing_and_keeps_what_is_stored(adapted):
    path, data, record, _, _ = adapted
    before = library_snapshot(path / "experts") | library_snapshot(path / "routers")
    events = []
    options = AdaptOptions(task=NEW_TASK, data=str(data), shots=(8,), steps=STEPS, budget=6)
    again, _ = adapt_library(path, options, Reporter(progress=events.append))
    assert events == []
    assert not any(run["trained_now"] for run in again["runs"])
    assert library_snapshot(path / "experts") | library_snapshot(path / "routers") == before
    assert [r["score"]["rows"] for r in again["runs"]] == [r["score"]["rows"] for r in record["runs"]]


def test_poly_router_leaves_every_expert_byte_identical(copy):
    path, data = copy
    experts_before = library_snapshot(path / "experts")
    rm = RoutedModel.load(Library.open(path), device="cpu")
    stacks = {name: (layer.lora_a.clone(), layer.lora_bt.clone()) for name, layer in rm.layers.items()}
    pairs = [("say a word", "fox")] * 8
    result = train_poly(rm, ["fox", "noise0", "noise1"], pairs, TrainConfig(steps=4, batch_size=4, seed=0))
    assert any(t.abs().sum() > 0 for k, t in result.tensors.items() if k.endswith(".logits"))
    for name, layer in rm.layers.items():
        assert torch.equal(layer.lora_a, stacks[name][0]) and torch.equal(layer.lora_bt, stacks[name][1])
    assert library_snapshot(path / "experts") == experts_before


def test_a_learned_router_routes_as_it_was_trained(copy):
    """The stored poly:NAME computes what the router computed at the end of its training."""
    from lorlib_ui.core.learned_routers import LearnedRouter, store_learned_router
    from lorlib_ui.core.routers.poly import PolyTraining

    path, _ = copy
    library = Library.open(path)
    rm = RoutedModel.load(library, device="cpu")
    mixed = ["fox", "noise1"]
    result = train_poly(rm, mixed, [("say a word", "fox")] * 8, TrainConfig(steps=3, batch_size=4), full=True)
    hashes = [library.expert(x).weights_hash for x in mixed]
    store_learned_router(library, LearnedRouter("learned", "poly-full", mixed, hashes), result.tensors)
    subset = tuple(rm.experts.index(x) for x in mixed)
    logits = {k[: -len(".logits")]: v for k, v in result.tensors.items() if k.endswith(".logits")}
    factors = {
        m: (result.tensors[f"{m}.lora_a"].flatten(0, 1), result.tensors[f"{m}.lora_bt"].flatten(0, 1)) for m in logits
    }
    training = replace(PolyTraining(logits=logits, factors=factors), subset=subset)
    expected = routed_logits(rm, training)
    stored = routed_logits(rm, make_router("poly:learned", rm.experts))
    assert relative_error(stored, expected) < 1e-5
    assert not torch.allclose(stored, routed_logits(rm, make_router("base", rm.experts)))


def test_mu_starts_exactly_at_the_uniform_merge(copy, tiny_base):
    from lorlib_ui.core.base_model import load_base_model

    path, _ = copy
    library = Library.open(path)
    rm = RoutedModel.load(library, device="cpu")
    mu = mu_adapter(rm, ["fox", "noise0", "noise1"], TrainConfig(rank=4))
    config = TrainConfig(rank=4, targets=tuple(mu.target_modules))  # the noise experts adapt k and o too
    expected = routed_logits(rm, make_router("uniform@private", rm.experts, groups=library.groups(), mix="parameters"))
    model, _ = load_base_model(str(tiny_base), device="cpu", dtype="float32")
    peft_model = start_lora(model, config, mu)
    with torch.no_grad():
        started = peft_model(input_ids=routing_ids(rm)).logits
    assert relative_error(started, expected) < 1e-5


def test_poly_full_trains_the_mixed_experts_factors_too(copy):
    path, _ = copy
    rm = RoutedModel.load(Library.open(path), device="cpu")
    mixed = ["fox", "noise0", "noise1"]
    layers = sum(1 for layer in rm.layers.values() if layer.usable(tuple(range(3)))[1])
    assert trainable_numbers(rm, mixed, full=False) == 3 * layers
    d = sum(3 * layer.rank * (layer.base.in_features + layer.base.out_features) for layer in rm.layers.values())
    assert trainable_numbers(rm, mixed, full=True) == 3 * layers + d


@pytest.mark.parametrize(
    "options, message",
    [
        ({"shots": (40,)}, "more than the 32 training rows"),
        ({"methods": ("scratch", "distil")}, "unknown method 'distil'"),
        ({"methods": ()}, "the list of methods is empty"),
        ({"shots": (0,)}, "--shots must be at least 1"),
        ({"task": "no-such-task"}, "no-such-task"),
        ({"limit": 0}, "the limit must be positive"),
    ],
)
def test_bad_input_is_refused_and_changes_nothing(copy, options, message):
    path, data = copy
    before = library_snapshot(path)
    arguments = {"task": NEW_TASK, "data": str(data), "shots": (8,), "steps": 2} | options
    with pytest.raises(LorlibError, match=message):
        adapt_library(path, AdaptOptions(**arguments))
    assert library_snapshot(path) == before


def test_a_library_without_private_or_shared_experts_is_refused(copy, tmp_path, tiny_base, tiny_adapters):
    path, data = copy
    Library.open(path).remove_expert("shared")
    before = library_snapshot(path)
    with pytest.raises(LorlibError, match="method shared starts from the shared expert"):
        adapt_library(path, AdaptOptions(task=NEW_TASK, data=str(data), shots=(8,), methods=("shared",)))
    assert library_snapshot(path) == before
    clusters = library_of(tmp_path / "clusters", tiny_base, tiny_adapters[:2])
    with clusters.edit() as current:  # cluster experts only: nothing of one task to start from
        for expert in current.experts:
            expert.kind = "cluster"
    before = library_snapshot(clusters.path)
    with pytest.raises(LorlibError, match="has no private experts"):
        adapt_library(clusters.path, AdaptOptions(task=NEW_TASK, data=str(data), shots=(8,)))
    assert library_snapshot(clusters.path) == before


def test_other_settings_need_force(adapted, tmp_path):
    path, data, _, _, _ = adapted
    other = shutil.copytree(path, tmp_path / "lib")
    scratch = {"task": NEW_TASK, "data": str(data), "shots": (8,), "methods": ("scratch",)}
    before = library_snapshot(other)
    with pytest.raises(LorlibError, match="from other settings; use --force"):
        adapt_library(other, AdaptOptions(**scratch, steps=STEPS + 1))
    assert library_snapshot(other) == before
    record, _ = adapt_library(other, AdaptOptions(**scratch, steps=3, force=True))
    assert Library.open(other).expert(adapted_name("scratch", NEW_TASK, 8, 0)).training["steps"] == 3
    assert [run["method"] for run in record["runs"]] == ["scratch"]


def test_the_command_prints_results_and_a_learning_curve(copy, capsys):
    path, data = copy
    code, out, err = cli(
        capsys,
        "adapt",
        path,
        "--task",
        NEW_TASK,
        "--data",
        data,
        "--shots",
        "4,8",
        "--methods",
        "scratch,poly-router",
        "--steps",
        "2",
    )
    assert code == 0, err
    assert "| scratch/4 |" in out and "| poly-router/8 |" in out and "| arrow |" in out
    assert "learning curve" in out and "| poly-router |" in out
    name = adapted_name("poly-router", NEW_TASK, 8, 0)
    code, out, err = cli(capsys, "info", path)
    assert code == 0 and f"learned router poly:{name}: poly-router" in out
    code, out, err = cli(capsys, "route", path, "--router", f"poly:{name}", "--prompt", "the animal is", "--json")
    assert code == 0, err
    assert json.loads(out)["experts"] == Library.open(path).names
    code, out, err = cli(capsys, "route", path, "--router", "poly:nope", "--prompt", "the animal is")
    assert code == 1 and err.count("\n") == 1 and "has no learned router 'nope'" in err
    code, out, err = cli(capsys, "adapt", path, "--task", NEW_TASK, "--data", data, "--shots", "8,x")
    assert code == 1 and err.count("\n") == 1 and "--shots takes whole numbers" in err


def test_an_adaptation_plan_checks_everything_and_writes_nothing(adapted, no_model_loads):
    path, data, _, _, _ = adapted
    before = library_snapshot(path)
    options = AdaptOptions(task=NEW_TASK, data=str(data), shots=(8, 4, 8), steps=STEPS, budget=6)
    plan = plan_adaptation(path, options)
    assert plan.options.shots == (4, 8) and plan.test_rows == 4 and plan.notes == []
    assert [(run.label, run.done) for run in plan.runs] == [(f"{m}/4", False) for m in ADAPT_METHODS] + [
        (f"{m}/8", True)
        for m in ADAPT_METHODS  # stored by the fixture's run, with the same settings
    ]
    for changes, message in [
        ({"steps": STEPS + 1, "shots": (8,)}, "from other settings; use --force"),
        ({"task": "no-such-task"}, "no-such-task"),
        ({"shots": (40,)}, "more than the 32 training rows"),
    ]:
        with pytest.raises(LorlibError, match=message):
            plan_adaptation(path, replace(options, **changes))
    assert library_snapshot(path) == before
    for changes, message in [
        ({"shots": ()}, "give at least one number of shots"),
        ({"budget": 0}, "the budget must be positive, got 0"),
        ({"steps": 0}, "the steps must be positive, got 0"),
    ]:
        with pytest.raises(LorlibError, match=message):
            replace(options, **changes)
