"""The gradient highway in a real model: per-layer gradients of the LM loss, with and without skips.

Definitions (what the numbers mean):
- the stream entering block L is `resid_pre L` [batch, pos, d_model];
- the loss is the mean next-token cross-entropy over every position of the batch;
- the gradient norm at layer L is ||dloss/d resid_pre L||, the Frobenius norm over batch, pos and
  d_model of the *total* gradient reaching the stream there (through the block and around it);
- removing the skip of block L: the stream leaving the block is the sum of the block's two writes,
  `resid_post L = attn_out L + mlp_out L`, instead of `resid_pre L + attn_out L + mlp_out L`. A hook
  on `resid_post L` returns `resid_post L - resid_pre L`. Only the block's outer identity path is cut:
  in a pre-norm block the MLP still reads `resid_pre L + attn_out L`. So d resid_post / d resid_pre
  becomes dF/dx instead of I + dF/dx, with F the whole block.

The parameters have `requires_grad=False`; a hook on the embedding returns a detached copy that
requires grad, so autograd builds the graph from the stream onwards and nothing else changes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import einops
import torch

from streamlens.ablation.apply import skip_removal_hooks
from streamlens.model import Model
from streamlens.results import Provenance, command_line
from streamlens.results.highway import ALL_SKIPS, RealHighway, condition_label

if TYPE_CHECKING:
    import pandas as pd


def highway_tokens(model: Model, window: int = 64, n_windows: int = 4) -> tuple[torch.Tensor, str]:
    """A small batch of text: token ids [n_windows, window] from the built-in texts, and a description."""
    from streamlens.data import load_texts, token_windows

    tokens = token_windows(model, load_texts(None), window, n_windows)
    return tokens, f"builtin texts ({tokens.shape[0]} windows of {tokens.shape[1]} tokens)"


def _gradients_without_skips(model: Model, tokens: torch.Tensor, removed: Sequence[int]) -> tuple[torch.Tensor, ...]:
    """One forward and backward pass: (grad_norm [layer], stream_norm [layer], loss [])."""
    streams: dict[int, torch.Tensor] = {}
    hooks = skip_removal_hooks(model, removed, streams)
    with torch.enable_grad():
        logits = model.run(tokens, hooks=hooks)
        predictions = einops.rearrange(logits[:, :-1], "batch pos vocab -> (batch pos) vocab")
        labels = einops.rearrange(tokens[:, 1:], "batch pos -> (batch pos)")
        loss = torch.nn.functional.cross_entropy(predictions, labels)
        inputs = [streams[layer] for layer in range(model.n_layers)]
        grads = torch.autograd.grad(loss, inputs)
    grad_norm = torch.stack([grad.norm() for grad in grads])
    stream_norm = torch.stack([stream.detach().norm() for stream in inputs])
    return grad_norm, stream_norm, loss.detach()


def skip_gradients(
    model: Model,
    tokens: torch.Tensor,
    removed: Sequence[Sequence[int]] = ((),),
    text: str = "",
    command: str | None = None,
    on_condition: Any = None,
) -> RealHighway:
    """Per-layer gradient of the LM loss for the model as it is and with some skips removed.

    Args:
        model: a loaded `Model` (its hooks are attached only during each pass).
        tokens: token ids [batch, pos], pos >= 2.
        removed: one entry per condition: the blocks whose skip is removed (empty: none).
        text: a description of the tokens, kept in the result.
        on_condition: called with no argument after each condition (progress bars).
    """
    model.check_tokens(tokens)
    if tokens.shape[1] < 2:
        raise ValueError(f"tokens have {tokens.shape[1]} position: need at least 2 for one next-token prediction")
    if not removed:
        raise ValueError("no condition to measure: give at least one set of layers (empty: the model as it is)")
    removed = tuple(tuple(sorted({model.check_layer(layer) for layer in layers})) for layers in removed)
    results = []
    for layers in removed:
        results.append(_gradients_without_skips(model, tokens, layers))
        if on_condition is not None:
            on_condition()
    grad_norm, stream_norm, loss = (torch.stack(parts) for parts in zip(*results))
    return RealHighway(
        provenance=Provenance.of(model, command or command_line()),
        conditions=tuple(condition_label(layers, model.n_layers) for layers in removed),
        removed=removed, tokens=tokens.detach().cpu(), text=text,
        grad_norm=grad_norm.cpu(), stream_norm=stream_norm.cpu(), loss=loss.cpu(),
    )
