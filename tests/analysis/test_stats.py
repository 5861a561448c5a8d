"""Bootstrap intervals over test rows, paired differences, and rank correlation."""

import math

import numpy as np
import pytest

from lorlib_ui.analysis.stats import bootstrap_interval, paired_interval, pooled_ratio_interval, spearman, task_mean


def test_the_interval_covers_the_mean_and_shrinks_with_more_rows():
    rng = np.random.default_rng(1)
    small = [rng.binomial(1, 0.3, 20).astype(float), rng.binomial(1, 0.6, 20).astype(float)]
    large = [rng.binomial(1, 0.3, 500).astype(float), rng.binomial(1, 0.6, 500).astype(float)]
    widths = []
    for rows in (small, large):
        low, high = bootstrap_interval(rows)
        assert low < task_mean(rows) < high
        widths.append(high - low)
    assert widths[1] < widths[0] / 3  # about 1/sqrt(25) as wide
    # the normal approximation for a mean of two proportions, for scale
    p = np.array([x.mean() for x in small])
    se = math.sqrt(sum(p * (1 - p) / 20)) / 2
    assert widths[0] == pytest.approx(2 * 1.96 * se, rel=0.25)


def test_a_pooled_rate_interval_covers_the_rate_and_shrinks_with_more_prompts():
    """Per task, prompts of several tokens at two layers; the rate is hits over tokens pooled over
    a task's prompts, averaged over (task, layer); layers without a count do not enter."""
    rng = np.random.default_rng(2)

    def prompts(n, p):
        counts = rng.integers(5, 15, size=(n, 2)).astype(float)
        return rng.binomial(counts.astype(int), p).astype(float), counts

    widths = []
    for n in (10, 250):
        (h1, c1), (h2, c2) = prompts(n, 0.2), prompts(n, 0.7)
        c2[:, 1] = 0  # the second task has no count at the second layer
        rate = np.mean(
            [h1[:, 0].sum() / c1[:, 0].sum(), h1[:, 1].sum() / c1[:, 1].sum(), h2[:, 0].sum() / c2[:, 0].sum()]
        )
        low, high = pooled_ratio_interval([h1, h2], [c1, c2])
        assert low < rate < high
        widths.append(high - low)
    assert widths[1] < widths[0] / 3
    assert pooled_ratio_interval([np.ones((3, 2))], [np.ones((3, 2))]) == (1.0, 1.0)
    assert pooled_ratio_interval([np.zeros((0, 2))], [np.zeros((0, 2))]) is None


def test_each_task_weighs_the_same():
    assert task_mean([[1.0, 1.0, 1.0, 1.0], [0.0]]) == 0.5
    assert bootstrap_interval([[1.0] * 4, [0.0]]) == (0.5, 0.5)  # no spread: a point


def test_paired_differences_cancel_what_both_share():
    """Two routers that differ by a constant on every row: the paired interval is that constant,
    however much the rows vary; unpaired, the spread would swamp it."""
    rng = np.random.default_rng(0)
    rows = [rng.normal(0, 5, 40), rng.normal(-3, 5, 40)]
    better = [r + 0.1 for r in rows]
    diff, low, high = paired_interval(better, rows)
    assert diff == pytest.approx(0.1) and low == pytest.approx(0.1) and high == pytest.approx(0.1)
    noisy = [r + 0.1 + rng.normal(0, 0.5, 40) for r in rows]
    diff, low, high = paired_interval(noisy, rows)
    assert low < diff < high and high - low < 0.5
    with pytest.raises(ValueError):
        paired_interval([[1.0, 2.0]], [[1.0]])


def test_spearman_ranks_and_refuses_constants():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 400]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)  # 1 - 6·2 / (4·15)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3])) and math.isnan(spearman([1, 2], [1, 2]))
    assert spearman([1, 2, float("nan"), 3, 4], [1, 2, 5, 3, 4]) == pytest.approx(1.0)
