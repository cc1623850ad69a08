"""Results of the residual-family study (`streamlens.highway.study`) and its settings.

`ResidualConfig` lives here because a `ResidualStudy` carries it (and rebuilds it on `config`); the
variant and testbed names live here too, so that the settings can be validated below the analysis.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from streamlens.results.base import Provenance, Result, frame

if TYPE_CHECKING:
    import pandas as pd

VARIANTS = ("plain", "pre_norm", "post_norm", "highway", "rezero", "dense", "concat")
CNN_VARIANTS = ("plain", "residual")  # the digits testbed: the ResNet basic block with or without its shortcut
TESTBEDS = ("mlp", "lm", "cnn")
LM_DEFAULT = ("plain", "pre_norm", "post_norm", "rezero")  # the Transformer claims; the benchmark runs all seven
MAX_DEPTH = 256


def _whole(name: str, value: Any, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f"{low}-{high}" if high is not None else f">= {low}"
        raise ValueError(f"{name} {value!r} out of range: must be a whole number {bound}")


def _unique(name: str, values: tuple, what: str) -> tuple:
    values = tuple(values)
    if not values:
        raise ValueError(f"{name} is empty: give at least one {what}")
    if len(set(values)) != len(values):
        raise ValueError(f"{name} {list(values)} repeat a value: give each {what} once")
    return values


@dataclass(frozen=True)
class ResidualConfig:
    """Settings of the residual-family study (validated on construction; errors name the bad value).

    `warmup`: steps of linear learning-rate warm-up for the extra post-norm (and pre-norm) runs at the
    deepest `lm` depth that test Xiong et al. 2020; every other run has none. 0 skips those runs.
    `lesions`: run the lesion test after training (one held-out pass per block); False leaves it NaN
    (the benchmark's deep runs, where it would be a quarter of the cost).
    """

    testbeds: tuple[str, ...] = TESTBEDS
    mlp_variants: tuple[str, ...] = VARIANTS
    lm_variants: tuple[str, ...] = LM_DEFAULT
    seeds: tuple[int, ...] = (0, 1, 2)
    mlp_depths: tuple[int, ...] = (2, 12)
    lm_depths: tuple[int, ...] = (2, 4)
    cnn_depths: tuple[int, ...] = (2, 6)
    steps: int = 80
    eval_every: int = 20
    warmup: int = 16
    lesions: bool = True

    def __post_init__(self) -> None:
        for name, what in (("testbeds", "testbed"), ("mlp_variants", "variant"), ("lm_variants", "variant"),
                           ("seeds", "seed"),
                           ("mlp_depths", "depth"), ("lm_depths", "depth"), ("cnn_depths", "depth")):
            object.__setattr__(self, name, _unique(name, getattr(self, name), what))
        for testbed in self.testbeds:
            if testbed not in TESTBEDS:
                raise ValueError(f"unknown testbed {testbed!r}: choose from {', '.join(TESTBEDS)}")
        for variant in (*self.mlp_variants, *self.lm_variants):
            if variant not in VARIANTS:
                raise ValueError(f"unknown variant {variant!r}: choose from {', '.join(VARIANTS)}")
        for seed in self.seeds:
            _whole("seed", seed, 0, 2**31 - 1)
        for name in ("mlp_depths", "lm_depths", "cnn_depths"):
            for depth in getattr(self, name):
                _whole(f"depth {depth!r} in {name}:", depth, 1, MAX_DEPTH)
        _whole("steps", self.steps, 1, 1_000_000)
        _whole("eval_every", self.eval_every, 1, self.steps)
        _whole("warmup", self.warmup, 0, 1_000_000)
        if not isinstance(self.lesions, bool):
            raise ValueError(f"lesions {self.lesions!r} must be True or False")

    def depths(self, testbed: str) -> tuple[int, ...]:
        return getattr(self, f"{testbed}_depths")

    def testbed_variants(self, testbed: str) -> tuple[str, ...]:
        """The variants run on a testbed: the digits CNN runs plain and residual, the others theirs."""
        return CNN_VARIANTS if testbed == "cnn" else getattr(self, f"{testbed}_variants")

    @property
    def eval_steps(self) -> tuple[int, ...]:
        """The steps at which held-out loss and gradient norms are measured: 0, eval_every, ..., steps."""
        return tuple(sorted({*range(0, self.steps, self.eval_every), self.steps}))


@dataclass(frozen=True)
class ResidualStudy(Result):
    """Every run of the study: testbed x variant x depth x seed (x warm-up), in one flat list.

    Run r is described by `run_testbed[r]`, `run_variant[r]`, `run_depth[r]`, `run_seed[r]`,
    `run_warmup[r]`. Shapes (E = len(eval_steps), L = the deepest depth; NaN where a run has fewer
    blocks, no labels, or a block that cannot be deleted):
    train_loss [R, steps + 1]: mini-batch loss before update t (row t = steps: after training);
    heldout_loss, heldout_accuracy [R, E]: on the held-out set at each eval step;
    grad_norm [R, E, L]: ||dloss/dh_b|| at the input of block b on the mini-batch at each eval step;
    param_grad_norm [R, E, L]: ||dloss/dtheta_b|| of all parameters of block b, same batch and steps;
    lesion_loss, lesion_accuracy [R, L]: held-out loss / accuracy after training with block b deleted;
    saved_bytes [R]: bytes of distinct activation tensors saved for the backward pass of one training
    step (parameters excluded); step_seconds [R]: mean wall time of a training step (not reproducible);
    reuse_share, reuse_loss [R] (dense variant only, else NaN): the share of the trained DenseFormer
    weights on non-adjacent earlier states, and the held-out loss with those weights set to 0.
    """

    provenance: Provenance
    testbeds: tuple[str, ...]
    mlp_variants: tuple[str, ...]
    lm_variants: tuple[str, ...]
    seeds: tuple[int, ...]
    mlp_depths: tuple[int, ...]
    lm_depths: tuple[int, ...]
    cnn_depths: tuple[int, ...]
    steps: int
    eval_every: int
    warmup: int
    lesions: bool
    run_testbed: tuple[str, ...]
    run_variant: tuple[str, ...]
    run_depth: tuple[int, ...]
    run_seed: tuple[int, ...]
    run_warmup: tuple[int, ...]
    train_loss: torch.Tensor
    heldout_loss: torch.Tensor
    heldout_accuracy: torch.Tensor
    grad_norm: torch.Tensor
    param_grad_norm: torch.Tensor
    lesion_loss: torch.Tensor
    lesion_accuracy: torch.Tensor
    saved_bytes: torch.Tensor
    step_seconds: torch.Tensor
    reuse_share: torch.Tensor
    reuse_loss: torch.Tensor
    seconds: float

    @property
    def config(self) -> ResidualConfig:
        return ResidualConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(ResidualConfig)})

    @property
    def eval_steps(self) -> tuple[int, ...]:
        return self.config.eval_steps

    def runs(self, testbed: str, variant: str, depth: int, warmup: int = 0) -> list[int]:
        """Indices of the runs (one per seed, in seed order) with these settings."""
        return [r for r in range(len(self.run_testbed))
                if (self.run_testbed[r], self.run_variant[r], self.run_depth[r], self.run_warmup[r])
                == (testbed, variant, depth, warmup)]

    def first_to_last(self, eval_index: int = 0, parameters: bool = False) -> torch.Tensor:
        """||grad at block 0|| / ||grad at the last block|| at eval step `eval_index` (0: init), [R];
        of the stream entering the block (`grad_norm`), or with `parameters` of its parameters."""
        norms = self.param_grad_norm if parameters else self.grad_norm
        rows = torch.arange(len(self.run_depth))
        last = torch.tensor(self.run_depth) - 1
        return norms[rows, eval_index, 0] / norms[rows, eval_index, last]

    def lesion_damage(self) -> torch.Tensor:
        """Held-out loss with block b deleted minus the trained model's held-out loss, [R, L]."""
        return self.lesion_loss - self.heldout_loss[:, -1:]

    def to_dataframe(self) -> "pd.DataFrame":
        """Tidy rows: testbed, variant, depth, seed, warmup, step, layer, measure, value."""
        rows: list[dict[str, Any]] = []
        steps = self.eval_steps
        for r in range(len(self.run_testbed)):
            base = {"testbed": self.run_testbed[r], "variant": self.run_variant[r], "depth": self.run_depth[r],
                    "seed": self.run_seed[r], "warmup": self.run_warmup[r]}
            depth = self.run_depth[r]
            rows += [{**base, "step": t, "layer": None, "measure": "train_loss", "value": v}
                     for t, v in enumerate(self.train_loss[r].tolist())]
            for e, step in enumerate(steps):
                rows.append({**base, "step": step, "layer": None, "measure": "heldout_loss",
                             "value": float(self.heldout_loss[r, e])})
                if not torch.isnan(self.heldout_accuracy[r, e]):
                    rows.append({**base, "step": step, "layer": None, "measure": "heldout_accuracy",
                                 "value": float(self.heldout_accuracy[r, e])})
                rows += [{**base, "step": step, "layer": b, "measure": measure, "value": v}
                         for measure in ("grad_norm", "param_grad_norm")
                         for b, v in enumerate(getattr(self, measure)[r, e, :depth].tolist())]
            for measure in ("lesion_loss", "lesion_accuracy"):
                rows += [{**base, "step": self.steps, "layer": b, "measure": measure, "value": v}
                         for b, v in enumerate(getattr(self, measure)[r, :depth].tolist()) if v == v]
            rows += [{**base, "step": 0, "layer": None, "measure": m, "value": float(getattr(self, m)[r])}
                     for m in ("saved_bytes", "step_seconds", "reuse_share", "reuse_loss")
                     if not math.isnan(float(getattr(self, m)[r]))]
        return frame(rows)
