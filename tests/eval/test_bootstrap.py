"""Percentile bootstrap over sites: degenerate, seeded, covering, paired, shrinking."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.errors import PipelineError
from pipeline.eval.bootstrap import bootstrap_ci, paired_ppl_bootstrap

SMALL = np.array([1.0, 2.0, 4.0, 8.0, 3.0, 5.0, 0.5, 7.0, 2.5, 6.0])  # mean 3.9
PINNED_MEAN = (2.5, 5.35)  # bootstrap_ci(SMALL, seed=0): 1000 resamples, 95%
PINNED_MEDIAN = (1.5, 6.0)  # bootstrap_ci(SMALL, np.median, n_resamples=500, seed=3)


def test_all_sites_equal_give_a_zero_width_interval_at_the_value():
    values = np.full(37, 0.1)
    low, high = bootstrap_ci(values)
    assert low == high == np.mean(values)
    nll = np.full((23, 5), 2.7)
    boot = paired_ppl_bootstrap(nll, np.full((23, 5), 3.1))
    assert np.all(boot.ppl_ci == np.exp(2.7)) and np.all(boot.base_ppl_ci == np.exp(3.1))
    assert np.all(boot.delta_nll_ci[:, 0] == boot.delta_nll_ci[:, 1])
    np.testing.assert_allclose(boot.delta_nll_ci, -0.4, rtol=1e-12)


def test_seeded_bounds_are_pinned():
    assert bootstrap_ci(SMALL, seed=0) == bootstrap_ci(SMALL, seed=0)
    assert bootstrap_ci(SMALL, seed=0) != bootstrap_ci(SMALL, seed=1)
    np.testing.assert_allclose(bootstrap_ci(SMALL, seed=0), PINNED_MEAN, rtol=1e-12)
    np.testing.assert_allclose(bootstrap_ci(SMALL, np.median, n_resamples=500, seed=3), PINNED_MEDIAN, rtol=1e-12)


def test_a_stat_without_axis_takes_the_slow_path_with_the_same_resamples():
    slow = bootstrap_ci(SMALL, lambda v: float(np.mean(v)), n_resamples=300, seed=5)
    np.testing.assert_allclose(slow, bootstrap_ci(SMALL, n_resamples=300, seed=5), rtol=1e-12)


def test_95_percent_interval_covers_the_true_mean():
    rng = np.random.default_rng(1234)
    samples = rng.normal(loc=2.0, scale=3.0, size=(200, 100))
    covered = [lo <= 2.0 <= hi for lo, hi in (bootstrap_ci(s, seed=i) for i, s in enumerate(samples))]
    assert 0.90 <= np.mean(covered) <= 0.99


def test_interval_shrinks_as_sites_grow():
    rng = np.random.default_rng(7)
    widths = [np.diff(bootstrap_ci(rng.normal(size=n)))[0] for n in (50, 500, 5000)]
    assert widths[0] > 2 * widths[1] > 4 * widths[2]  # ~ 1/sqrt(n): a factor ~3.2 per step


def test_paired_reduction_of_identical_models_is_exactly_zero():
    nll = np.random.default_rng(0).gamma(2.0, 2.0, size=(40, 6))
    boot = paired_ppl_bootstrap(nll, nll.copy())
    assert np.all(boot.reduction_pct_ci == 0.0) and np.all(boot.delta_nll_ci == 0.0)
    assert np.all(boot.reduction_pct == 0.0) and not np.any(np.signbit(boot.reduction_pct_ci))
    np.testing.assert_allclose(boot.ppl_ci, boot.base_ppl_ci, rtol=1e-12)


def test_paired_intervals_match_the_one_dimensional_bootstrap_per_k():
    rng = np.random.default_rng(3)
    base = rng.gamma(2.0, 2.0, size=(60, 4))
    aug = base - 0.3 + 0.2 * rng.normal(size=base.shape)  # correlated with base, lower on average
    boot = paired_ppl_bootstrap(aug, base, n_resamples=400, level=0.9, seed=11)
    for k in range(4):
        def ppl(v):
            return float(np.exp(np.mean(v)))

        np.testing.assert_allclose(boot.ppl_ci[k], bootstrap_ci(aug[:, k], ppl, n_resamples=400, level=0.9, seed=11),
                                   rtol=1e-10)
        np.testing.assert_allclose(boot.delta_nll_ci[k], bootstrap_ci(aug[:, k] - base[:, k], n_resamples=400,
                                                                      level=0.9, seed=11), rtol=1e-10)
    np.testing.assert_allclose(boot.reduction_pct, 100 * (1 - boot.ppl / boot.base_ppl), rtol=1e-10)
    # pairing resolves the consistent per-site gain although the two ppl intervals overlap
    assert np.all(boot.reduction_pct_ci[:, 0] > 0) and np.all(boot.ppl_ci[:, 1] > boot.base_ppl_ci[:, 0])
    single = paired_ppl_bootstrap(aug, None, n_resamples=400, level=0.9, seed=11)
    np.testing.assert_allclose(single.ppl_ci, boot.ppl_ci, rtol=1e-12)
    assert single.base_ppl_ci is None and single.reduction_pct_ci is None


def test_bad_inputs_raise_the_project_error():
    with pytest.raises(PipelineError, match="1-D"):
        bootstrap_ci(np.zeros((3, 2)))
    with pytest.raises(PipelineError, match="n_resamples"):
        bootstrap_ci(SMALL, n_resamples=0)
    with pytest.raises(PipelineError, match="level"):
        bootstrap_ci(SMALL, level=1.0)
    with pytest.raises(PipelineError, match="shape"):
        paired_ppl_bootstrap(np.zeros((4, 2)), np.zeros((4, 3)))
