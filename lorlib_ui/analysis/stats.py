"""Uncertainty for comparisons of routers: bootstrap intervals, per-task sign counts, Wilson
intervals for proportions, and rank correlation.

A router's score on a set of tasks is the mean over tasks of each task's mean over its test rows
(each task weighs the same, as in `summaries.summarize`). Its 95% interval is the percentile
bootstrap (Efron & Tibshirani, 1993, ch. 13) of that statistic over B resamples, at one of two
levels:

- rows (`tasks=False`): each task's rows are resampled with replacement, the tasks are fixed. The
  interval says how sure we are about *these* tasks, given the rows they happen to have.
- tasks (`tasks=True`): a two-level bootstrap (Davison & Hinkley, 1997, sec. 3.8): draw as many
  tasks as there are, with replacement, then resample the rows within each drawn task (a task
  drawn twice gets two independent row resamples). The interval speaks about tasks like these in
  general, which is what a claim about held-out tasks means; with few tasks it is much wider.

A difference between two routers evaluated on the same rows is a paired statistic: both are
resampled with the same task and row indices, so difficulty shared by both cancels. `signs`
counts the tasks on which it is up, tied and down.

A percentile bootstrap of a proportion that is 0 (or 1) on every row has nothing to resample and
gives [0, 0]; `proportion_interval` then gives the Wilson score interval of the pooled rows
(Wilson, 1927), which does not collapse at 0% and 100%.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy.stats import norm, spearmanr

RESAMPLES = 2000
LEVEL = 0.95
SEED = 0


def _copies(rng: np.random.Generator, n_tasks: int, resamples: int, tasks: bool) -> np.ndarray:
    """(resamples, n_tasks): how many times each task is drawn in each resample; all ones when the
    tasks are fixed."""
    if not tasks:
        return np.ones((resamples, n_tasks), dtype=int)
    drawn = rng.integers(0, n_tasks, size=(resamples, n_tasks))
    return np.stack([(drawn == t).sum(axis=1) for t in range(n_tasks)], axis=1)


def _resampled_means(per_task: Sequence[Sequence[float]], resamples: int, seed: int, tasks: bool) -> np.ndarray:
    """(resamples,) the mean over (drawn) tasks of each task's resampled row mean."""
    rng = np.random.default_rng(seed)
    copies = _copies(rng, len(per_task), resamples, tasks)
    total = np.zeros(resamples)
    for t, rows in enumerate(per_task):
        values = np.asarray(rows, dtype=float)
        most = int(copies[:, t].max())
        if most == 0:
            continue
        picks = rng.integers(0, len(values), size=(resamples, most, len(values)))
        means = values[picks].mean(axis=2)  # (resamples, copy): each copy its own row resample
        total += (means * (np.arange(most) < copies[:, t, None])).sum(axis=1)
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
    per_task: Sequence[Sequence[float]],
    resamples: int = RESAMPLES,
    level: float = LEVEL,
    seed: int = SEED,
    tasks: bool = False,
) -> tuple[float, float]:
    """Percentile bootstrap interval of `task_mean`, resampling rows within each task, and with
    `tasks` the tasks as well (two-level)."""
    means = _resampled_means(_checked(per_task), resamples, seed, tasks)
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def paired_interval(
    a: Sequence[Sequence[float]],
    b: Sequence[Sequence[float]],
    resamples: int = RESAMPLES,
    level: float = LEVEL,
    seed: int = SEED,
    tasks: bool = False,
) -> tuple[float, float, float]:
    """The difference task_mean(a) − task_mean(b) and its paired bootstrap interval (with `tasks`,
    two-level): row i of a task in `a` and row i of the same task in `b` are the same test row."""
    diff = _differences(a, b)
    low, high = bootstrap_interval(diff, resamples, level, seed, tasks)
    return task_mean(diff), low, high


def _differences(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]]) -> list[np.ndarray]:
    a, b = _checked(a), _checked(b)
    if [len(x) for x in a] != [len(x) for x in b]:
        raise ValueError("paired scores must cover the same rows of the same tasks")
    return [x - y for x, y in zip(a, b)]


def signs(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]], tie: float = 1e-9) -> dict[str, int]:
    """On how many tasks the mean of `a` is above, level with (within `tie`) and below that of `b`,
    over the same rows."""
    diffs = [float(d.mean()) for d in _differences(a, b)]
    return {
        "up": sum(bool(d > tie) for d in diffs),
        "tied": sum(bool(abs(d) <= tie) for d in diffs),
        "down": sum(bool(d < -tie) for d in diffs),
    }


def wilson_interval(hits: float, n: int, level: float = LEVEL) -> tuple[float, float]:
    """Wilson's score interval of a proportion of `hits` in `n` trials."""
    if n < 1:
        raise ValueError("a proportion needs at least one trial")
    z = float(norm.ppf(1 - (1 - level) / 2))
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    low = 0.0 if hits == 0 else max(0.0, centre - half)  # exactly 0 and 1 at the ends, not 1e-19 off
    high = 1.0 if hits == n else min(1.0, centre + half)
    return low, high


def proportion_interval(
    per_task: Sequence[Sequence[float]], level: float = LEVEL, seed: int = SEED, tasks: bool = False
) -> tuple[float, float]:
    """`bootstrap_interval` of a 0/1 measure, except where every row is 0 or every row is 1: there
    the bootstrap has nothing to vary, and the interval is Wilson's over the pooled rows."""
    rows = np.concatenate(_checked(per_task))
    if rows.min() == rows.max() and rows[0] in (0.0, 1.0):
        return wilson_interval(float(rows.sum()), len(rows), level)
    return bootstrap_interval(per_task, level=level, seed=seed, tasks=tasks)


def pooled_ratio_interval(
    hits: Sequence[np.ndarray],
    counts: Sequence[np.ndarray],
    resamples: int = RESAMPLES,
    level: float = LEVEL,
    seed: int = SEED,
    tasks: bool = False,
) -> tuple[float, float] | None:
    """Percentile bootstrap interval of a rate pooled over each task's prompts: per task,
    `hits` and `counts` are (prompts, parts) arrays (a part: one layer, say); the statistic is the
    mean over every (task, part) with a count of summed hits / summed counts. Prompts are resampled
    within each task, so the interval is over the prompts the tasks happen to have; with `tasks`,
    the tasks are drawn with replacement first (two-level, as in `bootstrap_interval`). None when
    no task has a prompt."""
    if not len(hits):
        return None
    rng = np.random.default_rng(seed)
    copies = _copies(rng, len(hits), resamples, tasks)
    total, cells = np.zeros(resamples), np.zeros(resamples)
    for t, (h, c) in enumerate(zip(hits, counts)):
        h, c = np.asarray(h, dtype=float), np.asarray(c, dtype=float)
        most = int(copies[:, t].max())
        if len(h) == 0 or most == 0:
            continue
        picks = rng.integers(0, len(h), size=(resamples, most, len(h)))
        summed_h, summed_c = h[picks].sum(axis=2), c[picks].sum(axis=2)  # (resamples, copy, parts)
        defined = (summed_c > 0) & (np.arange(most) < copies[:, t, None])[:, :, None]
        total += np.where(defined, summed_h / np.where(summed_c > 0, summed_c, 1), 0).sum(axis=(1, 2))
        cells += defined.sum(axis=(1, 2))
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
