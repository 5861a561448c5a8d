"""Zero-shot evaluation of routers on held-out tasks, and the batched scoring and generation it uses."""

import json

import numpy as np
import pytest
import torch
from conftest import library_snapshot, run

from lorlib_ui.analysis.evaluation import EvaluateOptions, evaluate_library, normalize, plan_evaluation
from lorlib_ui.core.errors import LorlibError
from lorlib_ui.core.generation import score, score_continuations
from lorlib_ui.core.library import Library
from lorlib_ui.core.routers import make_router
from lorlib_ui.training.reporter import Reporter
from lorlib_ui.training.training import Cancelled


def test_score_continuations_equals_unbatched_score(tiny_routed):
    """Batched, right-padded scoring gives each continuation the same log-probs as scoring it alone."""
    tok = tiny_routed.tokenizer
    texts = ["the quick brown fox", "routing tokens to experts with arrow", "a library of lora adapters"]
    pairs = []
    for text in texts:
        ids = tok(text)["input_ids"]
        pairs.append((ids[:2], ids[2:]))
    router = make_router("arrow", tiny_routed.experts, top_k=2)
    batched = score_continuations(tiny_routed, router, pairs, batch_size=3)
    for text, (prompt, cont), got in zip(texts, pairs, batched):
        alone = score(tiny_routed, text, router).logprobs[len(prompt) :]
        assert len(got) == len(cont) and torch.allclose(torch.tensor(got), torch.tensor(alone), atol=1e-4)


@pytest.mark.parametrize("spec", ["arrow", "uniform", "base"])
def test_score_continuations_shares_a_common_prefix_exactly(tiny_routed, spec):
    """Sequences that start alike (the chat template's system prompt) are scored from one cached
    prefix: each continuation's log-probs are those of scoring its whole text alone."""
    tok = tiny_routed.tokenizer
    head = "a library of lora adapters routes"
    texts = [head + tail for tail in (" every token", " tokens to experts with arrow", " the quick brown fox", " x")]
    shared = len(tok(head)["input_ids"])
    pairs = []
    for text in texts:
        ids = tok(text)["input_ids"]
        pairs.append((ids[: shared + 1], ids[shared + 1 :]))
    router = make_router(spec, tiny_routed.experts, top_k=2)
    batched = score_continuations(tiny_routed, router, pairs, batch_size=3)
    for text, (prompt, cont), got in zip(texts, pairs, batched):
        alone = score(tiny_routed, text, router).logprobs[len(prompt) :]
        assert len(got) == len(cont) and torch.allclose(torch.tensor(got), torch.tensor(alone), atol=1e-4)


def test_normalize_for_exact_match():
    assert normalize("  Cats.\nThe plural of cat") == "cats"
    assert normalize("New   York") == normalize("new york")
    assert normalize("") == ""


def test_evaluate_compares_routers_on_held_out_tasks(built, capsys):
    assert run(capsys, "cluster", built, "--k", "2", "--steps", "2")[0] == 0
    code, out, err = run(capsys, "evaluate", built, "--limit", "2")
    assert code == 0, err
    library = Library.open(built)
    record = library.extra["evaluation"]
    routers = [row["router"] for row in record["summary"]]
    expected = ["base", "uniform", "mean_delta", "ties", "arrow", "arrow-cluster", "spectral", "shared", "oracle"]
    assert routers == expected  # phatgoose and avg_act need keys this library lacks; arrow-gks general experts
    held = library.extra["held_out"]["tasks"]
    for row in record["summary"]:
        assert row["tasks"] == 2 and row["mc_tasks"] == 1  # only the 'pick' family has options
    assert {s["task"] for s in record["scores"]} == set(held)
    oracle = [s for s in record["scores"] if s["router"] == "oracle"]
    assert all(s["expert"].startswith("expert:cluster") for s in oracle)
    # base and the experts see the same rows but score them differently
    ll = {row["router"]: row["loglik"] for row in record["summary"]}
    assert ll["base"] != ll["shared"]
    assert "| router |" in out and "| arrow-cluster |" in out
    code, out, _ = run(capsys, "evaluate", built, "--limit", "1", "--routers", "base,shared", "--json")
    assert code == 0 and [r["router"] for r in json.loads(out)["summary"]] == ["base", "shared"]


def test_evaluate_skips_or_refuses_routers_the_library_cannot_run(built, capsys):
    code, out, err = run(capsys, "evaluate", built, "--limit", "1", "--routers", "base")
    assert code == 0
    code, out, err = run(capsys, "evaluate", built, "--limit", "1", "--json")
    assert code == 0 and "skipped arrow-cluster" in err and "skipped oracle" in err
    assert "skipped phatgoose: router phatgoose@private" in err and "lorlib gates" in err  # no gates yet
    assert "skipped avg_act" in err and "skipped arrow-gks" in err
    before = library_snapshot(built)
    code, _, err = run(capsys, "evaluate", built, "--routers", "oracle")
    assert code == 1 and "no cluster experts" in err
    code, _, err = run(capsys, "evaluate", built, "--tasks", "nope")
    assert code == 1 and "no task 'nope'" in err
    assert library_snapshot(built) == before


def test_batched_generation_equals_one_at_a_time(tiny_routed):
    """Left-padded batches give each prompt the answer it gets alone (greedy, Arrow routing)."""
    from lorlib_ui.core.generation import encode_prompt, generate, generate_batch

    tok = tiny_routed.tokenizer
    prompts = ["the quick", "routing tokens to experts with", "a library", "one causal language"]
    router = make_router("arrow", tiny_routed.experts, top_k=2)
    batched = generate_batch(tiny_routed, [encode_prompt(tok, p) for p in prompts], router, 6, batch_size=4)
    alone = [generate(tiny_routed, p, router, max_new_tokens=6, record=False).text for p in prompts]
    assert batched == alone and any(alone)


def test_a_router_known_right_scores_above_ones_known_wrong(tmp_path, tiny_base):
    """Two tasks with fixed answers ('fox' and 'dog'): the expert trained on a task beats, on that
    task's test rows, the other task's expert and the base model. Evaluation ranks routers by
    what they know."""
    from lorlib_ui.analysis.evaluation import EvaluateOptions, evaluate_library
    from lorlib_ui.training.building import BuildOptions, build_library
    from lorlib_ui.training.config import TrainConfig

    rows = [{"task": t, "input": f"say a word {i}", "output": t} for t in ("fox", "dog") for i in range(30)]
    data = tmp_path / "fixed.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    config = TrainConfig(steps=60, batch_size=4, learning_rate=3e-2, rank=8)
    build_library(tmp_path / "lib", BuildOptions(data=str(data), shared=False, base_model=str(tiny_base)), config)
    options = EvaluateOptions(tasks=("fox",), routers=("expert:fox", "expert:dog", "base"))
    record, _ = evaluate_library(str(tmp_path / "lib"), options)
    by = {row["router"]: row for row in record["summary"]}
    right, wrong, base = by["expert:fox"], by["expert:dog"], by["base"]
    assert right["loglik"] > max(wrong["loglik"], base["loglik"]) + 0.5, by
    assert right["exact_match"] == 1.0 and wrong["exact_match"] == base["exact_match"] == 0.0, by


def test_evaluate_gives_intervals_paired_differences_and_seen_tasks(built, capsys):
    code, out, err = run(
        capsys, "evaluate", built, "--tasks", "all", "--limit", "2", "--routers", "base,uniform,arrow,shared"
    )
    assert code == 0, err
    record = Library.open(built).extra["evaluation"]
    held, seen = Library.open(built).extra["held_out"]["tasks"], record["seen"]
    assert set(record["tasks"]) == set(held) | set(seen) and len(seen) == 4 and not set(seen) & set(held)
    assert set(record["summary_by"]) == {"held-out", "seen"}
    assert record["summary_by"]["seen"][0]["tasks"] == 4
    for row in record["summary"]:
        low, high = row["loglik_ci"]
        assert low <= row["loglik"] <= high
        assert row["exact_match_ci"][0] <= row["exact_match"] <= row["exact_match_ci"][1]
    scores = {(s["router"], s["task"]): s for s in record["scores"]}
    differences = {(d["a"], d["b"]): d for d in record["differences"]}
    assert set(differences) == {("arrow", "shared"), ("arrow", "uniform")}  # no cluster experts: no arrow-cluster
    arrow_shared = differences["arrow", "shared"]["loglik"]
    by_hand = [
        np.mean(scores["arrow", t]["rows"]["loglik"]) - np.mean(scores["shared", t]["rows"]["loglik"])
        for t in record["tasks"]
    ]
    assert arrow_shared["difference"] == pytest.approx(np.mean(by_hand), abs=1e-4)
    assert arrow_shared["ci"][0] <= arrow_shared["difference"] <= arrow_shared["ci"][1]
    assert "held-out tasks:" in out and "seen tasks:" in out and "arrow − shared" in out and " [" in out


def test_evaluate_on_validation_rows_for_ablations(built, capsys, tasks_file):
    from lorlib_ui.analysis.evaluation import test_rows
    from lorlib_ui.training.data import load_tasks

    code, out, err = run(capsys, "evaluate", built, "--split", "validation", "--routers", "base", "--json")
    assert code == 0, err
    record = json.loads(out)
    data = load_tasks(str(tasks_file))
    assert record["split"] == "validation"
    for row in record["scores"]:
        assert row["examples"] == len(data.rows(row["task"], "validation"))
    task = record["scores"][0]["task"]
    assert test_rows(data, task, split="validation") == data.rows(task, "validation") != data.rows(task, "test")
    code, out, _ = run(capsys, "evaluate", built, "--split", "validation", "--routers", "base,arrow", "--top-k", "1")
    assert code == 0 and "on validation rows" in out
    record = Library.open(built).extra["evaluation"]
    assert record["top_k"] == 1 and {s["expert"] for s in record["scores"]} >= {
        "arrow@private(top_k=1, T=1, mix=outputs)"
    }
    code, _, err = run(capsys, "evaluate", built, "--routers", "arrow", "--top-k", "99")
    assert code == 1 and "top-k must be between" in err
    code, _, err = run(capsys, "evaluate", built, "--split", "train")
    assert code == 1 and "invalid choice" in err


def test_an_evaluation_plan_checks_everything_and_writes_nothing(built, no_model_loads):
    before = library_snapshot(built)
    plan = plan_evaluation(str(built), EvaluateOptions(limit=2))
    assert plan.tasks == Library.open(built).extra["held_out"]["tasks"] and not plan.few_shot
    assert {"base", "uniform", "arrow", "shared"} <= set(plan.routers) and "oracle" not in plan.routers
    assert any(note.startswith("skipped oracle") for note in plan.notes)
    assert plan_evaluation(str(built), EvaluateOptions(routers=("lorahub",), shots=2)).few_shot
    for options, message in [
        (EvaluateOptions(tasks=("nope",)), "no task 'nope'"),
        (EvaluateOptions(routers=("oracle",)), "no cluster experts"),
        (EvaluateOptions(routers=("lorahub",), shots=30), "--shots 30 is more than the"),
    ]:
        with pytest.raises(LorlibError, match=message):
            plan_evaluation(str(built), options)
    assert library_snapshot(built) == before
    for options, message in [
        ({"routers": ()}, "the list of routers is empty"),
        ({"limit": 0}, "the limit must be positive, got 0"),
        ({"split": "train"}, "unknown split 'train'"),
        ({"shots": 0}, "--shots must be at least 1, got 0"),
    ]:
        with pytest.raises(LorlibError, match=message):
            EvaluateOptions(**options)


def test_the_reporters_cancel_stops_an_evaluation_before_it_stores(built):
    counted = []
    reporter = Reporter(progress=counted.append, cancelled=lambda: len(counted) >= 1)
    with pytest.raises(Cancelled, match="evaluation cancelled"):
        evaluate_library(str(built), EvaluateOptions(routers=("base", "uniform"), limit=1), reporter)
    assert [c.what for c in counted] == [f"base on {Library.open(built).extra['held_out']['tasks'][0]}"]
    assert "evaluation" not in Library.open(built).extra
