"""Training one LoRA expert on the examples of one task (or of a cluster of tasks).

The paper's private experts (Ostapenko et al., 2024, Sec. 5), scaled down to a CPU: rank 4 on
the attention projections by default, loss on the answer tokens only, prompts in the model's
chat template when it has one, and fixed seeds. The loop is written out rather than handed to
`transformers.Trainer` for speed on small CPUs:

- dynamic padding: each batch is padded to its own longest example, never to a fixed length;
- the output layer (a 49k x 576 matmul on SmolLM2) runs only on the answer positions, which
  are a small share of every sequence, instead of on every position;
- optional bfloat16 autocast (on by default where the hardware computes in bf16, `fast_bf16`).

PEFT injects and removes the LoRA layers, so the base model is reused, unchanged, across experts.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lorlib_ui.core.adapters import LoraAdapter
from lorlib_ui.core.errors import LorlibError
from lorlib_ui.core.prompting import encode_prompt
from lorlib_ui.training.config import TrainConfig


@dataclass
class TrainResult:
    adapter: LoraAdapter
    metrics: dict = field(default_factory=dict)


class Cancelled(LorlibError):
    """Training was cancelled by the caller; nothing was written."""


def fast_bf16(device: torch.device | str) -> bool:
    """Whether bf16 autocast pays off here: a CUDA GPU with bf16, or a CPU with AVX512-BF16 or AMX
    (on other CPUs bf16 is emulated and slower than float32)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def encode_example(tokenizer, prompt: str, answer: str, chat: bool = True) -> tuple[list[int], int]:
    """Token ids of prompt + answer and how many of them belong to the prompt."""
    prompt_ids = encode_prompt(tokenizer, prompt, chat)
    templated = chat and tokenizer.chat_template
    text = (answer if templated else " " + answer) + (tokenizer.eos_token or "")
    return prompt_ids + tokenizer(text, add_special_tokens=False)["input_ids"], len(prompt_ids)


def encode_examples(tokenizer, examples: list[tuple[str, str]], max_length: int) -> list[tuple[list[int], int]]:
    """Each (prompt, answer) as token ids and its prompt's length, cut from the left to
    `max_length` tokens so that the answer is kept."""
    encoded = []
    for prompt, answer in examples:
        ids, n_prompt = encode_example(tokenizer, prompt, answer)
        if len(ids) > max_length:
            cut = len(ids) - max_length
            ids, n_prompt = ids[cut:], max(n_prompt - cut, 1)
        encoded.append((ids, n_prompt))
    return encoded


def batches(encoded: list[tuple[list[int], int]], config: TrainConfig, pad_id: int):
    """Endless shuffled batches, padded to their own longest sequence; labels mark answer tokens."""
    gen = torch.Generator().manual_seed(config.seed)
    while True:
        order = torch.randperm(len(encoded), generator=gen).tolist()
        full = len(order) - len(order) % config.batch_size or len(order)  # drop a ragged last batch
        for start in range(0, full, config.batch_size):
            chosen = [encoded[i] for i in order[start : start + config.batch_size]]
            width = max(len(ids) for ids, _ in chosen)
            ids = torch.full((len(chosen), width), pad_id)
            mask = torch.zeros((len(chosen), width), dtype=torch.long)
            answer = torch.zeros((len(chosen), width), dtype=torch.bool)
            for row, (seq, n_prompt) in enumerate(chosen):
                ids[row, : len(seq)] = torch.tensor(seq)
                mask[row, : len(seq)] = 1
                answer[row, n_prompt : len(seq)] = True
            yield ids, mask, answer


def answer_loss(causal_lm, ids: torch.Tensor, mask: torch.Tensor, answer: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Cross-entropy of the answer tokens, computing the output layer only where it is needed."""
    hidden = causal_lm.model(input_ids=ids, attention_mask=mask).last_hidden_state
    targets = answer[:, 1:]  # position t predicts token t + 1
    logits = causal_lm.lm_head(hidden[:, :-1][targets])
    labels = ids[:, 1:][targets]
    return nn.functional.cross_entropy(logits.float(), labels), int(labels.numel())


def lora_config(config: TrainConfig):
    """PEFT's LoraConfig for a TrainConfig (alpha defaults to 2 x rank)."""
    from peft import LoraConfig

    alpha = config.alpha or 2 * config.rank
    return LoraConfig(r=config.rank, lora_alpha=alpha, target_modules=list(config.targets), lora_dropout=0.0)


def start_lora(model: nn.Module, config: TrainConfig, init: LoraAdapter | None = None):
    """`model` with a trainable LoRA injected by PEFT, initialised as PEFT does (B = 0), or set to
    `init`'s factors where `init` adapts a module (at the config's rank: the starting point of
    supervised adaptation from µ or from the shared expert). A start from `init` computes exactly
    what `init` does: PEFT's scale alpha/r is folded into B where they differ, and the modules
    `init` leaves alone keep B = 0."""
    from peft import get_peft_model

    peft_model = get_peft_model(model, lora_config(config))
    if init is None:
        return peft_model
    scale = (config.alpha or 2 * config.rank) / config.rank
    modules = {n: m for n, m in peft_model.get_base_model().named_modules() if hasattr(m, "lora_A")}
    if outside := sorted(set(init.factors) - set(modules)):
        peft_model.unload()
        raise LorlibError(f"the starting adapter adapts {outside[0]}, which the training does not target")
    with torch.no_grad():
        for name, (a, b) in init.factors.items():
            module = modules[name]
            if a.shape[0] != config.rank:
                peft_model.unload()
                raise LorlibError(f"the starting adapter has rank {a.shape[0]} at {name}, not {config.rank}")
            module.lora_A["default"].weight.copy_(a)
            module.lora_B["default"].weight.copy_(b.float() * (init.scales[name] / scale))
    return peft_model


def linear_schedule(optimizer, steps: int):
    """Ten steps of linear warm-up, then a cosine decay to zero over `steps`."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / 10) * 0.5 * (1 + math.cos(math.pi * step / steps))
    )


@dataclass
class Fit:
    """What an optimisation loop measured: the loss at each step, answer tokens seen, seconds."""

    losses: list[float]
    answer_tokens: int
    seconds: float

    def metrics(self, examples: int) -> dict:
        tail = self.losses[-max(1, len(self.losses) // 10) :]
        return {
            "final_loss": sum(tail) / len(tail),
            "first_loss": self.losses[0],
            "steps": len(self.losses),
            "seconds": round(self.seconds, 2),
            "answer_tokens_per_s": round(self.answer_tokens / max(self.seconds, 1e-9), 1),
            "examples": examples,
            "loss_curve": [round(loss, 4) for loss in self.losses],  # one per optimizer step
        }


def fit(
    causal_lm,
    groups: list[dict],
    encoded: list[tuple[list[int], int]],
    config: TrainConfig,
    pad_id: int,
    progress: Callable[[int, int, float], None] | None = None,
    cancel: Callable[[], bool] | None = None,
) -> Fit:
    """Minimise the answer loss of `causal_lm` over the parameter `groups` (AdamW's, each with its
    own learning rate if it says so): `config.steps` steps of `config.batch_size` examples, the
    warm-up and cosine schedule, gradients clipped to norm 1. The one training loop of every
    expert, adapted expert and learned router."""
    params = [p for group in groups for p in group["params"]]
    optimizer = torch.optim.AdamW(groups, lr=config.learning_rate, weight_decay=0.0)
    schedule = linear_schedule(optimizer, config.steps)
    device = next(causal_lm.parameters()).device
    stream = batches(encoded, config, pad_id)
    losses, answer_tokens, start = [], 0, time.perf_counter()
    for step in range(config.steps):
        if cancel is not None and cancel():
            raise Cancelled("training cancelled")
        ids, mask, answer = next(stream)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.bf16):
            loss, n_answer = answer_loss(causal_lm, *(t.to(device) for t in (ids, mask, answer)))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        answer_tokens += n_answer
        if progress is not None:
            progress(step + 1, config.steps, losses[-1])
    return Fit(losses, answer_tokens, time.perf_counter() - start)


def pad_id(tokenizer) -> int:
    return (tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id) or 0


def train_expert(
    model: nn.Module,
    tokenizer,
    examples: list[tuple[str, str]],
    config: TrainConfig,
    progress: Callable[[int, int, float], None] | None = None,
    cancel: Callable[[], bool] | None = None,
    init: LoraAdapter | None = None,
) -> TrainResult:
    """Train a LoRA on (prompt, answer) pairs and return it; `model` is left as it was. The LoRA
    starts at zero (B = 0, as PEFT initialises it) or, given `init`, at that adapter.

    `progress(step, steps, loss)` is called after each step; `cancel()` returning True stops
    training and raises `Cancelled`.
    """
    if not examples:
        raise LorlibError("no training examples")
    torch.manual_seed(config.seed)
    encoded = encode_examples(tokenizer, examples, config.max_length)
    alpha = config.alpha or 2 * config.rank
    was_training = model.training
    peft_model = start_lora(model, config, init)
    try:
        peft_model.train()
        params = [p for p in peft_model.parameters() if p.requires_grad]
        run = fit(
            peft_model.get_base_model(), [{"params": params}], encoded, config, pad_id(tokenizer), progress, cancel
        )
        factors = {}
        for name, module in peft_model.get_base_model().named_modules():
            if hasattr(module, "lora_A") and "default" in module.lora_A:
                # on the CPU: an expert is written to disk and reloaded wherever it is served
                a = module.lora_A["default"].weight.detach().to("cpu", torch.bfloat16).clone()
                b = module.lora_B["default"].weight.detach().to("cpu", torch.bfloat16).clone()
                factors[name] = (a, b)
    finally:
        peft_model.unload()
        model.train(was_training)
    config_json = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": config.rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": list(config.targets),
        "bias": "none",
    }
    adapter = LoraAdapter(config=config_json, factors=factors, scales={m: alpha / config.rank for m in factors})
    return TrainResult(adapter, run.metrics(len(examples)))
