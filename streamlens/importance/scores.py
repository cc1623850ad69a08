"""Cheap scores from one clean pass, and how well they predict measured damage.

Block Influence (Men et al. 2024, ShortGPT): BI_l = 1 - cos(x_l, x_{l+1}), x_l the stream entering
block l; angular distance (Gromov et al. 2024): arccos(cos(x_s, x_{s+n})) / pi between the stream
entering block s and the stream n blocks later; the relative norm of each write; He et al.'s
importance 1 - cos(in, in + write) of each attention and MLP sublayer. Every score is a mean over
a text's real positions (ShortGPT averages over tokens; Gromov et al. read the last token), kept
per text so that its agreement with measured damage gets a bootstrap CI over texts.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from jaxtyping import Float

from streamlens import stats
from streamlens.ablation.replace import capture
from streamlens.data import TokenBatch
from streamlens.model import Model
from streamlens.results import Provenance, command_line
from streamlens.results.layers import StreamScores
from streamlens.sites import Site


def stream_scores(model: Model, batch: TokenBatch, batch_size: int = 16, command: str | None = None) -> StreamScores:
    """BI, angular distance for every span, relative write norms and sublayer influence from clean passes."""
    n, n_texts = model.n_layers, batch.n_texts
    bi = torch.zeros(n, n_texts, dtype=torch.float64)
    angular = torch.full((n, n, n_texts), math.nan, dtype=torch.float64)
    relative = torch.zeros(3, n, n_texts, dtype=torch.float64)
    influence = torch.zeros(3, n, n_texts, dtype=torch.float64)
    writes = [Site(kind, layer) for layer in range(n) for kind in ("attn", "mlp")]
    with torch.inference_mode():
        for start in range(0, n_texts, batch_size):
            rows = slice(start, min(start + batch_size, n_texts))
            resid, captured, final = capture(model, batch.tokens[rows], writes, range(n))
            valid = batch.valid[rows].double()
            streams = [resid[layer] for layer in range(n)] + [final]

            def mean(values: torch.Tensor) -> torch.Tensor:  # [n, pos] -> per-text mean over real positions
                return (values.double() * valid).sum(-1) / valid.sum(-1)

            for layer in range(n):
                x_in, x_out = streams[layer], streams[layer + 1]
                attn, mlp = captured[Site("attn", layer)], captured[Site("mlp", layer)]
                mid = x_in + attn
                bi[layer, rows] = mean(1 - F.cosine_similarity(x_in, x_out, dim=-1))
                for k, (read, write) in enumerate(((x_in, x_out - x_in), (x_in, attn), (mid, mlp))):
                    relative[k, layer, rows] = mean(write.norm(dim=-1) / read.norm(dim=-1))
                    influence[k, layer, rows] = mean(1 - F.cosine_similarity(read, read + write, dim=-1))
                for span in range(1, n - layer + 1):
                    cos = F.cosine_similarity(x_in, streams[layer + span], dim=-1).clamp(-1.0, 1.0)
                    angular[span - 1, layer, rows] = mean(torch.arccos(cos) / math.pi)
    return StreamScores(Provenance.of(model, command or command_line()), bi, angular, relative, influence,
                        batch.description)


spearman = stats.spearman  # the layer study's name for it (README, notebooks)


def spearman_ci(score: Float[torch.Tensor, "unit text"], damage: Float[torch.Tensor, "unit text"],
                n_boot: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    """Spearman rho between the mean score and the mean damage of each unit, with a 95% percentile
    bootstrap CI that resamples texts (the same texts for score and damage in each replicate)."""
    return stats.correlation_ci(score, damage, "spearman", n_boot, seed)
