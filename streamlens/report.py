"""One self-contained HTML report: the standard analyses of a model, composed into figures.

`standard_report` runs the public API (record, decompose, logit lens, an ablation sweep) and hands
each result to its figure function; `Report.to_html` writes one page with plotly.js embedded once, so
it opens offline. No maths here: every number comes from a result object.
"""

from __future__ import annotations

import html
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import plotly.graph_objects as go

    from streamlens.model import Model

DEFAULT_PROMPT = "The capital of France is"

_CSS = """
body { font-family: Inter, Helvetica, Arial, sans-serif; margin: 0 auto; max-width: 1200px; padding: 0 24px 48px;
       color: #222; }
h1 { margin: 28px 0 4px; } h2 { margin: 40px 0 4px; border-top: 1px solid #ddd; padding-top: 20px; }
p.caption { margin: 4px 0 8px; max-width: 900px; line-height: 1.45; }
table.facts { border-collapse: collapse; font-size: 14px; margin: 12px 0; }
table.facts td { padding: 2px 14px 2px 0; vertical-align: top; } table.facts td:first-child { color: #666; }
code { background: #f4f4f4; padding: 1px 4px; border-radius: 3px; }
nav ol { line-height: 1.6; } .figure { width: 100%; }
"""


@dataclass(frozen=True)
class Section:
    """One figure of the report with a heading and a caption that says what it shows."""

    title: str
    caption: str
    figure: "go.Figure"


@dataclass(frozen=True)
class Report:
    """A titled list of figures plus the facts (model, data, command) that explain them."""

    title: str
    facts: tuple[tuple[str, str], ...]
    sections: tuple[Section, ...]

    def to_html(self) -> str:
        """One HTML page; plotly.js is embedded once in the head, every figure is a div after it."""
        from plotly.offline import get_plotlyjs

        facts = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>" for k, v in self.facts)
        toc = "".join(f'<li><a href="#figure-{i}">{html.escape(s.title)}</a></li>' for i, s in enumerate(self.sections))
        body = []
        for index, section in enumerate(self.sections):
            div = section.figure.to_html(full_html=False, include_plotlyjs=False, div_id=f"plot-{index}",
                                         config={"displaylogo": False, "responsive": True})
            body.append(f'<section id="figure-{index}"><h2>{index + 1}. {html.escape(section.title)}</h2>'
                        f'<p class="caption">{section.caption}</p><div class="figure">{div}</div></section>')
        return (
            f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(self.title)}</title>'
            f"<style>{_CSS}</style><script>{get_plotlyjs()}</script></head><body>"
            f"<h1>{html.escape(self.title)}</h1><table class=\"facts\">{facts}</table>"
            f"<nav><ol>{toc}</ol></nav>{''.join(body)}</body></html>\n"
        )

    def write(self, path: str | os.PathLike[str]) -> Path:
        """Write the page atomically (a failure leaves no file)."""
        from streamlens.files import write_atomic

        written = write_atomic(path, self.to_html())
        written.chmod(0o644)  # the temporary file was private; a report is meant to be shared
        return written


def check_out_path(out: str | os.PathLike[str]) -> Path:
    """Validate the report's output path before any work: an .html file in a writable folder."""
    from streamlens.files import prepare_out_dir

    path = Path(out)
    if path.is_dir():
        raise ValueError(f"--out {path} is a folder: give a file path ending in .html")
    if path.suffix.lower() not in (".html", ".htm"):
        raise ValueError(f"--out {path}: the report is one HTML file, give a path ending in .html")
    prepare_out_dir(path.parent if str(path.parent) else ".")
    return path


def standard_report(
    model: "Model",
    prompt: str = DEFAULT_PROMPT,
    target: str | None = None,
    data: str | None = None,
) -> Report:
    """Run the standard analyses on `model` and compose their figures.

    Args:
        model: a loaded `Model`.
        prompt: the prompt whose stream, decomposition and logit lens are shown.
        target: the next token to explain (e.g. " Paris"); None: the model's top prediction.
        data: the data set for the ablation sweep (see `streamlens.data`); None: the default one.
    """
    from streamlens.decomposition import decompose, logit_lens
    from streamlens.plots import decomposition as decomposition_plots
    from streamlens.plots import lens as lens_plots
    from streamlens.plots import stream as stream_plots
    from streamlens.recording import record

    started = time.perf_counter()
    tokens = model.to_tokens(prompt)
    if target is not None:
        model.token_id(target)  # a bad target fails before any work
    writes = record(model, tokens, heads=True)
    parts = decompose(model, tokens, target=target, by_head=True, writes=writes)
    lens = logit_lens(model, tokens, target=target, writes=writes)
    explained = parts.target_strings[0][0]
    last = f"the last token {writes.token_strings[-1]!r}"
    sections = [
        Section("Waterfall: from the embedding to the logit", (
            f"The logit of {html.escape(explained)} at {html.escape(last)}, built up write by write in stream order. "
            "Each bar starts where the previous one ended; the red <b>total</b> bar is the model's real logit, "
            f"on which the staircase lands (largest gap: {parts.error:.2g}). The final norm's scale is frozen "
            "at its clean value, which makes the split exact."), decomposition_plots.waterfall(parts)),
        Section("Contribution of each layer, attention vs MLP", (
            "The same terms grouped by layer: attention (blue, all heads plus the output bias) and MLP "
            "(orange) stacked per layer; embeddings (grey) and the norm and unembedding biases (purple) at "
            "the ends. All bars sum to the real logit."), decomposition_plots.layer_bars(parts)),
        Section("Contribution of each attention head", (
            f"Layer x head: the direct contribution of each head's write to the logit of {html.escape(explained)}. "
            "Red raises it, blue lowers it. Heads do not include the attention output bias, which is counted "
            "in the per-layer bars."), decomposition_plots.head_heatmap(parts)),
        Section("Norm of each write and of the stream", (
            f"At {html.escape(last)}: the L2 norm of every write (bars, in stream order) and of the stream "
            "after adding it (red line)."), stream_plots.write_norms(writes)),
        Section("How much each write grows the stream", (
            "The change of the stream's norm caused by each write. The bars sum to the norm of the final "
            "stream; a large write that is orthogonal to the stream grows it little."),
            stream_plots.stream_growth(writes)),
        Section("Alignment of each write with the final stream", (
            "Cosine similarity between each write and the final stream (before the final norm): which "
            "writes point where the stream ends up."), stream_plots.write_cosines(writes)),
        Section("Logit lens: probability after each block", (
            "The stream after the embeddings and after each block, read through the model's own final norm "
            "and unembedding. Colour: probability of the target (the model's final top token when no "
            "target is given); text: the lens's top token; hover for the top 5."),
            lens_plots.lens_heatmap(lens, "prob")),
        Section("Logit lens: rank of the target after each block", (
            "The same reading coloured by the target's rank (0 = top, log colour scale): it shows when the "
            "answer enters the top of the list long before its probability is high."),
            lens_plots.lens_heatmap(lens, "rank")),
        Section("Logit lens: distance to the model's output", (
            "KL(final || lens) in nats after each block, per position (grey) and their mean (red). It is "
            "zero after the last block by construction."), lens_plots.kl_to_final(lens)),
    ]
    info = model.info
    facts = (
        ("model", f"{info.name} ({info.architecture}; {info.n_layers} layers, {info.n_heads} heads, "
                  f"d_model {info.d_model}, {info.norm} norm, {info.dtype} on {info.device})"),
        ("weights sha256", info.weights_hash or "unknown"),
        ("prompt", f"{prompt!r} -> {len(writes.token_strings)} tokens {list(writes.token_strings)}"),
        ("explained", f"{explained} at the last position (logit {float(parts.logits[0, 0]):.4f})"),
        ("data (ablation)", data or "none"),
        ("command", parts.provenance.command),
        ("made", f"{parts.provenance.created} with streamlens {parts.provenance.versions.get('streamlens')}, "
                 f"torch {parts.provenance.versions.get('torch')} in {time.perf_counter() - started:.1f} s"),
    )
    return Report(title=f"streamlens report: {info.name}", facts=facts, sections=tuple(sections))
