"""Statistics computed one way: bootstrap draws over texts, percentile intervals, ranks, correlations.

Every confidence interval in streamlens resamples *texts* (windows or prompts) with replacement,
never single predictions, and reads the interval off the bootstrap draws by percentiles:

    draws_b = statistic(texts resampled with `bootstrap_indices(n_texts, n_boot, seed)[b]`),
    (low, high) = quantiles (1 - level) / 2 and (1 + level) / 2 of the draws (linear interpolation).

The same seed gives the same draws everywhere, so numbers that must agree (a unit's CI in a sweep
and in a study) do. Ranks give ties their average rank (as `scipy.stats.rankdata`); Spearman's rho
is Pearson's r of the ranks (as `scipy.stats.spearmanr`). Only torch is imported; shapes are named in each docstring.
"""

from __future__ import annotations

import torch

CORRELATIONS = ("spearman", "pearson")


def bootstrap_indices(n: int, n_boot: int = 1000, seed: int = 0) -> torch.Tensor:
    """[n_boot, n] indices in 0..n-1 drawn with replacement from a generator seeded with `seed`."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, n, (n_boot, n), generator=generator)


def check_level(level: float) -> float:
    if not 0 < level < 1:
        raise ValueError(f"confidence level {level} must be between 0 and 1")
    return level


def percentile_interval(draws: torch.Tensor, level: float = 0.95, dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """(low, high): the (1 - level) / 2 and (1 + level) / 2 quantiles of `draws` along `dim`
    (linear interpolation, as `numpy.quantile`); each has `draws`' shape without `dim`."""
    alpha = (1 - check_level(level)) / 2
    if draws.numel() == 0:  # nothing to resample (e.g. an evaluation of no specs): empty intervals
        empty = draws.sum(dim)  # draws' shape without `dim`, all zeros
        return empty, empty.clone()
    return torch.quantile(draws, alpha, dim=dim), torch.quantile(draws, 1 - alpha, dim=dim)


def bootstrap_mean_ci(per_text: torch.Tensor, n_boot: int = 1000, seed: int = 0,
                      level: float = 0.95) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean over texts with a percentile bootstrap interval.

    Each replicate draws n_texts texts with replacement and averages their values; the same
    replicates serve every row, so rows (units) are compared on common draws.

    Args:
        per_text: [..., text] one value per text (e.g. a metric's per-text mean).

    Returns:
        (estimate, low, high), each [...] float64 on the CPU; `estimate` is the plain mean over texts.
        One text: low = high = estimate (no spread to resample).
    """
    check_level(level)
    values = per_text.double().cpu()
    estimate = values.mean(-1)
    if values.shape[-1] < 2:
        return estimate, estimate.clone(), estimate.clone()
    draws = values[..., bootstrap_indices(values.shape[-1], n_boot, seed)].mean(-1)  # [..., n_boot]
    low, high = percentile_interval(draws, level)
    return estimate, low, high


def ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks 1..n over the last axis, ties given their average rank (`scipy.stats.rankdata`), float64; shape of `values`."""
    values = values.double()
    ordered, order = values.sort(dim=-1, stable=True)
    n = values.shape[-1]
    starts = torch.ones_like(ordered, dtype=torch.bool)
    starts[..., 1:] = ordered[..., 1:] != ordered[..., :-1]
    group = starts.long().cumsum(-1) - 1  # tie group of each sorted entry, 0..groups-1
    position = torch.arange(n, dtype=torch.float64).expand_as(ordered)
    first = torch.full_like(ordered, float(n)).scatter_reduce(-1, group, position, "amin")
    last = torch.full_like(ordered, -1.0).scatter_reduce(-1, group, position, "amax")
    sorted_ranks = ((first + last) / 2 + 1).gather(-1, group)  # mean of first..last, 1-based
    return torch.empty_like(values).scatter_(-1, order, sorted_ranks)


def pearson(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Pearson's r over the last axis [...] (float64; NaN where x or y is constant)."""
    x, y = x.double(), y.double()
    x, y = x - x.mean(-1, keepdim=True), y - y.mean(-1, keepdim=True)
    return (x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1))


def spearman(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Spearman's rho over the last axis [...]: Pearson's r of the average ranks."""
    return pearson(ranks(x), ranks(y))


def correlation_ci(x: torch.Tensor, y: torch.Tensor,
                   kind: str = "spearman", n_boot: int = 1000, seed: int = 0,
                   level: float = 0.95) -> tuple[float, float, float]:
    """Correlation over units of the per-unit means of x, y [unit, text], with a bootstrap CI over texts.

    Each replicate resamples the texts once for both x and y (paired), averages each unit over the
    drawn texts and correlates the units; replicates where a side is constant (NaN) are dropped.

    Returns:
        (estimate, low, high): the correlation of x.mean(-1) and y.mean(-1), and the interval.
    """
    if kind not in CORRELATIONS:
        raise ValueError(f"unknown correlation {kind!r}: choose from {', '.join(CORRELATIONS)}")
    if x.shape != y.shape or x.dim() != 2:
        raise ValueError(f"correlation_ci needs two [unit, text] tensors of one shape, got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")
    function = spearman if kind == "spearman" else pearson
    estimate = float(function(x.mean(-1), y.mean(-1)))
    draws = bootstrap_indices(x.shape[-1], n_boot, seed)  # [n_boot, text]
    values = function(x[:, draws].mean(-1).T, y[:, draws].mean(-1).T)  # [n_boot]
    values = values[~torch.isnan(values)]
    if len(values) == 0:
        return estimate, float("nan"), float("nan")
    low, high = percentile_interval(values, level)
    return estimate, float(low), float(high)


def paired_difference_ci(a: torch.Tensor, b: torch.Tensor, n_boot: int = 1000,
                         seed: int = 0, level: float = 0.95) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean of a - b [..., text] over texts with a paired bootstrap CI (the same texts drawn for a and b).

    Returns:
        (difference, low, high), each [...]; `difference` = (a - b).mean(-1).
    """
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(f"paired values need the same texts: {a.shape[-1]} and {b.shape[-1]}")
    return bootstrap_mean_ci(a.double() - b.double(), n_boot, seed, level)

