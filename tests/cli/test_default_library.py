"""The default library shipped in assets/library: complete, small, 16-bit, and what its manifest says."""

from collections import Counter
from pathlib import Path

import pytest
import torch

from lorlib_ui.cli.default_library import FAMILIES, OUT
from lorlib_ui.core.adapters import read_layout
from lorlib_ui.core.library import Library
from lorlib_ui.core.prototypes import stored_prototypes
from lorlib_ui.training.data import load_tasks


@pytest.fixture(scope="module")
def shipped():
    return Library.open(OUT)


def test_it_has_private_cluster_and_shared_experts_on_the_embedded_model(shipped):
    assert shipped.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    kinds = Counter(e.kind for e in shipped.experts)
    assert kinds["private"] >= 24 and kinds["shared"] == 1 and kinds["cluster"] >= 2
    families = {e.family for e in shipped.experts if e.kind == "private"}
    assert len(families) >= 6 and families == set(FAMILIES)
    for e in shipped.experts:
        if e.kind == "private":
            assert len(e.tasks) == 1 and e.metrics["final_loss"] < e.metrics["first_loss"]


def test_one_task_per_family_is_held_out_and_never_trained(shipped):
    data = load_tasks("default")
    held = shipped.extra["held_out"]["tasks"]
    assert Counter(data.family_of(t) for t in held) == Counter({f: 1 for f in FAMILIES})
    trained = {t for e in shipped.experts for t in e.tasks}
    assert not trained & set(held)
    assert trained | set(held) == {t for f in FAMILIES for t in data.tasks_in(f)}


def test_clusters_cover_the_private_experts(shipped):
    private = sorted(e.name for e in shipped.experts if e.kind == "private")
    members = shipped.clusters["members"]
    assert sorted(n for m in members.values() for n in m) == private
    for name, group in members.items():
        assert sorted(shipped.expert(name).tasks) == sorted(t for n in group for t in shipped.expert(n).tasks)


def test_small_and_sixteen_bit(shipped):
    size = sum(p.stat().st_size for p in Path(OUT).rglob("*") if p.is_file())
    assert size <= 34 * 2**20  # 21 MB of experts and prototypes, 7 MB of gates and activations, the analyses
    for e in shipped.experts:
        _, dtypes = read_layout(Path(OUT) / e.path)
        assert dtypes == {"BF16"}, e.name


def test_manifest_records_the_recipe_and_the_evaluation(shipped):
    assert shipped.extra["recipe"]["command"] == "python -m lorlib_ui.cli.default_library"
    commands = [h["command"].split()[3] for h in shipped.extra["history"]]
    assert {"build", "cluster", "evaluate"} <= set(commands)
    summary = {row["router"]: row for row in shipped.extra["evaluation"]["summary"]}
    assert set(summary) == {"base", "uniform", "arrow", "arrow-cluster", "shared", "oracle"}
    assert all(row["tasks"] == len(FAMILIES) for row in summary.values())


def test_the_recipe_of_another_seed_keeps_the_held_out_draw():
    from lorlib_ui.cli.default_library import RECIPE, recipe

    assert recipe(0) == RECIPE
    seeded = recipe(2)
    for command in ("build", "cluster"):
        options = seeded[command]
        assert options[options.index("--seed") + 1] == "2"
        assert [o for o in options if o not in ("2", "0")] == [o for o in RECIPE[command] if o != "0"] + (
            ["--holdout-seed"] if command == "build" else []
        )
    assert seeded["build"][-2:] == ["--holdout-seed", "0"]


def test_prototype_cache_matches_the_experts(shipped):
    """The shipped cache is used as is: every expert's prototypes are in it, keyed by its weights."""
    cached = stored_prototypes(shipped)
    for e in shipped.experts:
        assert len(cached.get(e.weights_hash, {})) == 2 * 30, e.name  # q_proj and v_proj of 30 layers
        assert all(torch.isfinite(v).all() for v in cached[e.weights_hash].values())


def test_every_private_expert_has_mean_activations(shipped):
    """avg_act@private runs out of the box: the activations are stored for the current weights."""
    private = shipped.groups()["private"]
    assert shipped.derived.lacking("activations", private) == []
    infos = shipped.derived.expert_info("activations")
    assert max(infos[name]["examples"] for name in private) == 100  # or all of a task's train rows, if fewer
    assert all(infos[name]["tokens"] > 1000 for name in private)


def test_every_private_expert_has_phatgoose_gates(shipped):
    """phatgoose@private runs out of the box: every gate was trained for the expert's current
    weights, 100 steps; over the experts, training lowered the loss (the first step's loss is one
    batch, the final one the mean of the last ten, so single experts are noisy)."""
    private = shipped.groups()["private"]
    assert shipped.derived.lacking("gates", private) == []
    infos = shipped.derived.expert_info("gates")
    assert {infos[name]["steps"] for name in private} == {100}
    first, final = (sum(infos[name][key] for name in private) for key in ("first_loss", "final_loss"))
    assert final < 0.9 * first


@pytest.mark.embedded
def test_its_demo_example_is_one_the_library_visibly_helps_with(shipped):
    """The example the Route tab opens on: a validation row of a held-out task, answered right by
    Arrow and wrong by the base model, as stored; greedy decoding gives the stored answers again."""
    from lorlib_ui.analysis.evaluation import answer_budget, normalize
    from lorlib_ui.core.generation import generate_batch
    from lorlib_ui.core.prompting import encode_prompt
    from lorlib_ui.core.routed_model import RoutedModel
    from lorlib_ui.core.routers import make_router
    from lorlib_ui.training.data import load_tasks

    demo = shipped.extra["demo"]
    assert demo["task"] in shipped.held_out.tasks and demo["split"] == "validation"
    data = load_tasks(shipped.data_source())
    assert demo["prompt"] in [row["input"] for row in data.rows(demo["task"], "validation")]
    rm = RoutedModel.load(shipped, device="cpu")
    budget = answer_budget(rm.tokenizer, data, demo["task"])
    ids = [encode_prompt(rm.tokenizer, demo["prompt"])]
    (routed,) = generate_batch(rm, ids, make_router(demo["router"], rm.experts, groups=shipped.groups()), budget)
    (base,) = generate_batch(rm, ids, make_router("base", rm.experts), budget)
    assert (routed, base) == (demo["answer"], demo["base_answer"])
    assert normalize(routed) == normalize(demo["expected"]) != normalize(base)


@pytest.mark.embedded
def test_its_stored_examples_are_validation_rows_that_show_what_they_say(shipped):
    """The example menu's first entries: validation rows of held-out tasks where Arrow helps (right,
    the base model wrong) and where it fails (wrong); greedy decoding gives the stored answers again."""
    from lorlib_ui.analysis.demo import graded
    from lorlib_ui.analysis.evaluation import answer_budget
    from lorlib_ui.core.generation import generate_batch
    from lorlib_ui.core.prompting import encode_prompt
    from lorlib_ui.core.routed_model import RoutedModel
    from lorlib_ui.core.routers import make_router
    from lorlib_ui.training.data import load_tasks

    examples = shipped.extra["examples"]
    kinds = [e["kind"] for e in examples]
    assert kinds.count("helps") >= 3 and kinds.count("fails") >= 1  # both sides of an honest demo
    data = load_tasks(shipped.data_source())
    rm = RoutedModel.load(shipped, device="cpu")
    for example in examples:
        task = example["task"]
        assert task in shipped.held_out.tasks and example["split"] == "validation"
        row = next(r for r in data.rows(task, "validation") if r["input"] == example["prompt"])
        assert row["output"] == example["expected"]
        ids = [encode_prompt(rm.tokenizer, example["prompt"])]
        budget = answer_budget(rm.tokenizer, data, task)
        router = make_router(example["router"], rm.experts, groups=shipped.groups())
        (routed,) = generate_batch(rm, ids, router, budget)
        (base,) = generate_batch(rm, ids, make_router("base", rm.experts), budget)
        assert (routed, base) == (example["answer"], example["base_answer"])
        if example["kind"] == "helps":
            assert graded(routed, row["output"]) and not graded(base, row["output"])
        else:
            assert not graded(routed, row["output"])
