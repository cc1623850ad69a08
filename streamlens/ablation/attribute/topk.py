"""The exact top K for less: measure a random calibration sample and the units with the largest
estimates exactly, bound every other unit by a split-conformal error model, and measure in the
order of that bound until no unmeasured unit can still enter the top K.

The rule (damage D: the metric oriented so that larger is worse, `metrics.damage`; E: the estimated
damage; s(u) = |E(u)| + median over units of |E|, the error scale, so that a unit with a large
estimate may err by more and one with a tiny estimate still gets an interval):

1. measure the K units with the largest E (the candidates) and a calibration sample C of m units
   drawn uniformly at random (seeded) from the others, the pool P;
2. conformal scores r(u) = (D(u) - E(u)) / s(u) on C; q = the ceil((m + 1)(1 - alpha))-th smallest
   (needs m >= (1 - alpha) / alpha: 19 for alpha = 0.05, where q is the largest score);
3. upper bound U(u) = E(u) + q s(u); measure the unmeasured units of largest U, K // 2 at a time,
   until every unmeasured U is below T, the K-th largest measured D (settled), or every unit is
   measured.

The guarantee (split conformal, Vovk et al. 2005; Lei et al. 2018): C is a uniform sample of P, so
a unit drawn at random from the rest of P is exchangeable with C, and P(D(u) > U(u)) <= alpha; the
expected number of uncalibrated pool units above their bound is at most alpha |P \\ C|. It is a
per-unit, marginal guarantee, not a simultaneous one: the top K returned is the exact one unless
one of those (expected alpha |P \\ C|) units also exceeds T; and the units left unmeasured are the
pool's smallest U, not a random draw. The tests hold the rule to the full sweep's top K on tiny
models for random seeds, and `benchmarks/bench_estimates.py replay` counts, on SmolLM2's saved
sweeps, how often it returns the sweep's top K and at what cost.

One `Engine` serves every round: the means are computed once, and the clean pass is reused while
the texts fit in one chunk (`batch_size`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from streamlens import metrics as M
from streamlens.ablation.attribute.common import metric_name
from streamlens.ablation.engine import Engine
from streamlens.ablation.options import EvalOptions
from streamlens.ablation.spec import Ablation, Progress
from streamlens.data import TokenBatch
from streamlens.model import Model
from streamlens.results import AblationResult
from streamlens.stats import bootstrap_mean_ci


@dataclass(frozen=True)
class ExactTop:
    """An exact-top-K run: `result` holds every unit (rows `measured` exact, the rest the estimate),
    `top` the exact top K (most damaging first), `evaluations` the exact unit evaluations it took
    (against `n_units` for the full sweep), `calibration` the randomly drawn units, `quantile` q and
    `alpha` of the error model, `settled` whether the bound stopped it with units left unmeasured."""

    result: AblationResult
    metric: str
    top: tuple[str, ...]
    evaluations: int
    n_units: int
    calibration: tuple[str, ...]
    quantile: float
    alpha: float
    settled: bool


@dataclass(frozen=True)
class Settled:
    """What `settle` found: {row: exact damage} of every measured row, the calibration rows, q, and
    whether the bound stopped it with rows left unmeasured."""

    damage: dict[int, float]
    calibration: tuple[int, ...]
    quantile: float
    settled: bool

    def top(self, k: int) -> list[int]:
        """The k measured rows of largest exact damage, largest first."""
        return sorted(self.damage, key=lambda row: -self.damage[row])[:k]


def min_calibration(alpha: float) -> int:
    """The smallest calibration sample whose conformal quantile is finite: m >= (1 - alpha) / alpha."""
    return math.ceil((1 - alpha) / alpha - 1e-9)


def conformal_quantile(scores: Sequence[float], alpha: float) -> float:
    """The ceil((m + 1)(1 - alpha))-th smallest of m scores: for a new score exchangeable with them,
    P(new > quantile) <= alpha. +inf when m is too small (`min_calibration`)."""
    rank = math.ceil((len(scores) + 1) * (1 - alpha) - 1e-9)
    return math.inf if rank > len(scores) else sorted(scores)[rank - 1]


def error_scale(estimated: torch.Tensor) -> torch.Tensor:
    """s(u) = |E(u)| + median |E| (the smallest positive |E| if the median is 0): [unit]."""
    size = estimated.abs().double()
    floor = size.median()
    if floor <= 0:
        floor = size[size > 0].min() if (size > 0).any() else torch.tensor(1.0, dtype=torch.float64)
    return size + floor


def calibration_rows(estimated: torch.Tensor, top: int, size: int, seed: int,
                     exclude: Sequence[int] = ()) -> tuple[int, ...]:
    """`size` rows drawn uniformly (seeded) from all but the `top` of largest estimate and `exclude`."""
    candidates = set(torch.argsort(estimated, descending=True, stable=True)[:top].tolist()) | set(exclude)
    pool = [row for row in range(len(estimated)) if row not in candidates]
    if size > len(pool):
        raise ValueError(f"calibration {size} is more than the {len(pool)} units outside the top {top}")
    drawn = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))[:size]
    return tuple(sorted(pool[i] for i in drawn.tolist()))


def settle(estimated: torch.Tensor, measure: Callable[[list[int]], list[float]], top: int,
           calibration: Sequence[int], alpha: float, always: Sequence[int] = ()) -> Settled:
    """The rule of the module docstring on damages: `measure(rows)` returns the exact damages of those
    rows; `always`: rows measured in the first round too (e.g. a stratum the error model does not
    cover). Step 1 measures the `top` candidates, `calibration` and `always`; then rounds of top // 2."""
    scale = error_scale(estimated)
    first = list(dict.fromkeys([*torch.argsort(estimated, descending=True, stable=True)[:top].tolist(),
                                *calibration, *always]))
    damage = dict(zip(first, measure(first)))
    scores = [(damage[row] - float(estimated[row])) / float(scale[row]) for row in calibration]
    quantile = conformal_quantile(scores, alpha)
    bound = estimated.double() + quantile * scale
    order = [int(i) for i in torch.argsort(bound, descending=True, stable=True)]
    while len(damage) < len(order):
        threshold = sorted(damage.values(), reverse=True)[top - 1] if len(damage) >= top else -math.inf
        rest = [row for row in order if row not in damage]
        if float(bound[rest[0]]) < threshold:
            return Settled(damage, tuple(calibration), quantile, True)
        rows = rest[: max(1, top // 2)]
        damage.update(zip(rows, measure(rows)))
    return Settled(damage, tuple(calibration), quantile, False)


def exact_top(
    model: Model,
    batch: TokenBatch,
    estimate: AblationResult,
    top: int = 10,
    metric: str | None = None,
    options: EvalOptions | None = None,
    *,
    calibration: int | None = None,
    alpha: float = 0.05,
    progress: Progress | None = None,
    command: str | None = None,
    **changes: Any,
) -> ExactTop:
    """Settle the exact top `top` units of `estimate` on `metric` (module docstring: the rule and
    what it guarantees), measuring `calibration` random units to calibrate the error model (None:
    the fewest that give a finite bound, `min_calibration(alpha)`, or the whole pool if it is smaller:
    then the bound is infinite and every unit is measured).

    Uses the estimate's method and the options' seed (means, donors and the calibration draw), so the
    measured rows carry the numbers `evaluate` gives them.
    """
    name = metric_name(estimate, metric)
    n_units = len(estimate.units)
    if isinstance(top, bool) or not isinstance(top, int) or not 1 <= top <= n_units:
        raise ValueError(f"exact top {top!r} must be from 1 to the {n_units} units estimated")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha {alpha} must be between 0 and 1 (exclusive)")
    if calibration is None:
        calibration = min(min_calibration(alpha), n_units - top)
    elif calibration < min_calibration(alpha):
        raise ValueError(f"calibration {calibration} is too small for alpha {alpha}: the conformal bound needs at "
                         f"least {min_calibration(alpha)} units")
    options = EvalOptions.of(EvalOptions.of(options, **changes), metrics=estimate.metrics)
    column = estimate.metrics.index(name)
    estimated = M.damage(name, estimate.values[:, column])
    drawn = calibration_rows(estimated, top, calibration, options.seed)
    engine = Engine.of(model, batch, options)
    warm(engine, [Ablation(sites, method, "total") for sites, method in zip(estimate.sites, estimate.methods)])
    measured: dict[int, torch.Tensor] = {}  # row -> per-text values [metric, text]

    def measure(rows: list[int]) -> list[float]:
        specs = [Ablation(estimate.sites[row], estimate.methods[row], "total") for row in rows]
        with options.torch_threads():
            per_text = engine.per_text(specs, progress)
        measured.update(zip(rows, per_text))
        return [float(M.damage(name, values[column].mean())) for values in per_text]

    found = settle(estimated, measure, top, drawn, alpha)
    result = merged(estimate, measured, options)
    return ExactTop(result, name, tuple(estimate.units[row] for row in found.top(top)), len(measured), n_units,
                    tuple(estimate.units[row] for row in drawn), found.quantile, alpha, found.settled)


def warm(engine: Engine, specs: list[Ablation]) -> None:
    """Compute the means of every unit's writes once, and the first clean chunk with every donor write
    (`Engine.passes` does both before its first group), so that later rounds reuse them instead of
    repeating a forward over the texts each round."""
    with torch.inference_mode():
        next(iter(engine.passes(specs)), None)


def merged(estimate: AblationResult, measured: dict[int, torch.Tensor], options: EvalOptions) -> AblationResult:
    """The estimate with the measured rows' values, CIs and per-text values replaced by exact ones
    (the same bootstrap replicates as `evaluate`: the seed's draws serve every row)."""
    values, low, high, per_text = (t.clone() for t in (estimate.values, estimate.ci_low, estimate.ci_high,
                                                         estimate.per_text))
    flags = torch.zeros(len(estimate.units), dtype=torch.bool)
    error_bar = None if estimate.error_bar is None else estimate.error_bar.clone()
    if measured:
        rows = sorted(measured)
        exact = torch.stack([measured[row] for row in rows]).double()
        mean, exact_low, exact_high = bootstrap_mean_ci(exact, n_boot=options.n_boot, seed=options.seed)
        values[rows], low[rows], high[rows], per_text[rows] = mean, exact_low, exact_high, exact
        flags[rows] = True
        if error_bar is not None:
            error_bar[rows] = 0.0
    return dataclasses.replace(estimate, values=values, ci_low=low, ci_high=high, per_text=per_text,
                               error_bar=error_bar, measured=flags)
