"""The gradient highway: why residual connections let deep stacks train.

With y = x + F(x) the Jacobian is dy/dx = I + dF/dx, so the gradient reaching layer l is a product of
(I + dF/dx) terms that always keeps a path around every block; a plain stack, y = F(x), multiplies
dF/dx terms only, and its gradient at early layers shrinks or grows exponentially with depth. And a
residual block with F = 0 is exactly the identity, so a deeper residual stack can always fall back to
a shallower one.

Two measurements, each in its own module:
- `highway.toy`: plain vs residual MLP stacks trained on a teacher task at several depths
  (`toy_highway(ToyConfig(...)) -> ToyHighway`);
- `highway.real`: per-layer gradients of the LM loss in a real model, with the skips of chosen blocks
  removed (`skip_gradients(model, tokens, removed) -> RealHighway`).

The residual family (issue 22) adds `highway.variants` (plain, pre/post-norm, highway, ReZero,
DenseFormer, concatenation: one module each around a sublayer F), `highway.testbeds` (toy MLP,
character Transformer, digits CNN), `highway.training`, `highway.lesion` (Veit et al. 2016),
`highway.study` (`residual_study(ResidualConfig(...)) -> ResidualStudy`) and `highway.verdicts`.

This package re-exports both; their results live in `streamlens.results.highway`, the page that
composes them in `streamlens.pages.highway`.
"""

from __future__ import annotations

from streamlens.highway.real import (
    highway_tokens,
    skip_gradients,
)
from streamlens.ablation.apply import skip_removal_hooks
from streamlens.sites import parse_layers
from streamlens.highway.toy import (
    KINDS,
    Stack,
    make_stack,
    torch_init_ratio,
    toy_highway,
    zero_branch_check,
)

from streamlens.highway.study import residual_study
from streamlens.highway.verdicts import residual_verdicts
from streamlens.results.highway import ALL_SKIPS, RealHighway, ToyConfig, ToyHighway, condition_label
from streamlens.results.residuals import ResidualConfig, ResidualStudy

__all__ = [
    "ALL_SKIPS", "KINDS", "RealHighway", "ResidualConfig", "ResidualStudy", "Stack", "ToyConfig", "ToyHighway",
    "condition_label", "highway_tokens", "make_stack", "parse_layers", "residual_study", "residual_verdicts",
    "skip_gradients", "skip_removal_hooks", "torch_init_ratio", "toy_highway", "zero_branch_check",
]
