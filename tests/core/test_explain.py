"""Explaining an answer: the gains add up to the answer's log-likelihood difference, and a planted
expert that alone carries the gain is the one the explanation names."""

import numpy as np
import pytest
from conftest import build_library, make_adapter

from lorlib_ui.core.errors import LorlibError
from lorlib_ui.core.explain import explain, explain_ids, format_explanation
from lorlib_ui.core.generation import generate, score_continuations
from lorlib_ui.core.prompting import answer_ids, encode_prompt
from lorlib_ui.core.routed_model import RoutedModel
from lorlib_ui.core.routers import make_router


@pytest.fixture
def planted(tmp_path, tiny_base):
    """Five experts that change nothing to speak of, and one (`planted`) that changes a lot."""
    folders = [make_adapter(tmp_path / f"quiet{i}", tiny_base, seed=i, magnitude=1e-4) for i in range(5)]
    folders.append(make_adapter(tmp_path / "planted", tiny_base, seed=42, magnitude=0.5))
    names = [f"quiet{i}" for i in range(5)] + ["planted"]
    library = build_library(tmp_path / "lib", tiny_base, folders, names=names)
    return RoutedModel.load(library, device="cpu", dtype="float32")


def test_the_gains_add_up_to_the_answers_log_likelihood_difference(tiny_routed):
    rm, prompt = tiny_routed, "the quick brown"
    router = make_router("arrow", rm.experts, top_k=2)
    answer = generate(rm, prompt, router, max_new_tokens=4).text
    shown = explain(rm, prompt, answer, router, compare=make_router("expert:task0", rm.experts))
    pair = [(encode_prompt(rm.tokenizer, prompt), answer_ids(rm.tokenizer)(answer))]
    routed, base, other = (
        score_continuations(rm, r, pair)[0]
        for r in (router, make_router("base", rm.experts), make_router("expert:task0", rm.experts))
    )
    assert np.allclose(shown.logprobs, routed, atol=1e-4) and np.allclose(shown.base, base, atol=1e-4)
    assert shown.gain.sum() == pytest.approx(sum(routed) - sum(base), abs=1e-4)
    assert np.allclose(shown.compared, other, atol=1e-4)
    assert shown.weights.shape == (len(rm.modules), len(shown.tokens), len(rm.experts))
    assert np.allclose(shown.weights.sum(axis=2), 1.0, atol=1e-5)  # top-2 weights at every layer and token
    assert np.all((shown.weights > 0).sum(axis=2) <= 2)
    assert all(len(row) <= 3 for row in shown.top_experts())


@pytest.mark.parametrize("spec", ["mean_delta", "arrow"])
def test_a_planted_expert_that_alone_carries_the_gain_is_named(planted, spec):
    """The router's own answer, by its own token ids: without the planted expert only the quiet
    ones are left, so the answer falls back to the base model and loses its whole gain; taking a
    quiet one out only shifts the others' shares."""
    rm = planted
    router = make_router(spec, rm.experts, top_k=6)
    own = generate(rm, "the lazy dog", router, max_new_tokens=6)
    shown = explain_ids(rm, own.prompt_ids, own.answer_ids[:5], router)
    (first, carried), *rest = shown.credit()
    assert first == "planted" and shown.gain.sum() > 1.0
    assert carried == pytest.approx(shown.gain.sum(), rel=0.05)
    assert all(abs(other) < 0.5 * carried for _, other in rest)
    assert "without planted: the answer loses" in format_explanation(shown)


def test_taking_an_expert_out_renormalises_the_others(tiny_routed):
    from lorlib_ui.core.routers.ablation import without

    rm = tiny_routed
    router = without(make_router("arrow", rm.experts, top_k=3), 2, len(rm.experts))
    record = generate(rm, "the quick brown", router, max_new_tokens=2).record
    assert np.all(record.weights[:, :, 2] == 0)
    assert np.allclose(record.weights.sum(axis=2), 1.0, atol=1e-5)
    merge = without(make_router("uniform", rm.experts), 2, len(rm.experts))
    assert merge.subset == (0, 1, 3, 4, 5)


def test_bad_answers_are_refused_in_one_line(tiny_routed):
    router = make_router("arrow", tiny_routed.experts)
    with pytest.raises(LorlibError, match="answer is empty"):
        explain(tiny_routed, "the quick", "  ", router)
    with pytest.raises(LorlibError, match="longer than the model's context"):
        explain(tiny_routed, "the quick", "fox " * 5000, router)
