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

from lorlib_ui.build.config import TrainConfig
from lorlib_ui.core.adapters import LoraAdapter
from lorlib_ui.core.errors import LorlibError
from lorlib_ui.core.prompting import encode_prompt


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


def train_expert(
    model: nn.Module,
    tokenizer,
    examples: list[tuple[str, str]],
    config: TrainConfig,
    progress: Callable[[int, int, float], None] | None = None,
    cancel: Callable[[], bool] | None = None,
) -> TrainResult:
    """Train a LoRA on (prompt, answer) pairs and return it; `model` is left as it was.

    `progress(step, steps, loss)` is called after each step; `cancel()` returning True stops
    training and raises `Cancelled`.
    """
    from peft import LoraConfig, get_peft_model

    if not examples:
        raise LorlibError("no training examples")
    torch.manual_seed(config.seed)
    encoded = encode_examples(tokenizer, examples, config.max_length)
    alpha = config.alpha or 2 * config.rank
    lora = LoraConfig(r=config.rank, lora_alpha=alpha, target_modules=list(config.targets), lora_dropout=0.0)
    was_training = model.training
    peft_model = get_peft_model(model, lora)
    try:
        peft_model.train()
        params = [p for p in peft_model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min(1.0, (step + 1) / 10) * 0.5 * (1 + math.cos(math.pi * step / config.steps))
        )
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        stream = batches(encoded, config, pad_id or 0)
        losses, answer_tokens, start = [], 0, time.perf_counter()
        for step in range(config.steps):
            if cancel is not None and cancel():
                raise Cancelled("training cancelled")
            ids, mask, answer = next(stream)
            with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=config.bf16):
                batch = (t.to(model.device) for t in (ids, mask, answer))
                loss, n_answer = answer_loss(peft_model.get_base_model(), *batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            answer_tokens += n_answer
            if progress is not None:
                progress(step + 1, config.steps, losses[-1])
        seconds = time.perf_counter() - start
        factors = {}
        for name, module in peft_model.get_base_model().named_modules():
            if hasattr(module, "lora_A") and "default" in module.lora_A:
                a = module.lora_A["default"].weight.detach().to(torch.bfloat16).clone()
                b = module.lora_B["default"].weight.detach().to(torch.bfloat16).clone()
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
    tail = losses[-max(1, len(losses) // 10) :]
    metrics = {
        "final_loss": sum(tail) / len(tail),
        "first_loss": losses[0],
        "steps": config.steps,
        "seconds": round(seconds, 2),
        "answer_tokens_per_s": round(answer_tokens / seconds, 1),
        "examples": len(examples),
        "loss_curve": [round(loss, 4) for loss in losses],  # one per optimizer step, for the expert view
    }
    return TrainResult(adapter, metrics)
