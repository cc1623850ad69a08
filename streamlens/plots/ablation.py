"""Figures of ablations, built only from `AblationResult` / `CumulativeAblation`.

- `damage`: one marker per unit (stream order) with its 95% bootstrap CI, coloured by kind;
- `cumulative_curve`: damage after removing 1, 2, ... units, with a CI band;
- `direct_vs_total`: the direct and the total effect of the same units side by side.
Every figure works for any number of layers and heads (heads are labelled L<layer>H<head>).
"""

from __future__ import annotations

import plotly.graph_objects as go

from streamlens.metrics import UNITS, metric_index
from streamlens.plots.style import color, finish
from streamlens.results import AblationResult, CumulativeAblation

METRIC_TITLES = {"loss_increase": "Loss increase", "kl": "KL(clean || ablated)", "top1_agreement": "Top-1 agreement",
                 "target_logit_change": "Target logit change", "target_prob_change": "Target probability change"}


def metric_axis(metric: str) -> str:
    """The axis title of a metric, with its unit ("Loss increase (nats)")."""
    return f"{METRIC_TITLES.get(metric, metric)} ({UNITS.get(metric, '')})"


def metric_column(result: AblationResult | CumulativeAblation, metric: str) -> int:
    """The column of `metric` in the result's values (fails naming the metrics it has)."""
    return metric_index(result.metrics, metric)


def _error_bars(result, column: int) -> dict:
    values = result.values[:, column]
    return {"type": "data", "symmetric": False, "array": (result.ci_high[:, column] - values).tolist(),
            "arrayminus": (values - result.ci_low[:, column]).tolist(), "thickness": 1.2, "width": 3}


def damage(result: AblationResult, metric: str = "loss_increase") -> go.Figure:
    """Damage of each unit with its 95% CI (bootstrap over texts), in the result's unit order."""
    column = metric_column(result, metric)
    values = result.values[:, column]
    hover = [f"{unit}: {float(v):.4g} [{float(lo):.4g}, {float(hi):.4g}]<br>{m}, {e} effect"
             for unit, v, lo, hi, m, e in zip(result.units, values, result.ci_low[:, column],
                                               result.ci_high[:, column], result.methods, result.effects)]
    fig = go.Figure(go.Scatter(
        x=list(result.units), y=values.tolist(), mode="markers+lines",
        line={"color": "#bbbbbb", "width": 1},
        marker={"color": [color(kind) for kind in result.kinds], "size": 7 if len(values) <= 60 else 4},
        error_y=_error_bars(result, column), hovertext=hover, hoverinfo="text", name=metric,
    ))
    fig.add_hline(y=1.0 if metric == "top1_agreement" else 0.0, line={"color": "#888888", "width": 1, "dash": "dot"})
    methods = ", ".join(sorted(set(result.methods)))
    effects = ", ".join(sorted(set(result.effects)))
    title = (f"{METRIC_TITLES.get(metric, metric)} when each unit is removed ({methods} ablation, {effects} effect; "
             f"95% CI over {result.n_texts} texts)")
    if getattr(result, "estimate", ""):  # a first-order estimate (ablation.attribute), not a measurement
        title = f"Estimated ({result.estimate}): {title}"
        fig.update_traces(name=f"{metric} (estimate, {result.estimate})")
    fig = finish(fig, title, "unit removed", metric_axis(metric))
    fig.update_xaxes(type="category", tickangle=-60 if len(values) > 12 else 0)
    return fig


def cumulative_curve(result: CumulativeAblation, metric: str = "loss_increase") -> go.Figure:
    """Damage after removing the first k units (k = 1..n), with a 95% CI band."""
    column = metric_column(result, metric)
    steps = list(range(1, len(result.units) + 1))
    low, high = result.ci_low[:, column].tolist(), result.ci_high[:, column].tolist()
    fig = go.Figure([
        go.Scatter(x=steps + steps[::-1], y=high + low[::-1], fill="toself", fillcolor="rgba(214,39,40,0.15)",
                   line={"width": 0}, hoverinfo="skip", name="95% CI"),
        go.Scatter(x=steps, y=result.values[:, column].tolist(), mode="lines+markers", name=metric,
                   line={"color": color("total")}, marker={"color": [color(kind) for kind in result.kinds]},
                   hovertext=[f"{k} removed, last: {unit}" for k, unit in zip(steps, result.units)],
                   hoverinfo="text+y"),
    ])
    how = "least damaging next (greedy)" if result.mode == "greedy" else "in the given order"
    title = f"{METRIC_TITLES.get(metric, metric)} as units are removed {how} ({result.method} ablation, {result.effect} effect)"
    fig = finish(fig, title, "number of units removed", metric_axis(metric))
    fig.update_xaxes(tickmode="array", tickvals=steps, ticktext=[f"{k}<br>{u}" for k, u in zip(steps, result.units)]
                     if len(steps) <= 16 else None)
    return fig


def direct_vs_total(direct: AblationResult, total: AblationResult, metric: str = "loss_increase") -> go.Figure:
    """Direct and total effect of the same units as paired bars with 95% CIs.

    The direct effect removes only a write's own path to the logits; the gap to the total effect is
    what later layers add (or repair) in response to the removal.
    """
    if direct.units != total.units:
        raise ValueError("direct and total results must cover the same units in the same order")
    bars = []
    for result, name, pattern in ((direct, "direct", "/"), (total, "total", "")):
        column = metric_column(result, metric)
        bars.append(go.Bar(
            x=list(result.units), y=result.values[:, column].tolist(), name=f"{name} effect",
            marker={"color": [color(kind) for kind in result.kinds], "pattern": {"shape": pattern},
                    "opacity": 0.55 if name == "direct" else 1.0},
            error_y=_error_bars(result, column),
        ))
    fig = go.Figure(bars)
    fig.update_layout(barmode="group")
    title = f"{METRIC_TITLES.get(metric, metric)}: direct (hatched) vs total effect of each unit"
    fig = finish(fig, title, "unit removed", metric_axis(metric))
    fig.update_xaxes(type="category", tickangle=-60 if len(direct.units) > 12 else 0)
    return fig
