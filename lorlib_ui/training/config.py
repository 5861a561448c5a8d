"""How one expert is trained: `TrainConfig`, the one place for the training settings' defaults,
help and ranges. Its fields are the `build` command's training flags and a build job's training
keys (`lorlib_ui.training.options`); the builders make one (it checks itself) and change it with
`dataclasses.replace`. Imports no torch, so the command line can show the defaults without loading it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from lorlib_ui.core.errors import LorlibError
from lorlib_ui.core.limits import MAX_ALPHA, MAX_RANK_ENV, max_rank
from lorlib_ui.training.options import option

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
# Test rows per task that the analyses of routing (transfer, routing-stats) use unless told: the
# full matrix over 33 tasks and 35 columns stays about an hour on two CPU cores.
ANALYSIS_ROWS = 20
# Routing keys (build/keys.py): PhatGoose gates as in the paper's code (mttl), and the examples
# per expert that the hidden-state baseline averages.
GATE_STEPS, GATE_LEARNING_RATE, GATE_BATCH = 100, 1e-3, 4
ACTIVATION_EXAMPLES = 100
# Supervised adaptation (build/adaptation.py): the ways `adapt` learns a new task from its examples.
ADAPT_METHODS = ("scratch", "mu", "shared", "poly-router", "poly-full", "lorahub")
# Sets of a library's tasks that evaluate, transfer and routing-stats take by name: the tasks held
# out of the library, the tasks its task experts were trained on, both, or the tasks of its data
# that no expert trained on and that are not held out (zero-shot to families without an expert).
TASK_SETS = ("held-out", "seen", "all", "unused")
# MBC (build/mbc.py) sparsifies each expert's weight vector by keeping |w| above this quantile of
# its own |w| (the paper's code keeps the top half).
KEEP_QUANTILE = 0.5


@dataclass(frozen=True)
class TrainConfig:
    """How one expert is trained: the one place for these settings' defaults and ranges (the
    command line, the app's jobs and the builders all make one, and change it with `replace`)."""

    rank: int = option(4, "LoRA rank of each expert")
    alpha: float | None = option(None, internal=True)  # default 2 x rank
    targets: tuple[str, ...] = option(DEFAULT_TARGETS, "comma-separated module names")
    steps: int = option(100, "optimizer steps per expert")
    batch_size: int = option(8, "training examples per step")
    learning_rate: float = option(1e-3, "AdamW's peak learning rate")
    seed: int = option(0, "seeds the training (and, unless --holdout-seed, which tasks are held out)")
    bf16: bool = option(False, internal=True)  # set by the trainer: autocast where the device is fast in bf16
    max_length: int = option(256, internal=True)  # tokens of prompt + answer; longer examples keep their answer

    def __post_init__(self):
        for name in ("rank", "steps", "batch_size", "max_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise LorlibError(f"{name.replace('_', ' ')} must be a positive integer, got {value!r}")
        if self.rank > max_rank():  # checked now, not when the trained expert is stored
            raise LorlibError(f"rank {self.rank} is above the largest rank allowed, {max_rank()} ({MAX_RANK_ENV})")
        if self.alpha is not None and isinstance(self.alpha, int | float) and abs(self.alpha) > MAX_ALPHA:
            raise LorlibError(f"alpha must be at most {MAX_ALPHA:g}, got {self.alpha!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise LorlibError(f"seed must be an integer, got {self.seed!r}")
        for name in ("learning_rate", "alpha"):
            value = getattr(self, name)
            if value is None and name == "alpha":
                continue
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
                raise LorlibError(f"{name.replace('_', ' ')} must be positive, got {value!r}")
        if isinstance(self.targets, str) or not self.targets or not all(isinstance(t, str) and t for t in self.targets):
            raise LorlibError(f"target modules must be a non-empty list of names, got {self.targets!r}")
        object.__setattr__(self, "targets", tuple(self.targets))  # a list from JSON is fine too

    @classmethod
    def from_options(cls, options: Mapping, **overrides) -> TrainConfig:
        """From a JSON-like mapping (an app job's options, the `training` record of an expert):
        its keys that name settings, coerced to their types; other keys are ignored."""
        kinds = {"rank": int, "steps": int, "batch_size": int, "max_length": int, "seed": int}
        kinds |= {"alpha": float, "learning_rate": float, "bf16": bool, "targets": tuple}
        values = {}
        given = {k: v for k, v in overrides.items() if v is not None}  # None: as the options say
        for name, value in {**options, **given}.items():
            if name not in kinds or value is None:
                continue
            try:
                values[name] = kinds[name](value)
            except (TypeError, ValueError):
                kind = {int: "an integer", float: "a number", bool: "true or false", tuple: "a list of names"}
                raise LorlibError(f"{name.replace('_', ' ')} must be {kind[kinds[name]]}, got {value!r}") from None
        return cls(**values)
