"""Record every write into the residual stream, and nothing else.

One forward pass with a handful of hooks that copy just the sublayer writes: the embedding(s), each
attention write, each MLP write, optionally each head's `z` (its write `z @ W_O` is computed on
demand, one layer at a time, so a record with heads is barely larger than one without), and the
final stream before the final norm with its scale. No full activation cache is built.

Identity (tested): embed (+ pos_embed) + sum_L (attn_L + mlp_L) == final stream; per layer,
sum_h head write + attention bias write == attention write (post-norm models: through the clean
post-norm scale).
"""

from __future__ import annotations

from typing import Any

import torch

from streamlens import sites
from streamlens.model import Model
from streamlens.results import Provenance, StreamWrites, command_line


def _recording_hooks(model: Model, kept: dict[str, torch.Tensor], attn: torch.Tensor, mlp: torch.Tensor,
                     z: torch.Tensor | None, post_scale: torch.Tensor | None) -> list[tuple[str, Any]]:
    """Hooks that copy the embeddings and final stream into `kept` (by site name) and each layer's writes
    into row `layer` of the buffers `attn`, `mlp` (and `z`, `post_scale` where given)."""

    def into(buffer: torch.Tensor, layer: int):
        def hook(tensor: torch.Tensor, hook: Any) -> None:
            buffer[layer].copy_(tensor.detach())

        return hook

    names = [sites.EMBED, sites.FINAL_STREAM, sites.FINAL_SCALE]
    names += [sites.POS_EMBED] if model.has_pos_embed else []
    # keyed by the name we asked for: the bridge reports aliases under their canonical names
    hooks = [(name, sites.storing(kept, name, copy=True)) for name in names]
    for layer in range(model.n_layers):
        hooks += [(sites.attn_out(layer), into(attn, layer)), (sites.mlp_out(layer), into(mlp, layer))]
        if z is not None:
            hooks.append((sites.attn_z(layer), into(z, layer)))
        if post_scale is not None:
            hooks.append((sites.attn_post_scale(layer), into(post_scale, layer)))
    return hooks


def record(model: Model, tokens: torch.Tensor, heads: bool = False, command: str | None = None) -> StreamWrites:
    """Run `tokens` [batch, pos] once and keep each write into the stream.

    Args:
        model: a loaded `Model`.
        tokens: token ids [batch, pos].
        heads: also keep each head's z [n_layers, batch, pos, n_heads, d_head] (and, for post-norm
            models, the attention post-norm's scale): `writes.head_writes(layer)` gives the per-head
            writes [batch, pos, n_heads, d_model].

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
    z = torch.empty(n_layers, batch, n_pos, model.n_heads, model.info.d_head, **empty) if heads else None
    post_weights = [model.attn_post_norm(layer) for layer in range(n_layers)] if heads else []  # sandwich norms
    has_post = any(weight is not None for weight in post_weights)
    post_scale = torch.empty(n_layers, batch, n_pos, 1, **empty) if has_post else None
    kept: dict[str, torch.Tensor] = {}
    hooks = _recording_hooks(model, kept, attn, mlp, z, post_scale)
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
        attn_bias=torch.stack([model.b_O(layer).detach() for layer in layers]),
        final=kept[sites.FINAL_STREAM],
        final_scale=kept[sites.FINAL_SCALE],
        logits=logits.detach(),
        norm=model.info.norm,
        z=z,
        W_O=tuple(model.W_O(layer).detach() for layer in layers) if heads else None,  # the model's own, not copies
        attn_post_weight=torch.stack([w.detach() for w in post_weights]) if has_post else None,
        attn_post_scale=post_scale,
    )
