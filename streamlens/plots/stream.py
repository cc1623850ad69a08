"""Anatomy of the residual stream, from a `StreamWrites` record.

Three figures over the writes in stream order (embed, (pos_embed), attn 0, mlp 0, attn 1, ...):
- `write_norms`: the norm of each write (bars) and of the stream after it is added (line);
- `write_cosines`: the cosine of each write with the final stream (what survives to the output);
- `stream_growth`: how much each write changes the stream's norm, ||s_i|| - ||s_{i-1}||.

Each reads one token (`pos`, default the last: the position that predicts the next token) of one
batch row, or averages over every token of the batch (`pos=None`).
"""

from __future__ import annotations

import plotly.graph_objects as go
import torch

from streamlens.plots.style import color, finish
from streamlens.results import StreamWrites

# The kinds of `StreamWrites.components()`, in legend order.
_KINDS = ("embed", "pos_embed", "attn", "mlp")


def _where(writes: StreamWrites, batch: int, pos: int | None) -> str:
    """Which tokens a figure reads, for its title."""
    if pos is None:
        return f"mean over {writes.tokens.numel()} tokens"
    n_pos = writes.tokens.shape[1]
    if not -n_pos <= pos < n_pos:
        raise ValueError(f"pos {pos} out of range: the record has {n_pos} positions ({-n_pos} to {n_pos - 1})")
    if not 0 <= batch < writes.tokens.shape[0]:
        raise ValueError(f"batch {batch} out of range: the record has {writes.tokens.shape[0]} rows")
    token = writes.token_strings[pos % n_pos] if batch == 0 else f"id {int(writes.tokens[batch, pos])}"
    return f"token {token!r} (position {pos % n_pos})"


def _per_component(values: torch.Tensor, batch: int, pos: int | None) -> list[float]:
    """[component, batch, pos] -> one float per component (one token, or the mean over all)."""
    picked = values.mean(dim=(1, 2)) if pos is None else values[:, batch, pos]
    return [float(v) for v in picked]


def _bars_by_kind(fig: go.Figure, labels, kinds, values, hover: list[str]) -> None:
    """One bar trace per component kind, so the legend names the colours."""
    for kind in _KINDS:
        rows = [i for i, k in enumerate(kinds) if k == kind]
        if rows:
            fig.add_bar(x=[labels[i] for i in rows], y=[values[i] for i in rows], name=kind,
                        marker_color=color(kind), hovertext=[hover[i] for i in rows], hoverinfo="text")


def _category_axis(fig: go.Figure, labels) -> None:
    fig.update_xaxes(type="category", categoryorder="array", categoryarray=list(labels), tickangle=-60)


def write_norms(writes: StreamWrites, pos: int | None = -1, batch: int = 0) -> go.Figure:
    """Norm of each write (bars by kind) and of the stream after adding it (line).

    Args:
        writes: a record from `streamlens.record`.
        pos: the position to read (negative counts from the end); None: mean over all tokens.
        batch: the batch row to read (ignored when `pos` is None).
    """
    where = _where(writes, batch, pos)
    comps = writes.components()
    write = _per_component(comps.stack.norm(dim=-1), batch, pos)
    stream = _per_component(comps.stack.cumsum(0).norm(dim=-1), batch, pos)
    fig = go.Figure()
    _bars_by_kind(fig, comps.labels, comps.kinds, write,
                  [f"{label}<br>||write|| = {value:.6g}" for label, value in zip(comps.labels, write)])
    fig.add_scatter(x=list(comps.labels), y=stream, mode="lines+markers", name="stream after",
                    line={"color": color("total")}, marker={"size": 4},
                    hovertext=[f"stream after {label}<br>||stream|| = {value:.6g}"
                               for label, value in zip(comps.labels, stream)], hoverinfo="text")
    _category_axis(fig, comps.labels)
    return finish(fig, f"Norm of each write and of the stream, {where}", "write (stream order)", "L2 norm")


def write_cosines(writes: StreamWrites, pos: int | None = -1, batch: int = 0) -> go.Figure:
    """Cosine similarity of each write with the final stream (before the final norm)."""
    where = _where(writes, batch, pos)
    comps = writes.components()
    cosine = torch.nn.functional.cosine_similarity(comps.stack, writes.final.unsqueeze(0), dim=-1)
    values = _per_component(cosine, batch, pos)
    fig = go.Figure()
    _bars_by_kind(fig, comps.labels, comps.kinds, values,
                  [f"{label}<br>cos(write, final) = {value:.6g}" for label, value in zip(comps.labels, values)])
    _category_axis(fig, comps.labels)
    fig.update_yaxes(range=[-1, 1])
    return finish(fig, f"Cosine of each write with the final stream, {where}", "write (stream order)",
                  "cosine with final stream")


def stream_growth(writes: StreamWrites, pos: int | None = -1, batch: int = 0) -> go.Figure:
    """Change of the stream's norm caused by each write: ||s_i|| - ||s_{i-1}|| (s_{-1} = 0).

    The bars sum to the norm of the final stream. A write can be large yet grow the stream little
    (it is orthogonal to it) or shrink it (it cancels part of it).
    """
    where = _where(writes, batch, pos)
    comps = writes.components()
    after = comps.stack.cumsum(0).norm(dim=-1)  # [component, batch, pos]
    before = torch.cat([torch.zeros_like(after[:1]), after[:-1]])
    growth = _per_component(after - before, batch, pos)
    relative = _per_component((after - before) / before.clamp_min(1e-30), batch, pos)
    hover = [
        f"{label}<br>change of ||stream|| = {g:+.6g}" + ("" if i == 0 else f"<br>relative to before = {r:+.3%}")
        for i, (label, g, r) in enumerate(zip(comps.labels, growth, relative))
    ]
    fig = go.Figure()
    _bars_by_kind(fig, comps.labels, comps.kinds, growth, hover)
    _category_axis(fig, comps.labels)
    return finish(fig, f"How much each write grows the stream, {where}", "write (stream order)",
                  "change of ||stream||")
