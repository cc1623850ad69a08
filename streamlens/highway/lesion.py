"""The lesion test of Veit, Wilber & Belongie 2016 ("Residual Networks Behave Like Ensembles of
Relatively Shallow Networks"): after training, delete one block at test time and measure the damage.

Deleting block b makes its output equal to its input (the stack skips it). For a residual block that
removes the branch F and keeps the skip; for a plain block it removes the whole layer, so the next
block sees a stream it was never trained on. Only blocks whose input and output shapes agree can be
deleted (`model.lesionable`); the others are reported as NaN. Batch norm runs in eval mode.

`reuse_ablation` is the same test for the design notes' "dense connections give maximal feature reuse":
it deletes a DenseFormer stack's weights on non-adjacent earlier states and measures the damage.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from streamlens.highway.testbeds import Testbed
from streamlens.highway.training import evaluate
from streamlens.highway.variants import Dense


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


def reuse_ablation(model: nn.Module, testbed: Testbed) -> tuple[float, float]:
    """How much a trained DenseFormer stack reuses earlier states: (weight share, held-out loss without them).

    Connection i computes y = a_self (x + F(LN(x))) + sum_{j <= i} a_j h_j, where h_i = x is its own
    input (adjacent) and h_j, j < i, are earlier states (non-adjacent). The weight share is
    sum_i sum_{j<i} |a_ij| / sum_i (|a_self,i| + sum_{j<=i} |a_ij|), 0 at init (all a_j = 0). The
    ablation sets every non-adjacent a_ij to 0 on a copy and scores the held-out set: its loss minus
    the trained model's loss is what the reuse is worth. (NaN, NaN) for a model without dense connections.
    """
    dense = [m for m in model.modules() if isinstance(m, Dense)]
    if not dense:
        return float("nan"), float("nan")
    reused = sum(float(m.weights[:-1].detach().abs().sum()) for m in dense)
    total = sum(float(m.weights.detach().abs().sum() + m.self_weight.detach().abs()) for m in dense)
    ablated = copy.deepcopy(model)
    with torch.no_grad():
        for m in ablated.modules():
            if isinstance(m, Dense):
                m.weights[:-1] = 0
    return reused / total, evaluate(ablated, testbed)[0]
