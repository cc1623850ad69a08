"""Results of ablation sweeps and cumulative removal."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from streamlens.results.base import Provenance, Result, frame

if TYPE_CHECKING:
    import pandas as pd


def _damage_rows(result: Any, labels: dict[str, tuple]) -> list[dict[str, Any]]:
    rows = []
    for index in range(result.values.shape[0]):
        for column, name in enumerate(result.metrics):
            row = {key: values[index] for key, values in labels.items()}
            row.update(metric=name, value=float(result.values[index, column]),
                       ci_low=float(result.ci_low[index, column]), ci_high=float(result.ci_high[index, column]))
            rows.append(row)
    return rows


@dataclass(frozen=True)
class AblationResult(Result):
    """Damage done by removing each unit (or set of units), with 95% bootstrap CIs.

    Shapes: values, ci_low, ci_high [unit, metric]; per_text [unit, metric, text]; clean_loss [text]
    (the clean model's mean next-token loss per text, for scale). `values` is the mean over texts
    of `per_text`; the CIs resample texts (windows or prompts) with replacement, `n_boot` times,
    seeded by `provenance.seed`. Metric names and units: `streamlens.metrics`.
    """

    provenance: Provenance
    units: tuple[str, ...]
    kinds: tuple[str, ...]
    layers: tuple[int | None, ...]
    heads: tuple[int | None, ...]
    methods: tuple[str, ...]
    effects: tuple[str, ...]
    metrics: tuple[str, ...]
    values: torch.Tensor
    ci_low: torch.Tensor
    ci_high: torch.Tensor
    per_text: torch.Tensor
    clean_loss: torch.Tensor
    data: str
    n_texts: int
    n_predictions: int
    n_boot: int
    seconds: float

    def value(self, unit: str, metric: str = "loss_increase") -> float:
        """The point estimate of one metric for one unit (by label, e.g. "block 3")."""
        if unit not in self.units:
            raise ValueError(f"unknown unit {unit!r}: this result has {', '.join(self.units)}")
        if metric not in self.metrics:
            raise ValueError(f"unknown metric {metric!r}: this result has {', '.join(self.metrics)}")
        return float(self.values[self.units.index(unit), self.metrics.index(metric)])

    def to_dataframe(self) -> "pd.DataFrame":
        """One row per (unit, metric): unit, kind, layer, head, method, effect, metric, value, ci_low, ci_high."""
        labels = {"unit": self.units, "kind": self.kinds, "layer": self.layers, "head": self.heads,
                  "method": self.methods, "effect": self.effects}
        return frame(_damage_rows(self, labels))


@dataclass(frozen=True)
class CumulativeAblation(Result):
    """Damage as units are removed one after another; step k (1-based) has units[:k] removed.

    Shapes: values, ci_low, ci_high [step, metric]; per_text [step, metric, text]. `mode` is
    "order" (the given order) or "greedy" (least damaging next). CIs as in `AblationResult`.
    """

    provenance: Provenance
    mode: str
    units: tuple[str, ...]
    kinds: tuple[str, ...]
    layers: tuple[int | None, ...]
    heads: tuple[int | None, ...]
    method: str
    effect: str
    metrics: tuple[str, ...]
    values: torch.Tensor
    ci_low: torch.Tensor
    ci_high: torch.Tensor
    per_text: torch.Tensor
    data: str
    n_texts: int
    n_predictions: int
    n_boot: int
    seconds: float

    def to_dataframe(self) -> "pd.DataFrame":
        """One row per (step, metric): n_removed, unit (removed at this step), kind, layer, head,
        method, effect, mode, metric, value, ci_low, ci_high."""
        steps = len(self.units)
        labels = {"n_removed": tuple(range(1, steps + 1)), "unit": self.units,
                  "kind": self.kinds, "layer": self.layers, "head": self.heads, "method": (self.method,) * steps,
                  "effect": (self.effect,) * steps, "mode": (self.mode,) * steps}
        return frame(_damage_rows(self, labels))
