"""Routing keys computed for experts after they are trained, stored next to each expert.

Two of the paper's baselines route by per-expert, per-layer vectors that are not in the LoRA
weights themselves (Ostapenko et al., 2024, Sec. 6; their code's `phatgoose` and `avg_act`):

- **gates** (PhatGoose, Muqeeth et al., 2024): with the base model and the expert frozen, a
  sigmoid gate σ(v·h) scales the expert's output at every layer it adapts; the vectors v start
  at zero (gate 0.5) and are trained on the expert's own training data (their code: 100 steps,
  learning rate 1e-3, batch 4). At routing time the gates are the experts' keys.
- **activations** (the "hidden states" baseline): the mean input hidden state of the base model
  at each layer over N examples of the expert's own tasks (default 100), L2-normalised.

Both read the same (prompt, answer) examples the experts were trained on, encoded the same way.
The mean skips the tokens the chat template puts before every prompt: they are the same for every
task, so they would only pull every expert's mean towards one point. Each expert's keys are
written the moment they are computed (`Derived.write_expert`: atomic, stamped with the weights
they belong to), so an interrupted run keeps what it finished and a rerun does only the rest.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from lorlib_ui.core.errors import LorlibError
from lorlib_ui.core.library import Library
from lorlib_ui.core.prompting import template_span
from lorlib_ui.core.routed_model import RoutedModel
from lorlib_ui.core.routers.base import Routing, TokenRouter
from lorlib_ui.training.config import ACTIVATION_EXAMPLES, GATE_BATCH, GATE_LEARNING_RATE, GATE_STEPS, TrainConfig
from lorlib_ui.training.data import MultiTaskData, load_tasks
from lorlib_ui.training.options import option
from lorlib_ui.training.reporter import QUIET, Reporter
from lorlib_ui.training.training import Cancelled, answer_loss, batches, encode_examples


@dataclass
class KeysReport:
    computed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # had them already
    seconds: float = 0.0


def plan_keys(
    library: Library, kind: str, data: MultiTaskData, experts: list[str] | None, force: bool
) -> tuple[list[str], list[str]]:
    """The experts to compute `kind` keys for, and those skipped because they have them (unless
    `force`): those named (an expert, or a kind like private), default all whose tasks the data
    has. Refuses
    names it does not know and experts whose tasks the data lacks, before any work."""
    groups = library.groups()
    if experts is None:
        chosen = [e.name for e in library.experts if e.tasks and set(e.tasks) <= set(data.tasks)]
    else:
        chosen = []
        for name in experts:
            chosen += groups[name] if name in groups else [library.expert(name).name]
        for name in chosen:
            if missing := [t for t in library.expert(name).tasks if t not in set(data.tasks)]:
                raise LorlibError(f"expert {name}: its task {missing[0]!r} is not in {data.origin}")
            if not library.expert(name).tasks:
                raise LorlibError(f"expert {name} records no tasks, so it has no training data for {kind}")
    if not chosen:
        raise LorlibError(f"no experts of library {library.path} have training data in {data.origin}")
    chosen, lacking = list(dict.fromkeys(chosen)), set(library.derived.lacking(kind))
    return [c for c in chosen if force or c in lacking], [c for c in chosen if not force and c not in lacking]


def _examples(data: MultiTaskData, tasks: list[str], limit: int | None, seed: int) -> list[tuple[str, str]]:
    rows = [(row["input"], row["output"]) for task in tasks for row in data.rows(task, "train")]
    if not rows:
        raise LorlibError(f"{data.origin}: no train rows for {', '.join(tasks)}")
    if limit is not None and len(rows) > limit:  # a seeded sample across the expert's tasks
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
        rows = [rows[i] for i in sorted(order[:limit])]
    return rows


def _routed_model(library: Library, device: str | None) -> RoutedModel:
    rm = RoutedModel.load(library, device=device, dtype="float32")
    rm.model.requires_grad_(False)
    return rm


@dataclass(frozen=True, kw_only=True)
class KeysOptions:
    """Which experts get routing keys, from which data (the `gates` and `activations` commands)."""

    kind: ClassVar[str]  # the keys computed, and the command's name
    experts: tuple[str, ...] | None = option(None, "a kind (private, cluster, ...) or comma-separated experts")
    data: str | None = option(None, "training data (default: what the library was built from)")
    seed: int = option(0, "draws the examples and seeds the training")
    device: str | None = option(None, "cuda or cpu (default: cuda when present)")
    force: bool = option(False, "compute again where present")


@dataclass(frozen=True, kw_only=True)
class GatesOptions(KeysOptions):
    """PhatGoose gates, trained as the paper's code trains them."""

    kind: ClassVar[str] = "gates"
    steps: int = option(GATE_STEPS, "steps per expert", flags=("--gate-steps", "--steps"))
    learning_rate: float = option(GATE_LEARNING_RATE, internal=True)
    batch_size: int = option(GATE_BATCH, internal=True)

    def __post_init__(self):
        for name, value in (("steps", self.steps), ("batch size", self.batch_size)):
            if value < 1:
                raise LorlibError(f"{name} must be a positive whole number, got {value}")
        if not self.learning_rate > 0:
            raise LorlibError(f"learning rate must be positive, got {self.learning_rate}")


@dataclass(frozen=True, kw_only=True)
class ActivationsOptions(KeysOptions):
    """Mean hidden states over each expert's own examples."""

    kind: ClassVar[str] = "activations"
    examples: int = option(ACTIVATION_EXAMPLES, "examples per expert")

    def __post_init__(self):
        if self.examples < 1:
            raise LorlibError(f"examples must be a positive whole number, got {self.examples}")


def compute_keys(path: str, options: GatesOptions | ActivationsOptions, reporter: Reporter = QUIET) -> KeysReport:
    """Compute `options.kind` for the experts `plan_keys` picks, storing each at once; `reporter`
    hears of every step, as in a build, and may cancel between steps."""
    start = time.perf_counter()
    library = Library.open(path)
    kind, seed = options.kind, options.seed
    loaded = load_tasks(library.data_source(options.data))
    experts = None if options.experts is None else list(options.experts)
    todo, skipped = plan_keys(library, kind, loaded, experts, options.force)
    report = KeysReport(skipped=skipped)
    if not todo:
        return report
    rm = _routed_model(library, options.device)
    for index, name in enumerate(todo, 1):
        expert = library.expert(name)
        step = reporter.steps(name, index, len(todo))
        if isinstance(options, GatesOptions):
            pairs = _examples(loaded, expert.tasks, None, seed)
            config = TrainConfig(
                steps=options.steps, batch_size=options.batch_size, learning_rate=options.learning_rate, seed=seed
            )
            keys, info = train_gates(rm, name, pairs, config, step, reporter.cancelled)
        else:
            pairs = _examples(loaded, expert.tasks, options.examples, seed)
            keys, info = mean_activations(rm, pairs, step, reporter.cancelled)
        library.derived.write_expert(kind, name, keys, {**info, "data": loaded.origin}, expert.weights_hash)
        report.computed.append(name)
    report.seconds = time.perf_counter() - start
    return report


@torch.no_grad()
def mean_activations(rm: RoutedModel, pairs: list[tuple[str, str]], progress=None, cancel=None, batch_size: int = 8):
    """module -> the L2-normalised mean input of that layer under the base model over the
    examples' tokens (those after the chat template's common prefix), and how it was computed."""

    skip, _ = template_span(rm.tokenizer, True)
    encoded = encode_examples(rm.tokenizer, pairs, TrainConfig().max_length)
    sums = {name: torch.zeros(layer.base.in_features, dtype=torch.float64) for name, layer in rm.layers.items()}
    mask_now: list[torch.Tensor] = []

    def add(module, inputs):
        x = inputs[0].double()
        sums[module.name] += (x * mask_now[0].unsqueeze(-1)).sum(dim=(0, 1)).cpu()

    hooks = [layer.register_forward_pre_hook(add) for layer in rm.layers.values()]
    tokens, steps = 0, -(-len(encoded) // batch_size)
    try:
        for n, begin in enumerate(range(0, len(encoded), batch_size), 1):
            if cancel is not None and cancel():
                raise Cancelled("cancelled")
            chunk = [ids for ids, _ in encoded[begin : begin + batch_size]]
            width = max(map(len, chunk))
            ids = torch.zeros((len(chunk), width), dtype=torch.long)
            attention = torch.zeros((len(chunk), width), dtype=torch.long)
            counted = torch.zeros((len(chunk), width), dtype=torch.float64, device=rm.device)
            for row, seq in enumerate(chunk):
                ids[row, : len(seq)] = torch.tensor(seq)
                attention[row, : len(seq)] = 1
                counted[row, min(skip, len(seq) - 1) : len(seq)] = 1
            mask_now[:] = [counted]
            rm.model(input_ids=ids.to(rm.device), attention_mask=attention.to(rm.device))
            tokens += int(counted.sum())
            if progress is not None:
                progress(n, steps, None)
    finally:
        for hook in hooks:
            hook.remove()
    keys = {name: (total / total.norm().clamp(min=1e-12)).float() for name, total in sums.items()}
    return keys, {"examples": len(pairs), "tokens": tokens, "skipped_prefix_tokens": skip}


@dataclass(frozen=True, eq=False)
class _GateTraining(TokenRouter):
    """While training one expert's gates: that expert alone, its output scaled by σ(v·h) at each
    layer it adapts (v: `gates[layer]`); every other expert 0. Used by `train_gates` only."""

    name: ClassVar[str] = "gate-training"
    summary: ClassVar[str] = "PhatGoose gate training"

    index: int = 0
    gates: dict = field(default_factory=dict)

    def route(self, slot, scores, h):
        gate = self.gates.get(slot.name)
        if gate is None:  # the expert does not adapt this layer
            return Routing(scores, weights=scores.new_zeros(scores.shape))
        column = torch.nn.functional.one_hot(torch.tensor(self.index), slot.n_experts).to(h.dtype)
        return Routing(scores, weights=torch.sigmoid(h @ gate).unsqueeze(-1) * column)


def train_gates(rm: RoutedModel, expert: str, pairs, config: TrainConfig, progress=None, cancel=None):
    """Train PhatGoose gates for one expert of `rm` (base and experts frozen): module -> v."""
    torch.manual_seed(config.seed)
    index = rm.experts.index(expert)
    gates = {
        name: torch.nn.Parameter(torch.zeros(layer.base.in_features, device=rm.device))
        for name, layer in rm.layers.items()
        if bool(layer.present[index])
    }
    router = _GateTraining(index=index, gates=gates)
    encoded = encode_examples(rm.tokenizer, pairs, config.max_length)
    pad = rm.tokenizer.pad_token_id if rm.tokenizer.pad_token_id is not None else rm.tokenizer.eos_token_id
    stream = batches(encoded, config, pad or 0)
    optimizer = torch.optim.Adam(list(gates.values()), lr=config.learning_rate)
    losses, start = [], time.perf_counter()
    with rm.routing(router):
        for step in range(config.steps):
            if cancel is not None and cancel():
                raise Cancelled("cancelled")
            ids, mask, answer = (t.to(rm.device) for t in next(stream))
            loss, _ = answer_loss(rm.model, ids, mask, answer)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            if progress is not None:
                progress(step + 1, config.steps, losses[-1])
    keys = {name: gate.detach() for name, gate in gates.items()}
    tail = losses[-max(1, len(losses) // 10) :]
    info = {
        "steps": config.steps,
        "learning_rate": config.learning_rate,
        "batch_size": config.batch_size,
        "seed": config.seed,
        "examples": len(pairs),
        "first_loss": round(losses[0], 5),
        "final_loss": round(sum(tail) / len(tail), 5),
        "seconds": round(time.perf_counter() - start, 2),
    }
    return keys, info
