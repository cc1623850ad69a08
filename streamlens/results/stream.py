"""Results of the stream analyses: recorded writes, logit decomposition, logit lens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import einops
import torch
from jaxtyping import Float, Int

from streamlens.results.base import Provenance, Result, frame

if TYPE_CHECKING:
    import pandas as pd


@dataclass(frozen=True)
class Components:
    """A stack of stream components with their labels (not saved; derived from `StreamWrites`).

    `stack` is [component, batch, pos, d_model]; `labels`, `kinds`, `layers`, `heads` name each row.
    """

    labels: tuple[str, ...]
    kinds: tuple[str, ...]
    layers: tuple[int | None, ...]
    heads: tuple[int | None, ...]
    stack: torch.Tensor


@dataclass(frozen=True)
class StreamWrites(Result):
    """Every write into the residual stream for one batch of tokens.

    Shapes: tokens [batch, pos]; embed, pos_embed, final [batch, pos, d_model];
    attn, mlp [layer, batch, pos, d_model]; attn_bias [layer, d_model]; final_scale [batch, pos, 1];
    logits [batch, pos, d_vocab]. Recorded with heads: z [layer, batch, pos, head, d_head] and the
    output weights W_O (one [head, d_head, d_model] per layer, the model's own tensors, not copies);
    per-head writes are computed from them on demand (`head_writes(layer)`, `heads`), so a record
    with heads keeps z (the size of one attention write per layer), never [.., head, d_model].
    Post-norm models (Gemma 2/3, OLMo 2) also keep the attention post-norm's weight
    attn_post_weight [layer, d_model] and clean scale attn_post_scale [layer, batch, pos, 1].
    Identity: embed + pos_embed + attn.sum(0) + mlp.sum(0) == final, and for each layer
    head_writes(L).sum(head) + attn_bias_write(L) == attn[L].
    """

    provenance: Provenance
    tokens: torch.Tensor
    token_strings: tuple[str, ...]
    embed: torch.Tensor
    pos_embed: torch.Tensor | None
    attn: torch.Tensor
    mlp: torch.Tensor
    attn_bias: torch.Tensor
    final: torch.Tensor
    final_scale: torch.Tensor
    logits: torch.Tensor
    norm: str
    z: torch.Tensor | None = None
    W_O: tuple[torch.Tensor, ...] | None = None
    attn_post_weight: torch.Tensor | None = None
    attn_post_scale: torch.Tensor | None = None

    @property
    def n_layers(self) -> int:
        return self.attn.shape[0]

    @property
    def has_heads(self) -> bool:
        return self.z is not None and self.W_O is not None

    def head_writes(self, layer: int) -> torch.Tensor:
        """Each head's write into the stream at one layer, [batch, pos, head, d_model]:
        z_h @ W_O[h] (post-norm models: times w / scale of the clean post-norm)."""
        if not self.has_heads:
            raise ValueError("these writes were recorded without heads: use record(..., heads=True)")
        assert self.z is not None and self.W_O is not None
        writes = einops.einsum(self.z[layer], self.W_O[layer].to(self.z),
                               "batch pos head d_head, head d_head d_model -> batch pos head d_model")
        if self.attn_post_weight is not None and self.attn_post_scale is not None:
            writes = writes * (self.attn_post_weight[layer] / self.attn_post_scale[layer]).unsqueeze(-2)
        return writes

    @property
    def heads(self) -> torch.Tensor | None:
        """All per-head writes [layer, batch, pos, head, d_model], computed now (None without heads).
        Large: prefer `head_writes(layer)` one layer at a time."""
        if not self.has_heads:
            return None
        return torch.stack([self.head_writes(layer) for layer in range(self.n_layers)])

    def attn_bias_write(self, layer: int) -> torch.Tensor:
        """What the attention output bias adds to the stream at one layer, [batch, pos, d_model]
        (b_O, or b_O * w / scale through a post-norm)."""
        bias = self.attn_bias[layer].expand_as(self.embed)
        if self.attn_post_weight is not None and self.attn_post_scale is not None:
            bias = bias * self.attn_post_weight[layer] / self.attn_post_scale[layer]
        return bias

    @property
    def embedding(self) -> torch.Tensor:
        """Token plus positional embedding: the stream entering block 0, [batch, pos, d_model]."""
        return self.embed if self.pos_embed is None else self.embed + self.pos_embed

    def stream(self, after_layer: int | None) -> torch.Tensor:
        """The stream after block `after_layer` (None: before block 0), [batch, pos, d_model]."""
        if after_layer is None:
            return self.embedding
        return self.embedding + self.attn[: after_layer + 1].sum(0) + self.mlp[: after_layer + 1].sum(0)

    def identity_error(self) -> float:
        """max |embed + sum of writes - final|: zero up to rounding when the record is complete."""
        return float((self.stream(self.n_layers - 1) - self.final).abs().max())

    def components(self, by_head: bool = False) -> Components:
        """Writes in stream order: embed, (pos_embed), then per layer attn (or heads + bias), mlp."""
        labels, kinds, layers, heads, rows = ["embed"], ["embed"], [None], [None], [self.embed]
        if self.pos_embed is not None:
            labels.append("pos_embed"), kinds.append("pos_embed"), layers.append(None), heads.append(None)
            rows.append(self.pos_embed)
        if by_head and not self.has_heads:
            raise ValueError("these writes were recorded without heads: use record(..., heads=True)")
        for layer in range(self.n_layers):
            if by_head:
                per_head = self.head_writes(layer)
                for head in range(per_head.shape[2]):
                    labels.append(f"L{layer}H{head}"), kinds.append("head"), layers.append(layer)
                    heads.append(head), rows.append(per_head[:, :, head])
                labels.append(f"attn bias {layer}"), kinds.append("attn_bias"), layers.append(layer)
                heads.append(None), rows.append(self.attn_bias_write(layer))
            else:
                labels.append(f"attn {layer}"), kinds.append("attn"), layers.append(layer), heads.append(None)
                rows.append(self.attn[layer])
            labels.append(f"mlp {layer}"), kinds.append("mlp"), layers.append(layer), heads.append(None)
            rows.append(self.mlp[layer])
        return Components(tuple(labels), tuple(kinds), tuple(layers), tuple(heads), torch.stack(rows))

    def to_dataframe(self) -> "pd.DataFrame":
        """Per (component, batch, pos): norm of the write, its cosine with the final stream, and
        the norm of the stream after it is added."""
        comps = self.components()
        norms = comps.stack.norm(dim=-1)
        cosines = torch.nn.functional.cosine_similarity(comps.stack, self.final.unsqueeze(0), dim=-1)
        running = comps.stack.cumsum(0).norm(dim=-1)
        rows = []
        for index, label in enumerate(comps.labels):
            for batch in range(self.tokens.shape[0]):
                for pos in range(self.tokens.shape[1]):
                    rows.append(
                        {
                            "component": label,
                            "kind": comps.kinds[index],
                            "layer": comps.layers[index],
                            "batch": batch,
                            "pos": pos,
                            "write_norm": float(norms[index, batch, pos]),
                            "cos_with_final": float(cosines[index, batch, pos]),
                            "stream_norm_after": float(running[index, batch, pos]),
                        }
                    )
        return frame(rows)


@dataclass(frozen=True)
class LogitDecomposition(Result):
    """Contributions of each stream component to target logits at chosen positions.

    Shapes: contributions [component, n_pos, n_targets]; logits [n_pos, n_targets] (the model's real
    logit, or logit difference when a contrast token is set); accumulated [n_layers + 1, n_pos,
    n_targets] (row 0: embeddings; row L + 1: after block L; bias terms excluded); scale [n_pos] (the
    frozen final-norm scale). Identity: contributions.sum(0) == logits.
    """

    provenance: Provenance
    tokens: Int[torch.Tensor, "1 pos"]
    token_strings: tuple[str, ...]
    positions: tuple[int, ...]
    target_ids: Int[torch.Tensor, "n_pos target"]
    contrast_ids: Int[torch.Tensor, "n_pos target"]
    target_strings: tuple[list[str], ...]
    labels: tuple[str, ...]
    kinds: tuple[str, ...]
    layers: tuple[int | None, ...]
    heads: tuple[int | None, ...]
    contributions: Float[torch.Tensor, "component n_pos target"]
    logits: Float[torch.Tensor, "n_pos target"]
    accumulated: Float[torch.Tensor, "stage n_pos target"]
    scale: Float[torch.Tensor, "n_pos"]
    norm: str

    @property
    def total(self) -> torch.Tensor:
        """Sum of all contributions, [n_pos, n_targets]."""
        return self.contributions.sum(0)

    @property
    def error(self) -> float:
        """max |sum of contributions - real logit|."""
        return float((self.total - self.logits).abs().max())

    def to_dataframe(self) -> "pd.DataFrame":
        """One row per (position, target, component)."""
        rows = []
        for p_index, position in enumerate(self.positions):
            for t_index, target in enumerate(self.target_strings[p_index]):
                for c_index, label in enumerate(self.labels):
                    rows.append(
                        {
                            "position": position,
                            "token": self.token_strings[position],
                            "target": target,
                            "component": label,
                            "kind": self.kinds[c_index],
                            "layer": self.layers[c_index],
                            "head": self.heads[c_index],
                            "contribution": float(self.contributions[c_index, p_index, t_index]),
                            "logit": float(self.logits[p_index, t_index]),
                        }
                    )
        return frame(rows)


@dataclass(frozen=True)
class LogitLens(Result):
    """The final norm and unembedding applied to the stream after the embeddings and every block.

    Shapes (stage = embeddings, then after each block; n_stages = n_layers + 1): top_ids, top_probs
    [stage, pos, k]; target_ids [pos] (text in target_strings); target_probs, target_ranks (0 = top), kl_to_final (nats,
    KL(final || lens)) [stage, pos]. The last stage is the model's own output.
    """

    provenance: Provenance
    tokens: Int[torch.Tensor, "1 pos"]
    token_strings: tuple[str, ...]
    layer_labels: tuple[str, ...]
    top_ids: Int[torch.Tensor, "stage pos k"]
    top_probs: Float[torch.Tensor, "stage pos k"]
    top_strings: tuple[list[list[str]], ...]
    target_ids: Int[torch.Tensor, "pos"]
    target_strings: tuple[str, ...]
    target_probs: Float[torch.Tensor, "stage pos"]
    target_ranks: Int[torch.Tensor, "stage pos"]
    kl_to_final: Float[torch.Tensor, "stage pos"]

    def to_dataframe(self) -> "pd.DataFrame":
        """One row per (stage, position)."""
        rows = []
        for stage, layer in enumerate(self.layer_labels):
            for position, token in enumerate(self.token_strings):
                rows.append(
                    {
                        "layer": layer,
                        "position": position,
                        "token": token,
                        "target_id": int(self.target_ids[position]),
                        "target": self.target_strings[position],
                        "target_prob": float(self.target_probs[stage, position]),
                        "target_rank": int(self.target_ranks[stage, position]),
                        "kl_to_final": float(self.kl_to_final[stage, position]),
                        "top1": self.top_strings[stage][position][0],
                        "top1_prob": float(self.top_probs[stage, position, 0]),
                    }
                )
        return frame(rows)


# ----- ablation (issue 4) -----------------------------------------------------------------------
