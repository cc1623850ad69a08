"""Ablation: remove writes into the residual stream and measure what the model loses.

Units are `sites.Site`s: "block L" (attention and MLP of layer L), "attn L", "mlp L", "head L.H"
("L3H2"), or any set of them (`Ablation(sites=...)`).

Methods (what takes the removed write's place; always computed from clean runs):
- zero: nothing;
- mean: the write's mean over the reference positions (every real position of the evaluated texts);
- resample: the same write on another text: a fixed, seeded derangement of the texts gives each text
  a donor, at the same position (for prompts, the donor's last position if the donor is shorter).
A head is ablated through its `hook_z` (z = 0, mean z, donor z), which removes exactly its write
z_h @ W_O[h]; the attention output bias b_O stays.

Effects:
- total: the write is replaced inside the forward and later layers react to it;
- direct: only the write's own path to the logits is removed: later layers see the clean stream and
  final stream = clean final stream - write + replacement, on which the model's final norm is
  recomputed (not frozen) before the unembedding.

Speed, with the numbers of one hooked full forward per unit (benchmarks/bench_ablation.py):
one clean pass caches `resid_pre` of every layer (and the writes a method needs); each ablated
forward restarts at its first ablated layer (`model.run_to(..., start_at_layer=L)` skips earlier
blocks); a unit that removes a whole block L starts at L+1 from resid_pre L + replacements (block
L's output is overwritten, so it is never computed); forwards stop at the final stream and
`metrics.logit_stats` unembeds only the scored positions, in vocabulary chunks; direct effects need
no forward at all; variants that restart at the same layer share one forward (`batch_size`).

Modules, each importing only those before it: `spec` (what an ablation is), `options`
(`EvalOptions`), `replace` (the zero | mean | resample switch and the clean captures it needs),
`apply` (hooks and the `ablated` context manager), `engine` (the one loop of fast evaluation),
`sweeps` (evaluate, sweep, cumulative: specs in, a result with bootstrap CIs out), `checkpoint`
(shards of a call, and the files that let a killed run resume), `backends` (the shards in this
process or on Ray workers), `placement` (which backend and batch size a run gets), `swap` (layer swaps as specs), `attribute`
(a package: estimates of every unit at once, AtP, AtP*, integrated gradients, second order, checked
against the engine, and the exact top K measured in the estimate's order).
"""

from streamlens.ablation.apply import ablated
from streamlens.ablation.backends import LocalBackend, RayBackend
from streamlens.ablation.checkpoint import Checkpoint, CheckpointMismatch
from streamlens.ablation.sweeps import by_damage, cumulative, cumulative_evaluations, evaluate, sweep
from streamlens.ablation.attribute import (ESTIMATES, GRADIENT_METRICS, ExactTop, agreement, attribute, exact_top,
                                          method_label, verify)
from streamlens.ablation.options import EvalOptions
from streamlens.ablation.replace import donor_rows
from streamlens.ablation.spec import CUMULATIVE_MODES, EFFECTS, METHODS, UNIT_KINDS, Ablation, units
from streamlens.limits import MIN_BOOTSTRAP, check_n_boot

__all__ = ["CUMULATIVE_MODES", "EFFECTS", "ESTIMATES", "GRADIENT_METRICS", "METHODS", "MIN_BOOTSTRAP", "UNIT_KINDS",
           "Ablation", "Checkpoint", "CheckpointMismatch", "EvalOptions", "ExactTop", "LocalBackend", "RayBackend",
           "ablated", "agreement", "attribute", "by_damage", "check_n_boot", "cumulative", "cumulative_evaluations",
           "donor_rows", "evaluate", "exact_top", "method_label", "sweep", "units", "verify"]
