"""Routing keys: PhatGoose gates and mean hidden states, computed for a tiny built library."""

import json

import pytest
import torch
from conftest import TRAIN, library_snapshot, run
from transformers import AutoModelForCausalLM

from lorlib_ui.core.errors import LorlibError
from lorlib_ui.core.library import Library
from lorlib_ui.core.prompting import template_span
from lorlib_ui.core.routed_model import RoutedModel
from lorlib_ui.training.config import TrainConfig
from lorlib_ui.training.data import load_tasks
from lorlib_ui.training.keys import (
    ActivationsOptions,
    GatesOptions,
    _examples,
    _GateTraining,
    compute_keys,
    mean_activations,
    train_gates,
)
from lorlib_ui.training.reporter import Reporter
from lorlib_ui.training.training import Cancelled, answer_loss, encode_examples


def _mean_loss(rm, router, encoded):
    """Mean answer loss over the examples one at a time (no padding)."""
    total = 0.0
    with torch.no_grad(), rm.routing(router):
        for ids, n_prompt in encoded:
            answer = torch.zeros(1, len(ids), dtype=torch.bool)
            answer[0, n_prompt:] = True
            ids = torch.tensor([ids])
            total += answer_loss(rm.model, ids, torch.ones_like(ids), answer)[0].item()
    return total / len(encoded)


def test_gate_training_lowers_the_loss_and_changes_no_weight(tiny_library, tmp_path):
    # the random experts of the tiny library change the model a lot, so their gates matter
    rows = [{"task": "task0", "family": "f", "input": f"say {w}", "output": w} for w in ("fox", "dog", "cat") * 4]
    data = tmp_path / "task0.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    library = Library.open(tiny_library.path)
    rm = RoutedModel.load(library, device="cpu", dtype="float32")
    before = {k: v.clone() for k, v in rm.model.state_dict().items()}
    files = library_snapshot(library.path)
    expert = library.experts[0]
    pairs = _examples(load_tasks(str(data)), ["task0"], None, 0)
    config = TrainConfig(steps=30, batch_size=4, learning_rate=0.01)
    gates, info = train_gates(rm, expert.name, pairs, config)

    index = rm.experts.index(expert.name)
    encoded = encode_examples(rm.tokenizer, pairs, config.max_length)
    zero = {m: torch.zeros_like(v) for m, v in gates.items()}  # σ(0) = 0.5: where training starts
    start = _mean_loss(rm, _GateTraining(index=index, gates=zero), encoded)
    trained = _mean_loss(rm, _GateTraining(index=index, gates=gates), encoded)
    assert trained < start - 0.01
    assert info["first_loss"] > info["final_loss"]
    assert set(gates) == set(library.load_adapter(expert.name).factors)  # one gate per adapted layer
    after = rm.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # base and stacked experts untouched
    assert library_snapshot(library.path) == files  # training itself writes nothing


def test_mean_activations_equal_a_direct_computation(built, tasks_file):
    library = Library.open(built)
    rm = RoutedModel.load(library, device="cpu", dtype="float32")
    expert = library.experts[1]
    pairs = _examples(load_tasks(str(tasks_file)), expert.tasks, 5, 0)
    keys, info = mean_activations(rm, pairs, batch_size=2)  # batches of two: padding must not count

    base = AutoModelForCausalLM.from_pretrained(library.base_model)
    skip, _ = template_span(rm.tokenizer, True)
    sums, seen = {m: 0 for m in keys}, {}
    for name in keys:
        base.get_submodule(name).register_forward_pre_hook(lambda mod, x, name=name: seen.__setitem__(name, x[0]))
    count = 0
    with torch.no_grad():
        for ids, _ in encode_examples(rm.tokenizer, pairs, 256):
            base(input_ids=torch.tensor([ids]))
            for name in keys:
                sums[name] = sums[name] + seen[name][0, skip:].double().sum(0)
            count += len(ids) - skip
    assert info["tokens"] == count and info["examples"] == 5
    for name, total in sums.items():
        expected = total / total.norm()
        assert torch.allclose(keys[name], expected.float(), atol=1e-5)


def test_gates_and_activations_commands_then_route(built, tasks_file, capsys):
    code, out, err = run(
        capsys, "route", built, "--prompt", "repeat fox", "--router", "phatgoose", "--max-new-tokens", 2
    )
    assert code == 1 and err.count("\n") == 1 and "lorlib gates" in err
    code, out, err = run(capsys, "gates", built, "--data", tasks_file, "--gate-steps", 2, "--experts", "private")
    assert code == 0, err
    assert "gates computed for 4 experts" in out
    library = Library.open(built)
    assert sorted(library.derived.expert_info("gates")) == sorted(library.groups()["private"])
    assert library.derived.expert_info("gates")[library.groups()["private"][0]]["steps"] == 2
    code, out, err = run(capsys, "route", built, "--prompt", "repeat fox", "--router", "phatgoose@private", "--json")
    assert code == 0, err
    # the rest: only the shared expert lacks them now; a rerun skips the others
    code, out, err = run(capsys, "gates", built, "--data", tasks_file, "--gate-steps", 2)
    assert code == 0 and "computed for 1 experts, 4 already had them" in out
    code, out, err = run(capsys, "activations", built, "--data", tasks_file, "--examples", 3)
    assert code == 0, err
    code, out, err = run(capsys, "route", built, "--prompt", "repeat fox", "--router", "avg_act", "--json")
    assert code == 0, err


@pytest.mark.parametrize(
    "argv,message",
    [
        (["gates", "--experts", "nobody"], "unknown expert 'nobody'"),
        (["gates", "--gate-steps", "0"], "steps must be a positive whole number"),
        (["activations", "--examples", "-1"], "examples must be a positive whole number"),
        (["activations", "--data", "nowhere.jsonl"], "nowhere.jsonl"),
    ],
)
def test_bad_key_options_are_one_line_and_change_nothing(built, tasks_file, capsys, argv, message):
    before = library_snapshot(built)
    data = [] if "--data" in argv else ["--data", tasks_file]
    code, out, err = run(capsys, argv[0], built, *data, *argv[1:])
    assert code == 1 and err.count("\n") == 1 and message in err and "Traceback" not in err
    assert library_snapshot(built) == before


def test_build_with_gates_trains_them_for_its_experts(tmp_path, tiny_base, tasks_file, capsys):
    path = tmp_path / "lib"
    argv = ["build", path, "--data", tasks_file, "--tasks", "copy0,pick0", "--base-model", tiny_base, *TRAIN]
    code, out, err = run(capsys, *argv, "--gates")
    assert code == 0, err
    library = Library.open(path)
    assert library.derived.lacking("gates") == [] and len(library.experts) == 3  # two private, the shared
    info = library.derived.expert_info("gates")["copy0"]
    assert info["steps"] == 100 and "tasks.jsonl" in info["data"]


def test_keys_options_check_themselves_and_the_reporter_cancels(built, tasks_file):
    with pytest.raises(LorlibError, match="steps must be a positive whole number, got 0"):
        GatesOptions(steps=0)
    with pytest.raises(LorlibError, match="examples must be a positive whole number, got -1"):
        ActivationsOptions(examples=-1)
    before = library_snapshot(built)
    events = []
    reporter = Reporter(progress=events.append, cancelled=lambda: len(events) >= 2)
    with pytest.raises(Cancelled):
        compute_keys(str(built), GatesOptions(data=str(tasks_file), steps=50), reporter)
    assert [e.step for e in events] == [1, 2] and events[0].steps == 50  # stopped at its next step
    assert library_snapshot(built) == before  # the expert in training keeps no gates
