"""The verdict table: each claim of the layer-pruning literature, this model's number, the paper's.

What the papers reported is stated qualitatively, with their models and metrics, where we are not
sure of an exact figure; "holds" / "differs" is decided by this model's 95% CI (bootstrap over texts).
"""

from __future__ import annotations

from typing import Any

import torch

from streamlens.ablation import EvalOptions
from streamlens.stats import bootstrap_indices, bootstrap_mean_ci, paired_difference_ci, percentile_interval
from streamlens.results.layers import Verdict

PAPERS = {
    "edges": ("Lad et al. 2024, 'The Remarkable Robustness of LLMs: Stages of Inference?' (GPT-2, Pythia, Phi; "
              "deleting one layer, KL and prediction accuracy): deleting the first layer is by far the most "
              "harmful, the last layer is also sensitive, middle layers are robust. ShortGPT (Men et al. 2024; "
              "LLaMA-2 7B/13B; BI) also finds the first layer important and the redundant layers deep in the stack."),
    "attention": ("He et al. 2024, 'What Matters in Transformers? Not All Attention Is Needed' (Llama-2-13B, "
                  "Mistral-7B, Llama-2-70B; average zero/few-shot benchmark accuracy): many attention layers can be "
                  "dropped (chosen by 1 - cos similarity) with little loss, while dropping MLP layers or whole "
                  "blocks hurts much sooner."),
    "bi": ("Men et al. 2024, ShortGPT (LLaMA-2 7B/13B and others; benchmark accuracy such as MMLU): removing the "
           "layers with the lowest Block Influence keeps most of the performance, i.e. low BI marks removable "
           "layers (no rank correlation with per-layer damage is reported)."),
    "angular": ("Gromov et al. 2024, 'The Unreasonable Ineffectiveness of the Deeper Layers' (Llama-2 up to 70B, "
                "Qwen, Mistral and others; MMLU/BoolQ accuracy, before and after QLoRA healing): the span of n blocks "
                "whose input and output have the smallest angular distance is a good span to remove; it lies in the "
                "deeper (not the last) layers."),
    "swaps": ("Lad et al. 2024 (GPT-2, Pythia, Phi; swapping adjacent layers vs deleting a layer; KL and accuracy): "
              "both interventions are well tolerated in the middle layers; as we read the paper, swapping adjacent "
              "layers generally does less damage than deleting one."),
    "repair": ("McGrath et al. 2023, 'The Hydra Effect' (Chinchilla 7B; direct vs total effect of attention layers "
               "on the top token's logit, resample ablation): downstream layers compensate when a layer is ablated, "
               "so total effects are smaller than direct ones. Rushing & Nanda 2024 (Pythia and GPT-2; per head, "
               "resample ablation, correct-token logit): self-repair is widespread but imperfect and noisy, and the "
               "final LayerNorm's rescaling is one of its sources."),
}


def _decide(low: float, high: float, expect_positive: bool = True) -> str:
    if (low > 0) if expect_positive else (high < 0):
        return "holds"
    if (high < 0) if expect_positive else (low > 0):
        return "differs"
    return "unclear"


def verdicts(study: dict[str, Any], options: EvalOptions) -> tuple[Verdict, ...]:
    """The verdict rows from a study's parts (`layer_study` builds them before its `LayerStudy`)."""
    blocks, attn, mlp, swaps = study["blocks"], study["attn"], study["mlp"], study["swaps"]
    n = study["n_layers"]
    loss = blocks.metrics.index("loss_increase")
    damage = blocks.per_text[:, loss]  # [layer, text]
    boot = dict(n_boot=options.n_boot, seed=options.seed)
    rows = []

    third = max(1, n // 3)
    middle = damage[third : n - third] if n - 2 * third > 0 else damage[1:-1]
    edges = (damage[0] + damage[-1]) / 2 - middle.mean(0)
    value, low, high = (float(v) for v in bootstrap_mean_ci(edges, **boot))
    rows.append(Verdict(
        "First and last blocks are the most damaging to remove; middle blocks are cheap",
        "remove one block (zero its attention and MLP writes), loss increase on text windows",
        f"mean of first and last block minus mean of the middle third: {value:.3f} nats [{low:.3f}, {high:.3f}]; "
        f"block 0 +{float(damage[0].mean()):.3f}, block {n - 1} +{float(damage[-1].mean()):.3f}",
        value, low, high, PAPERS["edges"], _decide(low, high)))

    value, low, high = (float(v) for v in paired_difference_ci(mlp.per_text[:, loss].mean(0),
                                                               attn.per_text[:, loss].mean(0), **boot))
    counts = {kind: removable(curve, 0.5) for kind, curve in study["greedy"].items()}
    rows.append(Verdict(
        "Attention is cheaper to remove than MLP",
        "remove one attention or MLP sublayer (zero); greedy cumulative removal per kind",
        f"mean MLP damage minus mean attention damage: {value:.3f} nats [{low:.3f}, {high:.3f}]; before +0.5 nats "
        f"greedy removal drops {_count(counts['attn'], study['greedy']['attn'])} attention sublayers vs "
        f"{_count(counts['mlp'], study['greedy']['mlp'])} MLPs",
        value, low, high, PAPERS["attention"], _decide(low, high)))

    for key, name in (("bi", "block influence"), ("angular", "angular distance (n=1)")):
        rho, low, high = study["correlations"][name]
        rows.append(Verdict(
            f"{'Block Influence' if key == 'bi' else 'Angular distance'} predicts removal damage",
            f"Spearman correlation over blocks between the score (one clean pass) and the measured loss increase",
            f"rho = {rho:.3f} [{low:.3f}, {high:.3f}]", rho, low, high, PAPERS[key], _decide(low, high)))

    rows.append(_span_verdict(study, boot))

    swap = swaps.per_text[:, swaps.metrics.index("loss_increase")]  # [layer, text], swap L <-> L+1
    value, low, high = (float(v) for v in bootstrap_mean_ci((damage[: n - 1] - swap).mean(0), **boot))
    rows.append(Verdict(
        "Swapping adjacent blocks hurts less than deleting a block",
        "swap blocks L and L+1 vs delete block L, for every L; loss increase",
        f"mean (delete L - swap L,L+1): {value:.3f} nats [{low:.3f}, {high:.3f}]",
        value, low, high, PAPERS["swaps"], _decide(low, high)))

    repair = study["repair"]
    heads = [i for i, site in enumerate(repair.sites) if site.kind == "head"]
    chosen = heads or list(range(len(repair.sites)))
    value, low, high = _median_fraction(repair, chosen, options)
    rows.append(Verdict(
        "Direct effects overstate total effects (self-repair)",
        "resample-ablate each head; label-logit direct effect (norm scale frozen) vs total effect; median of "
        "(direct - total) / direct over the heads with the larger half of |direct effect|",
        f"median repaired fraction {value:.2f} [{low:.2f}, {high:.2f}]",
        value, low, high, PAPERS["repair"], _decide(low, high)))
    return tuple(rows)


def removable(curve, threshold: float) -> int:
    """How many units greedy removal drops before the loss increase reaches `threshold` nats."""
    values = curve.values[:, curve.metrics.index("loss_increase")]
    above = (values >= threshold).nonzero()
    return int(above[0]) if len(above) else len(values)


def _count(count: int, curve) -> str:
    return f">= {count} (pool exhausted)" if count == len(curve.sites) else str(count)


def _span_verdict(study: dict[str, Any], boot: dict[str, int]) -> Verdict:
    spans = study["spans"]
    loss = spans.metrics.index("loss_increase")
    by_key = {(len(unit), unit[0].layer): i for i, unit in enumerate(spans.sites)}
    sizes = [s for s, _ in by_key]
    measured_sizes = sorted({s for s in sizes if sizes.count(s) > 1})
    size = measured_sizes[-1] if measured_sizes else 1
    start = dict(study["predicted_spans"]).get(size, 0)
    candidates = [i for (s, _), i in by_key.items() if s == size]
    best = min(candidates, key=lambda i: float(spans.values[i, loss]))
    value, low, high = (float(v) for v in paired_difference_ci(spans.per_text[by_key[(size, start)], loss],
                                                               spans.per_text[best, loss], **boot))
    best_start = spans.sites[best][0].layer
    return Verdict(
        "Angular distance finds the cheapest span to remove",
        f"all contiguous spans of {size} blocks removed; the span with the smallest angular distance vs the "
        f"measured cheapest",
        f"predicted blocks {start}-{start + size - 1} (+{float(spans.values[by_key[(size, start)], loss]):.3f}) vs "
        f"cheapest {best_start}-{best_start + size - 1} (+{float(spans.values[best, loss]):.3f}); excess "
        f"{value:.3f} nats [{low:.3f}, {high:.3f}]",
        value, low, high, PAPERS["angular"], "holds" if start == best_start or low <= 0 else "differs")


def _median_fraction(repair, units: list[int], options: EvalOptions) -> tuple[float, float, float]:
    """Median repaired fraction over the units with the larger half of |direct effect|, bootstrap CI over texts."""
    strength = repair.direct[units].mean(-1).abs()
    keep = [units[i] for i in torch.argsort(strength, descending=True)[: max(1, (len(units) + 1) // 2)].tolist()]
    estimate = float(repair.repaired_fraction()[keep].median())
    draws = bootstrap_indices(repair.direct.shape[1], options.n_boot, options.seed)
    medians = torch.stack([repair.repaired_fraction(draw)[keep].median() for draw in draws])
    low, high = percentile_interval(medians)
    return estimate, float(low), float(high)
