"""Routing over a dataset, on a library whose prototypes are built from each task's hidden states."""

import json

import numpy as np
import pytest
import torch
from conftest import make_adapter, run

from lorlib_ui.analysis.routing_stats import agree_with_transfer, route_dataset
from lorlib_ui.core.adapters import read_adapter
from lorlib_ui.core.library import Library, expert_from_adapter
from lorlib_ui.core.prompting import template_span
from lorlib_ui.core.prototypes import expert_prototypes

# Four tasks, two per family; every prompt of a task is one character, a single token, so each
# task's tokens have exactly one hidden state per layer.
TASKS = {"t0": ("a", "q"), "t1": ("a", "x"), "t2": ("b", "7"), "t3": ("b", "%")}
MODULES = ["q_proj", "v_proj"]


def _hidden_states(base_path, text: str) -> dict[str, torch.Tensor]:
    """The input of every q_proj and v_proj of the base model for a one-token prompt."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base_path)
    tok = AutoTokenizer.from_pretrained(base_path)
    ids = tok(text)["input_ids"]
    assert len(ids) == 1
    seen, hooks = {}, []
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in MODULES:
            hooks.append(module.register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, i[0][0, 0])))
    with torch.no_grad():
        model(input_ids=torch.tensor([ids]))
    for hook in hooks:
        hook.remove()
    return seen


@pytest.fixture(scope="module")
def matched(tmp_path_factory, tiny_base):
    """Each task's expert has ΔW = b·vᵀ with v its task's hidden state at that layer: Arrow's
    prototype is then v itself, and |h·v| is largest for the task's own expert (Cauchy-Schwarz).
    b is tiny, so that the experts chosen at the first layer barely change what later layers see."""
    from lorlib_ui.core.base_model import base_model_info

    root = tmp_path_factory.mktemp("matched")
    rows = [
        {"task": t, "family": f, "input": char, "output": "ok", "split": split}
        for t, (f, char) in TASKS.items()
        for split in ("train", "test", "test")
    ]
    data = root / "tasks.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    info = base_model_info(str(tiny_base))
    library = Library.create(root / "lib", info)
    template = read_adapter(make_adapter(root / "template", tiny_base, seed=0, rank=2, targets=MODULES))
    gen = torch.Generator().manual_seed(0)
    entries, states = [], {}
    for t, (family, char) in TASKS.items():
        states[t] = _hidden_states(tiny_base, char)
        factors = {}
        for module, (a, b) in template.factors.items():
            v = states[t][module]
            a, b = torch.zeros_like(a), torch.zeros_like(b)
            a[0] = v / v.norm()
            b[:, 0] = 1e-6 * torch.randn(b.shape[0], generator=gen)  # tiny: later layers see the base's states
            factors[module] = (a, b)
        adapter = type(template)(template.config, factors, template.scales)
        entries.append((expert_from_adapter(t, adapter, info.name, kind="private", tasks=[t], family=family), adapter))
    library.add_experts(entries)
    return root / "lib", data, states


def _routed(path):
    from lorlib_ui.core.routed_model import RoutedModel

    return RoutedModel.load(Library.open(path), device="cpu")


def test_routing_accuracy_is_one_when_prototypes_match_the_tasks(matched):
    from lorlib_ui.core.routers import make_router
    from lorlib_ui.training.data import load_tasks

    path, data, _ = matched
    rm = _routed(path)
    router = make_router("arrow", rm.experts, top_k=1)
    result = route_dataset(rm, router, load_tasks(str(data)), list(TASKS), limit=None)["all"]
    assert result.token_counts == [2, 2, 2, 2]
    assert np.allclose(result.own_accuracy, 1.0) and np.allclose(result.family_accuracy, 1.0)
    assert np.allclose(result.own_chance, 1 / 4) and np.allclose(result.family_chance, 2 / 4)
    assert np.allclose(result.mass, np.eye(4))  # top-1: all weight on the task's own expert
    assert np.allclose(result.entropy, 0.0) and np.allclose(result.uniform_entropy, np.log(4))
    summary = result.summary()
    assert summary["own_accuracy"] == pytest.approx(1.0) and summary["own_tasks"] == 4
    assert summary["own_accuracy_ci"] == pytest.approx((1.0, 1.0))  # every prompt hits: no spread
    assert summary["family_accuracy_ci"] == pytest.approx((1.0, 1.0))
    assert summary["own_accuracy_task_ci"] == pytest.approx((1.0, 1.0))  # nor over tasks
    assert summary["own_above_chance"] == {"up": 4, "tied": 0, "down": 0}
    assert [row["most_routed"] for row in result.per_task()] == list(TASKS)


def test_routing_matrix_and_entropy_equal_a_hand_computation(matched):
    """With every expert chosen (top-k = E), a token's weights are softmax(|h·v_e| / T) at each layer."""
    from lorlib_ui.core.routers import make_router
    from lorlib_ui.training.data import load_tasks

    path, data, states = matched
    rm = _routed(path)
    router = make_router("arrow", rm.experts, top_k=4, temperature=2.0)
    result = route_dataset(rm, router, load_tasks(str(data)), list(TASKS), limit=None)["all"]
    protos = expert_prototypes(Library.open(path))
    for i, task in enumerate(TASKS):
        per_layer = []
        for module in result.modules:
            h = states[task][module]
            logits = torch.stack([(h @ protos[e][module]).abs() for e in rm.experts])
            per_layer.append(torch.softmax(logits / 2.0, dim=0).numpy())
        per_layer = np.array(per_layer)  # (modules, experts)
        assert np.allclose(result.mass_by_layer[i], per_layer, atol=1e-5)
        entropy = -(per_layer * np.log(per_layer)).sum(axis=1)
        assert np.allclose(result.entropy[i], entropy, atol=1e-5)
    assert (result.entropy > 0).all() and (result.entropy < np.log(4)).all()


def test_agreement_with_transfer_ranks_routing_mass_against_gain(matched, tmp_path):
    """Spearman is +1 when the gains rank experts as the routing mass does, −1 when reversed."""
    import shutil

    from lorlib_ui.analysis.transfer import BASE, _store, column_keys
    from lorlib_ui.core.routers import make_router
    from lorlib_ui.training.data import load_tasks

    path, data, _ = matched
    shutil.copytree(path, tmp_path / "lib")
    library = Library.open(tmp_path / "lib")
    rm = _routed(tmp_path / "lib")
    result = route_dataset(rm, make_router("arrow", rm.experts, top_k=4), load_tasks(str(data)), list(TASKS), None)[
        "all"
    ]
    keys = column_keys(library)
    for sign, expected in ((1, 1.0), (-1, -1.0)):
        for j, expert in enumerate(result.experts):
            cells = {}
            for i, task in enumerate(result.tasks):
                gain = sign * float(result.mass[i, j])
                cells[task] = {"key": keys[expert], "loglik": [-3.0 + gain], "exact_match": None, "family": None}
            _store(library, expert, cells)
        base = {t: {"key": keys[BASE], "loglik": [-3.0], "exact_match": None, "family": None} for t in result.tasks}
        _store(library, BASE, base)
        agree_with_transfer(result, Library.open(tmp_path / "lib"), top=2)
        rows = result.transfer["tasks"]
        assert len(rows) == 4 and all(row["spearman"] == pytest.approx(expected) for row in rows)
        for i, row in enumerate(rows):
            top = np.sort(sign * result.mass[i])[::-1]
            assert row["best_gain"] == pytest.approx(top[0], abs=1e-4)
            most = sign * result.mass[i].max()
            assert row["most_routed_gain"] == pytest.approx(most, abs=1e-4)
    assert result.summary()["spearman"] == pytest.approx(-1.0)


def test_template_tokens_are_found_and_left_out_of_content(tiny_base):
    from transformers import AutoTokenizer

    from lorlib_ui.core.prompting import encode_prompt

    tok = AutoTokenizer.from_pretrained(tiny_base)
    assert template_span(tok, chat=True) == (0, 0)  # no chat template: every token is content
    tok.chat_template = "SYSTEM: be brief. {% for m in messages %}USER: {{ m['content'] }}{% endfor %} ANSWER:"
    prefix, suffix = template_span(tok, chat=True)
    ids = encode_prompt(tok, "fox dog", chat=True)
    assert tok.decode(ids[:prefix]).startswith("SYSTEM: be brief. USER:")
    assert tok.decode(ids[prefix : len(ids) - suffix]).strip() == "fox dog"
    assert tok.decode(ids[len(ids) - suffix :]).strip() == "ANSWER:"


def test_command_line_reports_accuracy_beside_chance(matched, capsys):
    path, data, _ = matched
    code, out, err = run(capsys, "routing-stats", path, "--tasks", ",".join(TASKS), "--data", data, "--top-k", "1")
    assert code == 0, err
    assert "own expert: 100.0% [100.0, 100.0] [100.0, 100.0] (chance 25.0%" in out and "content tokens" in out
    assert "above/at/below chance on 4/0/0 tasks" in out and "[tasks] resamples the tasks too" in out
    code, out, err = run(
        capsys, "routing-stats", path, "--tasks", "t0,t2", "--data", data, "--top-k", "1", "--json", "--limit", "1"
    )
    assert code == 0, err
    printed = json.loads(out)
    assert set(printed) == {"all", "content"} and printed["all"]["tasks"] == ["t0", "t2"]
    assert printed["all"]["summary"]["family_accuracy"] == 1.0 and printed["all"]["per_task"][0]["tokens"] == 1
    assert printed["all"]["summary"]["family_accuracy_ci"] == [1.0, 1.0]
    for argv, message in (
        (["--router", "nope"], "unknown router"),
        (["--tasks", "t9"], "no task 't9'"),
        (["--tasks", "t0", "--top-k", "9"], "top-k must be between"),
    ):
        code, _, err = run(capsys, "routing-stats", path, "--data", data, *argv)
        assert code == 1 and message in err and len(err.strip().splitlines()) == 1, (argv, err)


def test_statistics_of_other_experts_read_as_absent_but_are_kept_stale_with_the_reason(matched, tmp_path, tiny_base):
    """Stored statistics, then an expert added: `load_routing` (what judges) has none; the stale
    read keeps them with what changed, and retraining and removing say so too."""
    import shutil

    from lorlib_ui.analysis.routing_stats import load_routing, routing_seconds, stale_routing, store_routing
    from lorlib_ui.core.routers import make_router
    from lorlib_ui.training.data import load_tasks

    path, data, _ = matched
    shutil.copytree(path, tmp_path / "lib")
    library = Library.open(tmp_path / "lib")
    rm = _routed(tmp_path / "lib")
    results = route_dataset(rm, make_router("arrow", rm.experts, top_k=1), load_tasks(str(data)), list(TASKS), 1)
    store_routing(library, "arrow", results, 1)
    assert "arrow" in load_routing(Library.open(tmp_path / "lib")) and not stale_routing(library)
    extra = read_adapter(make_adapter(tmp_path / "extra", tiny_base, seed=9, rank=2, targets=MODULES))
    library.add_experts([(expert_from_adapter("extra", extra, library.base_model), extra)])
    library.add_experts([(expert_from_adapter("t1", extra, library.base_model), extra)], force=True)
    library.remove_expert("t3")
    library = Library.open(tmp_path / "lib")
    assert load_routing(library) == {}
    entry, changed = stale_routing(library)["arrow"]
    assert entry["all"]["tasks"] == list(TASKS) and entry["limit"] == 1
    assert (changed.added, changed.retrained, changed.removed) == (("extra",), ("t1",), ("t3",))
    assert changed.describe() == "1 expert added, 1 retrained and 1 removed since"
    assert routing_seconds(33, 20) == pytest.approx(330.0)  # 660 prompts at half a second
    # computing another router again keeps this one's stale statistics (until it is recomputed)
    rm = _routed(tmp_path / "lib")
    again = route_dataset(rm, make_router("uniform", rm.experts), load_tasks(str(data)), list(TASKS), 1)
    store_routing(library, "uniform", again, 1)
    library = Library.open(tmp_path / "lib")
    stale = stale_routing(library)  # (the fixture's library may hold other routers' statistics too)
    assert set(load_routing(library)) == {"uniform"} and "arrow" in stale and "uniform" not in stale
