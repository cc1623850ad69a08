"""`streamlens.stats` against scipy.stats and numpy on random data (ties included)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from streamlens import stats as S

scipy_stats = pytest.importorskip("scipy.stats")


def _random(*shape: int, seed: int = 0, ties: bool = False) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if ties:  # few distinct values: many ties
        return torch.randint(0, 4, shape, generator=generator).double()
    return torch.randn(*shape, dtype=torch.float64, generator=generator)


@pytest.mark.parametrize("ties", [False, True])
def test_ranks_match_scipy_rankdata(ties):
    values = _random(5, 17, seed=1, ties=ties)
    expected = scipy_stats.rankdata(values.numpy(), method="average", axis=-1)
    assert np.array_equal(S.ranks(values).numpy(), expected)


@pytest.mark.parametrize("ties", [False, True])
def test_spearman_and_pearson_match_scipy(ties):
    x, y = _random(6, 23, seed=2, ties=ties), _random(6, 23, seed=3, ties=ties)
    for row in range(6):
        rho = scipy_stats.spearmanr(x[row].numpy(), y[row].numpy()).statistic
        r = scipy_stats.pearsonr(x[row].numpy(), y[row].numpy()).statistic
        assert float(S.spearman(x, y)[row]) == pytest.approx(rho, abs=1e-12)
        assert float(S.pearson(x, y)[row]) == pytest.approx(r, abs=1e-12)
    assert torch.isnan(S.pearson(torch.ones(5), _random(5)))  # constant side: undefined, as in scipy


def test_percentile_interval_is_numpy_quantile():
    draws = _random(3, 1000, seed=4)
    low, high = S.percentile_interval(draws, 0.9)
    assert np.allclose(low.numpy(), np.quantile(draws.numpy(), 0.05, axis=-1), rtol=0, atol=1e-14)
    assert np.allclose(high.numpy(), np.quantile(draws.numpy(), 0.95, axis=-1), rtol=0, atol=1e-14)
    with pytest.raises(ValueError, match="level 1.5"):
        S.percentile_interval(draws, 1.5)


def test_bootstrap_mean_ci_is_the_loop_over_draws():
    per_text = _random(4, 30, seed=5)
    estimate, low, high = S.bootstrap_mean_ci(per_text, n_boot=200, seed=7)
    draws = S.bootstrap_indices(30, 200, 7)
    assert draws.shape == (200, 30) and torch.equal(draws, S.bootstrap_indices(30, 200, 7))
    means = np.stack([per_text.numpy()[:, index.numpy()].mean(-1) for index in draws], -1)  # [row, n_boot]
    assert np.allclose(low.numpy(), np.quantile(means, 0.025, axis=-1), atol=1e-12)
    assert np.allclose(high.numpy(), np.quantile(means, 0.975, axis=-1), atol=1e-12)
    assert torch.allclose(estimate, per_text.mean(-1)) and (low < estimate).all() and (estimate < high).all()


def test_correlation_ci_resamples_texts_for_both_sides():
    generator = torch.Generator().manual_seed(8)
    signal = torch.randn(12, 1, dtype=torch.float64, generator=generator)
    x = signal + 0.3 * torch.randn(12, 20, dtype=torch.float64, generator=generator)
    y = 2 * signal + 0.3 * torch.randn(12, 20, dtype=torch.float64, generator=generator)
    for kind, reference in (("spearman", scipy_stats.spearmanr), ("pearson", scipy_stats.pearsonr)):
        estimate, low, high = S.correlation_ci(x, y, kind, n_boot=300, seed=1)
        assert estimate == pytest.approx(reference(x.mean(-1).numpy(), y.mean(-1).numpy()).statistic, abs=1e-12)
        draws = S.bootstrap_indices(20, 300, 1)
        by_hand = [reference(x[:, d].mean(-1).numpy(), y[:, d].mean(-1).numpy()).statistic for d in draws]
        assert low == pytest.approx(np.quantile(by_hand, 0.025), abs=1e-12)
        assert high == pytest.approx(np.quantile(by_hand, 0.975), abs=1e-12)
        assert 0.5 < low < high <= 1 and estimate > 0.5
    with pytest.raises(ValueError, match="unknown correlation 'kendall'"):
        S.correlation_ci(x, y, "kendall")


def test_paired_difference_ci_sees_a_shift_that_unpaired_noise_hides():
    generator = torch.Generator().manual_seed(9)
    shared = 5 * torch.randn(40, dtype=torch.float64, generator=generator)  # text difficulty, common to a and b
    a = shared + 0.1 + 0.01 * torch.randn(40, dtype=torch.float64, generator=generator)
    b = shared
    difference, low, high = S.paired_difference_ci(a, b, n_boot=500, seed=0)
    assert float(difference) == pytest.approx(float((a - b).mean()), abs=1e-12)
    assert 0 < float(low) < 0.1 < float(high) < 0.2
    with pytest.raises(ValueError, match="same texts"):
        S.paired_difference_ci(a, b[:-1])


def test_no_values_give_empty_intervals_of_the_reduced_shape():
    """An evaluation of no specs ([0 unit, metric, text]) has no CIs to compute, not an error."""
    per_text = torch.zeros(0, 2, 5, dtype=torch.float64)
    estimate, low, high = S.bootstrap_mean_ci(per_text, n_boot=50, seed=0)
    assert estimate.shape == low.shape == high.shape == (0, 2)
