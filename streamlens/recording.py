"""Record every write into the residual stream, and nothing else.

One forward pass with a handful of hooks that copy just the sublayer writes: the embedding(s), each
attention write, each MLP write, optionally each head's write (`z @ W_O`, computed inside the hook
so `z` itself is never kept), and the final stream before the final norm with its scale. No full
activation cache is built.

Identity (tested): embed (+ pos_embed) + sum_L (attn_L + mlp_L) == final stream.
"""

from __future__ import annotations

from typing import Any

import einops
import torch

from streamlens import sites
from streamlens.model import Model
from streamlens.results import Provenance, StreamWrites, command_line


def record(model: Model, tokens: torch.Tensor, heads: bool = False, command: str | None = None) -> StreamWrites:
    """Run `tokens` [batch, pos] once and keep each write into the stream.

    Args:
        model: a loaded `Model`.
        tokens: token ids [batch, pos].
        heads: also keep per-head attention writes [n_layers, batch, pos, n_heads, d_model].

    Returns:
        `StreamWrites` whose `embed + pos_embed + attn.sum(0) + mlp.sum(0)` equals `final`.
    """
    model.check_tokens(tokens)
    batch, n_pos = tokens.shape
    n_layers, d_model = model.n_layers, model.info.d_model
    empty = dict(dtype=model.dtype, device=model.device)
    # Writes go straight into preallocated buffers: no per-layer list, no stacking copy at the end.
    attn = torch.empty(n_layers, batch, n_pos, d_model, **empty)
    mlp = torch.empty(n_layers, batch, n_pos, d_model, **empty)
    head_writes = torch.empty(n_layers, batch, n_pos, model.n_heads, d_model, **empty) if heads else None
    kept: dict[str, torch.Tensor] = {}

    def keep(name: str):
        # keyed by the name we asked for: the bridge reports aliases under their canonical names
        def hook(tensor: torch.Tensor, hook: Any) -> None:
            kept[name] = tensor.detach().clone()

        return hook

    def into(buffer: torch.Tensor, layer: int):
        def hook(tensor: torch.Tensor, hook: Any) -> None:
            buffer[layer].copy_(tensor.detach())

        return hook

    def into_heads(buffer: torch.Tensor, layer: int):
        W_O = model.W_O(layer)

        def hook(z: torch.Tensor, hook: Any) -> None:
            # z: [batch, pos, head, d_head] -> per-head write [batch, pos, head, d_model]
            buffer[layer].copy_(einops.einsum(
                z.detach(), W_O, "batch pos head d_head, head d_head d_model -> batch pos head d_model"
            ))

        return hook

    names = [sites.EMBED, sites.FINAL_STREAM, sites.FINAL_SCALE]
    names += [sites.POS_EMBED] if model.has_pos_embed else []
    hooks = [(name, keep(name)) for name in names]
    for layer in range(n_layers):
        hooks += [(sites.attn_out(layer), into(attn, layer)), (sites.mlp_out(layer), into(mlp, layer))]
        if head_writes is not None:
            hooks.append((sites.attn_z(layer), into_heads(head_writes, layer)))
    with torch.inference_mode():
        logits = model.run(tokens, hooks=hooks)
    layers = range(model.n_layers)
    return StreamWrites(
        provenance=Provenance.of(model, command or command_line()),
        tokens=tokens.detach().cpu(),
        token_strings=tuple(model.decode(t) for t in tokens[0].tolist()),
        embed=kept[sites.EMBED],
        pos_embed=kept.get(sites.POS_EMBED),
        attn=attn,
        mlp=mlp,
        heads=head_writes,
        attn_bias=torch.stack([model.b_O(layer).detach() for layer in layers]),
        final=kept[sites.FINAL_STREAM],
        final_scale=kept[sites.FINAL_SCALE],
        logits=logits.detach(),
        norm=model.info.norm,
    )
