"""Results of the gradient-highway measurements (`streamlens.highway`), and the toy experiment's settings.

`ToyConfig` lives here because a `ToyHighway` carries it (and rebuilds it on `config`); it is plain,
validated data, like every result.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch

from streamlens.results.base import Provenance, Result, frame

if TYPE_CHECKING:
    import pandas as pd

ALL_SKIPS = "all skips"


def condition_label(removed: Sequence[int], n_layers: int) -> str:
    """"all skips", "no skip: 10,11,12" or "no skip: all"."""
    if not removed:
        return ALL_SKIPS
    return "no skip: all" if len(removed) == n_layers else "no skip: " + ",".join(map(str, removed))


@dataclass(frozen=True)
class ToyConfig:
    """Settings of the toy experiment (validated on construction; errors name the bad value)."""

    depths: tuple[int, ...] = (2, 4, 8, 16, 32, 64)
    steps: int = 300
    width: int = 64
    seed: int = 0
    lr: float = 1e-3
    batch: int = 128
    n_train: int = 2048
    d_in: int = 16
    norm: Literal["none", "layer"] = "none"
    init: Literal["torch", "he"] = "torch"

    def __post_init__(self) -> None:
        object.__setattr__(self, "depths", tuple(self.depths))
        if not self.depths:
            raise ValueError("depths is empty: give at least one depth, e.g. 2,4,8")
        for depth in self.depths:
            if isinstance(depth, bool) or not isinstance(depth, int) or not 1 <= depth <= 1024:
                raise ValueError(f"depth {depth!r} out of range: a depth is a whole number of blocks, 1-1024")
        if len(set(self.depths)) != len(self.depths):
            raise ValueError(f"depths {list(self.depths)} repeat a value: give each depth once")
        for name, low in (("steps", 0), ("seed", 0), ("width", 1), ("batch", 1), ("n_train", 1), ("d_in", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} {value!r} out of range: must be a whole number >= {low}")
        if isinstance(self.lr, bool) or not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr)
                                             and 0 < self.lr <= 1):  # Adam steps above 1 only diverge
            raise ValueError(f"lr {self.lr!r} out of range: a learning rate is a number in (0, 1]")
        if self.norm not in ("none", "layer"):
            raise ValueError(f"norm {self.norm!r} unknown: choose none or layer")
        if self.init not in ("torch", "he"):
            raise ValueError(f"init {self.init!r} unknown: choose torch (PyTorch default) or he")


@dataclass(frozen=True)
class ToyHighway(Result):
    """Plain vs residual toy stacks trained at several depths.

    Shapes (k = kind in `kinds`, d = index into `depths`, t = 0..steps, l = layer):
    grad_norm [k, d, t, max_depth]: ||dloss/dh_l|| before update t (NaN where l >= depth);
    loss [k, d, t]: mini-batch loss before update t; final_loss [k, d]: whole training set after
    training. `zero_branch_error`, `zero_branch_grad_error`: `zero_branch_check` (exactly 0.0).
    """

    provenance: Provenance
    kinds: tuple[str, ...]
    depths: tuple[int, ...]
    steps: int
    width: int
    seed: int
    lr: float
    batch: int
    n_train: int
    d_in: int
    norm: str
    init: str
    grad_norm: torch.Tensor
    loss: torch.Tensor
    final_loss: torch.Tensor
    zero_branch_error: float
    zero_branch_grad_error: float
    seconds: float

    @property
    def config(self) -> ToyConfig:
        names = [f.name for f in dataclasses.fields(ToyConfig)]
        return ToyConfig(**{name: getattr(self, name) for name in names})

    def first_to_last(self, step: int = 0) -> torch.Tensor:
        """||grad at block 0|| / ||grad at the last block|| at training step `step` (-1: end), [k, d]."""
        ratios = torch.full((len(self.kinds), len(self.depths)), float("nan"), dtype=torch.float64)
        for d, depth in enumerate(self.depths):
            ratios[:, d] = self.grad_norm[:, d, step, 0] / self.grad_norm[:, d, step, depth - 1]
        return ratios

    def to_dataframe(self) -> "pd.DataFrame":
        """Tidy rows (kind, depth, step, layer, measure, value); measures grad_norm, loss, final_loss."""
        rows = []
        for k, kind in enumerate(self.kinds):
            for d, depth in enumerate(self.depths):
                base = {"part": "toy", "kind": kind, "depth": depth}
                grads = self.grad_norm[k, d, :, :depth].tolist()
                for step, per_layer in enumerate(grads):
                    rows += [{**base, "step": step, "layer": layer, "measure": "grad_norm", "value": value}
                             for layer, value in enumerate(per_layer)]
                rows += [{**base, "step": step, "layer": None, "measure": "loss", "value": value}
                         for step, value in enumerate(self.loss[k, d].tolist())]
                rows.append({**base, "step": self.steps, "layer": None, "measure": "final_loss",
                             "value": float(self.final_loss[k, d])})
        return frame(rows)


@dataclass(frozen=True)
class RealHighway(Result):
    """Gradient of the LM loss at the stream entering each block, per condition.

    Shapes: tokens [batch, pos]; grad_norm, stream_norm [condition, layer] (||dloss/d resid_pre L||,
    ||resid_pre L||); loss [condition]. `removed[c]` lists the blocks whose skip was removed in
    condition c (empty: the model as it is).
    """

    provenance: Provenance
    conditions: tuple[str, ...]
    removed: tuple[tuple[int, ...], ...]
    tokens: torch.Tensor
    text: str
    grad_norm: torch.Tensor
    stream_norm: torch.Tensor
    loss: torch.Tensor

    def __post_init__(self) -> None:
        object.__setattr__(self, "removed", tuple(tuple(layers) for layers in self.removed))  # JSON gives lists

    def first_to_last(self) -> torch.Tensor:
        """||grad at layer 0|| / ||grad at the last layer||, [condition]."""
        return self.grad_norm[:, 0] / self.grad_norm[:, -1]

    def to_dataframe(self) -> "pd.DataFrame":
        """Tidy rows (kind = condition, layer, measure, value); measures grad_norm, stream_norm, loss."""
        n_layers = self.grad_norm.shape[1]
        rows: list[dict[str, Any]] = []
        for c, condition in enumerate(self.conditions):
            base = {"part": "real", "kind": condition, "depth": n_layers, "step": None}
            for measure in ("grad_norm", "stream_norm"):
                values = getattr(self, measure)[c].tolist()
                rows += [{**base, "layer": layer, "measure": measure, "value": value} for layer, value in enumerate(values)]
            rows.append({**base, "layer": None, "measure": "loss", "value": float(self.loss[c])})
        return frame(rows)
