"""Explain an answer token by token: did the routing help it, and which expert earned it?

The answer is teacher-forced after its prompt (in the chat template, as `route` and training
wrap it). For every answer token t, with p the position that predicts it:

- its log-probability under the router, log p_R(t), under the base model, log p_0(t), and the
  gain log p_R(t) − log p_0(t); the gains of all tokens add up to the answer's log-likelihood
  difference between the router and the base model;
- the router's weights at p, per layer, and averaged over layers: its top experts there;
- leave-one-out: for each expert the router chose for the answer, the answer again without it
  (`routers.ablation.without`: its weight zeroed and the others renormalised, or a merge
  recomputed over the others), and per token how much of the log-probability it carried,
  log p_R(t) − log p_R∖e(t). Each expert costs one forward pass over the whole sequence, not one
  per token;
- optionally the same answer under another router, token by token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from lorlib_ui.core.errors import LorlibError
from lorlib_ui.core.prompting import answer_ids, checked_text, context_length, encode_prompt
from lorlib_ui.core.routed_model import RoutedModel
from lorlib_ui.core.routers import Router, make_router
from lorlib_ui.core.routers.ablation import without

MAX_REMOVED = 8  # experts taken out one at a time: the most weighted over the answer


@dataclass
class Explanation:
    router: str
    compare: str | None
    experts: list[str]
    modules: list[str]
    prompt: str
    answer: str
    tokens: list[str]  # the answer's tokens
    logprobs: np.ndarray  # (T,) under the router
    base: np.ndarray  # (T,) under the base model
    compared: np.ndarray | None  # (T,) under the other router
    weights: np.ndarray  # (modules, T, experts): the router's weights where each token is predicted
    carried: dict[str, np.ndarray] = field(default_factory=dict)  # expert -> (T,) log-prob it carried

    @property
    def gain(self) -> np.ndarray:
        return self.logprobs - self.base

    def top_experts(self, k: int = 3) -> list[list[tuple[str, float]]]:
        """Per answer token: the k experts with the most weight, averaged over layers."""
        mean = self.weights.mean(axis=0) if self.weights.size else np.zeros((len(self.tokens), 0))
        return [[(self.experts[i], float(row[i])) for i in np.argsort(-row)[:k] if row[i] > 0] for row in mean]

    def top_by_layer(self, k: int = 3) -> dict[str, list[list[tuple[str, float]]]]:
        """Per layer, per answer token: the k experts with the most weight there (on demand: `--per-layer`)."""
        return {
            module: [[(self.experts[i], float(row[i])) for i in np.argsort(-row)[:k] if row[i] > 0] for row in layer]
            for module, layer in zip(self.modules, self.weights)
        }

    def credit(self) -> list[tuple[str, float]]:
        """Which expert earned this answer: each removed expert with the answer log-likelihood it
        carried in all (summed over tokens), the most first."""
        return sorted(((e, float(v.sum())) for e, v in self.carried.items()), key=lambda x: -x[1])

    def to_dict(self, per_layer: bool = False) -> dict:
        by_layer = {
            module: [[{"expert": e, "weight": round(w, 6)} for e, w in row] for row in rows]
            for module, rows in self.top_by_layer().items()
        }
        return ({"top_experts_by_layer": by_layer} if per_layer else {}) | {
            "router": self.router,
            "compare": self.compare,
            "prompt": self.prompt,
            "answer": self.answer,
            "tokens": self.tokens,
            "logprob": _rounded(self.logprobs),
            "base_logprob": _rounded(self.base),
            "gain": _rounded(self.gain),
            "total_gain": round(float(self.gain.sum()), 6),
            "compare_logprob": None if self.compared is None else _rounded(self.compared),
            "top_experts": [[{"expert": e, "weight": round(w, 6)} for e, w in row] for row in self.top_experts()],
            "carried": {e: _rounded(v) for e, v in self.carried.items()},
            "credit": [{"expert": e, "logprob": round(v, 6)} for e, v in self.credit()],
        }


def _rounded(values: np.ndarray) -> list[float]:
    return [round(float(v), 6) for v in values]


@torch.inference_mode()
def _answer_logprobs(rm: RoutedModel, ids: list[int], start: int, router: Router, record: bool = False):
    """log p(ids[t] | ids[:t]) for t ≥ start under `router`, and the routing record if asked."""
    with rm.routing(router, record=record) as builder:
        logits = rm.model(input_ids=torch.tensor([ids], device=rm.device)).logits[0, start - 1 : -1].float()
    target = torch.tensor(ids[start:], device=logits.device)[:, None]
    logprobs = torch.log_softmax(logits, dim=-1).gather(1, target)[:, 0].cpu().numpy()
    record = builder.finish(router.describe(), rm.experts, [""] * len(ids)) if builder else None
    return logprobs, record


def explain(
    rm: RoutedModel,
    prompt: str,
    answer: str,
    router: Router,
    compare: Router | None = None,
    chat: bool = True,
    max_removed: int = MAX_REMOVED,
) -> Explanation:
    """Explain `answer` to `prompt` under `router` (see the module's docstring)."""
    prompt, answer = checked_text(prompt, "prompt"), checked_text(answer, "answer")
    head = encode_prompt(rm.tokenizer, prompt, chat)
    tail = answer_ids(rm.tokenizer, chat)(answer)
    return explain_ids(rm, head, tail, router, compare, max_removed, prompt, answer)


def explain_ids(
    rm: RoutedModel,
    head: list[int],
    tail: list[int],
    router: Router,
    compare: Router | None = None,
    max_removed: int = MAX_REMOVED,
    prompt: str = "",
    answer: str = "",
) -> Explanation:
    """`explain` on token ids: the prompt's `head` (already templated) and the answer's `tail`
    (a generation's own ids, say, which a decoded text need not give back)."""
    ids, context = head + tail, context_length(rm.model)
    if not tail:
        raise LorlibError("the answer has no tokens")
    if len(ids) > context:
        raise LorlibError(f"prompt and answer are {len(ids)} tokens, longer than the model's context of {context}")
    start = len(head)
    logprobs, record = _answer_logprobs(rm, ids, start, router, record=True)
    base, _ = _answer_logprobs(rm, ids, start, make_router("base", rm.experts))
    compared = None if compare is None else _answer_logprobs(rm, ids, start, compare)[0]
    weights = record.weights[:, start - 1 : -1, :]  # (modules, T, experts): where each token is predicted
    explanation = Explanation(
        router=router.describe(),
        compare=None if compare is None else compare.describe(),
        experts=list(rm.experts),
        modules=list(record.modules),
        prompt=prompt,
        answer=answer,
        tokens=[rm.tokenizer.decode([i]) for i in tail],
        logprobs=logprobs,
        base=base,
        compared=compared,
        weights=weights,
    )
    if router.applies_experts:
        total = weights.sum(axis=(0, 1)) if weights.size else np.zeros(len(rm.experts))
        chosen = [int(i) for i in np.argsort(-total)[:max_removed] if total[i] > 0]
        for e in chosen:
            alone, _ = _answer_logprobs(rm, ids, start, without(router, e, len(rm.experts)))
            explanation.carried[rm.experts[e]] = logprobs - alone
    return explanation


def format_explanation(explanation: Explanation) -> str:
    """The explanation as a table for a terminal: one row per answer token, then the credit."""
    lines = [f"{'token':>16}  {'router':>8}  {'base':>8}  {'gain':>7}  top experts (mean over layers)"]
    for token, lp, base, gain, top in zip(
        explanation.tokens, explanation.logprobs, explanation.base, explanation.gain, explanation.top_experts()
    ):
        shown = ", ".join(f"{e} {w:.2f}" for e, w in top) or "-"
        lines.append(f"{token!r:>16}  {lp:8.3f}  {base:8.3f}  {gain:+7.3f}  {shown}")
    lines.append(f"total gain over the base model: {explanation.gain.sum():+.3f} nats")
    if explanation.compared is not None:
        delta = float((explanation.logprobs - explanation.compared).sum())
        lines.append(f"against {explanation.compare}: {delta:+.3f} nats")
    for expert, carried in explanation.credit():
        lines.append(f"without {expert}: the answer loses {carried:+.3f} nats")
    return "\n".join(lines)
