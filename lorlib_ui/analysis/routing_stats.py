"""Routing over a dataset: where a router sends each task's prompt tokens, and whether that is right.

Ostapenko et al. (2024, Sec. 6) argue that Arrow routes a token to experts relevant to its task.
This module measures it. For every test prompt of every task (prompt tokens only: nothing is
generated), the routed model records each token's weights over the experts at each LoRA'd layer;
from those:

- the routing matrix: each expert's mean weight over a task's tokens, at each layer and over all;
- routing accuracy: how often a token's top-1 expert (per token, per layer) is the task's own
  expert (tasks with a task expert of their own), or an expert trained on a task of the same
  family; each beside its chance level, the share of usable experts that would count as a hit;
- routing entropy per layer, against the entropy of uniform weights over the usable experts;
- agreement with transfer (`transfer`): per task, Spearman's rank correlation between the routing
  mass and the experts' gain over the base model, and the gain of the most-routed expert against
  the best expert's.

The chat template adds the same tokens (system prompt, role markers) to every prompt; they are
routed the same whatever the task, so every statistic is computed twice: over all prompt tokens,
and over the task's own content tokens only (`content`).
"""

from __future__ import annotations

import math
from contextlib import suppress
from dataclasses import dataclass, field

import numpy as np
import torch

from lorlib_ui.analysis import stats
from lorlib_ui.analysis.evaluation import DatasetOptions, select_tasks, test_rows
from lorlib_ui.analysis.transfer import load_transfer
from lorlib_ui.core.derived import Changes
from lorlib_ui.core.errors import LorlibError
from lorlib_ui.core.library import TASK_KINDS, Library
from lorlib_ui.core.prompting import encode_prompt, template_span
from lorlib_ui.core.routed_model import RoutedModel
from lorlib_ui.core.routers import DEFAULT_TOP_K, MIXES, Router, help_text, make_router
from lorlib_ui.training.config import ANALYSIS_ROWS
from lorlib_ui.training.data import MultiTaskData, load_tasks
from lorlib_ui.training.options import option
from lorlib_ui.training.reporter import QUIET, Count, Reporter
from lorlib_ui.training.training import Cancelled

DEFAULT_LIMIT = ANALYSIS_ROWS
TOKEN_SETS = ("all", "content")  # every prompt token; the task's own tokens, without the template's


@dataclass(frozen=True, kw_only=True)
class RouterOptions:
    """A router and the model it routes (the flags of `route`, `score` and `routing-stats`); the
    router's own settings are checked by the router registry when it is made."""

    router: str = option("arrow", help_text())
    top_k: int | None = option(None, f"experts per token (default {DEFAULT_TOP_K}, or all if fewer)")
    temperature: float = option(1.0, "arrow softmax temperature (> 0)")
    mix: str = option(
        "outputs",
        "combine the chosen experts' outputs (PEFT) or their parameters (paper's code)",
        choices=MIXES,
    )
    density: float | None = option(None, "ties: share of each expert's entries kept (default 0.2)")
    base_model: str | None = option(None, "override the library's base model (must fit it)")
    device: str | None = option(None, "cuda or cpu (default: cuda when present)")
    dtype: str | None = option(None, "float32, bfloat16, float16 or auto")


@dataclass(frozen=True, kw_only=True)
class RoutingStatsOptions(DatasetOptions, RouterOptions):
    """Routing statistics of one router (the `routing-stats` command's flags and a routing job's keys)."""

    router: str = option("arrow@private", help_text())
    limit: int | None = option(DEFAULT_LIMIT, f"test prompts per task (default {DEFAULT_LIMIT})")


@dataclass
class _Tally:
    """Sums over the tokens of one task, per layer."""

    mass: np.ndarray  # (modules, experts) summed weights
    own: np.ndarray  # (modules,) top-1 is the task's own expert
    family: np.ndarray  # (modules,) top-1 is an expert of the task's family
    routed: np.ndarray  # (modules,) tokens with a top-1 expert (some weight)
    entropy: np.ndarray  # (modules,) summed entropy of the weights
    tokens: int = 0
    # per prompt, (own, family, routed) counts per layer: intervals over the task's prompts
    prompts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list)

    @classmethod
    def zeros(cls, modules: int, experts: int) -> _Tally:
        return cls(np.zeros((modules, experts)), *(np.zeros(modules) for _ in range(4)))


@dataclass
class RoutingStats:
    """One router over a set of tasks, for one set of tokens (all, or content only)."""

    router: str
    tokens: str  # "all" or "content"
    tasks: list[str]
    families: list[str]
    experts: list[str]  # the experts the router can use, in library order
    modules: list[str]
    token_counts: list[int]  # per task
    mass_by_layer: np.ndarray  # (tasks, modules, experts) mean weight per token
    own_expert: list[str | None]  # per task
    own_accuracy: np.ndarray  # (tasks, modules) NaN where the task has no expert of its own
    own_chance: np.ndarray  # (modules,)
    family_accuracy: np.ndarray  # (tasks, modules) NaN where no usable expert is of the family
    family_chance: np.ndarray  # (tasks, modules)
    entropy: np.ndarray  # (tasks, modules) mean entropy of a token's weights, in nats
    uniform_entropy: np.ndarray  # (modules,) log of the number of usable experts
    transfer: dict = field(default_factory=dict)  # agreement with the transfer matrix, where stored
    # 95% bootstrap intervals of the summary's accuracies, resampling each task's prompts (`_ci`),
    # and the tasks as well (`_task_ci`: about tasks like these), as `stats` computes them
    own_accuracy_ci: tuple[float, float] | None = None
    family_accuracy_ci: tuple[float, float] | None = None
    own_accuracy_task_ci: tuple[float, float] | None = None
    family_accuracy_task_ci: tuple[float, float] | None = None

    @property
    def mass(self) -> np.ndarray:
        """(tasks, experts): mean weight over tokens and layers."""
        return self.mass_by_layer.mean(axis=1)

    def summary(self) -> dict:
        """Means over tasks (each task weighs the same); accuracies over the tasks they apply to."""

        def mean(a: np.ndarray) -> float | None:
            return None if a.size == 0 or np.isnan(a).all() else float(np.nanmean(a))

        own = ~np.isnan(self.own_accuracy).all(axis=1)
        fam = ~np.isnan(self.family_accuracy).all(axis=1)
        own_chance = np.broadcast_to(self.own_chance, self.own_accuracy.shape)
        return {
            "own_accuracy": mean(self.own_accuracy),
            "own_accuracy_ci": self.own_accuracy_ci,
            "own_accuracy_task_ci": self.own_accuracy_task_ci,
            "own_above_chance": _above(self.own_accuracy, own_chance),
            "own_chance": mean(np.broadcast_to(self.own_chance, self.own_accuracy.shape)[own]) if own.any() else None,
            "own_tasks": int(own.sum()),
            "family_accuracy": mean(self.family_accuracy),
            "family_accuracy_ci": self.family_accuracy_ci,
            "family_accuracy_task_ci": self.family_accuracy_task_ci,
            "family_above_chance": _above(self.family_accuracy, self.family_chance),
            "family_chance": mean(np.where(np.isnan(self.family_accuracy), np.nan, self.family_chance)),
            "family_tasks": int(fam.sum()),
            "entropy": mean(self.entropy),
            "uniform_entropy": mean(self.uniform_entropy),
            "spearman": mean(np.array([t["spearman"] for t in self.transfer.get("tasks", [])], dtype=float)),
        }

    def per_task(self) -> list[dict]:
        def value(x) -> float | None:
            return None if not np.isfinite(x) else round(float(x), 5)

        by_task = {t["task"]: t for t in self.transfer.get("tasks", [])}
        rows = []
        for i, task in enumerate(self.tasks):
            top = int(np.argmax(self.mass[i]))
            rows.append(
                {
                    "task": task,
                    "family": self.families[i],
                    "tokens": self.token_counts[i],
                    "own_expert": self.own_expert[i],
                    "own_accuracy": value(np.nanmean(self.own_accuracy[i])) if self.own_expert[i] else None,
                    "family_accuracy": None
                    if np.isnan(self.family_accuracy[i]).all()
                    else value(np.nanmean(self.family_accuracy[i])),
                    "family_chance": None
                    if np.isnan(self.family_accuracy[i]).all()
                    else value(np.nanmean(self.family_chance[i])),
                    "entropy": value(self.entropy[i].mean()),
                    "most_routed": self.experts[top] if self.experts else None,
                    **{k: v for k, v in by_task.get(task, {}).items() if k != "task"},
                }
            )
        return rows

    def to_dict(self) -> dict:
        def rounded(a: np.ndarray) -> list:
            return np.round(np.nan_to_num(a, nan=-1.0), 5).tolist()

        return {
            "router": self.router,
            "tokens": self.tokens,
            "tasks": self.tasks,
            "families": self.families,
            "experts": self.experts,
            "layers": self.modules,
            "mass": rounded(self.mass),
            "mass_by_layer": np.round(self.mass_by_layer, 4).tolist(),
            "summary": self.summary(),
            "per_task": self.per_task(),
            "by_layer": {
                "own_accuracy": _layer_means(self.own_accuracy),
                "own_chance": self.own_chance.round(5).tolist(),
                "family_accuracy": _layer_means(self.family_accuracy),
                "family_chance": _layer_means(np.where(np.isnan(self.family_accuracy), np.nan, self.family_chance)),
                "entropy": _layer_means(self.entropy),
                "uniform_entropy": self.uniform_entropy.round(5).tolist(),
            },
        }


def _layer_means(a: np.ndarray) -> list[float | None]:
    """(tasks, modules) -> per module, the mean over the tasks where it is defined."""
    out = []
    for column in a.T:
        finite = column[np.isfinite(column)]
        out.append(round(float(finite.mean()), 5) if finite.size else None)
    return out


def _usable(rm: RoutedModel, router: Router) -> np.ndarray:
    """(modules, experts): which experts the router may choose at each layer."""
    rows = []
    for module in rm.modules:
        mask, _ = rm.model.get_submodule(module).usable(router.subset)
        rows.append(mask.cpu().numpy())
    return np.stack(rows) if rows else np.zeros((0, len(rm.experts)), dtype=bool)


def _expert_families(library: Library, data: MultiTaskData) -> list[set[str]]:
    known = set(data.tasks)
    return [{data.family_of(t) for t in e.tasks if t in known} for e in library.experts]


def route_dataset(
    rm: RoutedModel,
    router: Router,
    data: MultiTaskData,
    tasks: list[str],
    limit: int | None = DEFAULT_LIMIT,
    reporter: Reporter = QUIET,
) -> dict[str, RoutingStats]:
    """Route every test prompt of every task under `router`; the statistics over all prompt
    tokens ("all") and over content tokens only ("content")."""
    library, tok = rm.library, rm.tokenizer
    chat = bool(tok.chat_template)
    prefix, suffix = template_span(tok, chat)
    usable = _usable(rm, router)
    n_usable = usable.sum(axis=1)
    shown = np.flatnonzero(usable.any(axis=0))
    families = _expert_families(library, data)
    by_name = {e.name: e for e in library.experts}
    tallies: dict[str, list[_Tally]] = {kind: [] for kind in TOKEN_SETS}
    own_experts, task_families = [], []
    for done, task in enumerate(tasks, start=1):
        if reporter.cancelled():
            raise Cancelled("routing statistics cancelled")
        family = data.family_of(task)
        own = next((n for n in rm.experts if by_name[n].kind in TASK_KINDS and by_name[n].tasks == [task]), None)
        own_index = rm.experts.index(own) if own is not None else -1
        in_family = np.array([family in f for f in families])
        task_tallies = {kind: _Tally.zeros(len(rm.modules), len(rm.experts)) for kind in TOKEN_SETS}
        for row in test_rows(data, task, limit):
            ids = encode_prompt(tok, row["input"], chat)
            with torch.inference_mode(), rm.routing(router, record=True) as builder:
                rm.model(input_ids=torch.tensor([ids], device=rm.device))
            weights = builder.finish(router.describe(), rm.experts, [""] * len(ids)).weights  # (M, T, E)
            keep = {"all": slice(None), "content": slice(prefix, len(ids) - suffix)}
            for kind, part in keep.items():
                _add(task_tallies[kind], weights[:, part], own_index, in_family)
        for kind in TOKEN_SETS:
            tallies[kind].append(task_tallies[kind])
        own_experts.append(own)
        task_families.append(family)
        reporter.progress(Count(done, len(tasks), task))
    out = {}
    for kind in TOKEN_SETS:
        out[kind] = _finish(
            router, kind, tasks, task_families, own_experts, tallies[kind], usable, n_usable, shown, families, rm
        )
    return out


def _add(tally: _Tally, weights: np.ndarray, own: int, in_family: np.ndarray) -> None:
    """Add one prompt's tokens (weights: modules x tokens x experts) to a task's tally."""
    if weights.shape[1] == 0:
        return
    tally.mass += weights.sum(axis=1)
    top = weights.argmax(axis=2)  # (M, T)
    some = weights.max(axis=2) > 0
    prompt = (((top == own) & some).sum(axis=1), (in_family[top] & some).sum(axis=1), some.sum(axis=1))
    tally.prompts.append(prompt)
    tally.own += prompt[0]
    tally.family += prompt[1]
    tally.routed += prompt[2]
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(weights > 0, -weights * np.log(weights), 0.0)
    tally.entropy += terms.sum(axis=2).sum(axis=1)
    tally.tokens += weights.shape[1]


def _finish(router, kind, tasks, task_families, own_experts, tallies, usable, n_usable, shown, families, rm):
    n_tasks, n_modules = len(tasks), len(rm.modules)
    mass = np.zeros((n_tasks, n_modules, len(shown)))
    own_acc = np.full((n_tasks, n_modules), np.nan)
    fam_acc = np.full((n_tasks, n_modules), np.nan)
    fam_chance = np.full((n_tasks, n_modules), np.nan)
    entropy = np.zeros((n_tasks, n_modules))
    own_parts, fam_parts = ([], []), ([], [])  # per task, per prompt: (hits, counts) over layers
    with np.errstate(divide="ignore", invalid="ignore"):
        own_chance = np.where(n_usable > 0, 1 / n_usable, np.nan)
        for i, tally in enumerate(tallies):
            tokens = max(tally.tokens, 1)
            mass[i] = tally.mass[:, shown] / tokens
            entropy[i] = tally.entropy / tokens
            routed = np.where(tally.routed > 0, tally.routed, np.nan)
            own = own_experts[i]
            if own is not None:
                own_acc[i] = np.where(usable[:, rm.experts.index(own)], tally.own / routed, np.nan)
                _prompt_counts(own_parts, tally, 0, usable[:, rm.experts.index(own)])
            in_family = np.array([task_families[i] in f for f in families])
            hits = (usable & in_family).sum(axis=1)
            if (hits > 0).any():
                _prompt_counts(fam_parts, tally, 1, hits > 0)
            fam_acc[i] = np.where(hits > 0, tally.family / routed, np.nan)
            fam_chance[i] = np.where(hits > 0, hits / n_usable, np.nan)
        uniform = np.where(n_usable > 0, np.log(np.maximum(n_usable, 1)), np.nan)
    return RoutingStats(
        router=router.describe(),
        tokens=kind,
        tasks=list(tasks),
        families=list(task_families),
        experts=[rm.experts[j] for j in shown],
        modules=list(rm.modules),
        token_counts=[t.tokens for t in tallies],
        mass_by_layer=mass,
        own_expert=own_experts,
        own_accuracy=own_acc,
        own_chance=own_chance,
        family_accuracy=fam_acc,
        family_chance=fam_chance,
        entropy=entropy,
        uniform_entropy=uniform,
        own_accuracy_ci=stats.pooled_ratio_interval(*own_parts),
        family_accuracy_ci=stats.pooled_ratio_interval(*fam_parts),
        own_accuracy_task_ci=stats.pooled_ratio_interval(*own_parts, tasks=True),
        family_accuracy_task_ci=stats.pooled_ratio_interval(*fam_parts, tasks=True),
    )


def _above(accuracy: np.ndarray, chance: np.ndarray) -> dict[str, int] | None:
    """On how many tasks (where it is defined) the accuracy, averaged over layers, is above,
    level with and below chance: the per-task sign count beside the mean."""
    rows = [
        (np.nanmean(a), np.nanmean(np.where(np.isnan(a), np.nan, c)))
        for a, c in zip(accuracy, chance)
        if not np.isnan(a).all()
    ]
    if not rows:
        return None
    return {
        "up": sum(bool(a > c + 1e-9) for a, c in rows),
        "tied": sum(bool(abs(a - c) <= 1e-9) for a, c in rows),
        "down": sum(bool(a < c - 1e-9) for a, c in rows),
    }


def _prompt_counts(parts: tuple[list, list], tally: _Tally, which: int, defined: np.ndarray) -> None:
    """Append one task's per-prompt hits and counts (prompts, layers), counting only the layers
    where the accuracy is defined, for `stats.pooled_ratio_interval`."""
    if not tally.prompts:
        return
    parts[0].append(np.stack([p[which] for p in tally.prompts]))
    parts[1].append(np.stack([p[2] * defined for p in tally.prompts]))


def agree_with_transfer(result: RoutingStats, library: Library, top: int = 4) -> None:
    """Set `result.transfer`: per task with stored transfer cells, Spearman's correlation between
    the routing mass and the gain over base of the same experts, the gain of the most-routed expert
    (and the mean gain of the `top` most routed) against the best expert's."""
    matrix = load_transfer(library)
    if matrix is None:
        result.transfer = {"note": "no transfer matrix stored (run `transfer`)", "tasks": []}
        return
    gain = matrix.gain()
    rows = []
    for i, task in enumerate(result.tasks):
        if task not in matrix.tasks:
            continue
        t = matrix.tasks.index(task)
        pairs = [
            (result.mass[i, j], gain[t, matrix.columns.index(e)])
            for j, e in enumerate(result.experts)
            if e in matrix.columns and np.isfinite(gain[t, matrix.columns.index(e)])
        ]
        if len(pairs) < 2:
            continue
        mass, gains = map(np.array, zip(*pairs))
        order = np.argsort(-mass, kind="stable")
        rows.append(
            {
                "task": task,
                "experts_compared": len(pairs),
                "spearman": None if math.isnan(rho := stats.spearman(mass, gains)) else rho,
                "most_routed_gain": float(gains[order[0]]),
                "top_routed_gain": float(gains[order[:top]].mean()),
                "best_gain": float(gains.max()),
                "mean_gain": float(gains.mean()),
            }
        )
    result.transfer = {"tasks": rows}


SIDE_FILE = "routing"  # LIBRARY/routing.json: the last statistics of each router, for the app


def library_key(library: Library) -> str:
    """Identifies the experts statistics were computed over: they are stale once any changes."""
    return ",".join(f"{e.name}={e.weights_hash}" for e in library.experts)


def store_routing(library: Library, spec: str, results: dict[str, RoutingStats], limit: int | None) -> None:
    """Keep these statistics in the library under the router's spec, replacing that router's last
    ones. Other routers' are kept as they are, even when computed over other experts: `load_routing`
    leaves those out, and `stale_routing` shows them, marked, until each is computed again."""
    entry = {"key": library_key(library), "limit": limit} | {kind: r.to_dict() for kind, r in results.items()}

    def update(stored: dict | None, current: Library) -> tuple[dict, dict]:
        routers = dict((stored or {}).get("routers", {}))
        routers[spec] = entry
        return {"format": "lorlib-routing", "version": 1, "routers": routers}, {"routers": sorted(routers)}

    library.derived.update_json(SIDE_FILE, update)


def _stored_routers(library: Library) -> dict[str, dict]:
    stored = library.derived.read_json(SIDE_FILE) or {}
    routers = stored.get("routers") if isinstance(stored, dict) else None
    return {s: e for s, e in (routers or {}).items() if isinstance(e, dict) and isinstance(e.get("key"), str)}


def load_routing(library: Library) -> dict[str, dict]:
    """router spec -> {"all": statistics, "content": statistics, "limit": ...}, for the current experts."""
    key = library_key(library)
    return {s: e for s, e in _stored_routers(library).items() if e["key"] == key}


def _hashes(key: str) -> dict[str, str]:
    """`library_key` read back: expert name -> weights hash (names hold no ',' or '=')."""
    return dict(part.rpartition("=")[::2] for part in key.split(",") if "=" in part)


def stale_routing(library: Library) -> dict[str, tuple[dict, Changes]]:
    """router spec -> (its last statistics, what changed among the experts since), for the routers
    whose statistics were computed over other experts than the library's now: to show, marked
    stale, until they are computed again. `load_routing` reads them as absent."""
    key = library_key(library)
    return {
        s: (e, library.derived.changes_since(_hashes(e["key"])))
        for s, e in _stored_routers(library).items()
        if e["key"] != key
    }


# Routing one test prompt with the embedded SmolLM2-135M and 34 experts on a CPU: the shipped
# library's 33 tasks x 20 prompts took under 8.5 min (between its transfer run's end and its
# routing.json being written), and issue #34 reports about 5 min; rough, far less on a GPU.
PROMPT_SECONDS = 0.5


def routing_seconds(tasks: int, limit: int | None) -> float:
    """About how long routing `tasks` tasks takes on a CPU, `limit` test prompts each."""
    return tasks * (limit or DEFAULT_LIMIT) * PROMPT_SECONDS


def routing_stats_library(
    path: str, options: RoutingStatsOptions | None = None, reporter: Reporter = QUIET, store: bool = True
) -> dict[str, RoutingStats]:
    """Routing statistics of one router over the library's tasks (a list, or held-out, seen, all,
    unused), compared with the stored transfer matrix where it has the tasks; stored in the
    library under the router's spec when `store` says so."""
    o = options or RoutingStatsOptions()
    library = Library.open(path)
    if not library.experts:
        raise LorlibError(f"library {library.path} has no experts")
    spec = make_router(
        o.router, library.names, o.top_k, o.temperature, o.mix, groups=library.groups(), density=o.density
    )
    source = library.data_source(o.data)
    loaded = load_tasks(source)
    tasks = select_tasks(library, o.tasks, loaded)
    for task in tasks:
        test_rows(loaded, task, o.limit)
    rm = RoutedModel.load(library, o.base_model, device=o.device, dtype=o.dtype)
    results = route_dataset(rm, spec, loaded, tasks, o.limit, reporter)
    for result in results.values():
        agree_with_transfer(result, library, top=getattr(spec, "top_k", 1))
    if store:
        with suppress(LorlibError):  # a read-only library still reports its statistics
            store_routing(library, o.router, results, o.limit)
    return results
