"""Shared fixtures: a tiny random Llama built from a config (no hub) and random PEFT adapters."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# huggingface_hub reads its cache folder once, at import: the tests' own, empty, never the user's
os.environ["HF_HUB_CACHE"] = tempfile.mkdtemp(prefix="lorlib-test-hub-")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
_CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "routing tokens to experts with arrow prototypes",
    "a library of lora adapters over one causal language model",
    "0123456789 + - * / = ? ! , . : ; ( ) [ ]",
]


def _tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def build_tiny_llama(folder: Path, seed: int = 0, hidden: int = 64) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def make_adapter(
    folder: Path,
    base_path: Path,
    seed: int,
    rank: int = 4,
    targets: list[str] | None = None,
    dominant: float = 8.0,
    magnitude: float = 0.25,
    alpha: float | None = None,
) -> Path:
    """A random LoRA saved by PEFT itself. Rows of A and columns of B have norm about 1; `dominant`
    adds a rank-1 component of that norm to each, so the top singular value of ΔW = B·A stands
    well clear of the others (PEFT's 15-step power iteration then converges to the true vector).
    `magnitude` scales B, and so the update, without changing any singular vector."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_path)
    config = LoraConfig(r=rank, lora_alpha=alpha or 2 * rank, target_modules=targets or TARGETS, lora_dropout=0.0)
    peft_model = get_peft_model(base, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in peft_model.modules():
            if hasattr(module, "lora_A") and "default" in module.lora_A:
                a = module.lora_A["default"].weight
                b = module.lora_B["default"].weight
                d_in, d_out = a.shape[1], b.shape[0]
                a.copy_(torch.randn(a.shape, generator=gen) / d_in**0.5)
                b.copy_(torch.randn(b.shape, generator=gen) / d_out**0.5)
                a[0] += dominant * torch.randn(d_in, generator=gen) / d_in**0.5
                b[:, 0] += dominant * torch.randn(d_out, generator=gen) / d_out**0.5
                b.mul_(magnitude)
    peft_model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_adapters(tmp_path_factory, tiny_base) -> list[Path]:
    root = tmp_path_factory.mktemp("adapters")
    return [make_adapter(root / f"task{i}", tiny_base, seed=i) for i in range(6)]


def build_library(path: Path, base_path: Path, adapter_dirs: list[Path], names: list[str] | None = None):
    from lorlib_ui.core.adapters import read_adapter
    from lorlib_ui.core.base_model import base_model_info
    from lorlib_ui.core.library import Library, expert_from_adapter

    info = base_model_info(str(base_path))
    library = Library.create(path, info)
    names = names or [d.name for d in adapter_dirs]
    entries = []
    for name, folder in zip(names, adapter_dirs):
        adapter = read_adapter(folder)
        entries.append((expert_from_adapter(name, adapter, info.name), adapter))
    library.add_experts(entries)
    return library


def mixed_library(path: Path, base_path: Path, n: int, partial: tuple[str, ...], storage=torch.float32):
    """n random experts in `storage`, for the paths that pad and mask: most rank 4 on q, k, v, o;
    every 7th rank 2; every 5th only on the `partial` modules (absent from the others)."""
    from lorlib_ui.core.adapters import LoraAdapter
    from lorlib_ui.core.base_model import base_model_info
    from lorlib_ui.core.library import Library, expert_from_adapter

    info = base_model_info(str(base_path))
    library = Library.create(path, info)
    gen = torch.Generator().manual_seed(0)
    entries = []
    for i in range(n):
        rank = 2 if i % 7 == 0 else 4
        targets = partial if i % 5 == 0 else tuple(TARGETS)
        factors = {
            m: (
                (torch.randn(rank, d_in, generator=gen) / d_in**0.5).to(storage),
                (torch.randn(d_out, rank, generator=gen) / d_out**0.5).to(storage),
            )
            for m, (d_out, d_in) in info.linear_shapes.items()
            if m.rsplit(".", 1)[-1] in targets
        }
        config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(targets)}
        adapter = LoraAdapter(config=config, factors=factors, scales=dict.fromkeys(factors, 2.0))
        entries.append((expert_from_adapter(f"e{i:03d}", adapter, info.name), adapter))
    library.add_experts(entries)
    return library


def with_every_key(library, general: str = "task5"):
    """The library with random gates and mean activations stored for every expert and one expert
    marked general: every router of the registry can run on it."""
    import torch

    gen = torch.Generator().manual_seed(0)
    for kind in ("gates", "activations"):
        for e in library.experts:
            factors = library.load_adapter(e.name).factors
            keys = {m: torch.randn(a.shape[1], generator=gen) for m, (a, _) in factors.items()}
            library.derived.write_expert(kind, e.name, keys, {}, e.weights_hash)
    library.mark_general([general])
    return library


# Every router that runs on a typed prompt (the oracle and LoraHub choose per evaluated task).
PROMPT_ROUTERS = ["base", "uniform", "mean_delta", "ties", "arrow", "arrow_gks", "spectral", "phatgoose", "avg_act"]


@pytest.fixture
def hub() -> Path:
    """huggingface_hub's cache folder, offline, emptied after the test (`hub_cache.publish` lays
    repos out in it), and the snapshots of hub libraries lorlib copied meanwhile removed."""
    from lorlib_ui.core import hub as hub_module
    from lorlib_ui.core.cache import cache_dir

    cache = Path(os.environ["HF_HUB_CACHE"])
    snapshots = cache_dir() / "hub"  # lorlib's read-only copies of hub libraries
    before = set(snapshots.iterdir()) if snapshots.is_dir() else set()
    hub_module._resolved.clear()
    yield cache
    hub_module._resolved.clear()
    for child in cache.iterdir():
        shutil.rmtree(child) if child.is_dir() else child.unlink()
    for child in (set(snapshots.iterdir()) if snapshots.is_dir() else set()) - before:
        shutil.rmtree(child, ignore_errors=True)


@pytest.fixture
def tiny_library(tmp_path, tiny_base, tiny_adapters):
    return build_library(tmp_path / "lib", tiny_base, tiny_adapters)


@pytest.fixture
def tiny_routed(tiny_library):
    from lorlib_ui.core.routed_model import RoutedModel

    return RoutedModel.load(tiny_library, device="cpu")


ROUTING_TEXT = "the quick brown fox jumps over the lazy dog"


def routing_ids(rm, text: str = ROUTING_TEXT):
    """`text` as a batch of one row of token ids for the routed model."""
    import torch

    return torch.tensor([rm.tokenizer(text)["input_ids"]])


def routed_logits(rm, router, text: str = ROUTING_TEXT):
    """The routed model's logits for `text` under `router` (no gradients)."""
    import torch

    with torch.no_grad(), rm.routing(router):
        return rm.model(input_ids=routing_ids(rm, text)).logits


def relative_error(x, y) -> float:
    return ((x - y).norm() / y.norm()).item()


def library_snapshot(path: Path) -> dict[str, bytes]:
    """Every file under a library, byte for byte: refused writes must leave this unchanged."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# ---- multi-task data and a library built from it (build, cluster, evaluate) -----------------

WORDS = ["fox", "dog", "lazy", "quick", "brown", "model", "tokens", "experts", "arrow", "library"]
TRAIN = ["--steps", "3", "--shared-steps", "2", "--batch-size", "2", "--rank", "2", "--targets", "q_proj,v_proj"]


def _tasks_file(path):
    """Two families of three tasks, twelve rows each; the 'pick' family is multiple choice."""
    rows = []
    for t in range(3):
        for i in range(12):
            word = WORDS[(i + t) % len(WORDS)]
            rows.append({"task": f"copy{t}", "family": "copy", "input": f"repeat {word}", "output": word})
            options = [WORDS[(i + t + j) % len(WORDS)] for j in range(3)]
            rows.append(
                {"task": f"pick{t}", "family": "pick", "input": f"choose {word}", "output": word, "options": options}
            )
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def run(capsys, *argv):
    """Run the command line in-process: (exit code, stdout, stderr)."""
    from lorlib_ui.cli.main import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def tasks_file(tmp_path):
    return _tasks_file(tmp_path / "tasks.jsonl")


@pytest.fixture
def built(tmp_path, tiny_base, tasks_file, capsys):
    path = tmp_path / "lib"
    code, out, err = run(
        capsys, "build", path, "--data", tasks_file, "--holdout-per-family", "1", "--base-model", tiny_base, *TRAIN
    )
    assert code == 0, err
    return path


# ---- the explorer app on the tiny library (API and browser tests) ---------------------------------


def explorer_module():
    """app.py (the explorer's entry point), imported as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("explorer_app", Path(__file__).resolve().parent.parent / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def explorer_url(tiny_library):
    """The explorer over an in-process worker on the tiny library, served on a free local port."""
    from browser import served

    with served(tiny_library.path, {"copy": ["copy0"]}) as url:
        yield url


@pytest.fixture
def no_model_loads(monkeypatch):
    """Fails the test if a model loads: what the plan of a long command must not do."""
    from transformers import AutoModelForCausalLM

    from lorlib_ui.core.routed_model import RoutedModel

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(RoutedModel, "load", refuse)
