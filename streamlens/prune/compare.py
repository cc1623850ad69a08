"""Judge the strategies on held-out text: loss against k, paired bootstrap, and the papers' verdicts.

Every strategy's removal for every k (from `choose`) is evaluated by the engine on the evaluation
windows (zero, total effect: the blocks are skipped, exactly what deleting them computes), so the
held-out loss of each text is clean loss + the engine's loss increase. Removal sets that two
strategies share are evaluated once. Differences between strategies are paired over texts: the
same texts in every bootstrap replicate (`StrategyComparison.paired`).
"""

from __future__ import annotations

import torch

from streamlens import ablation as A
from streamlens.ablation.spec import Progress
from streamlens.data import TokenBatch
from streamlens.importance.verdict import PAPERS
from streamlens.metrics import bootstrap_ci
from streamlens.model import Model
from streamlens.prune.choose import unit_sites
from streamlens.results import Provenance, command_line
from streamlens.results.layers import Verdict
from streamlens.results.prune import KINDS, LABELS, PruneChoice, StrategyComparison

GROMOV_HEALING = ("Gromov et al. 2024 (Llama-2-70B and others; MMLU, BoolQ; the angular-distance span, healed with "
                  "QLoRA): up to about half the layers can go before MMLU collapses to chance; without healing the "
                  "deepest-blocks heuristic is much worse, with healing it comes close to the angular choice.")


def comparison_specs(choice: PruneChoice) -> tuple[list[A.Ablation], dict[tuple[str, int], int]]:
    """The distinct removals of `choice` and, for each (strategy, k), the index of its removal."""
    specs: list[A.Ablation] = []
    index: dict[tuple[str, int], int] = {}
    seen: dict[tuple, int] = {}
    for s, name in enumerate(choice.strategies):
        for k, layers in enumerate(choice.sets[s], start=1):
            key = (KINDS[name], layers)
            if key not in seen:
                seen[key] = len(specs)
                specs.append(A.Ablation(unit_sites(name, layers)))
            index[(name, k)] = seen[key]
    return specs, index


def compare(model: Model, batch: TokenBatch, choice: PruneChoice, options: A.EvalOptions | None = None, *,
            progress: Progress | None = None, command: str | None = None) -> StrategyComparison:
    """Held-out loss of every strategy's removal for k = 1 .. k_max on `batch` (texts the choice never saw)."""
    options = A.EvalOptions.of(options, metrics=("loss_increase",))
    specs, index = comparison_specs(choice)
    result = A.evaluate(model, batch, specs, options, progress=progress, command=command)
    increase = result.per_text[:, 0]  # [spec, text]
    loss = torch.stack([torch.stack([result.clean_loss + increase[index[(name, k)]]
                                     for k in range(1, choice.k_max + 1)]) for name in choice.strategies])
    boot = dict(n_boot=options.n_boot, seed=options.seed)
    interval = torch.stack(bootstrap_ci(loss, **boot), dim=-1)  # [strategy, k, 3]
    clean_interval = torch.stack(bootstrap_ci(result.clean_loss, **boot), dim=-1)
    if "greedy" in choice.strategies:  # paired: the difference per text, resampled over texts
        gap = torch.stack(bootstrap_ci(loss[choice.strategies.index("greedy")][None] - loss, **boot), dim=-1)
    else:
        gap = torch.full_like(interval, torch.nan)
    return StrategyComparison(Provenance.of(model, command or command_line(), options.seed), choice.strategies,
                              choice.sets, loss, result.clean_loss.clone(), interval, clean_interval, gap, choice.data,
                              batch.description, options.n_boot, options.seed)


def _decide(low: float, high: float) -> str:
    """'holds' when the 95% CI of (greedy - other) lies below 0, 'differs' above, else 'unclear'."""
    return "holds" if high < 0 else "differs" if low > 0 else "unclear"


def verdicts(comparison: StrategyComparison, k: int | None = None) -> tuple[Verdict, ...]:
    """The papers' claims next to this model's held-out numbers at `k` (default: the largest k).

    Each row: the paired difference of held-out loss between two strategies (nats, 95% CI over
    texts). Our metric is next-token loss on held-out text without healing; the papers measured
    benchmark accuracy (and Gromov et al. healed), so "differs" can mean the metric differs.
    """
    k = k or comparison.k_max
    strategies = comparison.strategies
    rows = []
    for other, paper in (("block_influence", PAPERS["bi"]), ("angular", PAPERS["angular"] + " " + GROMOV_HEALING),
                         ("last", GROMOV_HEALING)):
        if "greedy" not in strategies or other not in strategies:
            continue
        value, low, high = comparison.paired(other, k)
        claim = f"Measured greedy removal beats {LABELS[other]} on held-out text"
        rows.append(Verdict(
            claim, f"held-out loss with {k} blocks removed: measured greedy minus {LABELS[other]} (paired over "
                   f"texts); holds: the 95% CI lies below 0",
            f"{value:+.3f} nats [{low:+.3f}, {high:+.3f}]", value, low, high, paper, _decide(low, high)))
    for sub in ("attention", "mlp"):
        if sub in strategies and "greedy" in strategies:
            gap, gap_low, gap_high = comparison.paired(sub, k)  # greedy - sub: negate for sub - greedy
            value, low, high = -gap, -gap_high, -gap_low
            rows.append(Verdict(
                f"Removing {k} {'attention' if sub == 'attention' else 'MLP'} sublayers costs less than {k} blocks",
                f"held-out loss: {LABELS[sub]} minus measured greedy blocks, {k} units each (paired over texts)",
                f"{value:+.3f} nats [{low:+.3f}, {high:+.3f}]", value, low, high, PAPERS["attention"],
                _decide(low, high)))
    return tuple(rows)
