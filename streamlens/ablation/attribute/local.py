"""`estimate="local"`: each unit's removal computed exactly through its own block and `depth` more
layers, and to first order only after that.

AtP linearises the whole network after a unit's write; its largest errors on SmolLM2 sit on the
layer-0/1 heads, whose change passes first through their own layer's MLP (the model's extended
embedding) before anything else (docs/estimates.md). Here, for a unit u of layer l and s =
min(l + depth, L - 1), the stream after layer s is recomputed with u replaced, by a partial forward
from the clean resid_pre l (the engine's restart, stopped early), and only the layers after s are
linearised with the clean gradient:

    M(u removed) - M(clean) ~ (resid_post_s(u removed) - resid_post_s(clean)) . dM/d resid_post_s

per text (resid_post_s = resid_pre s+1, or the final stream for s = L - 1: then only the final
norm and unembedding are first order). Identities (tested): an MLP or a block with depth 0 is AtP
(the write is the whole change of resid_post l); with depth >= L - 1 - l the stream change is the
exact one, and the estimate is its first-order effect through the final norm and unembedding.

Cost: per unit, (depth + 1) layers of partial forward (`batch_size` texts x variants at a time),
plus one gradient-enabled clean forward and one backward per metric. The exact sweep runs
L - l layers per unit.
"""

from __future__ import annotations

import einops
import torch
from jaxtyping import Float

from streamlens import sites
from streamlens.ablation.apply import replacing_hooks
from streamlens.ablation.attribute.common import dot, leaf, per_text_metrics
from streamlens.ablation.spec import Ablation
from streamlens.data import TokenBatch
from streamlens.model import Model
from streamlens.sites import Site


def stop_layer(site: Site, depth: int, n_layers: int) -> int:
    """s: the last layer computed exactly for a unit of `site`'s layer."""
    return min(site.layer + depth, n_layers - 1)


def stream_after(layer: int, n_layers: int) -> str:
    """The hook holding resid_post `layer`: resid_pre of the next layer, or the final stream."""
    return sites.resid_pre(layer + 1) if layer + 1 < n_layers else sites.FINAL_STREAM


class LocalChunk:
    """One chunk of texts: the clean gradients at every resid_post, then the partial forwards."""

    def __init__(self, model: Model, batch: TokenBatch, chosen: list[Site], names: tuple[str, ...],
                 replacements: dict[Site, torch.Tensor], depth: int):
        self.model, self.chosen, self.names, self.depth = model, chosen, names, depth
        self.replacements, self.n_texts = replacements, batch.n_texts
        kept: dict[str, torch.Tensor] = {}

        points = [sites.resid_pre(layer) for layer in range(1, model.n_layers)]
        with torch.inference_mode(False), torch.enable_grad():
            final = model.run_to(batch.tokens, sites.FINAL_STREAM, [(sites.EMBED, leaf)]
                                 + [(name, sites.storing(kept, name)) for name in points])
            kept[sites.FINAL_STREAM] = final
            per_text, self.clean_loss = per_text_metrics(model, batch, final, names)
            names_kept = [*points, sites.FINAL_STREAM]
            self.grads = []  # [metric] {hook name: dM/d stream}
            for index in range(len(names)):
                grads = torch.autograd.grad(per_text[index].sum(), [kept[n] for n in names_kept],
                                            retain_graph=index < len(names) - 1, allow_unused=True)
                self.grads.append({n: (torch.zeros_like(kept[n]) if g is None else g.detach())
                                   for n, g in zip(names_kept, grads)})
        self.clean = {name: tensor.detach() for name, tensor in kept.items()}

    def estimate(self, tokens: torch.Tensor, batch_size: int) -> Float[torch.Tensor, "unit metric text"]:
        """Per unit and text: (exact stream change after layer s) . (clean gradient there)."""
        out = torch.zeros(len(self.chosen), len(self.names), self.n_texts, dtype=torch.float64)
        per_forward = max(1, batch_size // self.n_texts)
        by_layer: dict[int, list[int]] = {}
        for row, site in enumerate(self.chosen):
            by_layer.setdefault(site.layer, []).append(row)
        for layer, rows in by_layer.items():
            start = self._start(layer, tokens)
            for first in range(0, len(rows), per_forward):
                group = rows[first : first + per_forward]
                changes = self._changes(layer, start, group)  # [k, n, pos, d_model]
                stop = stream_after(stop_layer(self.chosen[group[0]], self.depth, self.model.n_layers),
                                    self.model.n_layers)
                for metric, grads in enumerate(self.grads):
                    for index, row in enumerate(group):
                        out[row, metric] = dot(changes[index], grads[stop])
        return out

    def _start(self, layer: int, tokens: torch.Tensor) -> torch.Tensor:
        """resid_pre `layer` of the clean run (layer 0: the embedding, recomputed)."""
        if layer > 0:
            return self.clean[sites.resid_pre(layer)]
        with torch.inference_mode():
            return self.model.run_to(tokens, sites.resid_pre(0))

    def _changes(self, layer: int, start: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """resid_post s with each unit of `rows` (all of layer `layer`) replaced, minus the clean one."""
        n_layers = self.model.n_layers
        stop_at = stop_layer(self.chosen[rows[0]], self.depth, n_layers)
        variants = [{w: self.replacements[w] for w in Ablation((self.chosen[row],)).writes} for row in rows]
        stream = einops.repeat(start, "n pos d -> (k n) pos d", k=len(rows)).clone()
        first = layer
        if self.chosen[rows[0]].kind == "block":  # whole block replaced: resid_post = resid_pre + r_attn + r_mlp
            for index, reps in enumerate(variants):
                part = slice(index * self.n_texts, (index + 1) * self.n_texts)
                stream[part] = stream[part] + reps[Site("attn", layer)] + reps[Site("mlp", layer)]
            first = layer + 1
        with torch.inference_mode():
            if first <= stop_at:
                hooks = replacing_hooks(variants, self.n_texts, from_layer=first)
                stream = self.model.run_to(stream, stream_after(stop_at, n_layers), hooks, first)
        clean = self.clean[stream_after(stop_at, n_layers)]
        return einops.rearrange(stream, "(k n) pos d -> k n pos d", k=len(rows)) - clean
