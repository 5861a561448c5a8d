"""Generate and score text with a routed model, optionally recording the routing.

Generation is a plain KV-cached decode loop rather than `model.generate`: every token, the prompt's
and each generated one (the last included), passes through the model exactly once, so the routing
record lines up token for token with the text, and streaming needs no extra thread.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lorlib_ui.core.errors import LorlibError
from lorlib_ui.core.prompting import check_max_new_tokens, checked_text, context_length, encode_prompt
from lorlib_ui.core.record import RoutingRecord
from lorlib_ui.core.routed_model import RoutedModel
from lorlib_ui.core.routers import Router

CHARS_PER_TOKEN = 64  # more characters than any token of a BPE vocabulary holds


@dataclass
class Generation:
    prompt: str
    text: str  # the generated continuation, special tokens removed
    prompt_ids: list[int]
    new_ids: list[int]
    prompt_tokens: list[str]
    new_tokens: list[str]
    record: RoutingRecord | None
    truncated: bool  # the prompt was cut (from the left) to fit the model's context
    stopped: bool = False  # the last new token is a stop token (not part of the answer)

    @property
    def answer_ids(self) -> list[int]:
        """The answer's own token ids: the new ones before the stop token."""
        return self.new_ids[:-1] if self.stopped else self.new_ids


@dataclass
class Scores:
    tokens: list[str]
    logprobs: list[float | None]  # log p(token | tokens before it); None for the first token
    record: RoutingRecord | None


def _token_strings(rm: RoutedModel, ids: list[int]) -> list[str]:
    return [rm.tokenizer.decode([i]) for i in ids]


def _stop_ids(rm: RoutedModel) -> set[int]:
    stops = rm.model.generation_config.eos_token_id
    stops = set(stops if isinstance(stops, list) else [stops]) if stops is not None else set()
    if rm.tokenizer.eos_token_id is not None:
        stops.add(rm.tokenizer.eos_token_id)
    return stops


@torch.inference_mode()
def generate(
    rm: RoutedModel,
    prompt: str,
    router: Router,
    max_new_tokens: int = 64,
    record: bool = True,
    chat: bool = True,
    on_token: Callable[[str], None] | None = None,
    max_prompt_tokens: int | None = None,
) -> Generation:
    """Greedy decoding under `router`; `on_token` receives the text generated so far after each token.
    A prompt longer than the model's context leaves (or than `max_prompt_tokens`, a served app's
    limit on one request's prefill) is cut from the left, and the result says so."""
    prompt = checked_text(prompt, "prompt")
    check_max_new_tokens(max_new_tokens)
    cut = max_prompt_tokens is not None and len(prompt) > CHARS_PER_TOKEN * max_prompt_tokens
    if cut:  # no token is this long, so the cut to tokens below ends the same; a huge prompt costs no tokenizing
        prompt = prompt[-CHARS_PER_TOKEN * max_prompt_tokens :]
    ids = encode_prompt(rm.tokenizer, prompt, chat)
    context = context_length(rm.model)
    room = context - max_new_tokens
    if room < 1:
        raise LorlibError(f"max new tokens ({max_new_tokens}) leaves no room in the model's context of {context}")
    room = min(room, max_prompt_tokens or room)
    truncated = cut or len(ids) > room
    ids = ids[-room:]
    stops, new = _stop_ids(rm), []
    with rm.routing(router, record=record) as builder:
        out = rm.model(input_ids=torch.tensor([ids], device=rm.device), use_cache=True, logits_to_keep=1)
        while True:
            token = int(out.logits[0, -1].argmax())
            new.append(token)
            if on_token is not None:
                on_token(rm.tokenizer.decode(new, skip_special_tokens=True))
            done = token in stops or len(new) >= max_new_tokens
            if done and builder is None:
                break
            step = torch.tensor([[token]], device=rm.device)
            out = rm.model(input_ids=step, cache=out.cache, use_cache=True, logits_to_keep=1)
            if done:  # that forward only routed the final token, for the record
                break
    prompt_tokens, new_tokens = _token_strings(rm, ids), _token_strings(rm, new)
    routing = builder.finish(router.describe(), rm.experts, prompt_tokens + new_tokens) if builder else None
    text = rm.tokenizer.decode(new, skip_special_tokens=True)
    stopped = bool(new) and new[-1] in stops
    return Generation(prompt, text, ids, new, prompt_tokens, new_tokens, routing, truncated, stopped)


@torch.inference_mode()
def score(rm: RoutedModel, text: str, router: Router, record: bool = False) -> Scores:
    """Each token's log-probability given the tokens before it, under `router`."""
    text = checked_text(text, "text")
    ids = rm.tokenizer(text)["input_ids"]
    context = context_length(rm.model)
    if len(ids) > context:
        raise LorlibError(f"text is {len(ids)} tokens, longer than the model's context of {context}")
    with rm.routing(router, record=record) as builder:
        logits = rm.model(input_ids=torch.tensor([ids], device=rm.device)).logits[0].float()
    logprobs = torch.log_softmax(logits[:-1], dim=-1).gather(1, torch.tensor(ids[1:], device=logits.device)[:, None])
    tokens = _token_strings(rm, ids)
    routing = builder.finish(router.describe(), rm.experts, tokens) if builder else None
    return Scores(tokens, [None] + logprobs.squeeze(1).tolist(), routing)


@torch.inference_mode()
def score_continuations(
    rm: RoutedModel, router: Router, pairs: list[tuple[list[int], list[int]]], batch_size: int = 8
) -> list[list[float]]:
    """log p(token | everything before it) for each token of each continuation, given its prompt:
    `pairs` holds (prompt ids, continuation ids). Sequences of similar length are batched together,
    right-padded (so positions are unaffected) and cut from the left to fit the context.

    The tokens every sequence starts with (the chat template's system prompt: a third of a
    typical evaluation row) go through the model once, and each batch continues from their
    cache. That is exact because every router decides each token from that token's own hidden
    state, which causal attention makes independent of what follows."""
    context = context_length(rm.model)
    pad = next(i for i in (rm.tokenizer.pad_token_id, rm.tokenizer.eos_token_id, 0) if i is not None)
    out: list[list[float]] = [[] for _ in pairs]
    seqs = [(prompt + cont)[-context:] for prompt, cont in pairs]
    # the first scored position of each sequence must come after the shared prefix
    shared = min([_common_prefix(seqs)] + [len(s) - 1 - min(len(c), len(s) - 1) for s, (_, c) in zip(seqs, pairs)])
    order = sorted(range(len(pairs)), key=lambda i: len(seqs[i]))
    with rm.routing(router):
        prefix = None
        if shared > 0 and len(pairs) > 1:
            ids = torch.tensor([seqs[0][:shared]], device=rm.device)
            prefix = rm.model(input_ids=ids, use_cache=True, logits_to_keep=1).cache
        else:
            shared = 0
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            width = max(len(seqs[i]) for i in chunk)
            ids = torch.full((len(chunk), width - shared), pad, device=rm.device)
            mask = torch.zeros((len(chunk), width), dtype=torch.long, device=rm.device)
            for row, i in enumerate(chunk):
                ids[row, : len(seqs[i]) - shared] = torch.tensor(seqs[i][shared:], device=rm.device)
                mask[row, : len(seqs[i])] = 1
            # Only the positions that predict a continuation token need the vocabulary projection
            # and its softmax (a prompt is many times longer than its answer): ask the model for
            # those alone, the union over the batch (rows of similar length need similar ones).
            spans = [range(len(seqs[i]) - 1 - min(len(pairs[i][1]), len(seqs[i]) - 1), len(seqs[i]) - 1) for i in chunk]
            keep = sorted(set().union(*spans))
            at = {p: j for j, p in enumerate(keep)}
            index = torch.tensor(keep, device=rm.device) - shared
            cache = None
            if prefix is not None:
                cache = copy.deepcopy(prefix)
                cache.batch_repeat_interleave(len(chunk))
            logits = rm.model(
                input_ids=ids, attention_mask=mask, cache=cache, use_cache=cache is not None, logits_to_keep=index
            ).logits
            logprobs = torch.log_softmax(logits.float(), dim=-1).gather(2, ids[:, index + 1, None])[..., 0]
            for row, (i, span) in enumerate(zip(chunk, spans)):
                out[i] = logprobs[row, [at[p] for p in span]].tolist()
    return out


def _common_prefix(seqs: list[list[int]]) -> int:
    """How many leading tokens all of `seqs` share."""
    first, n = seqs[0], min(map(len, seqs))
    return next((j for j in range(n) if any(s[j] != first[j] for s in seqs)), n)


def generate_batch(
    rm: RoutedModel, prompts: list[list[int]], router: Router, max_new_tokens: int, batch_size: int = 8
) -> list[str]:
    """Greedy answers to many tokenized prompts (`generate_batch_ids`), as text."""
    return [text for text, _ in generate_batch_ids(rm, prompts, router, max_new_tokens, batch_size)]


@torch.inference_mode()
def generate_batch_ids(
    rm: RoutedModel, prompts: list[list[int]], router: Router, max_new_tokens: int, batch_size: int = 8
) -> list[tuple[str, list[int]]]:
    """Greedy answers to many tokenized prompts, batched (left-padded) through `model.generate`,
    as (text, new token ids before the stop token); no routing record is kept. Each token is
    routed on its own, so a prompt's answer does not depend on the others in its batch."""
    pad = next(i for i in (rm.tokenizer.pad_token_id, rm.tokenizer.eos_token_id, 0) if i is not None)
    stops = sorted(_stop_ids(rm))
    texts: list[tuple[str, list[int]]] = [("", [])] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    with rm.routing(router):
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            width = max(len(prompts[i]) for i in chunk)
            ids = torch.full((len(chunk), width), pad, device=rm.device)
            mask = torch.zeros((len(chunk), width), dtype=torch.long, device=rm.device)
            for row, i in enumerate(chunk):
                ids[row, width - len(prompts[i]) :] = torch.tensor(prompts[i], device=rm.device)
                mask[row, width - len(prompts[i]) :] = 1
            out = rm.model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad,
                eos_token_id=stops or None,
            )
            for row, i in enumerate(chunk):
                new = out[row, width:].tolist()
                cut = next((j for j, t in enumerate(new) if t in stops), len(new))
                texts[i] = (rm.tokenizer.decode(new[:cut], skip_special_tokens=True), new[:cut])
    return texts
