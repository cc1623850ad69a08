"""`EvalOptions`: how an evaluation is run and summarised, shared by evaluate, sweep, cumulative and
every command that measures damage (one frozen object instead of the same eight parameters).

The bootstrap rule it checks (`check_n_boot`, `MIN_BOOTSTRAP`) lives in the torch-free `streamlens.limits`,
so the CLI applies the same rule before importing torch."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from streamlens import metrics as M
from streamlens.data import TokenBatch
from streamlens.limits import check_n_boot


@dataclass(frozen=True)
class EvalOptions:
    """Options of an ablation evaluation.

    Attributes:
        metrics: names from `metrics.METRICS` (None: all that apply to the batch).
        seed: seeds the resample donors and the bootstrap.
        batch_size: most sequences in one forward (texts x variants).
        n_boot: bootstrap replicates for the 95% CIs (at least `limits.MIN_BOOTSTRAP`); the resampling unit is the
            text.
        threads: torch CPU threads while evaluating (None: leave torch's setting alone).
    """

    metrics: tuple[str, ...] | None = None
    seed: int = 0
    batch_size: int = 16
    n_boot: int = 1000
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.metrics is not None:
            if isinstance(self.metrics, str):
                raise ValueError(f"metrics {self.metrics!r} must be a sequence of names, not one string")
            object.__setattr__(self, "metrics", tuple(self.metrics))
        check_n_boot(self.n_boot)
        for name, least in (("batch_size", 1), ("threads", 1)):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
                raise ValueError(f"{name} {value!r} must be a whole number of at least {least}")

    @staticmethod
    def of(options: "EvalOptions | None" = None, **changes: Any) -> "EvalOptions":
        """`options` (default: the defaults) with `changes` (field names) applied; unknown names are an error."""
        known = {item.name for item in dataclasses.fields(EvalOptions)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise TypeError(f"unknown evaluation option {unknown[0]!r}: choose from {', '.join(sorted(known))}")
        return dataclasses.replace(options or EvalOptions(), **changes)

    @contextlib.contextmanager
    def torch_threads(self) -> Iterator[None]:
        """Run the block with `threads` torch threads, restoring the previous number after."""
        if self.threads is None:
            yield
            return
        before = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            yield
        finally:
            torch.set_num_threads(before)


def metric_names(metrics: Sequence[str] | None, batch: TokenBatch) -> tuple[str, ...]:
    """The checked metric names (None: every metric that applies to `batch`)."""
    has_targets = batch.targets is not None
    return M.check_metrics(tuple(metrics), has_targets) if metrics is not None else M.default_metrics(has_targets)
