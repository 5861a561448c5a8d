import numpy as np
import pytest
import torch

from lorlib_ui.core.errors import LorlibError
from lorlib_ui.core.generation import encode_prompt, generate, score
from lorlib_ui.core.routers import make_router


def test_generation_records_every_token(tiny_routed):
    router = make_router("arrow", tiny_routed.experts, top_k=2)
    streamed = []
    result = generate(tiny_routed, "the quick brown", router, max_new_tokens=6, on_token=streamed.append)
    record = result.record
    n_tokens = len(result.prompt_tokens) + len(result.new_tokens)
    assert record.weights.shape == (len(tiny_routed.modules), n_tokens, 6)
    assert record.tokens == result.prompt_tokens + result.new_tokens
    assert np.allclose(record.weights.sum(-1), 1.0, atol=1e-5)
    assert ((record.weights > 0).sum(-1) == 2).all()
    assert np.isfinite(record.logits).all()
    assert streamed[-1] == result.text and len(streamed) == len(result.new_tokens)
    # the record's top expert is the argmax of the recorded weights
    top = record.top_expert()
    assert top.shape == (n_tokens, len(tiny_routed.modules))
    assert (top == record.weights.argmax(-1).T).all()


def test_greedy_decode_matches_transformers_generate(tiny_routed):
    router = make_router("arrow", tiny_routed.experts, top_k=3)
    ours = generate(tiny_routed, "the lazy dog", router, max_new_tokens=8, record=False)
    ids = torch.tensor([encode_prompt(tiny_routed.tokenizer, "the lazy dog")])
    with tiny_routed.routing(router):
        out = tiny_routed.model.generate(ids, max_new_tokens=8, do_sample=False)
    expected = tiny_routed.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert ours.text == expected


def test_record_is_same_with_and_without_cache(tiny_routed):
    """Routing recorded during KV-cached decoding equals one full pass over the same tokens."""
    router = make_router("arrow", tiny_routed.experts, top_k=2)
    result = generate(tiny_routed, "routing tokens", router, max_new_tokens=5)
    with torch.no_grad(), tiny_routed.routing(router, record=True) as builder:
        tiny_routed.model(input_ids=torch.tensor([result.prompt_ids + result.new_ids]))
    again = builder.finish("arrow", tiny_routed.experts, result.record.tokens)
    assert np.allclose(again.logits, result.record.logits, rtol=1e-4, atol=1e-5)
    # weights agree except where float rounding flips a near-tie in the top-k
    same = np.isclose(again.weights, result.record.weights, atol=1e-5).all(axis=-1)
    assert same.mean() > 0.98


def test_score_logprobs(tiny_routed):
    router = make_router("uniform", tiny_routed.experts)
    result = score(tiny_routed, "the quick brown fox", router, record=True)
    ids = tiny_routed.tokenizer("the quick brown fox")["input_ids"]
    assert len(result.tokens) == len(ids) and result.logprobs[0] is None
    with torch.no_grad(), tiny_routed.routing(router):
        logits = tiny_routed.model(input_ids=torch.tensor([ids])).logits[0]
    expected = torch.log_softmax(logits, -1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    assert np.allclose(result.logprobs[1:], expected.numpy(), atol=1e-5)
    assert all(lp < 0 for lp in result.logprobs[1:])
    assert np.allclose(result.record.weights, 1 / 6)


def test_base_router_record_has_no_weight(tiny_routed):
    result = generate(tiny_routed, "the", make_router("base", tiny_routed.experts), max_new_tokens=2)
    assert (result.record.weights == 0).all() and (result.record.top_expert() == -1).all()
    assert all(v is None for row in result.record.to_dict()["top_expert"] for v in row)


def test_long_prompt_is_truncated_with_notice(tiny_routed):
    result = generate(tiny_routed, "the quick brown fox " * 200, make_router("base", []), max_new_tokens=4)
    assert result.truncated
    assert len(result.prompt_tokens) == 256 - 4


@pytest.mark.parametrize("prompt", ["", "   \n"])
def test_empty_prompt_is_refused(tiny_routed, prompt):
    with pytest.raises(LorlibError, match="prompt is empty"):
        generate(tiny_routed, prompt, make_router("base", []))


@pytest.mark.parametrize("prompt", ["\x00\x01\xff\ufffd bytes", b"a\xff\xfe\x00b".decode("utf-8", "surrogateescape")])
def test_binary_prompt_does_not_crash(tiny_routed, prompt):
    """Bytes that are not UTF-8 reach Python as lone surrogates (command-line arguments)."""
    result = generate(tiny_routed, prompt, make_router("arrow", tiny_routed.experts), max_new_tokens=2)
    assert len(result.new_tokens) >= 1
