"""Figures of the residual-family study, built only from a `ResidualStudy` (and its verdicts).

- `gradient_by_layer`: gradient norm at each block's input, at init and after training, one row per
  depth, one line per variant (mean over seeds);
- `loss_curves`: training loss (solid) and held-out loss (dots) against step, per variant;
- `lesion_profile`: the damage of deleting each block of the trained model, per variant;
- `cost_bars`: activation memory saved for backward and wall time per training step, per variant;
- `verdict_table`: the verdict rows as a table.
"""

from __future__ import annotations

from collections.abc import Sequence

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from streamlens.plots.style import finish
from streamlens.results.layers import Verdict
from streamlens.results.residuals import ResidualStudy

VARIANT_COLORS = {"plain": "#d62728", "pre_norm": "#2ca02c", "residual": "#2ca02c", "post_norm": "#1f77b4",
                  "highway": "#ff7f0e", "rezero": "#9467bd", "dense": "#8c564b", "concat": "#e377c2"}
TESTBED_NAMES = {"mlp": "toy MLP", "lm": "char Transformer", "cnn": "digits CNN"}


def _color(variant: str) -> str:
    return VARIANT_COLORS.get(variant, "#444444")


def _variants(study: ResidualStudy, testbed: str, depth: int) -> list[str]:
    seen: list[str] = []
    for r in range(len(study.run_testbed)):
        if (study.run_testbed[r], study.run_depth[r], study.run_warmup[r]) == (testbed, depth, 0):
            if study.run_variant[r] not in seen:
                seen.append(study.run_variant[r])
    return seen


def _check(study: ResidualStudy, testbed: str, depth: int | None) -> int:
    depths = study.config.depths(testbed) if testbed in study.testbeds else ()
    if not depths:
        raise ValueError(f"testbed {testbed!r} was not run: the study has {list(study.testbeds)}")
    depth = max(depths) if depth is None else depth
    if depth not in depths:
        raise ValueError(f"depth {depth} was not run on {testbed}: the study has depths {list(depths)}")
    return depth


def gradient_by_layer(study: ResidualStudy, testbed: str) -> go.Figure:
    """||dloss/dh_b|| against block b (log scale): columns at init / after training, rows per depth."""
    depths = study.config.depths(testbed)
    _check(study, testbed, None)
    fig = make_subplots(rows=len(depths), cols=2, shared_yaxes=False, vertical_spacing=0.08,
                        subplot_titles=[f"depth {d}, {when}" for d in depths for when in ("at init", "after training")])
    for row, depth in enumerate(depths, start=1):
        for variant in _variants(study, testbed, depth):
            runs = study.runs(testbed, variant, depth)
            for col, step in ((1, 0), (2, -1)):
                values = study.grad_norm[runs, step, :depth].mean(0)
                fig.add_trace(go.Scatter(
                    x=list(range(depth)), y=[v if v > 0 else None for v in values.tolist()], mode="lines+markers",
                    name=variant, legendgroup=variant, showlegend=row == 1 and col == 1,
                    line={"color": _color(variant)}, marker={"size": 4},
                    hovertemplate="block %{x}<br>‖grad‖ %{y:.3g}<extra>" + variant + "</extra>"), row=row, col=col)
    fig.update_yaxes(type="log", exponentformat="power")
    finish(fig, f"{TESTBED_NAMES[testbed]}: gradient norm at each block's input (mean over seeds)", "block",
           "‖∂L/∂h‖")
    fig.update_layout(height=320 * len(depths))
    return fig


def loss_curves(study: ResidualStudy, testbed: str, depth: int | None = None) -> go.Figure:
    """Training loss (solid, every step) and held-out loss (dots, eval steps), mean over seeds, per variant."""
    depth = _check(study, testbed, depth)
    fig = go.Figure()
    for variant in _variants(study, testbed, depth):
        runs = study.runs(testbed, variant, depth)
        fig.add_trace(go.Scatter(x=list(range(study.steps + 1)), y=study.train_loss[runs].mean(0).tolist(),
                                 mode="lines", name=f"{variant} (train)", legendgroup=variant,
                                 line={"color": _color(variant), "width": 2}))
        fig.add_trace(go.Scatter(x=list(study.eval_steps), y=study.heldout_loss[runs].mean(0).tolist(),
                                 mode="markers+lines", name=f"{variant} (held out)", legendgroup=variant,
                                 line={"color": _color(variant), "dash": "dot", "width": 1}, marker={"size": 7}))
    finish(fig, f"{TESTBED_NAMES[testbed]}, depth {depth}: loss during training (mean over seeds)", "step", "loss")
    return fig


def lesion_profile(study: ResidualStudy, testbed: str, depth: int | None = None) -> go.Figure:
    """Damage of deleting block b after training (held-out loss increase; accuracy drop with labels)."""
    depth = _check(study, testbed, depth)
    accuracy = testbed == "cnn"
    fig = go.Figure()
    for variant in _variants(study, testbed, depth):
        runs = study.runs(testbed, variant, depth)
        if accuracy:
            damage = 100 * (study.heldout_accuracy[runs, -1:] - study.lesion_accuracy[runs, :depth])
        else:
            damage = study.lesion_damage()[runs, :depth]
        values = damage.mean(0)
        fig.add_trace(go.Scatter(x=list(range(depth)), y=[None if v != v else v for v in values.tolist()],
                                 mode="lines+markers", name=variant, line={"color": _color(variant), "width": 2.5},
                                 hovertemplate="block %{x}<br>damage %{y:.3g}<extra>" + variant + "</extra>"))
    fig.add_hline(y=0, line={"dash": "dot", "color": "#888"})
    y_title = "held-out accuracy drop (points)" if accuracy else "held-out loss increase"
    finish(fig, f"{TESTBED_NAMES[testbed]}, depth {depth}: delete one block after training (Veit et al. 2016)",
           "deleted block", y_title)
    return fig


def cost_bars(study: ResidualStudy, testbed: str, depth: int | None = None) -> go.Figure:
    """Activation memory saved for backward (MB) and wall time per training step (ms), per variant."""
    depth = _check(study, testbed, depth)
    variants = _variants(study, testbed, depth)
    fig = make_subplots(rows=1, cols=2, subplot_titles=["activation memory per step (MB, exact)",
                                                        "wall time per step (ms, mean over seeds)"])
    for col, (field, scale) in enumerate((("saved_bytes", 1e-6), ("step_seconds", 1e3)), start=1):
        values = [float(getattr(study, field)[study.runs(testbed, v, depth)].mean()) * scale for v in variants]
        fig.add_trace(go.Bar(x=variants, y=values, marker={"color": [_color(v) for v in variants]},
                             showlegend=False, hovertemplate="%{x}: %{y:.3g}<extra></extra>"), row=1, col=col)
    finish(fig, f"{TESTBED_NAMES[testbed]}, depth {depth}: what each connection costs", "variant", "")
    return fig


def verdict_table(rows: Sequence[Verdict]) -> go.Figure:
    """The verdicts as a table: claim, protocol, our number, verdict, what the paper reported."""
    columns = ("claim", "protocol", "number", "verdict", "paper")
    fill = {"holds": "#e5f5e0", "differs": "#fde0dd", "unclear": "#f0f0f0"}
    colors = [fill.get(row.verdict, "white") for row in rows]
    fig = go.Figure(go.Table(
        columnwidth=[3, 4, 4, 1.2, 5],
        header={"values": [f"<b>{c}</b>" for c in columns], "align": "left"},
        cells={"values": [[getattr(row, c) for row in rows] for c in columns], "align": "left",
               "fill_color": [colors] * len(columns)}))
    fig.update_layout(height=160 + 120 * len(rows), margin={"l": 10, "r": 10, "t": 10, "b": 10})
    return fig

