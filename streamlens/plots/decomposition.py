"""Figures of an exact logit decomposition (`LogitDecomposition`).

- `layer_bars`: each layer's contribution, attention and MLP stacked, with embeddings and biases;
- `waterfall`: the running sum from the embeddings to the final logit, ending in a "total" bar that
  is the model's real logit (the bars before it add up to it);
- `head_heatmap`: layer x head contributions (needs `decompose(..., by_head=True)`).

Each shows one (position, target) pair of the decomposition: `pos_index` indexes
`decomposition.positions` and `target_index` the targets at that position.
"""

from __future__ import annotations

import plotly.graph_objects as go

from streamlens.plots.style import color, finish
from streamlens.results import LogitDecomposition

# Decomposition kinds -> the coloured group they are drawn in (heads and attention bias are attention).
GROUP = {"embed": "embed", "pos_embed": "pos_embed", "attn": "attn", "head": "attn", "attn_bias": "attn",
         "mlp": "mlp", "bias": "bias"}


def _pick(decomposition: LogitDecomposition, pos_index: int, target_index: int) -> tuple[list[float], float, str]:
    """Contributions (one per component), the real value and a description of what they explain."""
    n_pos, n_targets = decomposition.logits.shape
    if not -n_pos <= pos_index < n_pos:
        raise ValueError(f"pos_index {pos_index} out of range: the decomposition has {n_pos} positions "
                         f"({-n_pos} to {n_pos - 1})")
    if not -n_targets <= target_index < n_targets:
        raise ValueError(f"target_index {target_index} out of range: the decomposition has {n_targets} "
                         f"targets per position ({-n_targets} to {n_targets - 1})")
    pos_index, target_index = pos_index % n_pos, target_index % n_targets
    position = decomposition.positions[pos_index]
    target = decomposition.target_strings[pos_index][target_index]
    quantity = "logit difference" if int(decomposition.contrast_ids[pos_index, target_index]) >= 0 else "logit"
    what = f"{quantity} of {target} after {decomposition.token_strings[position]!r} (position {position})"
    values = [float(v) for v in decomposition.contributions[:, pos_index, target_index]]
    return values, float(decomposition.logits[pos_index, target_index]), what


def _quantity(what: str) -> str:
    return "logit difference" if what.startswith("logit difference") else "logit"


def _n_layers(decomposition: LogitDecomposition) -> int:
    return decomposition.accumulated.shape[0] - 1


def _steps(decomposition: LogitDecomposition, values: list[float]) -> list[tuple[str, str, float]]:
    """(label, group, value) in stream order: embeddings, attn L and mlp L per layer, the biases.

    Heads and the attention bias of a layer are summed into "attn L"; every component is counted once.
    """
    steps: dict[str, list] = {}
    for label, kind, layer, value in zip(decomposition.labels, decomposition.kinds, decomposition.layers, values):
        group = GROUP.get(kind, kind)
        key = label if layer is None else f"{group} {layer}"
        steps.setdefault(key, [key, group, 0.0])[2] += value
    return [tuple(step) for step in steps.values()]


def layer_bars(decomposition: LogitDecomposition, pos_index: int = -1, target_index: int = 0) -> go.Figure:
    """Bars per layer, attention (blue) and MLP (orange) stacked; embeddings and biases at the ends.

    All bars together sum to the real logit (given in the title).
    """
    values, real, what = _pick(decomposition, pos_index, target_index)
    steps = _steps(decomposition, values)
    fig = go.Figure()
    for group in ("embed", "pos_embed", "attn", "mlp", "bias"):
        rows = [(label, value) for label, g, value in steps if g == group]
        if not rows:
            continue
        # layers share one x slot ("3") so attention and MLP stack; other terms keep their label
        x = [label.split(" ")[1] if group in ("attn", "mlp") else label for label, _ in rows]
        fig.add_bar(x=x, y=[value for _, value in rows], name=group, marker_color=color(group),
                    hovertext=[f"{label}<br>contribution = {value:+.6g}" for label, value in rows],
                    hoverinfo="text")
    order = [label for label, g, _ in steps if g in ("embed", "pos_embed")]
    order += [str(layer) for layer in range(_n_layers(decomposition))]
    order += [label for label, g, _ in steps if g == "bias"]
    fig.update_xaxes(type="category", categoryorder="array", categoryarray=order)
    fig.update_layout(barmode="relative")
    fig.add_hline(y=0, line={"color": "#444444", "width": 1})
    return finish(fig, f"Per-layer contributions to the {what}: total {real:.4g}", "layer",
                  f"contribution to the {_quantity(what)}")


def waterfall(decomposition: LogitDecomposition, pos_index: int = -1, target_index: int = 0) -> go.Figure:
    """Running sum from the embeddings to the final logit, one floating bar per write.

    Each bar starts where the previous one ended; the last bar, "total", is the model's real logit
    (or logit difference) drawn from zero, so the staircase visibly lands on it.
    """
    values, real, what = _pick(decomposition, pos_index, target_index)
    steps = _steps(decomposition, values)
    running, bases = 0.0, []
    for _, _, value in steps:
        bases.append(running)
        running += value
    fig = go.Figure()
    for group in ("embed", "pos_embed", "attn", "mlp", "bias"):
        rows = [i for i, (_, g, _) in enumerate(steps) if g == group]
        if not rows:
            continue
        fig.add_bar(
            x=[steps[i][0] for i in rows], y=[steps[i][2] for i in rows], base=[bases[i] for i in rows],
            name=group, marker_color=color(group), hoverinfo="text",
            hovertext=[f"{steps[i][0]}<br>contribution = {steps[i][2]:+.6g}<br>running sum = "
                       f"{bases[i] + steps[i][2]:.6g}" for i in rows],
        )
    fig.add_bar(x=["total"], y=[real], base=[0.0], name="total (real logit)", marker_color=color("total"),
                hoverinfo="text",
                hovertext=[f"model's real {_quantity(what)} = {real:.6g}<br>sum of contributions = {running:.6g}"
                           f"<br>difference = {running - real:.2g}"])
    labels = [label for label, _, _ in steps] + ["total"]
    fig.add_scatter(x=labels, y=[*(b + s[2] for b, s in zip(bases, steps)), real], mode="lines",
                    line={"color": "#444444", "width": 1, "shape": "hvh", "dash": "dot"}, name="running sum",
                    hoverinfo="skip")
    fig.update_xaxes(type="category", categoryorder="array", categoryarray=labels, tickangle=-60)
    fig.update_layout(barmode="overlay")
    return finish(fig, f"From embedding to the {what} = {real:.4g}", "component (stream order)",
                  _quantity(what))


def head_heatmap(decomposition: LogitDecomposition, pos_index: int = -1, target_index: int = 0) -> go.Figure:
    """Layer x head heatmap of each head's contribution (red raises the target, blue lowers it)."""
    if "head" not in decomposition.kinds:
        raise ValueError("this decomposition has no per-head terms: use decompose(..., by_head=True)")
    values, real, what = _pick(decomposition, pos_index, target_index)
    rows = [(layer, head, value, label) for label, kind, layer, head, value in
            zip(decomposition.labels, decomposition.kinds, decomposition.layers, decomposition.heads, values)
            if kind == "head"]
    n_layers, n_heads = _n_layers(decomposition), 1 + max(head for _, head, _, _ in rows)
    z = [[0.0] * n_heads for _ in range(n_layers)]
    text = [[""] * n_heads for _ in range(n_layers)]
    for layer, head, value, label in rows:
        z[layer][head] = value
        text[layer][head] = f"{label}<br>contribution = {value:+.6g}"
    peak = max(abs(value) for _, _, value, _ in rows) or 1.0
    fig = go.Figure(go.Heatmap(
        z=z, x=list(range(n_heads)), y=list(range(n_layers)), text=text, hoverinfo="text",
        colorscale="RdBu_r", zmid=0, zmin=-peak, zmax=peak, colorbar={"title": {"text": "contribution"}},
    ))
    fig.update_xaxes(dtick=1)
    fig.update_yaxes(dtick=1 if n_layers <= 12 else 2)  # layer 0 at the bottom, as the stack is built
    fig.update_layout(height=max(420, 16 * n_layers + 160))
    return finish(fig, f"Head contributions to the {what} (total {real:.4g})", "head", "layer")
