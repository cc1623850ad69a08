"""The result of `streamlens check`: is streamlens exact on this model, check by check."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float

from streamlens.results.base import Provenance, Result, frame

if TYPE_CHECKING:
    import pandas as pd


@dataclass(frozen=True)
class ModelCheck(Result):
    """Each exactness check of one model: its measured error and the tolerance it must stay under.

    `checks` names the rows of `errors` and `tolerances` [check] (relative errors, except the
    ablation spot check: nats of loss increase). `passed` when every error is within tolerance.
    """

    provenance: Provenance
    family: str
    architecture: str
    norm_kind: str
    dtype: str
    load_seconds: float
    checks: tuple[str, ...]
    descriptions: tuple[str, ...]
    errors: Float[torch.Tensor, " check"]
    tolerances: Float[torch.Tensor, " check"]

    @property
    def ok(self) -> torch.Tensor:
        """[check] bool: error within tolerance (a NaN error fails)."""
        return self.errors <= self.tolerances

    @property
    def passed(self) -> bool:
        return bool(self.ok.all())

    def error(self, check: str) -> float:
        if check not in self.checks:
            raise ValueError(f"unknown check {check!r}: choose from {', '.join(self.checks)}")
        return float(self.errors[self.checks.index(check)])

    def to_dataframe(self) -> "pd.DataFrame":
        """One row per check: family, check, what it compares, error, tolerance, ok."""
        return frame([
            {"model": self.provenance.model, "family": self.family, "architecture": self.architecture,
             "norm": self.norm_kind, "dtype": self.dtype, "check": name, "compares": description,
             "error": float(error), "tolerance": float(tolerance), "ok": bool(ok)}
            for name, description, error, tolerance, ok in zip(self.checks, self.descriptions, self.errors,
                                                               self.tolerances, self.ok)
        ])
