"""Results of ablation sweeps and cumulative removal; both carry the removed units as `Site`s."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Bool, Float

from streamlens.results.base import Provenance, Result, frame
from streamlens.sites import Site

if TYPE_CHECKING:
    import pandas as pd


def as_sites(value: Any) -> tuple:
    """Sites as given, or as labels read back from JSON ("attn 3", "L3H2"; nested for sets)."""
    if isinstance(value, (Site, str)):
        return Site.parse(value) if isinstance(value, str) else value
    return tuple(as_sites(item) for item in value)


@dataclass(frozen=True)
class Damage(Result):
    """What every ablation result holds: metric values with 95% bootstrap CIs over texts.

    Shapes: values, ci_low, ci_high [row, metric]; per_text [row, metric, text]. `values` is the
    mean over texts of `per_text`; the CIs resample texts (windows or prompts) with replacement,
    `n_boot` times, seeded by `provenance.seed`. Metric names and units: `streamlens.metrics`.
    """

    provenance: Provenance
    metrics: tuple[str, ...]
    values: Float[torch.Tensor, "row metric"]
    ci_low: Float[torch.Tensor, "row metric"]
    ci_high: Float[torch.Tensor, "row metric"]
    per_text: Float[torch.Tensor, "row metric text"]
    data: str
    n_texts: int
    n_predictions: int
    n_boot: int
    seconds: float

    def _rows(self, labels: dict[str, tuple]) -> list[dict[str, Any]]:
        rows = []
        for index in range(self.values.shape[0]):
            for column, name in enumerate(self.metrics):
                row = {key: values[index] for key, values in labels.items()}
                row.update(metric=name, value=float(self.values[index, column]),
                           ci_low=float(self.ci_low[index, column]), ci_high=float(self.ci_high[index, column]))
                rows.append(row)
        return rows


@dataclass(frozen=True)
class AblationResult(Damage):
    """Damage done by removing each unit (or set of units), with 95% bootstrap CIs.

    Row i removed the sites `sites[i]` (one unit, or a set) with `methods[i]`, measuring
    `effects[i]`. clean_loss [text]: the clean model's mean next-token loss per text, for scale.

    `estimate` is "" for measured effects and names the first-order method otherwise ("atp",
    "atp-qk", "atpstar": `ablation.attribute`); `cancellation` [row, metric] is AtP*'s GradDrop
    score when it was computed (a ranking score in the metric's unit, not an effect). `error_bar`
    [row, metric]: an estimate's cheap reliability diagnostic (|IG(N) - IG(N/2)|, or the size of the
    second-order term), in the metric's unit; `measured` [row] (bool): rows an exact-top-K run measured
    exactly (their values are exact, the others estimates).
    """

    sites: tuple[tuple[Site, ...], ...] = ()
    methods: tuple[str, ...] = ()
    effects: tuple[str, ...] = ()
    clean_loss: Float[torch.Tensor, "text"] | None = None
    estimate: str = ""
    cancellation: Float[torch.Tensor, "row metric"] | None = None
    error_bar: Float[torch.Tensor, "row metric"] | None = None
    measured: Bool[torch.Tensor, "row"] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "sites", as_sites(self.sites))

    @property
    def units(self) -> tuple[str, ...]:
        """Row labels: "block 3", "L3H2", or "attn 0 + mlp 2" for a set."""
        return tuple(" + ".join(site.label for site in unit) or "nothing" for unit in self.sites)

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(unit[0].kind if len(unit) == 1 else "set" for unit in self.sites)

    @property
    def layers(self) -> tuple[int | None, ...]:
        """The first (lowest) layer of each row's units."""
        return tuple(min((site.layer for site in unit), default=None) for unit in self.sites)

    @property
    def heads(self) -> tuple[int | None, ...]:
        return tuple(unit[0].head if len(unit) == 1 else None for unit in self.sites)

    def value(self, unit: str, metric: str = "loss_increase") -> float:
        """The point estimate of one metric for one unit (by label, e.g. "block 3")."""
        if unit not in self.units:
            raise ValueError(f"unknown unit {unit!r}: this result has {', '.join(self.units)}")
        if metric not in self.metrics:
            raise ValueError(f"unknown metric {metric!r}: this result has {', '.join(self.metrics)}")
        return float(self.values[self.units.index(unit), self.metrics.index(metric)])

    def to_dataframe(self) -> "pd.DataFrame":
        """One row per (unit, metric): unit, kind, layer, head, method, effect, metric, value, ci_low, ci_high
        (estimates: an `estimate` column naming the method, `graddrop_score`, `estimate_error` and
        `source` (exact | estimate, per row) when present)."""
        labels = {"unit": self.units, "kind": self.kinds, "layer": self.layers, "head": self.heads,
                  "method": self.methods, "effect": self.effects}
        table = frame(self._rows(labels))
        if self.estimate:
            table.insert(6, "estimate", self.estimate)
        if self.cancellation is not None:
            table["graddrop_score"] = self.cancellation.flatten().tolist()  # row-major = (unit, metric) order
        if self.error_bar is not None:
            table["estimate_error"] = self.error_bar.flatten().tolist()
        if self.measured is not None:
            table["source"] = ["exact" if bool(m) else "estimate" for m in self.measured for _ in self.metrics]
        return table


@dataclass(frozen=True)
class CumulativeAblation(Damage):
    """Damage as units are removed one after another; step k (1-based) has sites[:k] removed.

    Rows are steps. `mode` is "order" (the given order) or "greedy" (least damaging next).
    """

    mode: str = "order"
    sites: tuple[Site, ...] = ()
    method: str = "zero"
    effect: str = "total"

    def __post_init__(self) -> None:
        object.__setattr__(self, "sites", as_sites(self.sites))

    @property
    def units(self) -> tuple[str, ...]:
        return tuple(site.label for site in self.sites)

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(site.kind for site in self.sites)

    @property
    def layers(self) -> tuple[int | None, ...]:
        return tuple(site.layer for site in self.sites)

    @property
    def heads(self) -> tuple[int | None, ...]:
        return tuple(site.head for site in self.sites)

    def to_dataframe(self) -> "pd.DataFrame":
        """One row per (step, metric): n_removed, unit (removed at this step), kind, layer, head,
        method, effect, mode, metric, value, ci_low, ci_high."""
        steps = len(self.sites)
        labels = {"n_removed": tuple(range(1, steps + 1)), "unit": self.units,
                  "kind": self.kinds, "layer": self.layers, "head": self.heads, "method": (self.method,) * steps,
                  "effect": (self.effect,) * steps, "mode": (self.mode,) * steps}
        return frame(self._rows(labels))
