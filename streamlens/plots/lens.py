"""Figures of the logit lens (`LogitLens`): what the stream predicts after each block.

- `lens_heatmap`: stages (embeddings, then after each block) x positions, coloured by the target's
  probability or rank; each cell names the lens's top token, the hover gives exact values;
- `kl_to_final`: KL(final || lens) per stage, one thin line per position and their mean.
"""

from __future__ import annotations

import math
from typing import Literal

import plotly.graph_objects as go
import torch

from streamlens.plots.style import color, finish
from streamlens.results import LogitLens

# Write the top token inside each cell only while cells stay wide enough to read.
_MAX_POSITIONS_WITH_TEXT = 16


def target_label(lens: LogitLens, position: int) -> str:
    """The target token at `position`, quoted so that spaces show."""
    return repr(lens.target_strings[position])


def _cell(token: str) -> str:
    """A token as short cell text: escapes kept (a newline shows as \\n), quotes dropped."""
    return repr(token)[1:-1]


def _position_labels(lens: LogitLens) -> list[str]:
    # the index keeps labels unique when a token repeats
    return [f"{i} {token!r}" for i, token in enumerate(lens.token_strings)]


def lens_heatmap(lens: LogitLens, value: Literal["prob", "rank"] = "prob") -> go.Figure:
    """Stages x positions heatmap of the target's probability (or rank, 0 = top) under the lens.

    Args:
        lens: a `LogitLens` from `streamlens.logit_lens`.
        value: "prob" colours by the target's probability; "rank" by log10(1 + rank), reversed so
            that rank 0 has the colour of probability 1, and the colour bar is labelled in ranks.
    """
    if value not in ("prob", "rank"):
        raise ValueError(f"value {value!r}: choose 'prob' or 'rank'")
    n_stages, n_pos = lens.target_probs.shape
    columns = _position_labels(lens)
    targets = [target_label(lens, position) for position in range(n_pos)]
    hover = [[
        f"after {'embeddings' if stage == 0 else 'block ' + lens.layer_labels[stage]}, position {columns[pos]}"
        f"<br>target {targets[pos]}: p = {float(lens.target_probs[stage, pos]):.4g}, "
        f"rank {int(lens.target_ranks[stage, pos])}"
        f"<br>top: " + ", ".join(f"{token!r} {float(p):.3g}" for token, p in
                                 zip(lens.top_strings[stage][pos], lens.top_probs[stage, pos]))
        for pos in range(n_pos)] for stage in range(n_stages)]
    cells = [[_cell(lens.top_strings[stage][pos][0]) for pos in range(n_pos)] for stage in range(n_stages)]
    if value == "prob":
        z, bar = lens.target_probs.tolist(), {"title": {"text": "target probability"}}
        scale, bounds = "Viridis", {"zmin": 0.0, "zmax": 1.0}
    else:
        z = torch.log10(1.0 + lens.target_ranks.double()).tolist()
        top = max(1.0, math.log10(1.0 + int(lens.target_ranks.max())))
        ticks = [t for t in (0, 1, 10, 100, 1000, 10000, 100000) if math.log10(1.0 + t) <= top]
        bar = {"title": {"text": "target rank"}, "tickvals": [math.log10(1.0 + t) for t in ticks],
               "ticktext": [str(t) for t in ticks]}
        scale, bounds = "Viridis_r", {"zmin": 0.0, "zmax": top}
    heatmap = go.Heatmap(z=z, x=columns, y=list(lens.layer_labels), hovertext=hover, hoverinfo="text",
                         colorscale=scale, colorbar=bar, **bounds)
    if n_pos <= _MAX_POSITIONS_WITH_TEXT:
        heatmap.update(text=cells, texttemplate="%{text}", textfont={"size": 9})
    fig = go.Figure(heatmap)
    fig.update_xaxes(type="category")
    fig.update_yaxes(type="category", title_standoff=4)
    fig.update_layout(height=max(420, 18 * n_stages + 140))
    what = "probability" if value == "prob" else "rank"
    named = targets[0] if len(set(targets)) == 1 else "the final top token"
    return finish(fig, f"Logit lens: {what} of {named} after each block (cells: the lens's top token)",
                  "position (input token)", "stream read after")


def kl_to_final(lens: LogitLens) -> go.Figure:
    """KL(final || lens) in nats after each stage: how far each stage is from the model's output."""
    stages = list(lens.layer_labels)
    fig = go.Figure()
    for pos, label in enumerate(_position_labels(lens)):
        values = lens.kl_to_final[:, pos].tolist()
        fig.add_scatter(x=stages, y=values, mode="lines", name=f"position {label}", showlegend=False,
                        line={"color": "#bbbbbb", "width": 1}, hoverinfo="text",
                        hovertext=[f"position {label}, after {stage}<br>KL = {kl:.4g} nats"
                                   for stage, kl in zip(stages, values)])
    mean = lens.kl_to_final.mean(dim=1).tolist()
    fig.add_scatter(x=stages, y=mean, mode="lines+markers", name=f"mean over {len(lens.token_strings)} positions",
                    line={"color": color("total"), "width": 2}, marker={"size": 5}, hoverinfo="text",
                    hovertext=[f"after {stage}<br>mean KL = {kl:.4g} nats" for stage, kl in zip(stages, mean)])
    fig.update_xaxes(type="category")
    return finish(fig, "Logit lens: KL from the model's output to the lens after each block",
                  "stream read after (embed, then block)", "KL(final || lens), nats")
