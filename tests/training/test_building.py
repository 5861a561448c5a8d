"""Building a library from multi-task data: private and shared experts per task, MBC cluster experts."""

import json

import pytest
from conftest import TRAIN, library_snapshot, run
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorlib_ui.core.errors import LorlibError
from lorlib_ui.core.library import Library
from lorlib_ui.training.building import BuildOptions, build_library, expert_name, hold_out, plan_build, private_jobs
from lorlib_ui.training.config import TrainConfig
from lorlib_ui.training.data import load_tasks
from lorlib_ui.training.reporter import Reporter
from lorlib_ui.training.trainers import train_jobs
from lorlib_ui.training.training import Cancelled


def test_expert_names_are_valid_and_distinct():
    assert expert_name("arithmetic.2_digit_addition") == "arithmetic.2_digit_addition"  # valid names are kept
    odd = [expert_name(t) for t in ("glue:cola", "glue/cola", "glue cola", "../x", "é")]
    assert len(set(odd)) == len(odd)
    assert all("/" not in n and ".." not in n and n[0].isalnum() for n in odd)


def test_hold_out_one_task_per_family_deterministically(tasks_file):
    data = load_tasks(tasks_file)
    held = hold_out(data, 1, seed=0)
    assert len(held) == 2 and {data.family_of(t) for t in held} == {"copy", "pick"}
    assert hold_out(data, 1, seed=0) == held
    assert {tuple(hold_out(data, 1, seed=s)) for s in range(10)} != {tuple(held)}  # the seed matters
    with pytest.raises(LorlibError, match="would leave none to train"):
        hold_out(data, 3)


def test_a_holdout_seed_keeps_the_held_out_tasks_across_training_seeds(tasks_file, tmp_path, tiny_base):
    """Builds of several training seeds compared on the same tasks (issue #31): --holdout-seed."""
    data = load_tasks(tasks_file)
    other = next(s for s in range(1, 50) if hold_out(data, 1, seed=s) != hold_out(data, 1, seed=0))
    base = {"data": str(tasks_file), "holdout_per_family": 1, "base_model": str(tiny_base)}
    plan = plan_build(tmp_path / "lib", BuildOptions(**base, holdout_seed=0), TrainConfig(seed=other))
    assert plan.held_out == hold_out(data, 1, seed=0) and plan.config.seed == other
    plan = plan_build(tmp_path / "lib", BuildOptions(**base), TrainConfig(seed=other))
    assert plan.held_out == hold_out(data, 1, seed=other)  # by default the training seed draws them
    with pytest.raises(LorlibError, match="--holdout-seed must be an integer"):
        BuildOptions(**base, holdout_seed="zero")


def test_build_trains_private_and_shared_experts(built, tasks_file):
    library = Library.open(built)
    held = library.extra["held_out"]["tasks"]
    assert len(held) == 2 and library.extra["held_out"]["data"] == str(tasks_file)
    private = [e for e in library.experts if e.kind == "private"]
    assert sorted(t for e in private for t in e.tasks) == sorted(set(load_tasks(tasks_file).tasks) - set(held))
    shared = library.expert("shared")
    assert shared.kind == "shared" and sorted(shared.tasks) == sorted(t for e in private for t in e.tasks)
    e = private[0]
    assert e.family in ("copy", "pick") and e.rank == 2 and e.target_modules == ["q_proj", "v_proj"]
    assert e.training["steps"] == 3 and shared.training["steps"] == 2
    assert e.metrics["steps"] == 3 and e.metrics["examples"] == 10  # 80% of 12 rows
    history = library.extra["history"]
    assert len(history) == 1 and history[0]["command"].startswith("python -m lorlib_ui build ")


def test_build_again_resumes_and_skips(built, tasks_file, tiny_base, capsys):
    before = library_snapshot(built)
    code, out, err = run(capsys, "build", built, "--data", tasks_file, "--holdout-per-family", "1", *TRAIN)
    assert code == 0, err
    assert "trained 0, skipped 5" in out
    after = library_snapshot(built)
    assert {k: v for k, v in after.items() if k != "manifest.json"} == {
        k: v for k, v in before.items() if k != "manifest.json"
    }
    # --force retrains the same experts in place
    code, out, err = run(capsys, "build", built, "--data", tasks_file, "--force", *TRAIN)
    assert code == 0 and "trained 5, skipped 0" in out


def test_interrupted_build_keeps_finished_experts(tmp_path, tiny_base, tasks_file):
    from lorlib_ui.core.base_model import base_model_info

    data = load_tasks(tasks_file)
    library = Library.create(tmp_path / "lib", base_model_info(str(tiny_base)))
    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    config = TrainConfig(steps=3, batch_size=2, rank=2)
    jobs = private_jobs(data, data.tasks[:3])

    def stop_in_second(event):
        if event.index == 2 and event.step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_jobs(library, data, jobs, model, tokenizer, config, reporter=Reporter(progress=stop_in_second))
    assert Library.open(library.path).names == [jobs[0].name]
    report = train_jobs(Library.open(library.path), data, jobs, model, tokenizer, config)
    assert report.skipped == [jobs[0].name] and report.trained == [j.name for j in jobs[1:]]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--tasks", "nope"], "no task 'nope'"),
        (["--families", "nope"], "no family 'nope'"),
        (["--steps", "0"], "steps must be a positive integer"),
        (["--targets", "gate_projj"], "no linear layer named 'gate_projj'"),
        (["--holdout-per-family", "3"], "would leave none to train"),
    ],
)
def test_bad_build_input_changes_nothing(built, tasks_file, capsys, extra, message):
    before = library_snapshot(built)
    code, out, err = run(capsys, "build", built, "--data", tasks_file, *extra)
    assert code == 1 and message in err and len(err.strip().splitlines()) == 1
    assert library_snapshot(built) == before


def test_build_refuses_a_held_out_task(built, tasks_file, capsys):
    held = Library.open(built).extra["held_out"]["tasks"][0]
    before = library_snapshot(built)
    code, _, err = run(capsys, "build", built, "--data", tasks_file, "--tasks", held)
    assert code == 1 and "is held out" in err
    assert library_snapshot(built) == before


def test_bad_data_file_creates_no_library(tmp_path, tiny_base, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"task": "a", "input": "x"}\n')
    code, _, err = run(capsys, "build", tmp_path / "lib", "--data", bad, "--base-model", tiny_base)
    assert code == 1 and "bad.jsonl" in err and "output" in err
    assert not (tmp_path / "lib").exists()


def test_cluster_records_assignment_and_trains_cluster_experts(built, capsys):
    code, out, err = run(capsys, "cluster", built, "--k", "2", "--steps", "2", "--json")
    assert code == 0, err
    summary = json.loads(out)
    library = Library.open(built)
    assert library.clusters == summary and summary["k"] == 2
    members = summary["members"]
    assert len(members) == 2 and sorted(n for m in members.values() for n in m) == sorted(
        e.name for e in library.experts if e.kind == "private"
    )
    for name, group in members.items():
        expert = library.expert(name)
        assert expert.kind == "cluster" and expert.training["steps"] == 2
        assert sorted(expert.tasks) == sorted(t for n in group for t in library.expert(n).tasks)
    assert set(summary["silhouette"]) == {"2", "3"} and summary["ari_vs_families"] is not None
    # the same clustering again: cluster experts are up to date
    before = library_snapshot(built)
    code, _, err = run(capsys, "cluster", built, "--k", "2", "--steps", "2")
    assert code == 0 and "trained 0 cluster experts, 2 up to date" in err
    assert {k: v for k, v in library_snapshot(built).items() if k != "manifest.json"} == {
        k: v for k, v in before.items() if k != "manifest.json"
    }
    # k = 1: one cluster of everything replaces the two
    code, _, err = run(capsys, "cluster", built, "--k", "1", "--steps", "2")
    assert code == 0, err
    clusters = [e for e in Library.open(built).experts if e.kind == "cluster"]
    assert len(clusters) == 1 and len(clusters[0].tasks) == 4


@pytest.mark.parametrize("k", ["0", "5"])
def test_cluster_k_out_of_range_changes_nothing(built, capsys, k):
    before = library_snapshot(built)
    code, _, err = run(capsys, "cluster", built, "--k", k)
    assert code == 1 and "k must be between 1 and the number of clustered experts (4)" in err
    assert library_snapshot(built) == before


def test_cluster_no_train_only_records(built, capsys):
    code, out, err = run(capsys, "cluster", built, "--k", "2", "--no-train")
    assert code == 0, err
    library = Library.open(built)
    assert library.clusters["k"] == 2 and not [e for e in library.experts if e.kind == "cluster"]
    assert "suggested k" in out


def test_a_task_without_training_rows_is_refused_before_training(tmp_path, tiny_base, capsys):
    rows = [{"task": "a", "input": f"x{i}", "output": "y", "split": "train"} for i in range(4)]
    rows += [{"task": "b", "input": "x", "output": "y", "split": "test"}]
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    code, _, err = run(capsys, "build", tmp_path / "lib", "--data", data, "--base-model", tiny_base, *TRAIN)
    assert code == 1 and "task 'b' has no training rows" in err
    assert not (tmp_path / "lib").exists()


SMALL = TrainConfig(steps=3, batch_size=2, rank=2, targets=("q_proj", "v_proj"))


def test_a_build_plan_checks_everything_and_writes_nothing(built, tasks_file, tmp_path, tiny_base, no_model_loads):
    before = library_snapshot(built)
    held = Library.open(built).extra["held_out"]["tasks"]
    plan = plan_build(built, BuildOptions(data=str(tasks_file)), SMALL)
    trained = sorted(set(load_tasks(tasks_file).tasks) - set(held))
    assert [job.name for job in plan.jobs] == [*trained, "shared"] and plan.held_out == sorted(held)
    fresh = plan_build(tmp_path / "new", BuildOptions(data=str(tasks_file), base_model=str(tiny_base)), SMALL)
    assert fresh.library is None and fresh.base is not None and not (tmp_path / "new").exists()
    # the refusals a build used to reach after writing the held-out record, now before anything
    with Library.open(built).edit() as current:  # an expert named as a task's but trained on another
        next(e for e in current.experts if e.name == trained[0]).tasks = [trained[1]]
    before = library_snapshot(built)
    for options, config, message in [
        (BuildOptions(data=str(tasks_file), tasks=(held[0],)), SMALL, "is held out of library"),
        (
            BuildOptions(data=str(tasks_file)),
            TrainConfig(targets=("gate_projj",)),
            "no linear layer named 'gate_projj'",
        ),
        (BuildOptions(data=str(tasks_file)), SMALL, f"already has an expert {trained[0]!r}.*use --force"),
    ]:
        with pytest.raises(LorlibError, match=message):
            plan_build(built, options, config)
    assert library_snapshot(built) == before
    assert plan_build(built, BuildOptions(data=str(tasks_file), force=True), SMALL).force


def test_the_reporters_cancel_stops_a_build_and_keeps_the_finished_experts(tmp_path, tiny_base, tasks_file):
    events, lines = [], []
    reporter = Reporter(progress=events.append, cancelled=lambda: any(e.index == 2 for e in events), log=lines.append)
    options = BuildOptions(data=str(tasks_file), holdout_per_family=1, base_model=str(tiny_base))
    with pytest.raises(Cancelled):
        build_library(tmp_path / "lib", options, SMALL, reporter=reporter)
    library = Library.open(tmp_path / "lib")
    assert library.names == [events[0].expert] and events[-1].index == 2 and events[-1].step == 0
    assert lines == [f"held out for evaluation: {', '.join(library.held_out.tasks)}"]
