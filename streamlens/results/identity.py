"""Result of the token-identity measurement (`streamlens.identity`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float

from streamlens.results.base import Provenance, Result, frame

if TYPE_CHECKING:
    import pandas as pd

TARGETS = ("current", "previous")
SPLITS = ("all", "word start", "continuation")
MEASURES = ("probe_top1", "probe_top5", "majority", "log10_rank", "cosine")


@dataclass(frozen=True)
class TokenIdentity(Result):
    """How much of the current (and previous) input token each stage's stream still carries.

    Shapes: value, low, high [condition, target, split, stage, measure] (mean over held-out tokens and
    its 95% bootstrap interval over texts; NaN where not measured: with the skip around block L
    removed only the stream after L and the final stream are measured); n_tokens [target, split]
    (tokens scored by the probe, summed over folds). Stage 0 = embeddings, stage s = after block s - 1.
    Measures: probe_top1 / probe_top5 (held-out accuracy of a ridge probe over tokens seen in
    training), majority (accuracy of always guessing the most frequent training token), log10_rank
    (log10(1 + rank) of the token when the stream is read through the final norm and the embedding
    matrix), cosine (of the stream with the token's embedding). `removed[c]` is the block whose
    skip is removed in condition c (-1: none).
    """

    provenance: Provenance
    conditions: tuple[str, ...]
    removed: tuple[int, ...]
    layer_labels: tuple[str, ...]
    targets: tuple[str, ...]
    splits: tuple[str, ...]
    measures: tuple[str, ...]
    value: Float[torch.Tensor, "condition target split stage measure"]
    low: Float[torch.Tensor, "condition target split stage measure"]
    high: Float[torch.Tensor, "condition target split stage measure"]
    n_tokens: Float[torch.Tensor, "target split"]
    text: str
    alpha: float

    def get(self, measure: str, target: str = "current", split: str = "all", condition: str = "clean") -> torch.Tensor:
        """One measure per stage [stage] (NaN where not measured)."""
        return self.value[self.conditions.index(condition), self.targets.index(target), self.splits.index(split), :,
                          self.measures.index(measure)]

    def to_dataframe(self) -> "pd.DataFrame":
        """One row per (condition, target, split, stage, measure) that was measured."""
        rows = []
        for c, condition in enumerate(self.conditions):
            for t, target in enumerate(self.targets):
                for s, split in enumerate(self.splits):
                    for stage, label in enumerate(self.layer_labels):
                        for m, measure in enumerate(self.measures):
                            value = float(self.value[c, t, s, stage, m])
                            if value != value:
                                continue
                            rows.append({"condition": condition, "removed_skip": self.removed[c], "target": target,
                                         "split": split, "stage": label, "stage_index": stage, "measure": measure,
                                         "value": value, "low": float(self.low[c, t, s, stage, m]),
                                         "high": float(self.high[c, t, s, stage, m])})
        return frame(rows)
