"""A linear probe for a token's identity: ridge regression onto one-hot token ids, closed form in float64.

Fitted on some texts, scored on others: the classes are the tokens seen in training, and a held-out
token whose id was never seen cannot be scored (it is left out, and counted). Features are
standardised with the training mean and spread; the ridge penalty is `alpha` times the number of
training tokens. Closed form, so it is deterministic (no seed needed) and quick.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float, Int


@dataclass(frozen=True)
class Probe:
    """A fitted probe: classes [class] (token ids), mean, spread [d_model], weight [d_model + 1, class]."""

    classes: Int[torch.Tensor, "cls"]
    mean: Float[torch.Tensor, "d_model"]
    spread: Float[torch.Tensor, "d_model"]
    weight: Float[torch.Tensor, "d_model_plus_1 cls"]
    majority: int

    def scores(self, features: Float[torch.Tensor, "n d_model"]) -> Float[torch.Tensor, "n cls"]:
        return _design(features.double(), self.mean, self.spread) @ self.weight

    def hits(self, features: Float[torch.Tensor, "n d_model"], labels: Int[torch.Tensor, "n"],
             k: int = 5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(top-1 hit, top-k hit, majority-baseline hit, scorable) per token, all bool [n].

        scorable: the label is one of the training classes (only those are counted).
        """
        position = torch.searchsorted(self.classes, labels).clamp(max=len(self.classes) - 1)
        scorable = self.classes[position] == labels
        top = self.scores(features).topk(min(k, len(self.classes)), dim=-1).indices  # [n, k]
        top1 = (top[:, 0] == position) & scorable
        topk = (top == position[:, None]).any(-1) & scorable
        return top1, topk, (labels == self.majority) & scorable, scorable


def _design(features: torch.Tensor, mean: torch.Tensor, spread: torch.Tensor) -> torch.Tensor:
    standard = (features - mean) / spread
    return torch.cat([standard, torch.ones_like(standard[:, :1])], dim=1)


def fit_probe(features: Float[torch.Tensor, "n d_model"], labels: Int[torch.Tensor, "n"], alpha: float = 0.1) -> Probe:
    """Ridge regression of one-hot(label) on the standardised features plus a constant (float64)."""
    if features.shape[0] == 0:
        raise ValueError("no training tokens for the probe")
    x = features.double()
    mean, spread = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-8)
    design = _design(x, mean, spread)  # [n, d + 1]
    classes, index = labels.unique(return_inverse=True)
    target = torch.zeros(design.shape[1], len(classes), dtype=torch.float64)
    target.index_add_(1, index, design.T)  # design.T @ one_hot(index), without the one-hot matrix
    gram = design.T @ design
    penalty = alpha * design.shape[0] * torch.eye(design.shape[1], dtype=torch.float64)
    penalty[-1, -1] = 0.0  # the constant is not penalised
    weight = torch.linalg.solve(gram + penalty, target)
    counts = torch.bincount(index, minlength=len(classes))
    return Probe(classes, mean, spread, weight, int(classes[counts.argmax()]))
