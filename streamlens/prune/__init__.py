"""Prune layers, ship the smaller model, and prove what it costs on held-out text (issue 20).

- `choose`: what every strategy of the literature removes, on the same choice data (measured
  greedy removal, Block Influence, the angular-distance span, the last blocks, attention-only and
  MLP-only removal), for k blocks or a damage budget;
- `compare`: held-out loss of each strategy against k, paired bootstrap, the papers' verdicts;
- `prove`: export the removal as an HF folder (and GGUF) and compare its logits with the engine's
  simulated removal;
- `pipeline`: `streamlens prune` as named steps (`run -> PruneRun`);
- `evaluate`: a pruned model against the full one on held-out text (loss, KL, top-1 agreement,
  prompt accuracy, parameters, file sizes, tokens/s, greedy generations), as `evaluate_pruned`;
- `heal`: a short fine-tune (LoRA or full, LM loss or distillation) judged the same way.

Results live in `streamlens.results.prune`, figures in `streamlens.plots.prune`, the page in
`streamlens.pages.prune`.
"""

from streamlens.prune.choose import check_k, choose, greedy_blocks
from streamlens.prune.compare import compare, verdicts
from streamlens.prune.evaluate import EvaluateSettings
from streamlens.prune.evaluate import compare as evaluate_pruned
from streamlens.prune.heal import heal
from streamlens.prune.pipeline import PruneConfig, PruneRun, run
from streamlens.prune.prove import export, prove, simulated_logits
from streamlens.results.prune import KINDS, STRATEGIES, ExportCheck, PruneChoice, StrategyComparison

__all__ = ["KINDS", "STRATEGIES", "EvaluateSettings", "ExportCheck", "PruneChoice", "PruneConfig", "PruneRun",
           "StrategyComparison", "check_k", "choose", "compare", "evaluate_pruned", "export", "greedy_blocks", "heal",
           "prove", "run", "simulated_logits", "verdicts"]
