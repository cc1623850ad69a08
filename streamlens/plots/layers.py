"""Figures of the layer study, built only from `LayerStudy` results.

Per-layer figures take a list of studies and `depth=True` puts every model on l / (L - 1), so
models of different depths overlay; each model gets its own line dash.

- `removal_profile`: damage of removing each block, attention sublayer, MLP (95% CI), and of swapping
  blocks L and L+1;
- `score_profile` / `stream_score_profile`: BI, angular distance (n=1) and relative write norm per layer;
- `score_scatter`: each cheap score against measured block damage (Spearman rho in the legend);
- `angular_heatmap`: angular distance of every span (size x start), Gromov et al.'s picture;
- `span_curve`: loss increase and top-1 agreement of the predicted span vs n, measured best spans;
- `greedy_curves`: greedy cumulative removal of attention sublayers vs MLPs, thresholds marked;
- `repair_scatter`, `repair_parts`: direct vs total effect per unit; the exact split per sublayer;
- `verdict_table`: the verdict rows as a table figure.
"""

from __future__ import annotations

from collections.abc import Sequence

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from streamlens.plots.style import color, finish
from streamlens.results.layers import LayerStudy, StreamScores, depth as depth_of

DASHES = ("solid", "dash", "dot", "dashdot", "longdash")
SWAP_COLOR = "#8c564b"


def _x(study: LayerStudy, layers: Sequence[int], depth: bool) -> list[float]:
    return [depth_of(layer, study.n_layers) if depth else layer for layer in layers]


def _x_title(depth: bool) -> str:
    return "depth l / (L - 1)" if depth else "layer"


def _band(result, column: int) -> dict:
    values = result.values[:, column]
    return {"type": "data", "symmetric": False, "array": (result.ci_high[:, column] - values).tolist(),
            "arrayminus": (values - result.ci_low[:, column]).tolist(), "thickness": 1, "width": 2}


def removal_profile(studies: Sequence[LayerStudy], depth: bool = False, metric: str = "loss_increase") -> go.Figure:
    """Damage of removing each block / attention / MLP and of swapping L with L+1, per layer, 95% CIs."""
    fig = go.Figure()
    for m, study in enumerate(studies):
        dash = DASHES[m % len(DASHES)]
        for kind, result in (("block", study.blocks), ("attn", study.attn), ("mlp", study.mlp), ("swap", study.swaps)):
            column = result.metrics.index(metric)
            layers = [unit[0].layer for unit in result.sites]
            name = f"swap L, L+1" if kind == "swap" else f"remove {kind}"
            fig.add_trace(go.Scatter(
                x=_x(study, layers, depth), y=result.values[:, column].tolist(), mode="lines+markers",
                name=f"{study.model}: {name}" if len(studies) > 1 else name, error_y=_band(result, column),
                line={"color": SWAP_COLOR if kind == "swap" else color(kind), "dash": dash, "width": 1.5},
                marker={"size": 5}, hovertemplate=f"{study.model} {name} at %{{x}}: %{{y:.4g}}<extra></extra>"))
    fig = finish(fig, "Damage of removing one block, attention sublayer or MLP, and of swapping adjacent blocks "
                      "(zero ablation; 95% CI over texts)", _x_title(depth), metric.replace("_", " "))
    return fig.update_yaxes(type="log" if metric == "loss_increase" else "linear")


def score_profile(studies: Sequence[LayerStudy], depth: bool = False) -> go.Figure:
    """Block Influence, angular distance (n=1) and relative write norm of each block (means over texts)."""
    return stream_score_profile([study.scores for study in studies], [study.model for study in studies], depth)


def stream_score_profile(scores: Sequence[StreamScores], names: Sequence[str] = (), depth: bool = False) -> go.Figure:
    """The cheap scores of one clean pass per block, for one or several models (`StreamScores`)."""
    fig = go.Figure()
    for m, score in enumerate(scores):
        dash = DASHES[m % len(DASHES)]
        layers = list(range(score.n_layers))
        x = [depth_of(layer, score.n_layers) if depth else layer for layer in layers]
        prefix = f"{names[m]}: " if len(scores) > 1 and m < len(names) else ""
        series = (("block influence 1 - cos", score.block_influence.mean(-1), color("block")),
                  ("angular distance / pi (n=1)", score.angular_distance[0].mean(-1), color("total")),
                  ("relative norm of the block's write", score.relative_norm[0].mean(-1), color("bias")))
        for name, values, line in series:
            fig.add_trace(go.Scatter(x=x, y=values.tolist(), mode="lines+markers", name=prefix + name,
                                     line={"color": line, "dash": dash}, marker={"size": 5}))
    fig = finish(fig, "Cheap scores from one clean pass, per block", _x_title(depth), "score")
    return fig.update_yaxes(type="log")


def score_scatter(study: LayerStudy) -> go.Figure:
    """Each cheap score (x) against the measured damage of removing the block (y), one point per block."""
    column = study.blocks.metrics.index("loss_increase")
    damage = study.blocks.values[:, column].tolist()
    fig = make_subplots(rows=1, cols=3, subplot_titles=list(study.correlations))
    scores = (study.scores.block_influence, study.scores.angular_distance[0], study.scores.relative_norm[0])
    for index, ((name, (rho, low, high)), values) in enumerate(zip(study.correlations.items(), scores)):
        fig.add_trace(go.Scatter(
            x=values.mean(-1).tolist(), y=damage, mode="markers+text", text=[str(i) for i in range(study.n_layers)],
            textposition="top center", marker={"color": color("block"), "size": 7},
            name=f"{name}: Spearman {rho:.2f} [{low:.2f}, {high:.2f}]"), row=1, col=index + 1)
        fig.update_xaxes(type="log", title_text=f"{name} (rho {rho:.2f} [{low:.2f}, {high:.2f}])", row=1, col=index + 1)
    fig.update_yaxes(type="log")
    return finish(fig, f"{study.model}: cheap scores vs measured loss increase of removing each block (labels: layer)",
                  "", "loss increase (nats)")


def angular_heatmap(study: LayerStudy) -> go.Figure:
    """Angular distance between the stream entering block s and the stream n blocks later."""
    values = study.scores.angular_distance.mean(-1)  # [span, start]
    fig = go.Figure(go.Heatmap(z=values.tolist(), x=list(range(study.n_layers)),
                               y=list(range(1, study.n_layers + 1)), colorscale="Viridis",
                               colorbar={"title": "angular / pi"},
                               hovertemplate="start %{x}, n %{y}: %{z:.4f}<extra></extra>"))
    picked = study.predicted_spans
    fig.add_trace(go.Scatter(x=[start for _, start in picked], y=[size for size, _ in picked], mode="markers",
                             marker={"color": "white", "symbol": "x", "size": 7}, name="smallest distance per n"))
    return finish(fig, f"{study.model}: angular distance of every span (Gromov et al.)", "first block of the span s",
                  "span size n")


def span_curve(study: LayerStudy) -> go.Figure:
    """Loss increase and top-1 agreement of removing the span the angular distance picks, for n = 1 .. L/2,
    with the measured cheapest span where every span of that size was measured."""
    rows = study.span_rows()
    fig = make_subplots(rows=1, cols=2, subplot_titles=("loss increase (nats)", "top-1 agreement"))
    spans = study.spans
    measured = study.measured_sizes()
    for col, metric in enumerate(("loss_increase", "top1_agreement"), start=1):
        column = spans.metrics.index(metric)
        picked = [rows[(size, start)] for size, start in study.predicted_spans]
        fig.add_trace(go.Scatter(
            x=[size for size, _ in study.predicted_spans], y=[float(spans.values[i, column]) for i in picked],
            error_y={"type": "data", "symmetric": False,
                     "array": [float(spans.ci_high[i, column] - spans.values[i, column]) for i in picked],
                     "arrayminus": [float(spans.values[i, column] - spans.ci_low[i, column]) for i in picked]},
            mode="lines+markers", name="span with the smallest angular distance" if col == 1 else None,
            showlegend=col == 1, line={"color": color("total")},
            hovertext=[spans.sites[i][0].label + " .. " + spans.sites[i][-1].label for i in picked], hoverinfo="text+y"),
            row=1, col=col)
        best = []
        for size in measured:
            candidates = [i for (s, _), i in rows.items() if s == size]
            key = (lambda i: float(spans.values[i, column])) if metric == "loss_increase" else \
                (lambda i: -float(spans.values[i, column]))
            best.append(min(candidates, key=key))
        fig.add_trace(go.Scatter(
            x=measured, y=[float(spans.values[i, column]) for i in best], mode="markers",
            marker={"color": color("block"), "size": 11, "symbol": "diamond"}, showlegend=col == 1,
            name="cheapest span, every span measured" if col == 1 else None,
            hovertext=[spans.sites[i][0].label + " .. " + spans.sites[i][-1].label for i in best], hoverinfo="text+y"),
            row=1, col=col)
    fig.update_yaxes(type="log", row=1, col=1)
    return finish(fig, f"{study.model}: removing n contiguous blocks (95% CI over texts)", "blocks removed n", "")


def greedy_curves(studies: Sequence[LayerStudy], thresholds: Sequence[float] = (0.1, 0.5)) -> go.Figure:
    """Loss increase as attention sublayers (blue) or MLPs (orange) are removed greedily, 95% CI band."""
    fig = go.Figure()
    for m, study in enumerate(studies):
        for kind, curve in study.greedy.items():
            column = curve.metrics.index("loss_increase")
            steps = list(range(1, len(curve.sites) + 1))
            fig.add_trace(go.Scatter(
                x=steps, y=curve.values[:, column].tolist(), mode="lines+markers",
                error_y={"type": "data", "symmetric": False,
                         "array": (curve.ci_high[:, column] - curve.values[:, column]).tolist(),
                         "arrayminus": (curve.values[:, column] - curve.ci_low[:, column]).tolist()},
                name=f"{study.model}: {kind}" if len(studies) > 1 else kind, hovertext=list(curve.units),
                hoverinfo="text+y", line={"color": color(kind), "dash": DASHES[m % len(DASHES)]}))
    for threshold in thresholds:
        fig.add_hline(y=threshold, line={"color": "#888888", "dash": "dot", "width": 1},
                      annotation_text=f"+{threshold} nats")
    return finish(fig, "Greedy cumulative removal: attention sublayers vs MLPs (zero ablation)",
                  "sublayers removed", "loss increase (nats)")


def repair_scatter(study: LayerStudy) -> go.Figure:
    """Direct effect (norm scale frozen) vs total effect on the label logit of each resample-ablated unit."""
    repair = study.repair
    direct, total = repair.direct.mean(-1), repair.total.mean(-1)
    fig = go.Figure()
    for kind in ("head", "attn", "mlp"):
        index = [i for i, site in enumerate(repair.sites) if site.kind == kind]
        if index:
            fig.add_trace(go.Scatter(x=direct[index].tolist(), y=total[index].tolist(), mode="markers",
                                     name={"head": "heads", "attn": "attention sublayers", "mlp": "MLPs"}[kind],
                                     text=[repair.sites[i].label for i in index], hoverinfo="text+x+y",
                                     marker={"color": color(kind), "size": 6 if kind == "head" else 9,
                                             "symbol": "circle-open" if kind == "head" else "circle"}))
    low, high = float(min(direct.min(), total.min())), float(max(direct.max(), total.max()))
    fig.add_trace(go.Scatter(x=[low, high], y=[low, high], mode="lines", name="total = direct",
                             line={"color": "#888888", "dash": "dot"}))
    return finish(fig, f"{study.model}: self-repair, direct vs total effect on the label logit (resample ablation)",
                  "direct effect (logit, norm scale frozen)", "total effect (logit)")


def repair_parts(study: LayerStudy, kind: str = "attn", depth: bool = False) -> go.Figure:
    """Per layer, the exact split total = direct + downstream + norm of one kind of sublayer (stacked bars)."""
    repair = study.repair
    index = [i for i, site in enumerate(repair.sites) if site.kind == kind]
    layers = [repair.sites[i].layer for i in index]
    x = _x(study, layers, depth)
    fig = go.Figure()
    for name, line in (("direct", color(kind)), ("downstream", "#2ca02c"), ("norm", color("bias"))):
        fig.add_trace(go.Bar(x=x, y=getattr(repair, name)[index].mean(-1).tolist(), name=name,
                             marker={"color": line}))
    fig.add_trace(go.Scatter(x=x, y=repair.total[index].mean(-1).tolist(), mode="markers", name="total",
                             marker={"color": color("total"), "symbol": "line-ew-open", "size": 14,
                                     "line": {"width": 3}}))
    fig.update_layout(barmode="relative")
    return finish(fig, f"{study.model}: label-logit effect of resample-ablating each {kind} sublayer, split exactly",
                  _x_title(depth), "logit change")


def verdict_table(study: LayerStudy) -> go.Figure:
    """The verdict rows: claim, this model's number with its 95% CI, holds / differs."""
    rows = study.verdicts
    colours = {"holds": "#d9f0d3", "differs": "#fddbc7", "unclear": "#f0f0f0"}
    fig = go.Figure(go.Table(
        columnwidth=[3, 4, 5, 1],
        header={"values": ["claim", "protocol", f"{study.model}: number [95% CI]", "verdict"], "align": "left"},
        cells={"values": [[r.claim for r in rows], [r.protocol for r in rows], [r.number for r in rows],
                          [r.verdict for r in rows]], "align": "left",
               "fill_color": [["white"] * len(rows)] * 3 + [[colours.get(r.verdict, "white") for r in rows]]}))
    fig.update_layout(height=120 + 95 * len(rows), margin={"l": 10, "r": 10, "t": 40, "b": 10},
                      title={"text": f"{study.model}: the papers' claims, measured", "x": 0.02})
    return fig
