import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorlib_ui.core.adapters import read_adapter, write_adapter
from lorlib_ui.training.config import TrainConfig
from lorlib_ui.training.training import batches, encode_example, train_expert

EXAMPLES = [("the quick brown", "fox"), ("the lazy", "dog"), ("routing tokens to", "experts"), ("one causal", "model")]


def test_answer_mask_covers_only_answer_tokens(tiny_base):
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    encoded = [encode_example(tokenizer, p, a) for p, a in EXAMPLES]
    ids, mask, answer = next(batches(encoded, TrainConfig(batch_size=4), pad_id=0))
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


def test_the_loss_curve_holds_each_steps_loss_rounded(tiny_base):
    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    losses = []
    config = TrainConfig(steps=12, batch_size=2, learning_rate=3e-2, rank=2)
    result = train_expert(model, tokenizer, EXAMPLES, config, progress=lambda step, total, loss: losses.append(loss))
    curve = result.metrics["loss_curve"]
    assert len(curve) == 12 and curve == [round(loss, 4) for loss in losses]
    assert curve[0] == round(result.metrics["first_loss"], 4)
    assert abs(curve[-1] - result.metrics["final_loss"]) < 1e-4  # at 12 steps the last tenth is the last step


def test_every_kind_of_expert_keeps_its_curve_in_the_manifest(built, capsys):
    """Private and shared experts (build) and cluster experts (MBC) carry their curve into the
    manifest, one loss per step of their own."""
    import json

    from conftest import run

    code, _, err = run(capsys, "cluster", built, "--k", "2", "--steps", "5")
    assert code == 0, err
    experts = json.loads((built / "manifest.json").read_text())["experts"]
    steps = {e["name"]: len(e["metrics"]["loss_curve"]) for e in experts}
    kinds = {e["name"]: e["kind"] for e in experts}
    want = {"private": 3, "shared": 2, "cluster": 5}  # conftest.TRAIN: --steps 3 --shared-steps 2
    assert sorted(set(kinds.values())) == ["cluster", "private", "shared"]
    assert steps == {name: want[kind] for name, kind in kinds.items()}
    for e in experts:
        assert all(isinstance(x, float) and x == round(x, 4) for x in e["metrics"]["loss_curve"])
