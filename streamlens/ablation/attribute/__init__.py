"""Estimates of every unit's removal at once, checked against the exact engine.

Modules, each importing only those before it: `common` (metrics with a gradient, per-text values),
`atpstar` (AtP and AtP*'s QK fix and GradDrop), `paths` (integrated gradients and the second-order
term along the clean -> ablated path), `local` (exact through the unit's own block and d more layers,
first order after), `estimate` (`attribute`, the one entry point), `check` (`ranking`, `verify`,
`agreement`), `topk` (`exact_top`: the exact top K, settled by a split-conformal error model
calibrated on a random sample of units).
"""

from streamlens.ablation.attribute.check import Agreement, agreement, ranking, verify
from streamlens.ablation.attribute.common import GRADIENT_METRICS, gradient_metrics
from streamlens.ablation.attribute.estimate import ESTIMATES, attribute, check_estimate, method_label
from streamlens.ablation.attribute.topk import ExactTop, exact_top

__all__ = ["ESTIMATES", "GRADIENT_METRICS", "Agreement", "ExactTop", "agreement", "attribute", "check_estimate",
           "exact_top", "gradient_metrics", "method_label", "ranking", "verify"]
