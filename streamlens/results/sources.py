"""Result of the source-position split of attention (`streamlens.sources`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float, Int

from streamlens.results.base import Provenance, Result, frame
from streamlens.sites import Site

if TYPE_CHECKING:
    import pandas as pd


@dataclass(frozen=True)
class AttentionSources(Result):
    """Each head's direct logit contribution at one position, split by the source position it read.

    Shapes: tokens [1, pos]; contributions [layer, head, src] (the part of head L.H's contribution to
    the target logit at `position` that came through source position src; zero for src > position);
    head_totals [layer, head] (the head's whole contribution, as in `decompose(..., by_head=True)`);
    same_norm, other_norm, mlp_norm [layer, pos]: at every destination position, the norm of the
    attention write (heads only, no output bias) coming from the same position, from all other
    positions, and the norm of the MLP write (which reads only its own position).
    Identity: contributions.sum(-1) == head_totals.
    """

    provenance: Provenance
    tokens: Int[torch.Tensor, "1 pos"]
    token_strings: tuple[str, ...]
    position: int
    target_id: int
    target_string: str
    contributions: Float[torch.Tensor, "layer head src"]
    head_totals: Float[torch.Tensor, "layer head"]
    logit: float
    same_norm: Float[torch.Tensor, "layer pos"]
    other_norm: Float[torch.Tensor, "layer pos"]
    mlp_norm: Float[torch.Tensor, "layer pos"]

    @property
    def error(self) -> float:
        """max |sum over sources - head contribution| (zero up to rounding)."""
        return float((self.contributions.sum(-1) - self.head_totals).abs().max())

    def top(self, k: int = 3) -> list[tuple[Site, int, float]]:
        """The k (head, source position, contribution) triples with the largest contribution."""
        flat = self.contributions.flatten()
        n_heads, n_src = self.contributions.shape[1:]
        order = flat.argsort(descending=True)[:k].tolist()
        return [(Site("head", i // (n_heads * n_src), (i // n_src) % n_heads), i % n_src, float(flat[i])) for i in order]

    def top_sources(self, k: int = 3) -> list[tuple[int, float, list[tuple[Site, float]]]]:
        """The k source positions contributing most through all heads together, each with its 3 main heads."""
        per_source = self.contributions.sum((0, 1))
        result = []
        for src in per_source.argsort(descending=True)[:k].tolist():
            column = self.contributions[:, :, src].flatten()
            heads = [(Site("head", i // self.contributions.shape[1], i % self.contributions.shape[1]), float(column[i]))
                     for i in column.argsort(descending=True)[:3].tolist()]
            result.append((src, float(per_source[src]), heads))
        return result

    def same_share(self) -> Float[torch.Tensor, "layer"]:
        """Per layer: ||same|| / (||same|| + ||other||), averaged over destination positions."""
        return (self.same_norm / (self.same_norm + self.other_norm)).mean(-1)

    def to_dataframe(self) -> "pd.DataFrame":
        """One row per (layer, head, source position)."""
        n_layers, n_heads, n_src = self.contributions.shape
        values = self.contributions.tolist()
        return frame([
            {"layer": layer, "head": head, "site": f"L{layer}H{head}", "src": src, "src_token": self.token_strings[src],
             "position": self.position, "target": self.target_string, "contribution": values[layer][head][src],
             "head_total": float(self.head_totals[layer, head])}
            for layer in range(n_layers) for head in range(n_heads) for src in range(n_src)
        ])

    def norms_dataframe(self) -> "pd.DataFrame":
        """One row per (layer, destination position): same / other attention norm and MLP norm."""
        rows = []
        for layer in range(self.same_norm.shape[0]):
            for pos in range(self.same_norm.shape[1]):
                rows.append({"layer": layer, "position": pos, "token": self.token_strings[pos],
                             "attn_same_norm": float(self.same_norm[layer, pos]),
                             "attn_other_norm": float(self.other_norm[layer, pos]),
                             "mlp_norm": float(self.mlp_norm[layer, pos])})
        return frame(rows)
