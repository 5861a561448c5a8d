"""Arrow at a realistic size on a GPU (issue #32): base, lorlib's Arrow and PEFT's, in one run.

    python benchmarks/bench_gpu.py --device cuda --out OUT/bench_gpu.md        # --budget-s (300) + ~1 min
    python benchmarks/bench_gpu.py --device cpu --tiny --rounds 1              # the dry run (a test)

Models are built from a config with RANDOM weights, directly on the device in bfloat16; nothing
is downloaded and no checkpoint is read. `7b` has Llama-2-7B's shapes (hidden 4096, 32 layers, 32
heads, MLP 11008, vocabulary 32000); `135m` has SmolLM2-135M's, the model the app serves by
default (hidden 576, 30 layers, 9 heads with 3 key-value heads, MLP 1536, vocabulary 49152).
Random rank-r experts on q, k, v and o are made in memory on the device, in bfloat16 as a library
stores trained experts; lorlib holds them in a `RoutedModel`'s layers filled straight from memory
(`random_routed_model`); PEFT gets the same experts as adapter folders in a temporary directory
(its `create_arrow_model` reads paths), loaded without upcasting them to float32, so that it
computes in bfloat16 as lorlib does. Both route with Arrow, top-k 4, T = 1.

Per expert count, the methods take turns within each round on the same base model (their layers
are swapped in and out): prefill tokens/s (one forward of batch x length tokens with full logits,
median of --repeats), greedy decode tokens/s at each batch of --decode-batches (the same loop of
single-token forwards with a KV cache for every method, after a prompt that is not timed; tokens/s
counts every sequence of the batch), and on CUDA the peak of allocated GPU memory as if the method
were alone: base weights + its own experts + the most its timed passes added (synchronised,
`torch.cuda.max_memory_allocated` reset per turn). Tables give medians over rounds and the ratios
to the base model computed within each round, as median [min-max].

The timed cells route by random unit prototypes: on a GPU lorlib's dense path and PEFT's Arrow
compute every expert for every token whatever is chosen, so the choices change no timing, and
exact prototypes of 1,024 random experts would cost a minute of QR. The agreement check uses the
exact ones (lorlib's `top_right_singular_vectors`): on the 135m shape in float32 and then cast to
bfloat16 (as `RoutedModel.load(dtype="bfloat16")` holds it), the share of token-layers whose
Arrow top-k set is the same, read from the routed model's routing record.

--budget-s bounds the wall-clock time: before each step the cost is estimated (memory from the
shapes; time from the cells already measured, or priors) and a step that would not fit is skipped
with a printed note, as is one whose expected memory exceeds the device's. Results are written
after every step, so a run cut short still leaves its table.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import zlib
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lorlib_ui.core.prototypes import top_right_singular_vectors  # noqa: E402
from lorlib_ui.core.routed_model import RoutedModel  # noqa: E402
from lorlib_ui.core.routers import make_router  # noqa: E402

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
METHODS = ("base", "lorlib_arrow", "peft_arrow")
CHUNK = 64  # experts made together; expert e is row e % CHUNK of chunk e // CHUNK, whatever the count
SCALE = 2.0  # every expert's LoRA scale (lora_alpha = 2r)
GIB = 2**30


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool
    weight: float  # its share of the budget, against the other shapes still to run

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def modules(self) -> list[tuple[int, int]]:
        """(d_out, d_in) of every LoRA'd layer: q, k, v, o of each block."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return [(q, self.hidden), (kv, self.hidden), (kv, self.hidden), (self.hidden, q)] * self.layers

    def parameters(self) -> int:
        per_layer = sum(o * i for o, i in self.modules()[:4]) + 3 * self.hidden * self.intermediate + 2 * self.hidden
        return self.layers * per_layer + self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    def config(self):
        from transformers import LlamaConfig

        return LlamaConfig(
            vocab_size=self.vocab,
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            head_dim=self.head_dim,
            max_position_embeddings=4096,
            tie_word_embeddings=self.tied,
        )


SHAPES = {
    "7b": Shape("7b", 4096, 32, 32, 32, 11008, 32000, False, 2.0),  # Llama-2-7B
    "135m": Shape("135m", 576, 30, 9, 3, 1536, 49152, True, 1.0),  # SmolLM2-135M
}
TINY = {  # the same structure (MHA and untied; GQA and tied), a few thousand parameters a layer
    "7b": Shape("7b", 64, 2, 4, 4, 128, 512, False, 2.0),
    "135m": Shape("135m", 48, 2, 3, 1, 96, 512, True, 1.0),
}


@dataclass(frozen=True)
class Sizes:
    batch: int  # prefill: batch x length tokens
    length: int
    prompt: int  # decode: an untimed prompt of this many tokens, then `new` timed steps
    new: int
    decode_batches: tuple[int, ...]
    experts: tuple[int, ...]

    @property
    def tokens(self) -> int:
        return self.batch * self.length


FULL = Sizes(8, 512, 64, 32, (1, 8), (64, 256, 1024))
TINY_SIZES = Sizes(8, 32, 8, 4, (1, 8), (4, 8, 16))


# ---- the plan: memory and time, computed before anything is built -------------------------------


def expected_bytes(shape: Shape, sizes: Sizes, method: str, n: int, rank: int) -> dict[str, int]:
    """What a cell holds in bfloat16 (2 bytes a value): the base weights, the method's own
    experts, and the largest transient of a prefill (the base model's activations plus what the
    method adds at its widest layer)."""
    t, b = sizes.tokens, 2
    weights = shape.parameters() * b
    base_act = t * (shape.vocab + 4 * shape.intermediate + 8 * shape.hidden) * b
    if method == "base":
        return {"weights": weights, "own": 0, "transient": base_act}
    factors = sum(rank * (o + i) * b for o, i in shape.modules())
    keys = sum(i * b for _, i in shape.modules())  # one prototype per module
    widest_out = max(o for o, _ in shape.modules())
    if method == "lorlib_arrow":
        # stacked factors and prototypes (the input groups share them); a prefill adds the
        # projections A_e h of all experts and their coefficients, and the scores in float32
        extra = 2 * t * n * rank * b + 3 * t * n * 4
        # and per module each expert's scale (compute dtype) and whether it adapts it (a bool)
        own = n * (factors + keys + len(shape.modules()) * (b + 1))
        return {"weights": weights, "own": own, "transient": base_act + extra}
    # PEFT: its adapters, its prototypes, and per layer the (tokens, experts, d_out) outputs of
    # every expert (and their scaled copy), with all experts' A and B stacked again
    extra = 3 * t * n * widest_out * b + n * max(rank * (o + i) * b for o, i in shape.modules())
    return {"weights": weights, "own": n * (factors + keys), "transient": base_act + extra}


def gib(value: float) -> str:
    return f"{value / GIB:.1f}"


class Clock:
    """Estimates of what a step costs, from the steps measured so far (or priors)."""

    def __init__(self):
        self.seen: dict[tuple[str, str], tuple[int, float, float]] = {}  # (shape, method) -> n, setup s, round s
        self.base_round: dict[str, float] = {}

    def setup_s(self, shape: Shape, method: str, n: int) -> float:
        seen = self.seen.get((shape.name, method))
        if method == "lorlib_arrow":  # making and copying the factors: linear in n
            return seen[1] * n / seen[0] if seen else 5e-5 * n * len(shape.modules())
        # PEFT: each load_adapter costs more the more are loaded (BENCHMARKS.md: 55 s for 64
        # experts on 120 modules, 843 s for 256), so scale quadratically
        if seen:
            return seen[1] * (n / seen[0]) ** 2
        return len(shape.modules()) * n * (3e-4 + 1.1e-4 * n)

    def round_s(self, shape: Shape, method: str, n: int) -> float:
        base = self.base_round.get(shape.name, 60.0)
        seen = self.seen.get((shape.name, method))
        if seen:
            return base + max(seen[2] - base, 0.0) * n / seen[0]
        return base * (1 + n / (64 if method == "lorlib_arrow" else 16))

    def cell_s(self, shape: Shape, method: str, n: int, rounds: int) -> float:
        return self.setup_s(shape, method, n) + (rounds + 1) * self.round_s(shape, method, n)


def skip_reason(needed_s: float, left_s: float, needed_bytes: int, capacity: int) -> str | None:
    """Why a step must be skipped (it would not fit the time left, or the device), or None."""
    if needed_bytes > capacity:
        return f"needs about {gib(needed_bytes)} GiB, more than the {gib(capacity)} GiB usable"
    if needed_s > left_s:
        return f"estimated {needed_s:.0f} s, more than the {max(left_s, 0):.0f} s left of the budget"
    return None


# ---- building: a random base model, random experts, lorlib's routed model, PEFT's Arrow ----------


def build_base(shape: Shape, device: str, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """The model with random weights, made on the device in `dtype` (no checkpoint)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(shape.config(), dtype=dtype)
    return model.eval()


def target_modules(model: nn.Module) -> dict[str, nn.Linear]:
    return {
        name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS
    }


def random_factors(module: str, shape: tuple[int, int], first: int, count: int, rank: int, device, seed: int = 0):
    """Experts first .. first + count - 1 at one module (first a multiple of CHUNK): A (count, r,
    d_in) with rows of norm about 1, B (count, d_out, r) small, bfloat16, made on the device;
    the same values whoever asks and for whatever expert count."""
    d_out, d_in = shape
    gen = torch.Generator(device=device).manual_seed(zlib.crc32(f"{seed}:{module}:{first}".encode()))
    a = torch.randn(CHUNK, rank, d_in, generator=gen, device=device) / d_in**0.5
    b = torch.randn(CHUNK, d_out, rank, generator=gen, device=device) * (0.02 / rank**0.5)
    return a[:count].to(torch.bfloat16), b[:count].to(torch.bfloat16)


def random_routed_model(
    model: nn.Module, n: int, rank: int, factors, prototypes: str = "random", seed: int = 0
) -> RoutedModel:
    """lorlib's routed model over n experts made in memory (`RoutedModel.unfilled`), with the
    factors that `factors(module, shape, first, count)` returns, CHUNK experts at a time, at every
    target module. Prototypes are "exact" (lorlib's `top_right_singular_vectors` of each expert's
    factors) or "random" unit vectors. tests/test_gpu_check.py holds it equal to
    `RoutedModel.load` of a library of the same experts."""
    names = [f"random{i:04d}" for i in range(n)]
    routed = RoutedModel.unfilled(model, names, {m: [rank] * n for m in target_modules(model)}, torch.bfloat16)
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, layer in routed.layers.items():
        shape = (layer.base.out_features, layer.base.in_features)
        keys = torch.empty(n, shape[1], device=layer.prototypes.device)
        for first in range(0, n, CHUNK):
            a, b = factors(name, shape, first, min(CHUNK, n - first))
            layer.set_factors(first, a, b)
            if prototypes == "exact":
                keys[first : first + len(a)] = top_right_singular_vectors(a, b)
        if prototypes != "exact":
            keys = torch.randn(n, shape[1], generator=gen, device=keys.device)
            keys /= keys.norm(dim=1, keepdim=True)
        layer.set_keys([SCALE] * n, keys)
    return routed


def write_peft_experts(folder: Path, model: nn.Module, n: int, rank: int, device) -> list[str]:
    """The same random experts as PEFT adapter folders (safetensors, bfloat16)."""
    from safetensors.torch import save_file

    shapes = {name: (m.out_features, m.in_features) for name, m in target_modules(model).items()}
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": SCALE * rank}
    config |= {"lora_dropout": 0.0, "bias": "none", "target_modules": list(TARGETS)}
    paths = []
    for first in range(0, n, CHUNK):
        count = min(CHUNK, n - first)
        chunk = {m: [x.cpu() for x in random_factors(m, s, first, count, rank, device)] for m, s in shapes.items()}
        for j in range(count):
            path = folder / f"expert{first + j:04d}"
            path.mkdir(parents=True)
            tensors = {}
            for module, (a, b) in chunk.items():
                tensors[f"base_model.model.{module}.lora_A.weight"] = a[j].contiguous()
                tensors[f"base_model.model.{module}.lora_B.weight"] = b[j].contiguous()
            save_file(tensors, str(path / "adapter_model.safetensors"))
            (path / "adapter_config.json").write_text(json.dumps(config))
            paths.append(str(path))
    return paths


def peft_arrow(model: nn.Module, paths: list[str], top_k: int):
    from peft import ArrowConfig, create_arrow_model

    config = ArrowConfig(top_k=top_k, router_temperature=1.0)
    # keep the bfloat16 adapters in bfloat16 (PEFT's default widens them to float32)
    return create_arrow_model(model, paths, config, autocast_adapter_dtype=False).eval()


def attach(model: nn.Module, modules: dict[str, nn.Module]) -> None:
    """Put each module at its name: the base layers, lorlib's or PEFT's."""
    for name, module in modules.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, module)


# ---- measuring -----------------------------------------------------------------------------------

# transformers 5 renames `past_key_values` to `cache` in later releases; take the one this has
_CACHE = (
    "cache" if "cache" in inspect.signature(__import__("transformers").LlamaForCausalLM.forward).parameters else None
)


def _cache_kwargs(cache) -> dict:
    return {_CACHE or "past_key_values": cache, "use_cache": True}


def _next_cache(out):
    return getattr(out, "cache", None) or out.past_key_values


def measure(call, sizes: Sizes, vocab: int, device: str, repeats: int) -> dict:
    """Prefill tokens/s and decode tokens/s at each batch of `call` (a model's forward), and on
    CUDA the most memory its passes added to what was allocated before them."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (sizes.batch, sizes.length), generator=gen).to(device)
    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        sync()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    result = {}
    with torch.inference_mode():
        times = []
        for _ in range(repeats):
            sync()
            start = time.perf_counter()
            call(input_ids=ids)
            sync()
            times.append(time.perf_counter() - start)
        result["prefill_tok_s"] = sizes.tokens / statistics.median(times)
        for batch in sizes.decode_batches:
            prompt = ids[:1, : sizes.prompt].expand(batch, -1).contiguous()
            out = call(input_ids=prompt, logits_to_keep=1, **_cache_kwargs(None))
            token, cache = out.logits[:, -1:].argmax(-1), _next_cache(out)
            sync()
            start = time.perf_counter()
            for _ in range(sizes.new):
                out = call(input_ids=token, **_cache_kwargs(cache))
                token, cache = out.logits[:, -1:].argmax(-1), _next_cache(out)
            sync()
            result[f"decode{batch}_tok_s"] = batch * sizes.new / (time.perf_counter() - start)
            del out, cache
    if cuda:
        result["transient_bytes"] = torch.cuda.max_memory_allocated() - before
    return result


def allocated(device: str) -> int:
    if device == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated()
    return 0


def free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


# ---- the bf16 routing agreement ------------------------------------------------------------------


def topk_agreement(shape: Shape, sizes: Sizes, n: int, rank: int, top_k: int, device: str) -> dict:
    """Share of token-layers whose Arrow top-k set is the same with the model and prototypes in
    bfloat16 as in float32 (the same weights; experts stored in bfloat16 in both)."""
    model = build_base(shape, device, torch.float32)
    rm = random_routed_model(model, n, rank, _random(rank, device), prototypes="exact")
    router = make_router("arrow", rm.experts, top_k=top_k)
    ids = torch.randint(0, shape.vocab, (sizes.batch, sizes.length), generator=torch.Generator().manual_seed(2))
    chosen = {}
    for dtype in (torch.float32, torch.bfloat16):
        model.to(dtype)
        with torch.inference_mode(), rm.routing(router, record=True) as record:
            model(input_ids=ids.to(device), logits_to_keep=1)
        chosen[dtype] = torch.stack([torch.cat(record.weights[m]) > 0 for m in rm.modules])  # (layers, tokens, E)
    same = (chosen[torch.float32] == chosen[torch.bfloat16]).all(dim=-1)
    del rm, model
    free(device)
    return {"shape": shape.name, "experts": n, "token_layers": same.numel(), "agreement": float(same.float().mean())}


# ---- one expert count: build, take turns, summarise ----------------------------------------------


def run_count(model, base_layers: dict, shape: Shape, sizes: Sizes, n: int, methods: list[str], args, clock, work):
    """Build each method's experts at n, then time base and the methods in turn for --rounds
    rounds; one summary row per method (base's row too, for this count)."""
    device = args.device
    # per method: the modules at the LoRA'd layers' names, what to call, the context to call it in
    sets: dict[str, tuple[dict, object, object]] = {"base": (base_layers, model, nullcontext)}
    setup: dict[str, float] = {"base": 0.0}
    own: dict[str, int] = {"base": 0}
    try:
        for method in methods:
            start, before = time.perf_counter(), allocated(device)
            if method == "lorlib_arrow":
                rm = random_routed_model(model, n, args.rank, _random(args.rank, device), seed=n)
                router = make_router("arrow", rm.experts, top_k=args.top_k)
                sets[method] = (dict(rm.layers), model, lambda rm=rm, router=router: rm.routing(router))
            else:
                paths = write_peft_experts(work / f"{shape.name}-{n}", model, n, args.rank, device)
                print(f"  wrote {n} PEFT adapters in {time.perf_counter() - start:.1f} s", file=sys.stderr)
                peft_model = peft_arrow(model, paths, args.top_k)
                sets[method] = ({name: model.get_submodule(name) for name in base_layers}, peft_model, nullcontext)
            attach(model, base_layers)
            setup[method] = time.perf_counter() - start
            start = time.perf_counter()
            _turn(model, base_layers, sets[method], _warm(sizes), shape, args, 1)  # PEFT builds its prototypes
            clock.seen[(shape.name, method)] = (n, setup[method], time.perf_counter() - start)
            own[method] = allocated(device) - before
            print(f"  {method} at {n} experts: set up in {setup[method]:.1f} s", file=sys.stderr, flush=True)
        runs: dict[str, list[dict]] = {m: [] for m in sets}
        for round_ in range(args.rounds):
            for method in sets:
                start = time.perf_counter()
                runs[method].append(_turn(model, base_layers, sets[method], sizes, shape, args, args.repeats))
                if round_ == 0 and method == "base":
                    clock.base_round[shape.name] = time.perf_counter() - start
                elif round_ == 0:  # what one round costs, for the estimates of the larger counts
                    clock.seen[(shape.name, method)] = (n, setup[method], time.perf_counter() - start)
            print(f"  round {round_ + 1} at {n} experts done", file=sys.stderr, flush=True)
    finally:
        if "peft_arrow" in sets:  # PEFT's own way out: its wrappers replaced by the base layers
            attach(model, sets["peft_arrow"][0])
            sets["peft_arrow"][1].unload()
        attach(model, base_layers)
        if hasattr(model, "peft_config"):
            del model.peft_config
    return [summarise(shape, m, n, runs[m], runs["base"], setup[m], own[m], args) for m in runs]


def _random(rank: int, device: str):
    return lambda module, shape, first, count: random_factors(module, shape, first, count, rank, device)


def _turn(model, base_layers: dict, method_set, sizes: Sizes, shape: Shape, args, repeats: int) -> dict:
    """One method's measurement: its layers in place, in its context, then the base layers back."""
    modules, call, context = method_set
    attach(model, modules)
    try:
        with context():
            return measure(call, sizes, shape.vocab, args.device, repeats)
    finally:
        attach(model, base_layers)


def _warm(sizes: Sizes) -> Sizes:
    return Sizes(sizes.batch, sizes.length, sizes.prompt, 2, sizes.decode_batches, sizes.experts)


def summarise(shape: Shape, method: str, n: int, runs: list[dict], base: list[dict], setup: float, own: int, args):
    """Medians over rounds; ratios to base within each round: median and (min, max)."""
    row = {"shape": shape.name, "method": method, "experts": n, "status": "ok", "rounds": len(runs)}
    row["setup_s"] = setup
    for key in runs[0]:
        row[key] = statistics.median(run[key] for run in runs)
    for key in [k for k in runs[0] if k.endswith("_tok_s")]:
        ratios = [run[key] / b[key] for run, b in zip(runs, base)]
        row[key.replace("_tok_s", "_ratio")] = [statistics.median(ratios), min(ratios), max(ratios)]
    if "transient_bytes" in row:  # peak as if alone: the base weights, its own experts, its passes
        row["peak_gib"] = (shape.parameters() * 2 + own + max(r["transient_bytes"] for r in runs)) / GIB
    row["per_round"] = runs
    expected = expected_bytes(shape, _sizes(args), method, n, args.rank)
    row["expected_gib"] = sum(expected.values()) / GIB
    return row


def _sizes(args) -> Sizes:
    sizes = TINY_SIZES if args.tiny else FULL
    experts = tuple(int(x) for x in args.experts.split(",")) if args.experts else sizes.experts
    return Sizes(
        sizes.batch, sizes.length, sizes.prompt, args.decode_tokens or sizes.new, sizes.decode_batches, experts
    )


# ---- the run -------------------------------------------------------------------------------------


def capacity_bytes(device: str) -> int:
    if device == "cuda":
        return int(torch.cuda.get_device_properties(0).total_memory * 0.92)
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * 0.8)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes and sizes: the CPU dry run")
    parser.add_argument("--shapes", default="7b,135m")
    parser.add_argument("--experts", default=None, help="expert counts (default 64,256,1024; tiny 4,8,16)")
    parser.add_argument("--methods", default=",".join(METHODS[1:]), help="besides base: lorlib_arrow,peft_arrow")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2, help="prefills timed per round (median)")
    parser.add_argument("--decode-tokens", type=int, default=None, help="timed decode steps (default 32; tiny 4)")
    parser.add_argument(
        "--budget-s", type=float, default=300.0, help="wall-clock budget; steps that would not fit are skipped"
    )
    parser.add_argument("--out", default=None, help="write the Markdown table here, and a JSON record beside it")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_gpu: --device cuda but torch.cuda.is_available() is False")
    if args.tiny:  # tensors of a few thousand values: more threads only wait on each other
        torch.set_num_threads(1)
    shapes = [(TINY if args.tiny else SHAPES)[s] for s in args.shapes.split(",")]
    methods = [m for m in args.methods.split(",") if m in METHODS[1:]]
    sizes = _sizes(args)
    capacity = capacity_bytes(args.device)
    record = {"meta": _meta(args, sizes, capacity), "plan": [], "cells": [], "agreement": None, "notes": []}
    for shape in shapes:  # the plan's memory, printed before anything is built
        for n in sizes.experts:
            for method in ["base", *methods]:
                e = expected_bytes(shape, sizes, method, n, args.rank)
                record["plan"].append({"shape": shape.name, "method": method, "experts": n} | e)
    print(render_plan(record["plan"]), file=sys.stderr, flush=True)
    clock, deadline = Clock(), time.perf_counter() + args.budget_s
    with tempfile.TemporaryDirectory(prefix="lorlib-bench-gpu-") as tmp:
        for i, shape in enumerate(shapes):
            left = deadline - time.perf_counter()
            shape_deadline = time.perf_counter() + left * shape.weight / sum(s.weight for s in shapes[i:])
            if shape_deadline - time.perf_counter() < 15:
                why = f"{max(left, 0):.0f} s left of the budget for the whole shape"
                skip(record, shape, ["base", *methods], sizes.experts, why)
                continue
            try:
                run_shape(shape, sizes, methods, args, clock, shape_deadline, capacity, record, Path(tmp))
            except Exception as exc:  # noqa: BLE001 - a shape that breaks is reported, the next still runs
                record["notes"].append(f"{shape.name}: failed: {type(exc).__name__}: {_first_line(exc)}")
                print(f"note: {record['notes'][-1]}", file=sys.stderr, flush=True)
                free(args.device)
            write(record, args)
    write(record, args)
    print(render(record))


def run_shape(shape, sizes, methods, args, clock, deadline, capacity, record, work: Path) -> None:
    def note(text: str) -> None:
        record["notes"].append(f"{shape.name}: {text}")
        print(f"note: {shape.name}: {text}", file=sys.stderr, flush=True)

    print(f"{shape.name}: building the random model ({shape.parameters() / 1e9:.2f}B parameters)", file=sys.stderr)
    model = build_base(shape, args.device, torch.bfloat16)
    base_layers = target_modules(model)
    measure(model, _warm(sizes), shape.vocab, args.device, 1)  # warm-up: kernels, cuBLAS
    start = time.perf_counter()
    measure(model, sizes, shape.vocab, args.device, args.repeats)  # what a round of base costs
    clock.base_round[shape.name] = time.perf_counter() - start
    if shape.name == "135m":  # the agreement check first: it is cheap and it is a target
        n = min([x for x in sizes.experts if x > args.top_k] or [max(sizes.experts)])  # a choice to make
        needed = 4 * clock.base_round[shape.name] + clock.setup_s(shape, "lorlib_arrow", n) * 3
        fp32 = 2 * (expected_bytes(shape, sizes, "lorlib_arrow", n, args.rank)["weights"]) + allocated(args.device)
        why = skip_reason(needed, deadline - time.perf_counter(), fp32, capacity)
        if why:
            note(f"bf16/fp32 top-k agreement skipped: {why}")
        else:
            record["agreement"] = topk_agreement(shape, sizes, n, args.rank, args.top_k, args.device)
    for n in sizes.experts:
        chosen, held = [], 0
        for method in methods:
            e = expected_bytes(shape, sizes, method, n, args.rank)
            needed_bytes = e["weights"] + held + e["own"] + e["transient"]
            left = deadline - time.perf_counter() - sum(clock.cell_s(shape, m, n, args.rounds) for m in chosen)
            left -= (args.rounds + 1) * clock.base_round[shape.name]
            why = skip_reason(clock.cell_s(shape, method, n, args.rounds), left, needed_bytes, capacity)
            if why:
                note(f"{method} at {n} experts skipped: {why}")
                skip(record, shape, [method], [n], why)
            else:
                chosen.append(method)
                held += e["own"]
        if not chosen:
            skip(record, shape, ["base"], [n], "nothing to compare with at this count")
            continue
        print(f"{shape.name}: {n} experts: {', '.join(chosen)}", file=sys.stderr, flush=True)
        try:
            record["cells"] += run_count(model, base_layers, shape, sizes, n, chosen, args, clock, work)
        except Exception as exc:  # noqa: BLE001 - a count that breaks is reported, the others still run
            first = _first_line(exc)
            for method in ["base", *chosen]:
                record["cells"].append({"shape": shape.name, "method": method, "experts": n, "status": "error"})
                record["cells"][-1]["note"] = f"{type(exc).__name__}: {first}"
            note(f"{n} experts failed: {type(exc).__name__}: {first}")
        free(args.device)
        write(record, args)
    del model
    free(args.device)


def skip(record: dict, shape: Shape, methods: list[str], counts, why: str) -> None:
    """Rows for cells that were not run, each with its reason."""
    for n in counts:
        for method in methods:
            record["cells"].append({"shape": shape.name, "method": method, "experts": n, "status": "skipped"})
            record["cells"][-1]["note"] = why


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def _meta(args, sizes: Sizes, capacity: int) -> dict:
    import peft
    import transformers

    gpu = (
        torch.cuda.get_device_name(0) if args.device == "cuda" else f"{platform.machine()} CPU, {os.cpu_count()} cores"
    )
    return {
        "date": date.today().isoformat(),
        "device": gpu,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "args": vars(args),
        "sizes": asdict(sizes),
        "capacity_gib": capacity / GIB,
    }


# ---- output --------------------------------------------------------------------------------------


def render_plan(plan: list[dict]) -> str:
    lines = ["Expected memory (bfloat16): weights + experts + prefill transient, GiB"]
    for p in plan:
        if p["method"] != "base" or p["experts"] == plan[0]["experts"]:
            total = p["weights"] + p["own"] + p["transient"]
            lines.append(
                f"  {p['shape']:>5} {p['method']:<13} {p['experts']:>5}: {gib(p['weights'])} + {gib(p['own'])}"
                f" + {gib(p['transient'])} = {gib(total)}"
            )
    return "\n".join(lines)


def _ratio(row: dict, key: str) -> str:
    mid, low, high = row[key]
    return f"{mid:.2f}" + (f" [{low:.2f}-{high:.2f}]" if row["rounds"] > 1 else "")


def render(record: dict) -> str:
    meta = record["meta"]
    s = meta["sizes"]
    batches = s["decode_batches"]
    lines = [
        f"Run {meta['date']} on {meta['device']}, torch {meta['torch']} (CUDA {meta['cuda']}), transformers "
        f"{meta['transformers']}, peft {meta['peft']}. RANDOM weights (built from a config, nothing downloaded), "
        f"bfloat16; random rank-{meta['args']['rank']} experts on q, k, v, o; Arrow top-k {meta['args']['top_k']}. "
        f"Prefill {s['batch']} x {s['length']} tokens; decode {s['new']} steps after a {s['prompt']}-token prompt at "
        f"batch {' and '.join(map(str, batches))} (tok/s over all sequences). Medians of {meta['args']['rounds']} "
        "round(s); ratios to base within each round, median [min-max]. Peak: base weights + own experts + the most "
        "its passes added (CUDA only); expected: the plan's estimate.",
        "",
        "| shape | method | experts | setup s | prefill tok/s | x base | "
        + " | ".join(f"decode b{b} tok/s | x base" for b in batches)
        + " | peak GiB | expected GiB |",
        "|---|---|---:|---:|---:|---:|" + "---:|---:|" * len(batches) + "---:|---:|",
    ]
    for row in record["cells"]:
        head = f"| {row['shape']} | {row['method']} | {row['experts']} |"
        if row["status"] != "ok":
            lines.append(f"{head} {row['status']}: {row['note']} |" + " |" * (4 + 2 * len(batches)))
            continue
        decode = " | ".join(f"{row[f'decode{b}_tok_s']:.1f} | {_ratio(row, f'decode{b}_ratio')}" for b in batches)
        peak = f"{row['peak_gib']:.1f}" if "peak_gib" in row else "n/a"
        lines.append(
            f"{head} {row['setup_s']:.1f} | {row['prefill_tok_s']:.0f} | {_ratio(row, 'prefill_ratio')} | {decode} | "
            f"{peak} | {row['expected_gib']:.1f} |"
        )
    lines += [""] + versus_peft(record) + agreement_line(record) + [f"- note: {n}" for n in record["notes"]]
    return "\n".join(lines + targets(record))


def versus_peft(record: dict) -> list[str]:
    """lorlib against PEFT's Arrow, the ratios taken within each round."""
    cells = {(r["shape"], r["method"], r["experts"]): r for r in record["cells"] if r["status"] == "ok"}
    lines = []
    for (shape, method, n), ours in cells.items():
        peft = cells.get((shape, "peft_arrow", n))
        if method != "lorlib_arrow" or peft is None:
            continue
        parts = []
        for key in [k for k in ours if k.endswith("_tok_s")]:
            ratios = [a[key] / b[key] for a, b in zip(ours["per_round"], peft["per_round"])]
            label = key.replace("_tok_s", "").replace("decode", "decode b")
            parts.append(f"{label} {statistics.median(ratios):.2f}x [{min(ratios):.2f}-{max(ratios):.2f}]")
        lines.append(f"- {shape}, {n} experts, lorlib against PEFT's Arrow: {', '.join(parts)}.")
    return lines


def agreement_line(record: dict) -> list[str]:
    a = record["agreement"]
    if not a:
        return []
    return [
        f"- bf16 against fp32 ({a['shape']}, {a['experts']} experts, exact prototypes): the same top-k set on "
        f"{100 * a['agreement']:.2f}% of {a['token_layers']} token-layers."
    ]


def targets(record: dict) -> list[str]:
    """Issue #32's targets (where we stand, not gates) at the smallest expert count of the 7b shape."""
    cells = {(r["shape"], r["method"], r["experts"]): r for r in record["cells"] if r["status"] == "ok"}
    n = min(record["meta"]["sizes"]["experts"])
    ours, peft = cells.get(("7b", "lorlib_arrow", n)), cells.get(("7b", "peft_arrow", n))
    rows = []
    if ours:
        rows.append(f"| 7b, {n} experts: prefill >= 0.8x base | {_ratio(ours, 'prefill_ratio')} |")
        for b in record["meta"]["sizes"]["decode_batches"]:
            rows.append(f"| 7b, {n} experts: decode (batch {b}) >= 0.8x base | {_ratio(ours, f'decode{b}_ratio')} |")
    if ours and peft:
        ratios = [a["prefill_tok_s"] / b["prefill_tok_s"] for a, b in zip(ours["per_round"], peft["per_round"])]
        rows.append(f"| 7b, {n} experts: prefill >= 5x PEFT's Arrow | {statistics.median(ratios):.2f} |")
    if a := record["agreement"]:
        rows.append(f"| bf16 picks fp32's top-k on >= 99% of token-layers | {100 * a['agreement']:.2f}% |")
    return ["", "| target (issue #32) | measured |", "|---|---|", *rows] if rows else []


def write(record: dict, args) -> None:
    if not args.out:
        return
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(record) + "\n")
    out.with_suffix(".json").write_text(json.dumps(record, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
