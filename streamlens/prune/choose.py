"""Choose what to remove: every strategy of the layer-pruning literature, on the same choice data.

- greedy: measured greedy removal (the steps of `ablation.cumulative(mode="greedy")`). Step k removes, of the blocks
  left, the one whose removal together with the k - 1 already removed raises the loss least on the
  choice data (the engine's zero, total-effect removal); with a budget it stops once the damage
  passes the budget;
- block_influence (Men et al. 2024, ShortGPT): the k blocks with the lowest BI = 1 - cos(x_l, x_{l+1});
- angular (Gromov et al. 2024): the span of k consecutive blocks whose input and output streams are
  closest in angular distance;
- last: the k blocks before the final one (L-1-k .. L-2), the simple baseline of Gromov et al.;
- attention / mlp (He et al. 2024): the k attention (or MLP) sublayers with the lowest
  1 - cos(stream in, stream in + write). Measured; exported only where the family's config can say
  "this block has no attention" (none of the families streamlens checks can, so export refuses).

Scores come from `layers.scores.stream_scores`, damage from `ablation.evaluate`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from streamlens import ablation as A
from streamlens.ablation.spec import Progress
from streamlens.data import TokenBatch
from streamlens.importance.scores import stream_scores
from streamlens.importance.study import predicted_spans
from streamlens.model import Model
from streamlens.results import Provenance, command_line
from streamlens.results.layers import StreamScores
from streamlens.results.prune import KINDS, STRATEGIES, PruneChoice
from streamlens.sites import Site


def check_k(k: int, n_layers: int) -> int:
    """k blocks to remove: 1 .. L - 1 (at least one block must stay)."""
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k < n_layers:
        raise ValueError(f"k {k!r} out of range: the model has {n_layers} blocks, remove 1-{n_layers - 1}")
    return k


def unit_sites(strategy: str, layers: Sequence[int]) -> tuple[Site, ...]:
    """The sites a strategy's removal zeroes (blocks, attention or MLP sublayers)."""
    return tuple(Site(KINDS[strategy], int(layer)) for layer in layers)


def greedy_blocks(model: Model, batch: TokenBatch, k_max: int, options: A.EvalOptions | None = None,
                  budget: float | None = None, progress: Progress | None = None) -> tuple[list[int], list[float]]:
    """Measured greedy removal of up to `k_max` blocks: (removal order, mean loss increase after each step).

    The first `k_max` steps of `ablation.cumulative(mode="greedy")` over every block: each step
    evaluates every remaining block added to those already removed (L - step evaluations, each
    restarted from the stream of the removed blocks) and keeps the least damaging. With `budget`
    (nats) it stops after the first step whose damage passes the budget (that step is kept, so
    `PruneChoice.k_budget` can see it).
    """
    options = A.EvalOptions.of(options, metrics=("loss_increase",), n_boot=A.MIN_BOOTSTRAP)  # only the means are used
    blocks = [Site("block", layer) for layer in range(model.n_layers)]
    curve = A.cumulative(model, batch, blocks, mode="greedy", options=options, steps=k_max, budget=budget,
                         progress=progress, command="greedy")
    return [site.layer for site in curve.sites], [float(value) for value in curve.values[:, 0]]


def lowest(scores: torch.Tensor, k: int) -> tuple[int, ...]:
    """The k layers with the lowest mean score ([layer, text] -> sorted layer indices; ties: lower layer)."""
    order = torch.argsort(scores.double().mean(-1), stable=True)
    return tuple(sorted(int(i) for i in order[:k]))


def choose(model: Model, batch: TokenBatch, k_max: int, options: A.EvalOptions | None = None, *,
           budget: float | None = None, strategies: Sequence[str] = STRATEGIES, scores: StreamScores | None = None,
           progress: Progress | None = None, command: str | None = None) -> PruneChoice:
    """What each strategy removes for k = 1 .. k_max, chosen on `batch` (the choice data).

    Args:
        k_max: the largest removal (1 .. L - 1); with `budget`, greedy stops at the first step whose
            damage passes it, and every strategy is then given up to that step.
        budget: nats of choice-data loss increase the greedy removal may spend (>= 0).
        scores: the clean-pass scores (default: computed on `batch`).

    Returns:
        `PruneChoice` (sets [strategy][k - 1], greedy damage per step).
    """
    check_k(k_max, model.n_layers)
    if budget is not None and not budget >= 0:
        raise ValueError(f"budget {budget} nats must be at least 0")
    unknown = [name for name in strategies if name not in KINDS]
    if unknown:
        raise ValueError(f"unknown strategy {unknown[0]!r}: choose from {', '.join(STRATEGIES)}")
    n = model.n_layers
    scores = scores or stream_scores(model, batch)
    order, damage = (greedy_blocks(model, batch, k_max, options, budget, progress) if "greedy" in strategies
                     else ([], []))
    top = len(order) if "greedy" in strategies else k_max  # a budget may stop greedy early: compare up to there
    spans = dict(predicted_spans(scores, top))
    sets = []
    for name in strategies:
        per_k = []
        for k in range(1, top + 1):
            if name == "greedy":
                chosen = tuple(sorted(order[:k]))
            elif name == "block_influence":
                chosen = lowest(scores.block_influence, k)
            elif name == "angular":
                chosen = tuple(range(spans[k], spans[k] + k))
            elif name == "last":
                chosen = tuple(range(max(0, n - 1 - k), n - 1))
            else:
                chosen = lowest(scores.sublayer_influence[1 if name == "attention" else 2], k)
            per_k.append(chosen)
        sets.append(tuple(per_k))
    seed = A.EvalOptions.of(options).seed
    return PruneChoice(Provenance.of(model, command or command_line(), seed), tuple(strategies), tuple(sets),
                       torch.tensor(damage, dtype=torch.float64), n, batch.description, budget)
