"""Figures of what the stream carries: token identity per stage, attention sources, logit vs tuned lens.

- `identity_curves`: a measure per stage for the current and previous token, with 95% bands over texts;
- `identity_splits`: the probe's top-1 accuracy for word starts vs continuations;
- `skip_removed`: the probe at the stage after block L and at the end, clean vs the skip around L removed;
- `source_heatmap`: head x source token, each head's contribution to the answer's logit by source;
- `source_norms`: per layer, the attention write from the same vs other positions, next to the MLP write;
- `lens_kl`: mean KL(final || lens) per stage for the logit and tuned lens (95% bands over texts);
- `lens_rank`: mean rank of the final top token per stage for both lenses.
"""

from __future__ import annotations

import plotly.graph_objects as go

from streamlens.plots.style import color, finish
from streamlens.results.identity import TokenIdentity
from streamlens.results.sources import AttentionSources
from streamlens.results.tunedlens import LensComparison

_TARGET_COLORS = {"current": color("total"), "previous": color("attn")}
_LENS_COLORS = {"logit lens": color("embed"), "tuned lens": color("total")}
_TITLES = {"probe_top1": "probe top-1 accuracy (held-out texts)", "probe_top5": "probe top-5 accuracy",
           "log10_rank": "log10(1 + rank) through the embedding", "cosine": "cosine with the token's embedding"}


def _band(fig: go.Figure, x: list, low: list, high: list, line: str, name: str) -> None:
    fig.add_scatter(x=x + x[::-1], y=high + low[::-1], fill="toself", line={"width": 0}, fillcolor=line,
                    opacity=0.18, hoverinfo="skip", showlegend=False, name=f"{name} 95%")


def identity_curves(identity: TokenIdentity, measure: str = "probe_top1", split: str = "all") -> go.Figure:
    """One line per target (current, previous token) across stages; dotted: the majority baseline."""
    fig = go.Figure()
    stages = list(identity.layer_labels)
    s, m = identity.splits.index(split), identity.measures.index(measure)
    for t, target in enumerate(identity.targets):
        line = _TARGET_COLORS.get(target, "#444444")
        _band(fig, stages, identity.low[0, t, s, :, m].tolist(), identity.high[0, t, s, :, m].tolist(), line, target)
        fig.add_scatter(x=stages, y=identity.value[0, t, s, :, m].tolist(), mode="lines+markers", name=f"{target} token",
                        line={"color": line}, marker={"size": 4})
        if measure.startswith("probe"):
            fig.add_scatter(x=stages, y=identity.value[0, t, s, :, identity.measures.index("majority")].tolist(),
                            mode="lines", name=f"{target}: majority baseline", line={"color": line, "dash": "dot"})
    fig.update_xaxes(type="category")
    return finish(fig, f"Token identity per stage: {_TITLES.get(measure, measure)} ({split} tokens)",
                  "stream after (embed, then block)", _TITLES.get(measure, measure))


def identity_splits(identity: TokenIdentity, target: str = "current") -> go.Figure:
    """The probe's top-1 accuracy per stage for word starts and continuations."""
    fig = go.Figure()
    stages = list(identity.layer_labels)
    t, m = identity.targets.index(target), identity.measures.index("probe_top1")
    for s, split in enumerate(identity.splits):
        dash = {"all": "solid", "word start": "dash", "continuation": "dot"}.get(split, "solid")
        fig.add_scatter(x=stages, y=identity.value[0, t, s, :, m].tolist(), mode="lines", name=split,
                        line={"color": _TARGET_COLORS.get(target, "#444"), "dash": dash})
    fig.update_xaxes(type="category")
    return finish(fig, f"Probe for the {target} token: word starts vs continuations", "stream after (embed, then block)",
                  "top-1 accuracy (held-out texts)")


def skip_removed(identity: TokenIdentity, target: str = "current") -> go.Figure:
    """Grouped bars: probe top-1 after block L and at the end, clean vs with the skip around L removed."""
    fig = go.Figure()
    t, m = identity.targets.index(target), identity.measures.index("probe_top1")
    last = len(identity.layer_labels) - 1
    groups, clean, cut, clean_end, cut_end = [], [], [], [], []
    for c, layer in enumerate(identity.removed):
        if layer < 0:
            continue
        groups.append(f"block {layer}")
        clean.append(float(identity.value[0, t, 0, layer + 1, m]))
        cut.append(float(identity.value[c, t, 0, layer + 1, m]))
        clean_end.append(float(identity.value[0, t, 0, last, m]))
        cut_end.append(float(identity.value[c, t, 0, last, m]))
    for name, values, colour in (("after the block, clean", clean, color("residual")),
                                 ("after the block, skip removed", cut, color("plain")),
                                 ("final stream, clean", clean_end, "#98df8a"),
                                 ("final stream, skip removed", cut_end, "#ff9896")):
        fig.add_bar(x=groups, y=values, name=name, marker_color=colour)
    fig.update_layout(barmode="group")
    return finish(fig, f"Probe top-1 for the {target} token with the skip around one block removed",
                  "block whose skip is removed", "top-1 accuracy (held-out texts)")


def source_heatmap(sources: AttentionSources, max_heads: int = 40) -> go.Figure:
    """Heads (rows, the most contributing first) x source tokens, coloured by logit contribution."""
    n_layers, n_heads, n_src = sources.contributions.shape
    n_src = sources.position + 1
    flat = sources.contributions[:, :, :n_src].reshape(n_layers * n_heads, n_src)
    order = flat.abs().sum(-1).argsort(descending=True)[:max_heads].tolist()
    rows = [f"L{i // n_heads}H{i % n_heads}" for i in order]
    columns = [f"{p} {sources.token_strings[p]!r}" for p in range(n_src)]
    z = flat[order].tolist()
    bound = max(1e-12, float(flat[order].abs().max()))
    fig = go.Figure(go.Heatmap(z=z, x=columns, y=rows, colorscale="RdBu_r", zmin=-bound, zmax=bound,
                               colorbar={"title": {"text": "logit contribution"}},
                               hovertemplate="%{y} reading %{x}: %{z:.4g}<extra></extra>"))
    fig.update_xaxes(type="category")
    fig.update_yaxes(type="category", autorange="reversed")
    fig.update_layout(height=max(420, 16 * len(rows) + 160))
    return finish(fig, f"Logit of {sources.target_string!r} at {sources.token_strings[sources.position]!r}: each head "
                       f"by the source token it read ({len(rows)} largest heads)", "source position (token)", "head")


def source_norms(sources: AttentionSources) -> go.Figure:
    """Per layer (mean over positions): attention write from the same position, from other positions, MLP write."""
    fig = go.Figure()
    layers = list(range(sources.same_norm.shape[0]))
    for name, values, colour in (("attention, same position", sources.same_norm, "#9ecae1"),
                                 ("attention, other positions", sources.other_norm, color("attn")),
                                 ("MLP (own position only)", sources.mlp_norm, color("mlp"))):
        fig.add_bar(x=layers, y=values.mean(-1).tolist(), name=name, marker_color=colour)
    share = sources.same_share().tolist()
    fig.add_scatter(x=layers, y=share, yaxis="y2", mode="lines+markers", name="same / (same + other)",
                    line={"color": color("total")})
    fig.update_layout(barmode="group", yaxis2={"overlaying": "y", "side": "right", "range": [0, 1],
                                               "title": {"text": "same-position share"}})
    return finish(fig, "Where each layer's writes come from (mean norm over positions)", "layer", "norm of the write")


def lens_kl(comparison: LensComparison) -> go.Figure:
    """Mean KL(final || lens) per stage for both lenses, with 95% bands over texts (log scale)."""
    fig = go.Figure()
    stages = list(comparison.layer_labels)
    kl, interval = comparison.mean_kl(), comparison.kl_interval()
    for k, lens in enumerate(comparison.lenses):
        line = _LENS_COLORS.get(lens, "#444")
        _band(fig, stages, interval[0, k].tolist(), interval[1, k].tolist(), line, lens)
        fig.add_scatter(x=stages, y=kl[k].tolist(), mode="lines+markers", name=lens, line={"color": line},
                        marker={"size": 4})
    fig.update_xaxes(type="category")
    fig.update_yaxes(type="log")
    return finish(fig, f"Logit lens vs tuned lens: KL to the model's output on held-out text ({comparison.text})",
                  "stream read after (embed, then block)", "mean KL(final || lens), nats")


def lens_rank(comparison: LensComparison) -> go.Figure:
    """Mean rank (0 = top) of the model's final top token under each lens, per stage (log scale)."""
    fig = go.Figure()
    stages = list(comparison.layer_labels)
    for k, lens in enumerate(comparison.lenses):
        fig.add_scatter(x=stages, y=(1.0 + comparison.mean_rank()[k]).tolist(), mode="lines+markers", name=lens,
                        line={"color": _LENS_COLORS.get(lens, "#444")}, marker={"size": 4})
    fig.update_xaxes(type="category")
    fig.update_yaxes(type="log")
    return finish(fig, "Rank of the model's final top token under each lens", "stream read after (embed, then block)",
                  "1 + mean rank")
