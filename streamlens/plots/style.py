"""One colour per kind of stream component, used by every figure."""

from __future__ import annotations

COLORS = {
    "embed": "#7f7f7f",      # grey: what the stream starts from
    "pos_embed": "#bcbd22",
    "attn": "#1f77b4",       # blue: attention writes (and heads)
    "head": "#1f77b4",
    "attn_bias": "#9ecae1",
    "mlp": "#ff7f0e",        # orange: MLP writes
    "block": "#2ca02c",      # green: attention + MLP of one layer
    "bias": "#9467bd",       # purple: final-norm bias and unembedding bias
    "total": "#d62728",      # red: the real logit / the sum
    "plain": "#d62728",      # highway: a plain stack (no skip)
    "residual": "#2ca02c",   # highway: a residual stack
}
TEMPLATE = "plotly_white"
FONT = {"family": "Inter, Helvetica, Arial, sans-serif", "size": 13}


def color(kind: str) -> str:
    """The colour of a component kind; unknown kinds are dark grey."""
    return COLORS.get(kind, "#444444")


def finish(fig, title: str, x_title: str, y_title: str):
    """Common layout: template, font, titles; returns the figure."""
    fig.update_layout(template=TEMPLATE, font=FONT, title={"text": title, "x": 0.02},
                      xaxis_title=x_title, yaxis_title=y_title, legend={"orientation": "h", "y": -0.2},
                      margin={"l": 70, "r": 30, "t": 60, "b": 70})
    return fig
