"""Figures of the gradient highway, built only from `ToyHighway` and `RealHighway` results.

- `gradient_heatmaps`: layer x training step, log10 gradient norm, plain and residual side by side;
- `loss_vs_depth`: final training loss against depth, plain vs residual;
- `ratio_vs_depth`: first-layer / last-layer gradient norm against depth, at initialisation and after
  training;
- `real_gradients`: gradient norm against layer on the real model, with all skips and without some.
"""

from __future__ import annotations

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from streamlens.results.highway import ALL_SKIPS, RealHighway, ToyHighway
from streamlens.plots.style import color, finish

_DASHES = ("dash", "dot", "dashdot", "longdash", "longdashdot")


def _log10(values: torch.Tensor) -> torch.Tensor:
    # a gradient of exactly 0 has no logarithm: show it as missing, not as -inf
    return torch.where(values > 0, values.clamp_min(1e-300).log10(), torch.full_like(values, float("nan")))


def gradient_heatmaps(toy: ToyHighway, depth: int | None = None) -> go.Figure:
    """Heatmaps of log10 ||dloss/dh_l|| (layer x training step) for one depth (default: the deepest).

    Both panels share one colour scale, so equal colours mean equal gradient norms.
    """
    depth = max(toy.depths) if depth is None else depth
    if depth not in toy.depths:
        raise ValueError(f"depth {depth} was not trained: the result has depths {list(toy.depths)}")
    d = toy.depths.index(depth)
    logs = _log10(toy.grad_norm[:, d, :, :depth])  # [kind, step, layer]
    finite = logs[torch.isfinite(logs)]
    low, high = (float(finite.min()), float(finite.max())) if len(finite) else (-1.0, 1.0)
    fig = make_subplots(rows=1, cols=len(toy.kinds), shared_yaxes=True, horizontal_spacing=0.06,
                        subplot_titles=[f"{kind} (y = {'x + F(x)' if kind == 'residual' else 'F(x)'})"
                                        for kind in toy.kinds])
    for k, kind in enumerate(toy.kinds):
        fig.add_trace(go.Heatmap(
            z=logs[k].T.tolist(), x=list(range(toy.steps + 1)), y=list(range(depth)), zmin=low, zmax=high,
            colorscale="Viridis", showscale=k == 0, colorbar={"title": {"text": "log10 ‖∂L/∂h‖"}},
            name=kind, hovertemplate="step %{x}<br>layer %{y}<br>log10 ‖grad‖ %{z:.2f}<extra>" + kind + "</extra>",
        ), row=1, col=k + 1)
        fig.update_xaxes(title_text="training step", row=1, col=k + 1)
    for annotation, kind in zip(fig.layout.annotations, toy.kinds):
        annotation.font = {"color": color(kind), "size": 14}
    finish(fig, f"Gradient norm at each block's input, depth {depth} (layer 0 = first block)", "training step", "layer")
    fig.update_xaxes(title_text="training step")
    return fig


def loss_vs_depth(toy: ToyHighway) -> go.Figure:
    """Final training loss (whole training set) against depth; 1.0 = predicting the mean."""
    fig = go.Figure()
    for k, kind in enumerate(toy.kinds):
        fig.add_trace(go.Scatter(x=list(toy.depths), y=toy.final_loss[k].tolist(), mode="lines+markers", name=kind,
                                 line={"color": color(kind), "width": 3}, marker={"size": 9},
                                 hovertemplate="depth %{x}<br>loss %{y:.4f}<extra>" + kind + "</extra>"))
    fig.add_hline(y=1.0, line={"dash": "dot", "color": "#888"}, annotation_text="predicting the mean (loss 1.0)")
    finish(fig, f"Training loss after {toy.steps} steps against depth", "depth (blocks)", "final training loss (MSE)")
    fig.update_xaxes(type="log", tickvals=list(toy.depths))
    return fig


def ratio_vs_depth(toy: ToyHighway) -> go.Figure:
    """||grad at block 0|| / ||grad at the last block|| against depth, at step 0 and after training."""
    fig = go.Figure()
    for step, dash, when in ((0, "dash", "at initialisation"), (-1, "solid", "after training")):
        ratios = toy.first_to_last(step)
        for k, kind in enumerate(toy.kinds):
            fig.add_trace(go.Scatter(
                x=list(toy.depths), y=[r if r > 0 else None for r in ratios[k].tolist()], mode="lines+markers",
                name=f"{kind}, {when}", line={"color": color(kind), "dash": dash, "width": 2.5},
                hovertemplate="depth %{x}<br>ratio %{y:.3g}<extra>" + f"{kind}, {when}" + "</extra>"))
    fig.add_hline(y=1.0, line={"dash": "dot", "color": "#888"})
    finish(fig, "First-layer / last-layer gradient norm", "depth (blocks)", "‖grad at block 0‖ / ‖grad at last block‖")
    fig.update_xaxes(type="log", tickvals=list(toy.depths))
    fig.update_yaxes(type="log", exponentformat="power")
    return fig


def real_gradients(real: RealHighway) -> go.Figure:
    """||dloss/d resid_pre L|| against layer L, one line per condition (all skips; skips removed)."""
    fig = go.Figure()
    layers = list(range(real.grad_norm.shape[1]))
    cut = 0
    for c, condition in enumerate(real.conditions):
        if condition == ALL_SKIPS:
            line = {"color": color("residual"), "width": 3}
        else:
            line = {"color": color("plain"), "width": 2, "dash": _DASHES[cut % len(_DASHES)]}
            cut += 1
        fig.add_trace(go.Scatter(
            x=layers, y=real.grad_norm[c].tolist(), mode="lines+markers", name=f"{condition} (loss {float(real.loss[c]):.2f})",
            line=line, marker={"size": 5},
            hovertemplate="layer %{x}<br>‖grad‖ %{y:.3g}<extra>" + condition + "</extra>"))
        for layer in real.removed[c]:
            if len(real.removed[c]) <= 8:  # mark the cut blocks, unless it is most of them
                fig.add_vline(x=layer, line={"color": color("plain"), "width": 1, "dash": "dot"}, opacity=0.4)
    finish(fig, f"Gradient of the LM loss at the stream entering each block ({real.provenance.model})",
           "layer L", "‖∂loss/∂resid_pre L‖")
    fig.update_yaxes(type="log", exponentformat="power")
    return fig

