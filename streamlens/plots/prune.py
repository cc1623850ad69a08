"""Figures of `streamlens prune`, built only from `results.prune` results.

- `loss_curves`: held-out loss of every strategy against k (95% CIs over texts), clean loss marked;
- `paired_gaps`: measured greedy minus each other strategy against k, paired 95% CIs (below 0: greedy wins);
- `chosen_units`: which layers each strategy removes at k (a strategy x layer grid);
- `export_differences`: the export's max relative logit difference per way of loading it, against the tolerance;
- `pruned_vs_full`: held-out loss, top-1 accuracy and prompt accuracy of both models (95% CIs);
- `heal_before_after`: held-out loss (and KL to the full model) before and after healing (95% CIs).
"""

from __future__ import annotations

import plotly.graph_objects as go

from streamlens.plots.style import finish
from streamlens.results.prune import KINDS, LABELS, ExportCheck, PruneChoice, StrategyComparison
from streamlens.results.pruned import HealResult, PrunedComparison

STRATEGY_COLORS = {"greedy": "#d62728", "block_influence": "#2ca02c", "angular": "#9467bd", "last": "#7f7f7f",
                   "attention": "#1f77b4", "mlp": "#ff7f0e"}


def _error(values: list[float], low: list[float], high: list[float]) -> dict:
    return {"type": "data", "symmetric": False, "array": [h - v for v, h in zip(values, high)],
            "arrayminus": [v - lo for v, lo in zip(values, low)], "thickness": 1, "width": 3}


def loss_curves(comparison: StrategyComparison) -> go.Figure:
    """Held-out loss vs k, one line per strategy (dashed: sublayer strategies), 95% CI bars; clean loss dotted."""
    fig = go.Figure()
    ks = list(range(1, comparison.k_max + 1))
    for name in comparison.strategies:
        summaries = [comparison.summary(name, k) for k in ks]
        values, low, high = ([s[i] for s in summaries] for i in range(3))
        fig.add_trace(go.Scatter(x=ks, y=values, mode="lines+markers", name=LABELS[name],
                                 line={"color": STRATEGY_COLORS[name],
                                       "dash": "solid" if KINDS[name] == "block" else "dash"},
                                 error_y=_error(values, low, high)))
    fig.add_hline(y=float(comparison.clean_loss.mean()), line={"dash": "dot", "color": "black"},
                  annotation_text="full model")
    return finish(fig, f"Held-out loss after removing k units ({comparison.eval_data})", "k (units removed)",
                  "next-token loss (nats)")


def paired_gaps(comparison: StrategyComparison) -> go.Figure:
    """Measured greedy minus each other block strategy, vs k, paired bootstrap 95% CI (below 0: greedy better)."""
    fig = go.Figure()
    ks = list(range(1, comparison.k_max + 1))
    others = [s for s in comparison.strategies if s != "greedy" and KINDS[s] == "block"]
    if "greedy" in comparison.strategies:
        for name in others:
            summaries = [comparison.paired(name, k) for k in ks]
            values, low, high = ([s[i] for s in summaries] for i in range(3))
            fig.add_trace(go.Scatter(x=ks, y=values, mode="lines+markers", name=f"greedy - {LABELS[name]}",
                                     line={"color": STRATEGY_COLORS[name]}, error_y=_error(values, low, high)))
    fig.add_hline(y=0, line={"color": "black", "width": 1})
    return finish(fig, "Where measured greedy removal wins (held-out, paired over texts)", "k (blocks removed)",
                  "loss(greedy) - loss(other) (nats)")


def chosen_units(choice: PruneChoice, k: int) -> go.Figure:
    """Strategy x layer grid: 1 where the strategy removes that layer's unit (block, attention or MLP) at k."""
    rows = [[1.0 if layer in choice.removed(name, k) else 0.0 for layer in range(choice.n_layers)]
            for name in choice.strategies]
    labels = [f"{LABELS[name]} ({KINDS[name]})" for name in choice.strategies]
    fig = go.Figure(go.Heatmap(z=rows, x=list(range(choice.n_layers)), y=labels, showscale=False,
                               colorscale=[[0, "#f7f7f7"], [1, "#d62728"]], xgap=2, ygap=2))
    fig.update_yaxes(autorange="reversed")
    return finish(fig, f"What each strategy removes at k = {k} (chosen on {choice.data})", "layer", "")


def export_differences(check: ExportCheck) -> go.Figure:
    """Max |exported - simulated| / max |simulated| per way of loading the export, log scale, tolerance marked."""
    rows = check.rows()
    fig = go.Figure(go.Bar(x=[name for name, *_ in rows], y=[max(value, 1e-18) for _, value, *_ in rows],
                           marker_color=["#2ca02c" if value <= tolerance else "#d62728"
                                         for _, value, tolerance, _ in rows]))
    for _, _, tolerance, _ in rows[:1]:
        fig.add_hline(y=tolerance, line={"dash": "dash", "color": "black"}, annotation_text=f"tolerance {tolerance:.0e}")
    fig.update_yaxes(type="log")
    return finish(fig, f"Export vs simulated removal of blocks {list(check.blocks)} ({check.n_windows} held-out windows)",
                  "loaded with", "max relative logit difference")


def _interval_bars(fig: go.Figure, table, group: str, names: tuple[str, ...], colors: tuple[str, ...]) -> go.Figure:
    """One bar trace per value of `group` (x: metric), with the rows' 95% intervals as error bars."""
    for name, color in zip(names, colors):
        rows = table[table[group] == name]
        values, low, high = rows["estimate"].tolist(), rows["low"].tolist(), rows["high"].tolist()
        fig.add_trace(go.Bar(name=name, x=rows["metric"].tolist(), y=values, marker_color=color,
                             error_y=_error(values, low, high)))
    fig.update_layout(barmode="group")
    return fig


def pruned_vs_full(evaluation: PrunedComparison) -> go.Figure:
    """Held-out loss (nats), top-1 accuracy and prompt accuracy of the full and the pruned model, 95% CIs."""
    table = evaluation.to_dataframe()
    table = table[table["metric"].isin(("loss", "top1_accuracy", "prompt_accuracy"))]
    fig = _interval_bars(go.Figure(), table, "model", ("full", "pruned"), ("#1f77b4", "#d62728"))
    return finish(fig, f"Full vs pruned on {evaluation.data}", "metric", "value (95% CI over texts)")


def heal_before_after(heal: HealResult) -> go.Figure:
    """Held-out loss (and KL to the full model) of the pruned model before and after healing, 95% CIs."""
    table = heal.to_dataframe().rename(columns={"stage": "when"})
    fig = _interval_bars(go.Figure(), table, "when", ("before", "after"), ("#d62728", "#2ca02c"))
    return finish(fig, f"Healing: {heal.settings['steps']} steps ({heal.settings['mode']}, {heal.settings['loss']}), "
                       f"judged on {heal.data}", "metric", "nats (95% CI over texts)")
