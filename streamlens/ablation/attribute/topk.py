"""The exact top K for less: measure units exactly in the order of their estimate until no unmeasured
unit can still enter the top K.

The stop rule (stated, and what the tests hold it to). Damage D = the metric oriented so that larger
is worse (`metrics.damage`); E(u) the estimated damage, D(u) the exact one. Units are measured in
decreasing E, a round at a time. After each round, over the measured set S:

    bound B = safety * max_{u in S} |D(u) - E(u)|       (the largest error seen, times `safety`)
    T       = the K-th largest D(u) in S
    settled : every unmeasured u has E(u) + B < T        (i.e. the next E in order + B < T)

The error model is calibrated, not proven: it assumes an unmeasured unit's error is at most `safety`
times the largest error among the measured ones, which are the units with the largest estimates
(where the estimators' errors are largest: see docs/estimates.md). The check: once settled, the next
`check` units in order are measured too, which updates B and T; the run stops only if it is still
settled, otherwise it goes on. With no settling, every unit ends up measured (the full sweep, but
in estimate order).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from streamlens import metrics as M
from streamlens.ablation.attribute.common import metric_name
from streamlens.ablation.sweeps import evaluate
from streamlens.ablation.options import EvalOptions
from streamlens.ablation.spec import Ablation, Progress
from streamlens.data import TokenBatch
from streamlens.model import Model
from streamlens.results import AblationResult


@dataclass(frozen=True)
class ExactTop:
    """An exact-top-K run: `result` holds every unit (rows `measured` exact, the rest the estimate),
    `top` the exact top K (most damaging first), `evaluations` the exact unit evaluations it took
    (against `n_units` for the full sweep), `bound` the error bound B at the stop, `settled` whether the
    bound stopped it (False: every unit was measured without the bound ever settling)."""

    result: AblationResult
    metric: str
    top: tuple[str, ...]
    evaluations: int
    n_units: int
    bound: float
    settled: bool


def settled(estimated: torch.Tensor, exact: dict[int, float], order: list[int], top: int,
            safety: float) -> tuple[bool, float]:
    """The stop rule on damages: (every unmeasured E + B < K-th largest measured D, B)."""
    errors = [abs(exact[row] - float(estimated[row])) for row in exact]
    bound = safety * max(errors)
    if len(exact) < top:
        return False, bound
    threshold = sorted(exact.values(), reverse=True)[top - 1]
    rest = [float(estimated[row]) for row in order if row not in exact]
    return (not rest or max(rest) + bound < threshold), bound


def settle(estimated: torch.Tensor, measure: Callable[[list[int]], list[float]], top: int, safety: float = 1.5,
           check: int = 3) -> tuple[dict[int, float], float, bool]:
    """The measuring loop of `exact_top` on damages: `measure(rows)` returns the exact damages of those
    rows. Returns ({row: exact damage} of the measured rows, the bound at the stop, whether the bound
    stopped it with units left unmeasured)."""
    order = [int(i) for i in torch.argsort(estimated, descending=True, stable=True)]
    damage: dict[int, float] = {}
    checking, round_size, bound, done = None, top, 0.0, False
    while not done and len(damage) < len(order):
        rows = [row for row in order if row not in damage][: (check if checking is not None else round_size)]
        damage.update(zip(rows, measure(rows)))
        round_size = max(1, top // 2)
        ok, bound = settled(estimated, damage, order, top, safety)
        if ok and (checking is not None or check == 0 or len(damage) == len(order)):
            done = True
        checking = len(damage) if ok else None
    return damage, bound, done and len(damage) < len(order)


def exact_top(
    model: Model,
    batch: TokenBatch,
    estimate: AblationResult,
    top: int = 10,
    metric: str | None = None,
    options: EvalOptions | None = None,
    *,
    safety: float = 1.5,
    check: int = 3,
    progress: Progress | None = None,
    command: str | None = None,
    **changes: Any,
) -> ExactTop:
    """Measure the units of `estimate` exactly, largest estimated damage first, until the exact top
    `top` on `metric` is settled (module docstring); rounds of `top` units, then `top // 2`.

    Uses the estimate's method and the options' seed, so means and donors are the estimate's.
    """
    name = metric_name(estimate, metric)
    n_units = len(estimate.units)
    if isinstance(top, bool) or not isinstance(top, int) or not 1 <= top <= n_units:
        raise ValueError(f"exact top {top!r} must be from 1 to the {n_units} units estimated")
    if not safety >= 1 or check < 0:
        raise ValueError(f"safety {safety} must be at least 1 and check {check} at least 0")
    options = EvalOptions.of(options, **changes)
    options = EvalOptions.of(options, metrics=estimate.metrics)
    column = estimate.metrics.index(name)
    estimated = M.damage(name, estimate.values[:, column])
    measured: dict[int, AblationResult] = {}

    def measure(rows: list[int]) -> list[float]:
        specs = [Ablation(estimate.sites[row], estimate.methods[row], "total") for row in rows]
        exact = evaluate(model, batch, specs, options, progress=progress, command=command)
        for index, row in enumerate(rows):
            measured[row] = _row(exact, index)
        return [float(M.damage(name, exact.values[index, column])) for index in range(len(rows))]

    damage, bound, done = settle(estimated, measure, top, safety, check)
    result = _merged(estimate, measured)
    best = sorted(damage, key=lambda row: -damage[row])[:top]
    return ExactTop(result, name, tuple(estimate.units[row] for row in best), len(measured), n_units, bound, done)


def _row(exact: AblationResult, index: int) -> AblationResult:
    return dataclasses.replace(exact, values=exact.values[index], ci_low=exact.ci_low[index],
                               ci_high=exact.ci_high[index], per_text=exact.per_text[index])


def _merged(estimate: AblationResult, measured: dict[int, AblationResult]) -> AblationResult:
    """The estimate with the measured rows' values, CIs and per-text values replaced by exact ones."""
    values, low, high, per_text = (t.clone() for t in (estimate.values, estimate.ci_low, estimate.ci_high,
                                                         estimate.per_text))
    flags = torch.zeros(len(estimate.units), dtype=torch.bool)
    error_bar = None if estimate.error_bar is None else estimate.error_bar.clone()
    for row, exact in measured.items():
        values[row], low[row], high[row], per_text[row] = exact.values, exact.ci_low, exact.ci_high, exact.per_text
        flags[row] = True
        if error_bar is not None:
            error_bar[row] = 0.0
    return dataclasses.replace(estimate, values=values, ci_low=low, ci_high=high, per_text=per_text,
                               error_bar=error_bar, measured=flags)
