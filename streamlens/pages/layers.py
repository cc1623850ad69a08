"""What `streamlens layers` writes: layers.csv (tidy), layers.json (verdicts, numbers, provenance) and
layers.html (the verdict table and every figure; several models overlay on depth l / (L - 1)).

Built only from `LayerStudy` results and the command's settings (no model runs here).
"""

from __future__ import annotations

import dataclasses
import html
import json
from collections.abc import Sequence
from typing import Any

from streamlens.importance import removable
from streamlens.pages.html import Report, Section
from streamlens.plots import layers as plots
from streamlens.results.layers import LayerStudy


def verdict_html(study: LayerStudy) -> str:
    """The verdict table as an HTML table (claim | protocol | number [95% CI] | paper | verdict)."""
    colours = {"holds": "#d9f0d3", "differs": "#fddbc7", "unclear": "#f0f0f0"}
    head = "".join(f"<th>{name}</th>" for name in ("claim", "protocol", f"{html.escape(study.model)} [95% CI]",
                                                    "what the paper reported (model, metric)", "verdict"))
    body = "".join(
        f"<tr><td>{html.escape(v.claim)}</td><td>{html.escape(v.protocol)}</td><td>{html.escape(v.number)}</td>"
        f"<td>{html.escape(v.paper)}</td><td style=\"background:{colours.get(v.verdict, 'white')}\">"
        f"<b>{v.verdict}</b></td></tr>" for v in study.verdicts)
    return (f'<table class="facts" style="border:1px solid #ddd;font-size:13px"><tr>{head}</tr>{body}</table>'
            "holds / differs: the 95% CI (bootstrap over texts) lies on the claimed side / the other side; "
            "unclear: it spans both. For the cheapest span: holds when the predicted span is the cheapest or its "
            "excess damage over the cheapest is not distinguishable from 0.")


def layer_sections(studies: Sequence[LayerStudy]) -> list[Section]:
    """The page's sections: verdicts first, then per-layer profiles (overlaid on depth when several
    models), scores, spans, greedy removal and self-repair."""
    first = studies[0]
    several = len(studies) > 1
    sections = [Section(f"Verdicts: {html.escape(s.model)}", verdict_html(s), plots.verdict_table(s)) for s in studies]
    sections += [
        Section("Which blocks matter: removal and swaps per layer", (
            "Loss increase (log scale) when one block, one attention sublayer or one MLP is removed (its writes "
            "zeroed; later layers run on), and when blocks L and L+1 trade places (Lad et al.); 95% bootstrap "
            "intervals over texts."), plots.removal_profile(studies)),
        Section("The same against depth l / (L - 1)", (
            "Every per-layer curve on a depth axis from 0 (first block) to 1 (last), so models of different "
            "depths overlay" + (" (one line dash per model)." if several else ".")),
            plots.removal_profile(studies, depth=True)),
        Section("Cheap scores per block", (
            "Block Influence 1 - cos(x_l, x_{l+1}) (ShortGPT), angular distance of one block (Gromov et al.) and "
            "||write|| / ||stream||, each from one clean pass, mean over real positions and texts."),
            plots.score_profile(studies, depth=several)),
    ]
    for study in studies:
        rho = "; ".join(f"{name}: {r:.2f} [{lo:.2f}, {hi:.2f}]" for name, (r, lo, hi) in study.correlations.items())
        attn, mlp = (removable(study.greedy[k], 0.5) for k in ("attn", "mlp"))
        small_attn, small_mlp = (removable(study.greedy[k], 0.1) for k in ("attn", "mlp"))
        sections += [
            Section(f"{html.escape(study.model)}: do the cheap scores predict the damage?", (
                f"One point per block. Spearman rho with a 95% bootstrap CI over texts: {html.escape(rho)}."),
                plots.score_scatter(study)),
            Section(f"{html.escape(study.model)}: angular distance of every span", (
                "Rows: span size n; columns: first block s; crosses: the span each n would remove "
                "(Gromov et al.'s rule)."), plots.angular_heatmap(study)),
            Section(f"{html.escape(study.model)}: removing n contiguous blocks", (
                "Red: the span the angular distance picks, for every n up to L/2 (95% CI); green diamonds: the "
                "cheapest span found by measuring every span of that size."), plots.span_curve(study)),
            Section(f"{html.escape(study.model)}: attention vs MLP, removed greedily", (
                f"Each step removes the sublayer whose removal, together with those already gone, costs least "
                f"(greedy over the least damaging sublayers alone). Before +0.1 nats: {small_attn} attention "
                f"sublayers vs {small_mlp} MLPs; before +0.5 nats: {attn} vs {mlp}."),
                plots.greedy_curves([study])),
            Section(f"{html.escape(study.model)}: self-repair, direct vs total effect", (
                "Each unit resample-ablated on the text windows; change of the clean label's logit. Points below "
                "the diagonal on the negative side (total smaller in size than direct) were repaired."),
                plots.repair_scatter(study)),
            Section(f"{html.escape(study.model)}: where the repair comes from (attention)", (
                "total = direct (norm scale frozen) + downstream (later layers reacting) + norm (the final norm's "
                "rescaling alone), exactly, per attention sublayer."), plots.repair_parts(study, "attn")),
            Section(f"{html.escape(study.model)}: where the repair comes from (MLP)", (
                "The same split for each MLP."), plots.repair_parts(study, "mlp")),
        ]
    return sections


def summary(study: LayerStudy) -> dict[str, Any]:
    """The headline numbers of one study (also the JSON's per-model entry)."""
    spans, rows = study.spans, study.span_rows()
    loss = spans.metrics.index("loss_increase")
    best: dict[str, Any] = {}
    for size in study.measured_sizes():
        candidates = [i for (s, _), i in rows.items() if s == size]
        measured = min(candidates, key=lambda i: float(spans.values[i, loss]))
        predicted = rows[(size, dict(study.predicted_spans)[size])] if size in dict(study.predicted_spans) else None
        best[str(size)] = {
            "measured": _span(spans, measured, loss),
            "predicted": None if predicted is None else _span(spans, predicted, loss),
        }
    fractions = study.repair.repaired_fraction()
    heads = [i for i, site in enumerate(study.repair.sites) if site.kind == "head"]
    return {
        "model": study.model, "n_layers": study.n_layers, "seconds": round(study.seconds, 1),
        "clean_loss": float(study.blocks.clean_loss.mean()),
        "verdicts": [dataclasses.asdict(v) for v in study.verdicts],
        "spearman_with_block_damage": {k: {"rho": r, "ci_low": lo, "ci_high": hi}
                                       for k, (r, lo, hi) in study.correlations.items()},
        "best_spans": best,
        "removable_before": {f"+{t}": {k: removable(c, t) for k, c in study.greedy.items()} for t in (0.1, 0.5)},
        "greedy_pool": {k: len(c.sites) for k, c in study.greedy.items()},
        "median_repaired_fraction_heads": float(fractions[heads].median()) if heads else None,
        "median_norm_fraction_heads": float(study.repair.norm_fraction()[heads].median()) if heads else None,
    }


def _span(spans, index: int, loss: int) -> dict[str, Any]:
    unit = spans.sites[index]
    return {"blocks": f"{unit[0].layer}-{unit[-1].layer}", "loss_increase": float(spans.values[index, loss]),
            "ci_low": float(spans.ci_low[index, loss]), "ci_high": float(spans.ci_high[index, loss])}


def layers_files(studies: Sequence[LayerStudy], settings: dict[str, Any], seconds: float) -> dict[str, str]:
    """File name -> content for layers.csv, layers.json and layers.html."""
    import pandas as pd

    first = studies[0]
    provenance = first.blocks.provenance
    metadata = {**settings, "data": first.blocks.data, "n_texts": first.blocks.n_texts,
                "n_predictions": first.blocks.n_predictions, "bootstrap": {"replicates": first.blocks.n_boot,
                                                                          "level": 0.95, "resampling_unit": "text"},
                "models": [{**summary(s), "weights_hash": s.blocks.provenance.weights_hash,
                            "dtype": s.blocks.provenance.dtype} for s in studies],
                "versions": provenance.versions, "created": provenance.created, "seconds": round(seconds, 1)}
    facts = (("models", ", ".join(f"{s.model} ({s.n_layers} layers)" for s in studies)),
             ("data", first.blocks.data), ("command", str(settings.get("command"))),
             ("made", f"{provenance.created}, {seconds:.1f} s"))
    return {
        "layers.csv": pd.concat([s.to_dataframe() for s in studies], ignore_index=True).to_csv(index=False),
        "layers.json": json.dumps(metadata, indent=2, default=str),
        "layers.html": Report("streamlens layers: which layers matter, and why", facts,
                              tuple(layer_sections(studies))).to_html(),
    }
