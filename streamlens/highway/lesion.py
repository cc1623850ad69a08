"""The lesion test of Veit, Wilber & Belongie 2016 ("Residual Networks Behave Like Ensembles of
Relatively Shallow Networks"): after training, delete one block at test time and measure the damage.

Deleting block b makes its output equal to its input (the stack skips it). For a residual block that
removes the branch F and keeps the skip; for a plain block it removes the whole layer, so the next
block sees a stream it was never trained on. Only blocks whose input and output shapes agree can be
deleted (`model.lesionable`); the others are reported as NaN. Batch norm runs in eval mode.
"""

from __future__ import annotations

import torch
from torch import nn

from streamlens.highway.testbeds import Testbed
from streamlens.highway.training import evaluate


def lesion_profile(model: nn.Module, testbed: Testbed,
                   max_depth: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Held-out loss and accuracy with each block deleted in turn: two [max_depth] tensors (default depth).

    Entry b is the model with block b deleted; NaN for blocks that cannot be deleted (a change of
    shape) and beyond the model's depth. The identity `lesion_profile` of no block = `evaluate`.
    """
    width = model.depth if max_depth is None else max_depth
    losses = torch.full((width,), float("nan"), dtype=torch.float64)
    accuracies = torch.full((width,), float("nan"), dtype=torch.float64)
    for block in model.lesionable:
        losses[block], accuracies[block] = evaluate(model, testbed, frozenset({block}))
    return losses, accuracies
