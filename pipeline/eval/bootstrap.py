"""Percentile bootstrap over evaluation sites: intervals for ppl-at-k and its reduction.

Method. Draw `n_resamples` resamples of the n sites with replacement (each an index
vector of length n), compute the statistic on each, and report the (1-level)/2 and
(1+level)/2 quantiles of those statistics (the *percentile* interval, numpy's linear
interpolation between order statistics). Nothing is bias-corrected (no BCa); for means
of a few hundred sites or more the percentile interval is what one wants.

Resampling unit. The unit is the *site*: a site's K token positions are drawn together
(one index per site for every k, so the columns k stay aligned and the intervals of
different k are computed on the same resamples). In the paired case the Base alone and
the augmented model are evaluated on the SAME resampled sites, so the interval of their
difference reflects the per-site correlation between them (much narrower than two
independent intervals would suggest). Caveat: several sites of one document share
context and are correlated; treating them as independent makes the intervals somewhat
too narrow when `sites_per_doc > 1` (resampling whole documents would be the remedy).

Seed. Resamples come from `numpy.random.default_rng(seed)`; the draw depends only on
(seed, number of sites, n_resamples), so the same seed gives identical bounds, and every
model scored on the same site plan is resampled with the same site sets.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import numpy as np

from pipeline.errors import PipelineError

_BLOCK = 1 << 22
"""Index-matrix elements drawn at a time (32 MiB of int64): bounds memory for large n."""


def _index_blocks(n: int, n_resamples: int, seed: int) -> Iterator[np.ndarray]:
    """The (n_resamples, n) matrix of resampled site indices, in row blocks `(r, n)`.

    The block size depends on n only, so the draw is a function of (seed, n, n_resamples).
    """
    if n_resamples < 1:
        raise PipelineError(f"n_resamples must be >= 1, got {n_resamples}")
    rng = np.random.default_rng(seed)
    rows = max(1, _BLOCK // n)
    for start in range(0, n_resamples, rows):
        yield rng.integers(0, n, size=(min(rows, n_resamples - start), n))


def _interval(stats: np.ndarray, level: float) -> np.ndarray:
    """Percentile interval of resampled statistics `(R, ...)` -> `(..., 2)` as (low, high)."""
    if not 0.0 < level < 1.0:
        raise PipelineError(f"level must be in (0, 1), got {level}")
    tail = (1.0 - level) / 2.0
    return np.moveaxis(np.quantile(stats, [tail, 1.0 - tail], axis=0), 0, -1)


def _rowwise(stat: Callable[..., object], samples: np.ndarray) -> np.ndarray:
    """`stat` of each row of `(r, n)`: one vectorised call if `stat` takes `axis=`, else a loop."""
    try:
        out = np.asarray(stat(samples, axis=1), dtype=np.float64)
        if out.shape == (samples.shape[0],):
            return out
    except TypeError:  # a stat without an `axis` argument: the slower path below
        pass
    return np.array([stat(row) for row in samples], dtype=np.float64)


def bootstrap_ci(values: np.ndarray, stat: Callable[..., object] = np.mean, *, n_resamples: int = 1000,
                 level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile interval `(low, high)` of `stat` over per-site `values` `(n,)`.

    `stat` is called as `stat(samples, axis=1)` on an `(r, n)` block of resamples when it
    accepts `axis` (np.mean, np.median, ...), else once per resample.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or len(values) == 0:
        raise PipelineError(f"bootstrap_ci needs a non-empty 1-D array, got shape {values.shape}")
    stats = np.concatenate([_rowwise(stat, values[idx]) for idx in _index_blocks(len(values), n_resamples, seed)])
    low, high = _interval(stats, level)
    return float(low), float(high)


def _resampled_means(x: np.ndarray, n_resamples: int, seed: int) -> np.ndarray:
    """Column means of each resample of the rows of `x` `(n, C)` -> `(n_resamples, C)`.

    A resample's mean is counts @ x / n (counts: how often each site was drawn), one matrix
    product for all columns. Columns are centred on the first site first, so a constant
    column gives exactly its value (and precision does not depend on the NLL's offset).
    """
    n = x.shape[0]
    shift = x[0]
    centred = x - shift  # (n, C)
    out = []
    for idx in _index_blocks(n, n_resamples, seed):
        r = idx.shape[0]
        counts = np.bincount((idx + n * np.arange(r)[:, None]).ravel(), minlength=r * n)
        out.append(counts.reshape(r, n).astype(np.float64) @ centred / n)  # (r, C)
    return shift + np.concatenate(out)


@dataclasses.dataclass(frozen=True)
class PplBootstrap:
    """Per-k point estimates `(K,)` and percentile intervals `(K, 2)` (low, high).

    For one model alone (`paired_ppl_bootstrap(nll, None)`) only `ppl`/`ppl_ci` are set.
    """

    ppl: np.ndarray
    """exp(mean NLL over sites) of the augmented model."""
    ppl_ci: np.ndarray
    base_ppl: np.ndarray | None = None
    """exp(mean NLL) of the Base alone on the same sites."""
    base_ppl_ci: np.ndarray | None = None
    reduction_pct: np.ndarray | None = None
    """100 * (1 - ppl / base_ppl): positive when the augmentation helps."""
    reduction_pct_ci: np.ndarray | None = None
    delta_nll: np.ndarray | None = None
    """mean over sites of (NLL augmented - NLL Base): negative when the augmentation helps."""
    delta_nll_ci: np.ndarray | None = None
    ppl_gap: np.ndarray | None = None
    """ppl - base_ppl (in ppl units, as paper 000 reports differences): negative when it helps."""
    ppl_gap_ci: np.ndarray | None = None


def _reduction_pct(delta: np.ndarray) -> np.ndarray:
    # 1 - exp(a)/exp(b) = -expm1(a - b); written 0 - x so that a == b gives +0.0, not -0.0
    return 100.0 * (0.0 - np.expm1(delta))


def paired_ppl_bootstrap(aug: np.ndarray, base: np.ndarray | None, *, n_resamples: int = 1000,
                         level: float = 0.95, seed: int = 0) -> PplBootstrap:
    """Intervals of ppl@k, of the Base's, of the reduction and of the NLL difference.

    `aug`, `base`: per-site NLLs `(n_sites, K)`, row i of both the same site. Every
    resample draws sites (rows) once and uses them for `aug` and `base` alike (paired) and
    for every k. `base=None` gives the intervals of `aug` alone.
    """
    aug = np.asarray(aug, dtype=np.float64)
    if aug.ndim != 2 or aug.shape[0] == 0:
        raise PipelineError(f"per-site NLLs must be (n_sites > 0, K), got shape {aug.shape}")
    if base is None:
        means = _resampled_means(aug, n_resamples, seed)
        return PplBootstrap(ppl=np.exp(aug.mean(axis=0)), ppl_ci=_interval(np.exp(means), level))
    base = np.asarray(base, dtype=np.float64)
    if base.shape != aug.shape:
        raise PipelineError(f"augmented and Base NLLs differ in shape: {aug.shape} vs {base.shape}")
    k = aug.shape[1]
    # the difference gets its own columns (not m_aug - m_base): the same sum, but exactly 0
    # when aug == base, whatever the rounding of the product
    diff = aug - base
    means = _resampled_means(np.concatenate([aug, base, diff], axis=1), n_resamples, seed)  # (R, 3K)
    m_aug, m_base, m_diff = means[:, :k], means[:, k : 2 * k], means[:, 2 * k :]
    delta = diff.mean(axis=0)
    return PplBootstrap(
        ppl=np.exp(aug.mean(axis=0)), ppl_ci=_interval(np.exp(m_aug), level),
        base_ppl=np.exp(base.mean(axis=0)), base_ppl_ci=_interval(np.exp(m_base), level),
        reduction_pct=_reduction_pct(delta), reduction_pct_ci=_interval(_reduction_pct(m_diff), level),
        delta_nll=delta, delta_nll_ci=_interval(m_diff, level),
        ppl_gap=np.exp(aug.mean(axis=0)) - np.exp(base.mean(axis=0)),
        ppl_gap_ci=_interval(np.exp(m_aug) - np.exp(m_base), level),
    )
