"""A pruned model judged against the full one on held-out text, and a heal's before/after.

Both resample *texts* (held-out windows or prompts) for their 95% intervals: a model's mean with
`stats.bootstrap_mean_ci`, a difference between two models (or before/after) with
`stats.paired_difference_ci`, which draws the same texts for both sides.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float

from streamlens.results.base import Provenance, Result, frame
from streamlens.stats import bootstrap_mean_ci, paired_difference_ci

if TYPE_CHECKING:
    import pandas as pd

MODELS = ("full", "pruned")


@dataclass(frozen=True)
class PrunedComparison(Result):
    """Full vs pruned model on the same held-out windows, prompts and generation prompts.

    Per text (window) t, over its scored predictions i (p: full, q: pruned):
        loss[m, t] = mean_i -log m(label_i);  kl[t] = mean_i KL(p_i || q_i);
        agreement[t] = mean_i [argmax q_i == argmax p_i];  top1[m, t] = mean_i [argmax m_i == label_i].
    prompt_correct [model, prompt]: 1 where the model's top token after the prompt is its target.
    A model against itself gives loss[0] == loss[1], kl == 0 and agreement == 1 exactly.
    Speeds: medians of `repeats` greedy runs on `threads` threads, both models timed in the same run.
    """

    provenance: Provenance
    models: tuple[str, ...]
    weights_hashes: tuple[str, ...]
    data: str
    n_predictions: int
    loss: Float[torch.Tensor, "model text"]
    kl: Float[torch.Tensor, " text"]
    agreement: Float[torch.Tensor, " text"]
    top1: Float[torch.Tensor, "model text"]
    prompt_correct: Float[torch.Tensor, "model prompt"]
    parameters: tuple[int, ...]
    file_bytes: tuple[int, ...] | None
    prefill_tokens_per_s: tuple[float, ...]
    decode_tokens_per_s: tuple[float, ...]
    tokens_per_s: tuple[float, ...]
    speed_settings: dict[str, int]
    generation_prompts: tuple[str, ...]
    generations_full: tuple[str, ...]
    generations_pruned: tuple[str, ...]
    n_boot: int = 1000
    seed: int = 0
    level: float = 0.95

    @property
    def speedup(self) -> float:
        """tokens/s of the pruned model over that of the full one (prefill + decode, one run)."""
        return self.tokens_per_s[1] / self.tokens_per_s[0]

    def interval(self, per_text: torch.Tensor) -> tuple[float, float, float]:
        """(mean, low, high) over texts of one per-text row [text]."""
        mean, low, high = bootstrap_mean_ci(per_text, self.n_boot, self.seed, self.level)
        return float(mean), float(low), float(high)

    def difference(self, pruned: torch.Tensor, full: torch.Tensor) -> tuple[float, float, float]:
        """(mean of pruned - full, low, high) with the paired bootstrap over texts."""
        mean, low, high = paired_difference_ci(pruned, full, self.n_boot, self.seed, self.level)
        return float(mean), float(low), float(high)

    def to_dataframe(self) -> "pd.DataFrame":
        """Tidy rows (metric, model, estimate, low, high, unit); model "pruned - full" is the paired difference.

        Perplexity's interval is exp of the loss's (exp is monotone). Counts and speeds carry no interval.
        """
        rows: list[dict[str, Any]] = []

        def add(metric: str, model: str, values: tuple[float, float, float], unit: str) -> None:
            rows.append({"metric": metric, "model": model, "estimate": values[0], "low": values[1],
                         "high": values[2], "unit": unit})

        for metric, table, unit in (("loss", self.loss, "nats"), ("top1_accuracy", self.top1, "fraction"),
                                    ("prompt_accuracy", self.prompt_correct, "fraction")):
            if table.shape[-1] == 0:
                continue
            for index, model in enumerate(MODELS):
                add(metric, model, self.interval(table[index]), unit)
            add(metric, "pruned - full", self.difference(table[1], table[0]), unit)
            if metric == "loss":
                for index, model in enumerate(MODELS):
                    add("perplexity", model, tuple(math.exp(v) for v in self.interval(table[index])), "")
        add("kl_full_pruned", "pruned", self.interval(self.kl), "nats")
        add("top1_agreement", "pruned", self.interval(self.agreement), "fraction")
        counts = [("parameters", self.parameters, ""), ("file_bytes", self.file_bytes, "bytes"),
                  ("prefill_tokens_per_s", self.prefill_tokens_per_s, "tokens/s"),
                  ("decode_tokens_per_s", self.decode_tokens_per_s, "tokens/s"),
                  ("tokens_per_s", self.tokens_per_s, "tokens/s")]
        for metric, pair, unit in counts:
            if pair is None:
                continue
            for index, model in enumerate(MODELS):
                add(metric, model, (float(pair[index]),) * 3, unit)
            add(metric, "pruned / full", (float(pair[1]) / float(pair[0]),) * 3, "ratio")
        return frame(rows)

    def generations(self) -> "pd.DataFrame":
        """The greedy continuations side by side: prompt, full, pruned."""
        return frame([{"prompt": prompt, "full": full, "pruned": pruned} for prompt, full, pruned
                      in zip(self.generation_prompts, self.generations_full, self.generations_pruned)])


@dataclass(frozen=True)
class HealResult(Result):
    """A pruned model before and after healing, on the same held-out windows.

    loss_before, loss_after [text]: per-window mean next-token loss (nats); kl_before, kl_after
    [text]: per-window mean KL(full || model) when the full model was given, else empty [0].
    train_loss [step]: the training loss of each step (on the training windows, never the held-out
    ones). With 0 steps the healed model is the pruned one: after == before exactly.
    proof: the saved folder loaded back against the trained model in memory, max |logits - trained
    logits| / max |trained logits| on the first `proof_windows` held-out windows, per way of loading
    ("transformers", "streamlens", and "gguf" when a GGUF file was written); empty where not
    measured. `proof_tolerance`: what passes; `gguf_tolerance`: what the float32 GGUF file may differ by.
    """

    provenance: Provenance
    settings: dict[str, Any]
    data: str
    train_data: str
    folder: str
    loss_before: Float[torch.Tensor, " text"]
    loss_after: Float[torch.Tensor, " text"]
    kl_before: Float[torch.Tensor, " text"]
    kl_after: Float[torch.Tensor, " text"]
    train_loss: Float[torch.Tensor, " step"]
    seconds: float
    cpu_seconds: float
    n_boot: int = 1000
    seed: int = 0
    level: float = 0.95
    proof: dict[str, float] | None = None
    proof_tolerance: float | None = None
    proof_windows: int = 0
    gguf_tolerance: float | None = None

    @property
    def proved(self) -> bool | None:
        """Every way of loading the saved folder within its tolerance (None: not measured)."""
        if not self.proof or self.proof_tolerance is None:
            return None
        return all(value <= (self.gguf_tolerance if way == "gguf" and self.gguf_tolerance is not None
                             else self.proof_tolerance) for way, value in self.proof.items())

    def to_dataframe(self) -> "pd.DataFrame":
        """Rows (metric, stage, estimate, low, high): before, after, and after - before (paired bootstrap)."""
        rows = []
        for metric, before, after in (("loss", self.loss_before, self.loss_after),
                                      ("kl_full_model", self.kl_before, self.kl_after)):
            if before.shape[-1] == 0:
                continue
            for stage, values in (("before", before), ("after", after)):
                mean, low, high = bootstrap_mean_ci(values, self.n_boot, self.seed, self.level)
                rows.append({"metric": metric, "stage": stage, "estimate": float(mean), "low": float(low),
                             "high": float(high)})
            mean, low, high = paired_difference_ci(after, before, self.n_boot, self.seed, self.level)
            rows.append({"metric": metric, "stage": "after - before", "estimate": float(mean), "low": float(low),
                         "high": float(high)})
        return frame(rows)
