"""Figures of first-order estimates against exact measurements, built only from `AblationResult`s.

- `estimate_vs_exact`: one marker per unit, exact effect (x) against the estimate (y), both with
  their 95% CIs, and the line estimate = exact;
- `side_by_side`: the verified units (largest estimate first) as paired bars, estimate and exact;
- `frontier`: CPU seconds against agreement with the exact sweep, per estimator (the benchmark's rows).
Every title and legend says which numbers are estimates and by which method.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

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


def frontier(points: Sequence[Mapping[str, Any]], measure: str = "spearman") -> go.Figure:
    """The cost/accuracy frontier: CPU seconds (x, log) against an agreement `measure` ("spearman",
    "pearson": (value, low, high) with their 95% CIs; "recall": a number), one line per (unit kind,
    method) through its estimators, and a star at each exact sweep's cost (agreement 1 by definition).

    `points`: rows of `benchmarks/bench_estimates.py` (kind, method, estimate, cpu, exact_cpu and the
    agreement measures of the estimate with the exact sweep on the loss increase).
    """
    fig = go.Figure()
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for point in points:
        groups.setdefault((point["kind"], point["method"]), []).append(point)
    for (kind, method), group in sorted(groups.items()):
        group = sorted(group, key=lambda point: point["cpu"])
        value = [_scalar(point[measure]) for point in group]
        bars = None
        if isinstance(group[0][measure], (list, tuple)):
            bars = {"type": "data", "symmetric": False, "thickness": 0.8, "width": 2,
                    "array": [max(0.0, point[measure][2] - v) for point, v in zip(group, value)],
                    "arrayminus": [max(0.0, v - point[measure][1]) for point, v in zip(group, value)]}
        dash = "solid" if method == "mean" else "dash"
        fig.add_trace(go.Scatter(
            x=[point["cpu"] for point in group], y=value, mode="lines+markers+text", name=f"{kind}, {method}",
            text=[point["estimate"] for point in group], textposition="top center", error_y=bars,
            line={"color": color(kind), "dash": dash}, marker={"size": 7}))
        fig.add_trace(go.Scatter(x=[group[0]["exact_cpu"]], y=[1.0], mode="markers", name=f"{kind}, {method}: exact",
                                 marker={"color": color(kind), "symbol": "star", "size": 12}, showlegend=False))
    title = f"Estimates against the exact sweep: {measure} vs CPU seconds (stars: the exact sweeps)"
    fig = finish(fig, title, "CPU seconds (log)", f"{measure} with the exact effects")
    fig.update_xaxes(type="log")
    return fig


def _scalar(value: Any) -> float:
    return float(value[0]) if isinstance(value, (list, tuple)) else float(value)


def reliability(estimate: AblationResult, metric: str = "loss_increase", top: int = 30) -> go.Figure:
    """The `top` units with the largest |value|: the estimate with its error bar (`error_bar`: the
    estimator's own diagnostic, not a CI) and, where the row was measured exactly (`measured`), the
    exact value with its 95% CI. Grey bars: estimates whose error bar exceeds half their size
    (unreliable: re-measure them)."""
    column = metric_column(estimate, metric)
    values = estimate.values[:, column]
    rows = [int(i) for i in values.abs().argsort(descending=True, stable=True)[:top]]
    measured = estimate.measured if estimate.measured is not None else [False] * len(estimate.units)
    bars = estimate.error_bar[:, column] if estimate.error_bar is not None else None
    colors, errors = [], []
    for row in rows:
        exact = bool(measured[row])
        error = 0.0 if exact or bars is None else float(bars[row])
        shaky = not exact and bars is not None and error > 0.5 * abs(float(values[row]))
        colors.append("#bbbbbb" if shaky else color(estimate.kinds[row]))
        errors.append(error)
    labels = [f"{estimate.units[row]} ({'exact' if measured[row] else 'estimate'})" for row in rows]
    fig = go.Figure(go.Bar(
        x=labels, y=[float(values[row]) for row in rows], marker={"color": colors},
        marker_pattern_shape=["" if measured[row] else "/" for row in rows],
        error_y={"type": "data", "array": errors, "thickness": 1.2, "width": 3}, name=_name(estimate)))
    title = (f"{METRIC_TITLES.get(metric, metric)}: the {len(rows)} largest, {_name(estimate)} (hatched; error bar: the "
             f"estimator's diagnostic; grey: error bar > half the value) and exact rows (solid)")
    fig = finish(fig, title, "unit", metric_axis(metric))
    fig.update_xaxes(type="category", tickangle=-60 if len(rows) > 12 else 0)
    return fig
