"""Where attention reads from: each head's logit contribution split by source position.

With the attention pattern frozen at its clean value, the write of head h at destination position d is

    write[d, h] = sum over src of pattern[h, d, src] * (v[src, h] @ W_O[h])

(the sum runs over src <= d in a causal model). The exact decomposition (`decompose`) freezes the
final norm's scale, which makes the logit linear in every write, so each term of this sum has its own
logit contribution `(w * centre(part) / scale) @ W_U[:, target]` and the terms add up exactly to the
head's contribution. MLP writes read only their own position; attention is where information moves.
"""

from __future__ import annotations

from typing import Any

import einops
import torch

from streamlens import sites
from streamlens.decomposition import centre, prompt_tokens
from streamlens.model import Model
from streamlens.recording import record
from streamlens.results import Provenance, command_line
from streamlens.results.sources import AttentionSources


def attention_sources(
    model: Model,
    prompt_or_tokens: str | torch.Tensor,
    target: str | int | None = None,
    position: int = -1,
    command: str | None = None,
) -> AttentionSources:
    """Split every head's direct contribution to a target logit by the source position it read.

    Args:
        model: a loaded `Model`.
        prompt_or_tokens: a prompt, or token ids [1, pos].
        target: the token whose logit is explained (" Paris" or an id); None: the model's top prediction.
        position: the destination position (negative counts from the end).

    Returns:
        `AttentionSources`; `contributions.sum(-1)` equals each head's contribution in
        `decompose(model, tokens, target, positions=position, by_head=True)`.
    """
    tokens = prompt_tokens(model, prompt_or_tokens)
    n_pos = tokens.shape[1]
    if not -n_pos <= position < n_pos:
        raise ValueError(f"position {position} out of range: the prompt has {n_pos} tokens ({-n_pos} to {n_pos - 1})")
    position %= n_pos
    writes = record(model, tokens, heads=True)
    patterns, values = _patterns_and_values(model, tokens)
    target_id = int(writes.logits[0, position].argmax()) if target is None else model.token_id(target)
    with torch.inference_mode():
        scale = writes.final_scale[0, position]  # [1], frozen at its clean value
        readout = model.norm_weight * model.W_U[:, target_id] / scale  # [d_model]: logit per unit of a write
        contributions, same, other = [], [], []
        for layer in range(model.n_layers):
            W_O = model.W_O(layer)
            # every head's write from every source, [head, src, d_model], at the chosen destination
            parts = einops.einsum(patterns[layer][:, position], values[layer], W_O,
                                  "head src, src head d_head, head d_head d_model -> head src d_model")
            contributions.append(centre(parts, model.info.norm) @ readout)
            # at every destination: the heads' write from the same position, and from all others
            diagonal = torch.diagonal(patterns[layer], dim1=-2, dim2=-1)  # [head, pos]
            same_write = einops.einsum(diagonal, values[layer], W_O,
                                       "head pos, pos head d_head, head d_head d_model -> pos d_model")
            all_heads = writes.heads[layer, 0].sum(1)  # [pos, d_model]
            same.append(same_write.norm(dim=-1))
            other.append((all_heads - same_write).norm(dim=-1))
        head_writes = writes.heads[:, 0, position]  # [layer, head, d_model]
        head_totals = centre(head_writes, model.info.norm) @ readout
    return AttentionSources(
        provenance=Provenance.of(model, command or command_line()),
        tokens=tokens.cpu(),
        token_strings=tuple(model.decode(t) for t in tokens[0].tolist()),
        position=position,
        target_id=target_id,
        target_string=model.decode(target_id),
        contributions=torch.stack(contributions).cpu(),
        head_totals=head_totals.cpu(),
        logit=float(writes.logits[0, position, target_id]),
        same_norm=torch.stack(same).cpu(),
        other_norm=torch.stack(other).cpu(),
        mlp_norm=writes.mlp[:, 0].norm(dim=-1).cpu(),
    )


def _patterns_and_values(model: Model, tokens: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """One forward keeping each layer's pattern [head, dst, src] and per-head values [src, head, d_head]."""
    patterns: dict[int, torch.Tensor] = {}
    values: dict[int, torch.Tensor] = {}

    def keep(store: dict[int, torch.Tensor], layer: int):
        def hook(tensor: torch.Tensor, hook: Any) -> None:
            store[layer] = tensor[0].detach().clone()

        return hook

    hooks = []
    for layer in range(model.n_layers):
        hooks += [(sites.attn_pattern(layer), keep(patterns, layer)), (sites.attn_v(layer), keep(values, layer))]
    with torch.inference_mode():
        model.run(tokens, hooks=hooks)
    layers = range(model.n_layers)
    return [patterns[layer] for layer in layers], [model.values_per_head(values[layer]) for layer in layers]
