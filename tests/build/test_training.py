import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorlib_ui.build.config import TrainConfig
from lorlib_ui.build.training import _batches, encode_example, train_expert
from lorlib_ui.core.adapters import read_adapter, write_adapter

EXAMPLES = [("the quick brown", "fox"), ("the lazy", "dog"), ("routing tokens to", "experts"), ("one causal", "model")]


def test_answer_mask_covers_only_answer_tokens(tiny_base):
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    encoded = [encode_example(tokenizer, p, a) for p, a in EXAMPLES]
    ids, mask, answer = next(_batches(encoded, TrainConfig(batch_size=4), pad_id=0))
    assert ids.shape[1] == max(len(e) for e, _ in encoded)  # padded to the batch's longest, no more
    assert int(answer.sum()) == sum(len(e) - n for e, n in encoded)
    assert not (answer & (mask == 0)).any()
    eos = tokenizer.eos_token_id
    assert all(int(ids[r][answer[r]][-1]) == eos for r in range(4))  # each answer ends with EOS


def test_training_lowers_answer_loss_and_leaves_base_unchanged(tiny_base, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    steps = []
    result = train_expert(
        model,
        tokenizer,
        EXAMPLES * 4,
        TrainConfig(steps=40, batch_size=4, learning_rate=3e-2, rank=8),
        progress=lambda step, total, loss: steps.append(step),
    )
    assert steps == list(range(1, 41))
    # a random 64-wide model caps how far the loss can fall; a 10% drop shows the answers were learned
    assert result.metrics["final_loss"] < 0.9 * result.metrics["first_loss"]
    assert set(model.state_dict()) == set(before)  # the LoRA layers are gone again
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    # the trained expert is a normal PEFT adapter, stored in 16 bits
    write_adapter(tmp_path / "expert", result.adapter)
    adapter = read_adapter(tmp_path / "expert")
    assert adapter.rank == 8 and len(adapter.factors) == 8
    assert next(iter(adapter.factors.values()))[0].dtype == torch.bfloat16


def test_same_seed_same_expert(tiny_base):
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    runs = []
    for _ in range(2):
        model = AutoModelForCausalLM.from_pretrained(tiny_base)
        runs.append(train_expert(model, tokenizer, EXAMPLES, TrainConfig(steps=5, batch_size=2, seed=3)).adapter)
    for module, (a, b) in runs[0].factors.items():
        assert torch.equal(a, runs[1].factors[module][0]) and torch.equal(b, runs[1].factors[module][1])
