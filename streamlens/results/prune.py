"""Results of `streamlens prune`: the strategies' choices, their held-out comparison, the export's proof.

- `PruneChoice`: for each strategy and each k = 1 .. k_max, the layers it removes (chosen on the
  choice data), and the measured greedy removal's damage on that data after each step;
- `StrategyComparison`: held-out loss per text of every strategy's removal for each k, with the
  clean loss, with their means, 95% CIs and paired differences to greedy (computed by `prune.compare`);
- `ExportCheck`: the exported folder (and GGUF file) loaded fresh against the engine's simulated
  removal, max logit difference relative to the logit scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float

from streamlens.results.base import Provenance, Result, frame

if TYPE_CHECKING:
    import pandas as pd

# strategy -> the unit it removes (block: attention + MLP of a layer)
KINDS = {"greedy": "block", "block_influence": "block", "angular": "block", "last": "block",
         "attention": "attn", "mlp": "mlp"}
STRATEGIES = tuple(KINDS)
LABELS = {"greedy": "measured greedy", "block_influence": "Block Influence (ShortGPT)",
          "angular": "angular-distance span (Gromov)", "last": "last blocks before the final one",
          "attention": "attention only (He et al.)", "mlp": "MLP only (He et al.)"}


def _layers(sets: Any) -> tuple[tuple[tuple[int, ...], ...], ...]:
    return tuple(tuple(tuple(int(layer) for layer in chosen) for chosen in per_k) for per_k in sets)


@dataclass(frozen=True)
class PruneChoice(Result):
    """What each strategy removes, chosen on the choice data.

    Attributes:
        strategies: names from `STRATEGIES`; `KINDS[name]` is the unit each removes.
        sets: [strategy][k - 1] the sorted layers removed for k = 1 .. k_max.
        greedy_damage [step]: mean loss increase (nats) on the choice data after greedy step k.
        budget: nats; when given, `k_budget` is the most greedy steps whose damage stays within it.
    """

    provenance: Provenance
    strategies: tuple[str, ...]
    sets: tuple[tuple[tuple[int, ...], ...], ...]
    greedy_damage: Float[torch.Tensor, "step"]
    n_layers: int
    data: str
    budget: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "sets", _layers(self.sets))
        unknown = [name for name in self.strategies if name not in KINDS]
        if unknown:
            raise ValueError(f"unknown strategy {unknown[0]!r}: choose from {', '.join(STRATEGIES)}")

    @property
    def k_max(self) -> int:
        return len(self.sets[0]) if self.sets else 0

    @property
    def k_budget(self) -> int | None:
        """Greedy steps before the damage on the choice data passes `budget` (None without a budget)."""
        if self.budget is None:
            return None
        over = (self.greedy_damage > self.budget).nonzero()
        return int(over[0]) if len(over) else len(self.greedy_damage)

    def removed(self, strategy: str, k: int) -> tuple[int, ...]:
        if not 1 <= k <= self.k_max:
            raise ValueError(f"k {k} out of range: chosen for k = 1-{self.k_max}")
        return self.sets[self.strategies.index(strategy)][k - 1]

    def to_dataframe(self) -> "pd.DataFrame":
        """One row per (strategy, k): strategy, kind, k, layers ("3,4,7"), greedy choice damage (greedy rows)."""
        rows = []
        for s, name in enumerate(self.strategies):
            for k, chosen in enumerate(self.sets[s], start=1):
                damage = float(self.greedy_damage[k - 1]) if name == "greedy" and k <= len(self.greedy_damage) else None
                rows.append({"strategy": name, "kind": KINDS[name], "k": k, "layers": ",".join(map(str, chosen)),
                             "choice_loss_increase": damage})
        return frame(rows)


@dataclass(frozen=True)
class StrategyComparison(Result):
    """Held-out loss of each strategy's removal, per text, and its summaries.

    Attributes:
        loss [strategy, k, text]: mean next-token loss (nats) of each evaluation text with the
            strategy's k units removed (method zero, total effect), k = 1 .. k_max.
        clean_loss [text]: the same texts, nothing removed.
        interval [strategy, k, 3]: mean over texts of `loss`, 95% bootstrap CI low, high.
        clean_interval [3]: the same for `clean_loss`.
        gap_to_greedy [strategy, k, 3]: mean over texts of loss(greedy) - loss(strategy) and its
            paired 95% CI (the same texts resampled for both); zeros for greedy itself, NaN without greedy.
    Identity: loss - clean_loss is the engine's `loss_increase` for the same removal and texts.
    """

    provenance: Provenance
    strategies: tuple[str, ...]
    sets: tuple[tuple[tuple[int, ...], ...], ...]
    loss: Float[torch.Tensor, "strategy k text"]
    clean_loss: Float[torch.Tensor, "text"]
    interval: Float[torch.Tensor, "strategy k 3"]
    clean_interval: Float[torch.Tensor, "3"]
    gap_to_greedy: Float[torch.Tensor, "strategy k 3"]
    choice_data: str
    eval_data: str
    n_boot: int = 1000
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "sets", _layers(self.sets))

    @property
    def k_max(self) -> int:
        return self.loss.shape[1]

    def summary(self, strategy: str, k: int) -> tuple[float, float, float]:
        """(mean held-out loss, 95% CI low, high) over texts."""
        return tuple(float(v) for v in self.interval[self.strategies.index(strategy), k - 1])  # type: ignore[return-value]

    def paired(self, strategy: str, k: int) -> tuple[float, float, float]:
        """loss(greedy) - loss(strategy) at k, mean over texts with its paired 95% CI: below zero means
        measured greedy removal keeps the held-out loss lower."""
        return tuple(float(v) for v in self.gap_to_greedy[self.strategies.index(strategy), k - 1])  # type: ignore[return-value]

    def best(self, k: int, kinds: tuple[str, ...] = ("block",)) -> str:
        """The strategy (of the given unit kinds) with the lowest mean held-out loss at k."""
        chosen = [s for s in self.strategies if KINDS[s] in kinds]
        return min(chosen, key=lambda s: float(self.interval[self.strategies.index(s), k - 1, 0]))

    def to_dataframe(self) -> "pd.DataFrame":
        """One row per (strategy, k) plus k = 0 (clean): loss, CI, increase over clean, paired gap to greedy."""
        clean, low, high = (float(v) for v in self.clean_interval)
        rows = [{"strategy": "none", "kind": "", "k": 0, "layers": "", "loss": clean, "ci_low": low, "ci_high": high,
                 "loss_increase": 0.0}]
        for s, name in enumerate(self.strategies):
            for k in range(1, self.k_max + 1):
                value, low, high = self.summary(name, k)
                gap, gap_low, gap_high = self.paired(name, k)
                rows.append({"strategy": name, "kind": KINDS[name], "k": k,
                             "layers": ",".join(map(str, self.sets[s][k - 1])), "loss": value, "ci_low": low,
                             "ci_high": high, "loss_increase": value - clean, "greedy_minus_this": gap,
                             "greedy_minus_this_ci_low": gap_low, "greedy_minus_this_ci_high": gap_high})
        return frame(rows)


@dataclass(frozen=True)
class ExportCheck(Result):
    """The exported model against the removal the engine simulated, on held-out windows.

    Each difference is max |exported logits - simulated logits| / max |simulated logits| over every
    position and vocabulary entry of the windows: `hf` loads the folder with transformers alone,
    `streamlens` with `load_model` (the bridge, itself checked against HF at load), `gguf` the
    GGUF file with transformers' GGUF reader; None where no GGUF was written.
    """

    provenance: Provenance
    folder: str
    blocks: tuple[int, ...]
    n_layers_before: int
    n_layers_after: int
    hf: float
    streamlens: float
    gguf: float | None
    gguf_file: str | None
    tolerance: float
    gguf_tolerance: float
    n_windows: int
    data: str

    def rows(self) -> list[tuple[str, float, float, str]]:
        """(loaded with, difference, tolerance, path) for each way the export was loaded."""
        out = [("transformers", self.hf, self.tolerance, self.folder),
               ("streamlens", self.streamlens, self.tolerance, self.folder)]
        if self.gguf is not None:
            out.append(("gguf (transformers)", self.gguf, self.gguf_tolerance, str(self.gguf_file)))
        return out

    @property
    def passed(self) -> bool:
        """Every load within its tolerance (the GGUF file is float32: the float32 tolerance at least)."""
        return all(value <= tolerance for _, value, tolerance, _ in self.rows())

    def to_dataframe(self) -> "pd.DataFrame":
        return frame([{"loaded_with": name, "max_relative_logit_difference": value, "tolerance": tolerance,
                       "passed": value <= tolerance, "path": path} for name, value, tolerance, path in self.rows()])
