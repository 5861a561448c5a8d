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
        task_low, task_high = row["loglik_task_ci"]  # over tasks as well: wider, about tasks like these
        assert task_low <= row["loglik"] <= task_high
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
    assert arrow_shared["task_ci"][0] <= arrow_shared["difference"] <= arrow_shared["task_ci"][1]
    assert arrow_shared["signs"] == {
        "up": sum(d > 1e-9 for d in by_hand),
        "tied": sum(abs(d) <= 1e-9 for d in by_hand),
        "down": sum(d < -1e-9 for d in by_hand),
    }
    assert "[rows] [tasks]" in out and "up/tied/down" in out
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


def _record(exact_match: list[float], diff: float, ci: list[float], tasks=("t1", "t2")) -> dict:
    """A hand-made evaluation record: routers base and arrow, the difference arrow − base."""
    summary = [
        {"router": r, "exact_match": em, "loglik": -1.0 - em, "mc_accuracy": None}
        for r, em in zip(("base", "arrow"), exact_match)
    ]
    difference = {"a": "arrow", "b": "base", "loglik": {"difference": diff, "ci": ci}}
    same = {"tasks": list(tasks), "split": "test", "limit": 2, "top_k": None}
    return same | {"summary": summary, "differences": [difference]}


def test_across_libraries_gives_the_spread_over_libraries_and_refuses_different_designs():
    from lorlib_ui.analysis.summaries import across_libraries, format_across

    records = [
        _record([0.25, 0.5], 0.3, [0.1, 0.5]),
        _record([0.5, 0.25], -0.2, [-0.4, -0.1]),
        _record([0.0, 0.75], 0.05, [-0.1, 0.2]),
    ]
    result = across_libraries(records, ["s0", "s1", "s2"])
    arrow = {row["router"]: row for row in result["summary"]}["arrow"]
    values = np.array([0.5, 0.25, 0.75])
    assert arrow["exact_match"]["values"] == values.tolist()
    assert arrow["exact_match"]["mean"] == pytest.approx(values.mean())
    assert arrow["exact_match"]["sd"] == pytest.approx(values.std(ddof=1))
    assert (arrow["exact_match"]["min"], arrow["exact_match"]["max"]) == (0.25, 0.75)
    assert arrow["loglik"]["mean"] == pytest.approx((-1 - values).mean()) and arrow["mc_accuracy"] is None
    (difference,) = result["differences"]
    diffs = np.array([0.3, -0.2, 0.05])
    assert difference["loglik"]["sd"] == pytest.approx(diffs.std(ddof=1))
    assert difference["loglik"]["intervals"] == {"above": 1, "contains": 1, "below": 1}
    assert difference["exact_match"] is None  # no library stored it
    table = format_across(result)
    sd = 100 * values.std(ddof=1)
    assert f"| arrow | exact match (%) | 50.0 ± {sd:.1f} (25.0 – 75.0) | 50.0, 25.0, 75.0 |" in table
    assert "| arrow − base | answer log-likelihood | 0.050 ± " in table and "| 1/1/1 |" in table
    with pytest.raises(LorlibError, match=r"^the evaluations differ in tasks \(s0: \['t1', 't2'\]; s1: \['t1'\]\)$"):
        across_libraries([records[0], _record([0.5, 0.5], 0.0, [0, 0], tasks=("t1",))], ["s0", "s1"])
    with pytest.raises(LorlibError, match="differ in limit"):
        across_libraries([records[0], records[1] | {"limit": 3}], ["s0", "s1"])


def test_evaluate_several_libraries_reports_their_spread_and_stored_reports_it_again(built, tmp_path, capsys, request):
    import shutil

    from lorlib_ui.analysis.summaries import across_libraries

    a, b = shutil.copytree(built, tmp_path / "seed0"), shutil.copytree(built, tmp_path / "seed1")
    code, out, err = run(capsys, "evaluate", a, b, "--limit", "2", "--routers", "base,arrow")
    assert code == 0, err
    assert f"## {a}" in out and f"## {b}" in out and "## across libraries" in out
    assert "| arrow | exact match (%) |" in out
    records = [Library.open(path).extra["evaluation"] for path in (a, b)]
    assert all([r["router"] for r in record["summary"]] == ["base", "arrow"] for record in records)
    assert all("evaluate" in Library.open(path).extra["history"][-1]["command"] for path in (a, b))
    expected = across_libraries(records, [str(a), str(b)])
    request.getfixturevalue("no_model_loads")  # --stored runs nothing
    before = library_snapshot(a)
    code, stored, err = run(capsys, "evaluate", a, b, "--stored")
    assert code == 0, err
    assert stored.split("## across libraries")[1] == out.split("## across libraries")[1]
    code, out, err = run(capsys, "evaluate", a, b, "--stored", "--json")
    printed = json.loads(out)
    assert code == 0 and printed["across"] == expected and printed["libraries"][str(a)] == records[0]
    assert library_snapshot(a) == before
    code, out, err = run(capsys, "evaluate", built, "--stored")
    assert code == 1 and err.count("\n") == 1 and "stores no evaluation" in err and not out
    code, _, err = run(capsys, "evaluate", a, a, "--stored")
    assert code == 1 and "named twice" in err


def test_evaluate_unused_tasks_that_no_expert_trained_on(tmp_path, tiny_base, tasks_file, capsys, request):
    """A library built on the copy family of a file that has a pick family too: `--tasks unused`
    is the pick tasks, which no expert trained on and none holds out; the oracle, with a cluster
    expert of the copy family only, is skipped there with a note, or refused when asked for."""
    from conftest import TRAIN

    from lorlib_ui.analysis.evaluation import select_tasks
    from lorlib_ui.training.data import load_tasks

    path = tmp_path / "copy"
    build = ("build", path, "--data", tasks_file, "--families", "copy", "--holdout-per-family", "1")
    code, _, err = run(capsys, *build, "--base-model", tiny_base, *TRAIN)
    assert code == 0, err
    library = Library.open(path)
    assert {t for e in library.experts for t in e.tasks} | set(library.held_out.tasks) == {"copy0", "copy1", "copy2"}
    code, out, err = run(capsys, "evaluate", path, "--tasks", "unused", "--limit", "1", "--routers", "base,arrow")
    assert code == 0, err
    record = Library.open(path).extra["evaluation"]
    assert record["tasks"] == ["pick0", "pick1", "pick2"] and record["task_set"] == "unused" and record["seen"] == []
    assert sorted((s["router"], s["task"]) for s in record["scores"]) == [
        (r, t) for r in ("arrow", "base") for t in ("pick0", "pick1", "pick2")
    ]
    # the tasks of another file, by family then name; none left is one line
    rows = [json.loads(line) for line in tasks_file.read_text().splitlines()]
    more = [r | {"task": "zz", "family": "aaa"} for r in rows if r["task"] == "copy0"]
    more += [r | {"task": "aa", "family": "zzz"} for r in rows if r["task"] == "copy1"]
    (tmp_path / "more.jsonl").write_text("\n".join(json.dumps(r) for r in rows + more) + "\n")
    (tmp_path / "copy.jsonl").write_text("\n".join(json.dumps(r) for r in rows if r["family"] == "copy") + "\n")
    assert select_tasks(library, "unused", load_tasks(str(tmp_path / "more.jsonl"))) == [
        *("zz", "pick0", "pick1", "pick2", "aa")
    ]
    code, _, err = run(capsys, "evaluate", path, "--tasks", "unused", "--data", tmp_path / "copy.jsonl")
    assert code == 1 and err.count("\n") == 1 and "has an expert or a held-out task for every task" in err
    # the oracle needs a cluster expert of the task's family
    assert run(capsys, "cluster", path, "--k", "1", "--steps", "2")[0] == 0
    request.getfixturevalue("no_model_loads")
    plan = plan_evaluation(str(path), EvaluateOptions(tasks="unused"))
    assert (
        "oracle" not in plan.routers and "skipped oracle: no expert of the library fits these tasks" in plan.notes[-1]
    )
    held = library.held_out.tasks[0]
    plan = plan_evaluation(str(path), EvaluateOptions(tasks=(held, "pick1"), routers=("oracle",)))
    assert plan.routers == ["oracle"] and plan.notes == [
        "oracle skips 1 of the 2 tasks, which no expert fits (families: pick)"
    ]
    with pytest.raises(
        LorlibError, match=r"^router 'oracle': no expert of the library fits these tasks \(families: pick\)$"
    ):
        plan_evaluation(str(path), EvaluateOptions(tasks="unused", routers=("oracle",)))


def test_evaluate_runs_arrow_with_the_mix_and_temperature_asked_for(built, capsys):
    code, _, err = run(capsys, "evaluate", built, "--routers", "arrow", "--limit", "2")
    assert code == 0, err
    default = Library.open(built).extra["evaluation"]
    assert "mix" not in default and "temperature" not in default and default["task_set"] == "held-out"
    flags = ("--mix", "parameters", "--temperature", "0.5")
    code, _, err = run(capsys, "evaluate", built, "--routers", "arrow", "--limit", "2", *flags)
    assert code == 0, err
    ablated = Library.open(built).extra["evaluation"]
    assert ablated["mix"] == "parameters" and ablated["temperature"] == 0.5
    assert {s["expert"] for s in default["scores"]} == {"arrow@private(top_k=4, T=1, mix=outputs)"}
    assert {s["expert"] for s in ablated["scores"]} == {"arrow@private(top_k=4, T=0.5, mix=parameters)"}
    loglik = {s["task"]: s["loglik"] for s in default["scores"]}
    assert loglik.keys() == {s["task"] for s in ablated["scores"]}
    assert any(s["loglik"] != loglik[s["task"]] for s in ablated["scores"]), loglik


def test_evaluate_refuses_a_bad_mix_or_temperature_in_one_line(built, capsys):
    before = library_snapshot(built)
    for flags, message in [
        (("--temperature", "0"), "temperature must be positive and finite, got 0.0"),
        (("--temperature", "nan"), "temperature must be positive and finite, got nan"),
        (("--mix", "nonsense"), "argument --mix: invalid choice: 'nonsense'"),
    ]:
        code, out, err = run(capsys, "evaluate", built, "--routers", "arrow", *flags)
        assert code != 0 and err.count("\n") == 1 and message in err and not out, (flags, err)
    assert library_snapshot(built) == before
    for options, message in [
        ({"mix": "nonsense"}, r"^unknown mix 'nonsense'; use outputs or parameters$"),
        ({"temperature": -1.0}, r"^temperature must be positive and finite, got -1.0$"),
        ({"temperature": float("inf")}, r"^temperature must be positive and finite, got inf$"),
    ]:
        with pytest.raises(LorlibError, match=message):
            EvaluateOptions(**options)
