"""Bootstrap intervals over test rows and over tasks, paired differences, sign counts, Wilson's
interval, and rank correlation."""

import math

import numpy as np
import pytest

from lorlib_ui.analysis.stats import (
    bootstrap_interval,
    paired_interval,
    pooled_ratio_interval,
    proportion_interval,
    signs,
    spearman,
    task_mean,
    wilson_interval,
)


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


def test_the_interval_over_tasks_is_the_bootstrap_of_task_means_when_rows_do_not_vary():
    """Tasks whose rows are all equal: resampling rows changes nothing, so the row-level interval is
    a point, and the two-level one is the bootstrap of the mean of 50 task means, ±1.96/√50 for
    task means drawn from N(0, 1)."""
    rng = np.random.default_rng(3)
    means = rng.normal(size=50)
    per_task = [np.full(10, m) for m in means]
    low, high = bootstrap_interval(per_task)
    assert low == pytest.approx(high) == pytest.approx(means.mean())
    low, high = bootstrap_interval(per_task, tasks=True)
    assert low < means.mean() < high
    assert high - low == pytest.approx(2 * 1.96 * means.std() / math.sqrt(50), rel=0.15)


def test_tasks_that_agree_give_an_interval_over_tasks_close_to_the_one_over_rows():
    rng = np.random.default_rng(4)
    alike = [rng.binomial(1, 0.4, 200).astype(float) for _ in range(8)]
    apart = [rng.binomial(1, p, 200).astype(float) for p in np.linspace(0.05, 0.95, 8)]
    rows_alike, tasks_alike = (np.subtract(*bootstrap_interval(alike, tasks=t)[::-1]) for t in (False, True))
    rows_apart, tasks_apart = (np.subtract(*bootstrap_interval(apart, tasks=t)[::-1]) for t in (False, True))
    assert tasks_alike < 1.6 * rows_alike  # little between-task spread to add
    assert tasks_apart > 3 * rows_apart  # tasks far apart: the claim about tasks is far less sure


def test_a_task_drawn_twice_gets_two_row_resamples():
    """Task A has rows 0 and 1, task B only 0. Drawn N ~ Bin(2, 1/2) times, A adds N row means
    m ~ {0, 1/2, 1} (var 1/8) and the statistic is their sum over 2. Independent resamples per
    copy give Var = (Var N / 4 + E N / 8) / 4 = 1/16; one resample shared by the copies would give
    Var(N m) / 4 = 5/64."""
    from lorlib_ui.analysis.stats import _resampled_means

    values = _resampled_means([np.array([0.0, 1.0]), np.zeros(2)], 40_000, 0, tasks=True)
    assert values.mean() == pytest.approx(0.25, abs=0.005)
    assert values.var() == pytest.approx(1 / 16, abs=0.003)


def test_paired_differences_over_tasks_and_their_sign_counts():
    rng = np.random.default_rng(5)
    base = [rng.normal(size=30) for _ in range(6)]
    shift = [0.5, 0.5, 0.5, 0.5, 0.0, -0.5]
    a = [b + s for b, s in zip(base, shift)]
    diff, low, high = paired_interval(a, base, tasks=True)
    assert diff == pytest.approx(np.mean(shift))
    assert low == pytest.approx(min(shift), abs=1e-9) or low >= min(shift)  # within the tasks' range
    assert high <= max(shift) + 1e-9 and low < diff < high
    assert paired_interval(a, base)[1:] == pytest.approx((diff, diff), abs=1e-9)  # rows: nothing varies
    assert signs(a, base) == {"up": 4, "tied": 1, "down": 1}
    with pytest.raises(ValueError):
        signs(a, [x[:5] for x in base])


def test_wilson_does_not_collapse_at_zero_or_one():
    z2 = 1.959963984540054**2
    assert wilson_interval(0, 255) == pytest.approx((0.0, z2 / (255 + z2)))  # Wilson's closed form at 0
    assert wilson_interval(255, 255) == pytest.approx((255 / (255 + z2), 1.0))
    low, high = wilson_interval(5, 10)
    assert low == pytest.approx(1 - high) and low < 0.5 < high
    nothing = [np.zeros(40)] * 6 + [np.zeros(15)]
    assert bootstrap_interval(nothing) == (0.0, 0.0)  # the percentile bootstrap has nothing to vary
    assert proportion_interval(nothing) == pytest.approx((0.0, z2 / (255 + z2)))
    assert proportion_interval(nothing, tasks=True) == pytest.approx((0.0, z2 / (255 + z2)))
    some = [np.array([0.0, 1.0, 0.0, 0.0])] * 3
    assert proportion_interval(some) == bootstrap_interval(some)  # where rows vary, the bootstrap


def test_a_pooled_rate_over_tasks_is_wider_when_tasks_differ():
    rng = np.random.default_rng(6)
    counts = [np.full((20, 2), 5.0) for _ in range(6)]
    hits = [rng.binomial(5, p, size=(20, 2)).astype(float) for p in np.linspace(0.1, 0.9, 6)]
    low, high = pooled_ratio_interval(hits, counts)
    wide_low, wide_high = pooled_ratio_interval(hits, counts, tasks=True)
    assert wide_low < low and wide_high > high
    assert (wide_high - wide_low) > 3 * (high - low)
