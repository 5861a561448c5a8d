"""Uncertainty for comparisons of routers: bootstrap intervals over test rows, and rank correlation.

A router's score on a set of tasks is the mean over tasks of each task's mean over its test rows
(each task weighs the same, as in `evaluation.summarize`). Its 95% interval is the percentile
bootstrap (Efron & Tibshirani, 1993, ch. 13): resample each task's rows with replacement, apply
the same statistic, and take the 2.5th and 97.5th percentiles of B resamples. Tasks are fixed
(stratified resampling): the interval is over the rows the tasks happen to have, not over tasks.

A difference between two routers evaluated on the same rows is a paired statistic: both are
resampled with the same row indices, so row-to-row difficulty, shared by both, cancels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy.stats import spearmanr

RESAMPLES = 2000
LEVEL = 0.95
SEED = 0


def _resampled_means(per_task: Sequence[Sequence[float]], resamples: int, seed: int) -> np.ndarray:
    """(resamples,) the mean over tasks of each task's resampled row mean."""
    rng = np.random.default_rng(seed)
    total = np.zeros(resamples)
    for rows in per_task:
        values = np.asarray(rows, dtype=float)
        picks = rng.integers(0, len(values), size=(resamples, len(values)))
        total += values[picks].mean(axis=1)
    return total / len(per_task)


def _checked(per_task: Sequence[Sequence[float]]) -> list[np.ndarray]:
    tasks = [np.asarray(rows, dtype=float) for rows in per_task]
    if not tasks or any(len(rows) == 0 for rows in tasks):
        raise ValueError("every task needs at least one row")
    return tasks


def task_mean(per_task: Sequence[Sequence[float]]) -> float:
    """The statistic: mean over tasks of the mean over each task's rows."""
    return float(np.mean([rows.mean() for rows in _checked(per_task)]))


def bootstrap_interval(
    per_task: Sequence[Sequence[float]], resamples: int = RESAMPLES, level: float = LEVEL, seed: int = SEED
) -> tuple[float, float]:
    """Percentile bootstrap interval of `task_mean`, resampling rows within each task."""
    means = _resampled_means(_checked(per_task), resamples, seed)
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def paired_interval(
    a: Sequence[Sequence[float]],
    b: Sequence[Sequence[float]],
    resamples: int = RESAMPLES,
    level: float = LEVEL,
    seed: int = SEED,
) -> tuple[float, float, float]:
    """The difference task_mean(a) − task_mean(b) and its paired bootstrap interval: row i of a
    task in `a` and row i of the same task in `b` are the same test row."""
    a, b = _checked(a), _checked(b)
    if [len(x) for x in a] != [len(x) for x in b]:
        raise ValueError("paired scores must cover the same rows of the same tasks")
    diff = [x - y for x, y in zip(a, b)]
    low, high = bootstrap_interval(diff, resamples, level, seed)
    return task_mean(diff), low, high


def pooled_ratio_interval(
    hits: Sequence[np.ndarray],
    counts: Sequence[np.ndarray],
    resamples: int = RESAMPLES,
    level: float = LEVEL,
    seed: int = SEED,
) -> tuple[float, float] | None:
    """Percentile bootstrap interval of a rate pooled over each task's prompts: per task,
    `hits` and `counts` are (prompts, parts) arrays (a part: one layer, say); the statistic is the
    mean over every (task, part) with a count of summed hits / summed counts. Prompts are resampled
    within each task, so the interval is over the prompts the tasks happen to have. None when no
    task has a prompt."""
    rng = np.random.default_rng(seed)
    total, cells = np.zeros(resamples), np.zeros(resamples)
    for h, c in zip(hits, counts):
        h, c = np.asarray(h, dtype=float), np.asarray(c, dtype=float)
        if len(h) == 0:
            continue
        picks = rng.integers(0, len(h), size=(resamples, len(h)))
        summed_h, summed_c = h[picks].sum(axis=1), c[picks].sum(axis=1)  # (resamples, parts)
        defined = summed_c > 0
        total += np.where(defined, summed_h / np.where(defined, summed_c, 1), 0).sum(axis=1)
        cells += defined.sum(axis=1)
    if not cells.any():
        return None
    rates = total[cells > 0] / cells[cells > 0]
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(rates, [tail, 100 - tail])
    return float(low), float(high)


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (ties get their mean rank); NaN when either side is constant
    or fewer than three pairs are finite."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan
    return float(spearmanr(x, y).statistic)
