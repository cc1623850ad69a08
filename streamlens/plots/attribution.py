"""Figures of first-order estimates against exact measurements, built only from `AblationResult`s.

- `estimate_vs_exact`: one marker per unit, exact effect (x) against the estimate (y), both with
  their 95% CIs, and the line estimate = exact;
- `side_by_side`: the verified units (largest estimate first) as paired bars, estimate and exact.
Every title and legend says which numbers are estimates and by which method.
"""

from __future__ import annotations

import plotly.graph_objects as go

from streamlens.plots.ablation import METRIC_TITLES, metric_axis, metric_column
from streamlens.plots.style import color, finish
from streamlens.results import AblationResult


def _name(result: AblationResult) -> str:
    return f"estimate ({result.estimate})" if result.estimate else "exact"


def _matched(estimate: AblationResult, exact: AblationResult) -> list[tuple[int, int]]:
    """(estimate row, exact row) of the units both results hold, in the exact result's order."""
    if not estimate.estimate:
        raise ValueError("the first result is not an estimate (its `estimate` field is empty)")
    pairs = [(estimate.units.index(unit), row) for row, unit in enumerate(exact.units) if unit in estimate.units]
    if not pairs:
        raise ValueError("the estimate and the exact result share no unit")
    return pairs


def estimate_vs_exact(estimate: AblationResult, exact: AblationResult, metric: str = "loss_increase") -> go.Figure:
    """Exact effect (x) against the estimated effect (y) of every unit both results hold, with 95% CIs."""
    pairs = _matched(estimate, exact)
    est_col, exact_col = metric_column(estimate, metric), metric_column(exact, metric)
    rows_est, rows_exact = [p[0] for p in pairs], [p[1] for p in pairs]
    x = exact.values[rows_exact, exact_col]
    y = estimate.values[rows_est, est_col]

    def bars(result, rows, column):
        values = result.values[rows, column]
        return {"type": "data", "symmetric": False, "array": (result.ci_high[rows, column] - values).tolist(),
                "arrayminus": (values - result.ci_low[rows, column]).tolist(), "thickness": 0.8, "width": 0,
                "color": "#cccccc"}

    kinds = [exact.kinds[row] for row in rows_exact]
    hover = [f"{exact.units[r]}: exact {float(a):.4g}, {_name(estimate)} {float(b):.4g}"
             for r, a, b in zip(rows_exact, x, y)]
    low, high = float(min(x.min(), y.min())), float(max(x.max(), y.max()))
    fig = go.Figure([
        go.Scatter(x=[low, high], y=[low, high], mode="lines", name="estimate = exact",
                   line={"color": "#888888", "dash": "dot", "width": 1}, hoverinfo="skip"),
        go.Scatter(x=x.tolist(), y=y.tolist(), mode="markers", name=f"units: {_name(estimate)} vs exact",
                   marker={"color": [color(kind) for kind in kinds], "size": 7 if len(pairs) <= 60 else 5},
                   error_x=bars(exact, rows_exact, exact_col), error_y=bars(estimate, rows_est, est_col),
                   hovertext=hover, hoverinfo="text"),
    ])
    method = ", ".join(sorted(set(estimate.methods)))
    title = (f"{METRIC_TITLES.get(metric, metric)}: {_name(estimate)} vs exact, {len(pairs)} units ({method} ablation; "
             f"95% CIs over {exact.n_texts} texts)")
    return finish(fig, title, f"exact: {metric_axis(metric)}", f"{_name(estimate)}: {metric_axis(metric)}")


def side_by_side(estimate: AblationResult, exact: AblationResult, metric: str = "loss_increase") -> go.Figure:
    """The units of `exact` (e.g. the top K by estimate) as paired bars: estimate (hatched) and exact."""
    pairs = _matched(estimate, exact)
    bars = []
    for result, rows, pattern in ((estimate, [p[0] for p in pairs], "/"), (exact, [p[1] for p in pairs], "")):
        column = metric_column(result, metric)
        picked = result.values[rows, column]
        bars.append(go.Bar(
            x=[result.units[row] for row in rows], y=picked.tolist(), name=_name(result),
            marker={"color": [color(result.kinds[row]) for row in rows], "pattern": {"shape": pattern},
                    "opacity": 0.55 if result is estimate else 1.0},
            error_y={"type": "data", "symmetric": False,
                     "array": (result.ci_high[rows, column] - picked).tolist(),
                     "arrayminus": (picked - result.ci_low[rows, column]).tolist(), "thickness": 1.2, "width": 3},
        ))
    fig = go.Figure(bars)
    fig.update_layout(barmode="group")
    title = f"{METRIC_TITLES.get(metric, metric)}: {_name(estimate)} (hatched) and exact, side by side"
    fig = finish(fig, title, "unit removed", metric_axis(metric))
    fig.update_xaxes(type="category", tickangle=-60 if len(pairs) > 12 else 0)
    return fig
