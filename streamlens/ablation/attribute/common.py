"""What every estimator shares: the metrics with a gradient, per-prediction metric values, the
differentiable stream, and the per-text dot product of a write change with a gradient."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from streamlens import metrics as M
from streamlens.data import TokenBatch

GRADIENT_METRICS = ("loss_increase", "target_logit_change", "target_prob_change")


def gradient_metrics(metrics: Sequence[str] | None, batch: TokenBatch) -> tuple[str, ...]:
    """The metrics an estimate covers: `metrics` (checked) or every gradient metric that applies."""
    has_targets = batch.targets is not None
    if metrics is None:
        return tuple(name for name in M.default_metrics(has_targets) if name in GRADIENT_METRICS)
    names = M.check_metrics(tuple(metrics), has_targets)
    for name in names:
        if name not in GRADIENT_METRICS:
            raise ValueError(f"metric {name!r} has no useful gradient at the clean model (KL: value and gradient "
                             f"0; top-1 agreement: piecewise constant): estimates cover {', '.join(GRADIENT_METRICS)}")
    return names


def leaf(embedding: torch.Tensor, hook: Any) -> torch.Tensor:
    """Make the stream differentiable from the embedding on (parameters need no gradient)."""
    return embedding.detach().clone().requires_grad_(True)


def dot(delta: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """Sum over positions and features of delta * gradient, per text: [n] float64 (delta broadcasts)."""
    product = (delta.double() * gradient.double()).reshape(gradient.shape[0], -1)
    return product.sum(-1).cpu()


def token_values(logits: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor | None,
                 names: tuple[str, ...]) -> torch.Tensor:
    """Clean per-prediction values [metric, N] whose differences are the metrics: loss, target logit,
    target probability."""
    logsumexp = logits.logsumexp(-1)
    rows = torch.arange(logits.shape[0], device=logits.device)
    out = []
    for name in names:
        if name == "loss_increase":
            out.append(logsumexp - logits[rows, labels])
        elif name == "target_logit_change":
            out.append(logits[rows, targets])
        else:
            out.append((logits[rows, targets] - logsumexp).exp())
    return torch.stack(out)


def per_text_metrics(model: Any, batch: TokenBatch, final: torch.Tensor,
                     names: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """From the final stream [n, pos, d_model]: per-text metric values [metric, n] (differentiable)
    and the clean loss per text [n] (float64, detached)."""
    text_index, position = batch.scored.nonzero(as_tuple=True)
    logits = model.final_norm(final[text_index, position]) @ model.W_U + model.b_U
    labels = batch.labels[text_index, position]
    targets = None if batch.targets is None else batch.targets[text_index]
    per_text = M.per_text_means(token_values(logits, labels, targets, names), text_index, batch.n_texts)
    loss = M.per_text_means(token_values(logits.detach(), labels, None, ("loss_increase",))[0], text_index,
                            batch.n_texts)
    return per_text, loss.double().cpu()


def metric_name(result: Any, metric: str | None) -> str:
    """`metric` (default: the result's first), checked against the result's metrics."""
    name = metric or result.metrics[0]
    if name not in result.metrics:
        raise ValueError(f"metric {name!r} not in this result: choose from {', '.join(result.metrics)}")
    return name
