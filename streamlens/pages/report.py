"""The page of `streamlens report`: the standard analyses of a model, composed into figures.

`standard_report` runs the public API (record, decompose, logit lens; single and cumulative
sublayer ablations, direct and total) and hands each result to its figure function; the page is a
`pages.html.Report` (plotly.js embedded once, so it opens offline). No maths here: every number
comes from a result object.
"""

from __future__ import annotations

import html
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from streamlens.pages.html import Report, Section, fidelity_fact
from streamlens.results import Provenance, command_line

if TYPE_CHECKING:
    import torch

    from streamlens.ablation.engine import Backend
    from streamlens.data import TokenBatch
    from streamlens.model import Model
    from streamlens.results.tunedlens import TunedLens

DEFAULT_PROMPT = "The capital of France is"
DEFAULT_DATA = "prompts"  # the built-in prompt/target set: short prompts keep the ablations quick
ABLATION_METHOD = "mean"  # a write replaced by its mean stays on-distribution, unlike zero

def standard_report(
    model: "Model",
    prompt: str = DEFAULT_PROMPT,
    target: str | None = None,
    data: str | None = DEFAULT_DATA,
    log: Callable[[str], None] | None = None,
    lens: "TunedLens | None" = None,
    backend: "Backend | None" = None,
) -> Report:
    """Run the standard analyses on `model` and compose their figures.

    Args:
        model: a loaded `Model`.
        prompt: the prompt whose stream, decomposition and logit lens are shown.
        target: the next token to explain (e.g. " Paris"); None: the model's top prediction.
        data: what the ablations are measured on (any `streamlens.data` source: "prompts", the
            built-in prompt set scored at each prompt's last token; "builtin" text; a file; a text).
        log: called with a short line as each analysis starts (progress on the command line).
        lens: a trained tuned lens (`streamlens lens train`): adds logit-vs-tuned lens figures on the prompt.
        backend: where the ablation sweeps run (`ablation.placement.choose_backend`; None: here).
    """
    from streamlens import data as D

    started = time.perf_counter()
    say = log or (lambda line: None)
    # every input is checked before the first progress line, so bad input gives one line of error
    tokens = model.to_tokens(prompt)
    if target is not None:
        model.token_id(target)
    if lens is not None:
        from streamlens.tunedlens import check_lens

        check_lens(model, lens)
    # text windows are kept short so the report stays a quick overview (`streamlens ablate` goes further)
    batch = D.load_batch(model, data, window=32, max_windows=8)
    say(f"decomposing {prompt!r}")
    prompt_sections, explained = _prompt_sections(model, tokens, target)
    identity_sections = stream_sections(model, tokens, target, lens, say)
    ablation_sections, batch_description = _ablation_sections(model, batch, say, backend)
    ablation_sections.append(_layer_scores_section(model, batch))
    provenance = Provenance.of(model, command_line())
    info = model.info
    facts = (
        ("model", f"{info.name} ({info.architecture}; {info.n_layers} layers, {info.n_heads} heads, "
                  f"d_model {info.d_model}, {info.norm} norm, {info.dtype} on {info.device})"),
        ("weights sha256", info.weights_hash or "unknown"),
        ("fidelity", fidelity_fact(info)),
        ("prompt", prompt),
        ("explained", explained),
        ("ablation data", batch_description),
        ("command", provenance.command),
        ("made", f"{provenance.created} with streamlens {provenance.versions.get('streamlens')}, "
                 f"torch {provenance.versions.get('torch')}, in {time.perf_counter() - started:.0f} s"),
    )
    return Report(title=f"streamlens report: {info.name}", facts=facts,
                  sections=(*prompt_sections, *identity_sections, *ablation_sections))


def _prompt_sections(model: "Model", tokens: "torch.Tensor", target: str | None) -> tuple[list[Section], str]:
    """Decomposition, stream anatomy and logit lens of one prompt; also says what was explained."""
    from streamlens.decomposition import decompose, logit_lens
    from streamlens.plots import decomposition as decomposition_plots
    from streamlens.plots import lens as lens_plots
    from streamlens.plots import stream as stream_plots
    from streamlens.recording import record

    writes = record(model, tokens, heads=True)
    parts = decompose(model, tokens, target=target, by_head=True, writes=writes)
    lens = logit_lens(model, tokens, target=target, writes=writes)
    name = parts.target_strings[0][0]
    last = f"the last token {writes.token_strings[-1]!r}"
    explained = (f"{name} after {len(writes.token_strings)} tokens {list(writes.token_strings)}: "
                 f"logit {float(parts.logits[0, 0]):.4f}")
    sections = [
        Section("Waterfall: from the embedding to the logit", (
            f"The logit of {html.escape(name)} at {html.escape(last)}, built up write by write in stream order. "
            "Each bar starts where the previous one ended; the red <b>total</b> bar is the model's real logit, "
            f"on which the staircase lands (largest gap: {parts.error:.2g}). The final norm's scale is frozen "
            "at its clean value, which makes the split exact."), decomposition_plots.waterfall(parts)),
        Section("Contribution of each layer, attention vs MLP", (
            "The same terms grouped by layer: attention (blue, all heads plus the output bias) and MLP "
            "(orange) stacked per layer; embeddings (grey) and the norm and unembedding biases (purple) at "
            "the ends. All bars sum to the real logit."), decomposition_plots.layer_bars(parts)),
        Section("Contribution of each attention head", (
            f"Layer x head: the direct contribution of each head's write to the logit of {html.escape(name)}. "
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
    return sections, explained


def stream_sections(model: "Model", tokens: "torch.Tensor", target: str | None, lens: "TunedLens | None",
                    say: Callable[[str], None]) -> list[Section]:
    """What the stream carries: attention sources of the prompt's answer, token identity on short built-in
    windows (one per text, no counterfactual), and with a trained lens, logit vs tuned lens on the prompt."""
    from streamlens.data import text_windows
    from streamlens.identity import token_identity
    from streamlens.pages import identity as identity_page
    from streamlens.sources import attention_sources

    say("splitting attention by source position; token identity on short built-in windows")
    sections = identity_page.sources_sections(attention_sources(model, tokens, target))
    identity = token_identity(model, text_windows(model, None, window=32, max_per_text=1), n_boot=200)
    sections.append(identity_page.identity_sections(identity)[0])
    if lens is not None:
        from streamlens.tunedlens import compare_lenses

        sections += identity_page.lens_sections(compare_lenses(model, tokens, lens, text="the prompt"))
    return sections


def _layer_scores_section(model: "Model", batch: "TokenBatch") -> Section:
    """Which layers matter, cheaply: BI and angular distance per block (`streamlens layers` measures the rest)."""
    from streamlens.importance import stream_scores
    from streamlens.plots.layers import stream_score_profile

    return Section("Which blocks change the stream: Block Influence and angular distance", (
        "From one clean pass over the ablation data: 1 - cos between the stream entering and leaving each block "
        "(ShortGPT's Block Influence), the angular distance arccos(cos)/pi (Gromov et al.) and the block's write "
        "norm relative to the stream. <code>streamlens layers</code> checks how well they predict removal damage, "
        "with spans, swaps, attention vs MLP and self-repair."), stream_score_profile([stream_scores(model, batch)]))


def _ablation_sections(model: "Model", batch: "TokenBatch", say: Callable[[str], None],
                       backend: "Backend | None" = None) -> tuple[list[Section], str]:
    """Remove each attention and MLP sublayer, alone and one after another; direct vs total effect."""
    from streamlens import ablation as A
    from streamlens.plots import ablation as ablation_plots

    sublayers = sorted(A.units(model, "attn") + A.units(model, "mlp"), key=lambda s: (s.layer, s.kind == "mlp"))
    command = command_line()

    def each(effect: str):
        specs = [A.Ablation((site,), ABLATION_METHOD, effect) for site in sublayers]
        return A.evaluate(model, batch, specs, batch_size=64, command=command, backend=backend)

    say(f"ablating {len(sublayers)} sublayers on {batch.description}")
    total, direct = each("total"), each("direct")
    say(f"removing them one after another ({len(sublayers)} steps)")
    order = [sublayers[index] for index in A.by_damage(total)]
    curve = A.cumulative(model, batch, order, "order", ABLATION_METHOD, "total", batch_size=64, command=command,
                         backend=backend)
    metric = total.metrics[0]
    what = (f"{ABLATION_METHOD}-ablation (the write is replaced by its mean over the data), measured on "
            f"{html.escape(batch.description)} with 95% bootstrap intervals over texts")
    sections = [
        Section("Removing one sublayer: attention vs MLP", (
            f"The damage ({metric.replace('_', ' ')}) when a single attention (blue) or MLP (orange) sublayer is "
            f"removed and later layers run on: {what}."), ablation_plots.damage(total, metric)),
        Section("Direct vs total effect of each sublayer", (
            "Direct: only the write's own path to the logits is removed, later layers still see it. Total: the "
            "write is removed inside the forward pass. Where total exceeds direct, later layers depended on the "
            "write; where it is smaller, they repair its loss."), ablation_plots.direct_vs_total(direct, total, metric)),
        Section("Removing sublayers one after another", (
            "Sublayers removed together, least damaging first (ranked by the single-sublayer damage above): "
            "how much of the model can go before the damage climbs. The band is the 95% interval."),
            ablation_plots.cumulative_curve(curve, metric)),
    ]
    return sections, f"{batch.description}; {ABLATION_METHOD} ablation; {batch.n_scored} scored predictions"
