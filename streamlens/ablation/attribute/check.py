"""Checking an estimate against the exact engine: rank units by estimate, re-measure the top ones
(`verify`), and score the agreement (Spearman, Pearson with CIs over texts, recall of the top K)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from streamlens import metrics as M
from streamlens import stats
from streamlens.ablation.attribute.common import metric_name
from streamlens.ablation.sweeps import evaluate
from streamlens.ablation.options import EvalOptions
from streamlens.ablation.spec import Ablation, Progress
from streamlens.data import TokenBatch
from streamlens.model import Model
from streamlens.results import AblationResult


def ranking(estimate: AblationResult, metric: str | None = None) -> list[int]:
    """Unit rows of an estimate, largest |estimated effect| first (with GradDrop: the larger of
    |estimate| and the cancellation score)."""
    column = estimate.metrics.index(metric_name(estimate, metric))
    score = estimate.values[:, column].abs()
    if estimate.cancellation is not None:
        score = torch.maximum(score, estimate.cancellation[:, column])
    return [int(i) for i in torch.argsort(score, descending=True, stable=True)]


def verify(
    model: Model,
    batch: TokenBatch,
    estimate: AblationResult,
    top: int | None = None,
    metric: str | None = None,
    options: EvalOptions | None = None,
    *,
    progress: Progress | None = None,
    command: str | None = None,
    **changes: Any,
) -> AblationResult:
    """Measure exactly (`evaluate`) the `top` units with the largest estimated effect on `metric`
    (default: the estimate's first metric; `top` None: every unit), largest first.

    Uses the estimate's method and the options' seed, so means and donors are the estimate's.
    """
    order = ranking(estimate, metric)
    if top is not None:
        if top < 1:
            raise ValueError(f"verify top {top} must be at least 1")
        order = order[:top]
    specs = [Ablation(estimate.sites[row], estimate.methods[row], "total") for row in order]
    options = EvalOptions.of(options, **changes)
    if options.metrics is None:
        options = EvalOptions.of(options, metrics=estimate.metrics)
    return evaluate(model, batch, specs, options, progress=progress, command=command)



@dataclass(frozen=True)
class Agreement:
    """How well an estimate ranks and sizes the units an exact run measured (on their common units).

    `spearman`, `pearson`: (value, ci_low, ci_high) over units, 95% bootstrap CIs resampling texts
    (both results' per-text values drawn together); `recall`: the fraction of the exact top `top`
    units (most damaging) found among the estimated top `among`; `max_abs_error`: largest
    |estimate - exact| of a unit's mean.
    """

    metric: str
    n_units: int
    spearman: tuple[float, float, float]
    pearson: tuple[float, float, float]
    recall: float
    top: int
    among: int
    max_abs_error: float


def agreement(estimate: AblationResult, exact: AblationResult, metric: str = "loss_increase", top: int = 10,
              among: int = 20, n_boot: int = 1000, seed: int = 0) -> Agreement:
    """Spearman and Pearson correlation between estimated and exact effects (with CIs), and recall
    of the exact top `top` among the estimated top `among`."""
    metric_name(estimate, metric), metric_name(exact, metric)
    common = [unit for unit in exact.units if unit in estimate.units]
    if len(common) < 3:
        raise ValueError(f"estimate and exact result share {len(common)} units: need at least 3 to correlate")
    if estimate.n_texts != exact.n_texts:
        raise ValueError(f"estimate has {estimate.n_texts} texts and exact {exact.n_texts}: use the same batch")

    def pick(result: AblationResult) -> torch.Tensor:  # [unit, text] of the common units
        return result.per_text[[result.units.index(u) for u in common], result.metrics.index(metric)]

    guess, truth = pick(estimate), pick(exact)
    rho = stats.correlation_ci(guess, truth, "spearman", n_boot=n_boot, seed=seed)
    r = stats.correlation_ci(guess, truth, "pearson", n_boot=n_boot, seed=seed)
    damage_guess, damage_truth = M.damage(metric, guess.mean(-1)), M.damage(metric, truth.mean(-1))
    top = min(top, len(common))
    found = set(torch.argsort(damage_truth, descending=True)[:top].tolist())
    found &= set(torch.argsort(damage_guess, descending=True)[:among].tolist())
    return Agreement(metric, len(common), rho, r, len(found) / top, top, among,
                     float((guess.mean(-1) - truth.mean(-1)).abs().max()))

