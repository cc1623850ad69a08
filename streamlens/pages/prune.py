"""What `streamlens prune` writes: prune.csv (held-out loss per strategy and k), prune.json (the choice,
the verdicts, the export's proof, the evaluation and the heal, timings, provenance), prune.html (figures
and tables), and where measured evaluation.csv (full vs pruned), generations.csv (side by side) and
heal.csv (before / after).

Built only from a `PruneRun` and the command's settings (no model runs here).
"""

from __future__ import annotations

import html
import json
from typing import Any

from streamlens.pages.html import Report, Section
from streamlens.plots import prune as plots
from streamlens.prune.pipeline import PruneRun
from streamlens.results.layers import Verdict
from streamlens.results.prune import LABELS
from streamlens.results.pruned import HealResult, PrunedComparison


def verdict_html(verdicts: tuple[Verdict, ...]) -> str:
    """claim | protocol | number [95% CI] | the paper | verdict, as an HTML table."""
    colours = {"holds": "#d9f0d3", "differs": "#fddbc7", "unclear": "#f0f0f0"}
    head = "".join(f"<th>{name}</th>" for name in ("claim", "protocol", "this model [95% CI]",
                                                    "what the paper reported (model, metric)", "verdict"))
    body = "".join(
        f"<tr><td>{html.escape(v.claim)}</td><td>{html.escape(v.protocol)}</td><td>{html.escape(v.number)}</td>"
        f"<td>{html.escape(v.paper)}</td><td style=\"background:{colours.get(v.verdict, 'white')}\">"
        f"<b>{v.verdict}</b></td></tr>" for v in verdicts)
    return (f'<table class="facts" style="border:1px solid #ddd;font-size:13px"><tr>{head}</tr>{body}</table>'
            "Our metric is next-token loss on held-out text without healing; the papers measured benchmark "
            "accuracy (Gromov et al. after QLoRA healing), so a difference may be one of metric, model size or healing.")


def summary(run: PruneRun) -> dict[str, Any]:
    """The numbers of the JSON file: what was removed, every strategy's held-out loss, verdicts, the proof."""
    comparison = run.comparison
    table = {name: {str(k): dict(zip(("loss", "ci_low", "ci_high"), comparison.summary(name, k)))
                    for k in range(1, comparison.k_max + 1)} for name in comparison.strategies}
    return {
        "strategy": run.strategy, "k": run.k, "removed_blocks": list(run.removed),
        "budget_nats": run.choice.budget, "greedy_choice_damage": [float(v) for v in run.choice.greedy_damage],
        "sets": {name: [list(s) for s in run.choice.sets[i]] for i, name in enumerate(run.choice.strategies)},
        "clean_loss": float(comparison.clean_loss.mean()), "held_out_loss": table,
        "best_block_strategy": {str(k): comparison.best(k) for k in range(1, comparison.k_max + 1)},
        "verdicts": [v.__dict__ for v in run.verdicts],
        "export": None if run.export is None else {
            "folder": run.export.folder, "gguf": run.export.gguf_file, "passed": run.export.passed,
            "max_relative_logit_difference": {name: value for name, value, _, _ in run.export.rows()},
            "tolerance": run.export.tolerance, "windows": run.export.n_windows},
        "evaluation": None if run.evaluation is None else {
            "rows": run.evaluation.to_dataframe().to_dict("records"), "speedup": run.evaluation.speedup,
            "speed_settings": run.evaluation.speed_settings, "generations": run.evaluation.generations().to_dict("records")},
        "heal": None if run.heal is None else {
            "folder": run.heal.folder, "settings": run.heal.settings, "train_data": run.heal.train_data,
            "rows": run.heal.to_dataframe().to_dict("records"), "train_loss": run.heal.train_loss.tolist(),
            "seconds": run.heal.seconds, "cpu_seconds": run.heal.cpu_seconds, "proof": run.heal.proof,
            "proof_tolerance": run.heal.proof_tolerance, "gguf_tolerance": run.heal.gguf_tolerance,
            "proved": run.heal.proved},
        "seconds": {name: round(value, 2) for name, value in run.seconds.items()},
    }


def prune_sections(run: PruneRun) -> list[Section]:
    comparison, choice = run.comparison, run.choice
    sections = [
        Section("Verdicts against the papers", verdict_html(run.verdicts), plots.paired_gaps(comparison)),
        Section("Held-out loss against k, every strategy", (
            f"Each strategy chose its units on {html.escape(choice.data)}; the loss is measured on "
            f"{html.escape(comparison.eval_data)}, windows the choice never saw (checked by hashing). "
            "Blocks removed with their attention and MLP writes zeroed (what deleting them computes); dashed: "
            "sublayer strategies (k attention or MLP sublayers). 95% bootstrap intervals over texts."),
            plots.loss_curves(comparison)),
        Section(f"What each strategy removes at k = {run.k}", (
            f"Exported: {html.escape(LABELS[run.strategy])}, blocks {list(run.removed)}."),
            plots.chosen_units(choice, run.k)),
    ]
    if run.export is not None:
        check = run.export
        rows = "; ".join(f"{name}: {value:.1e}" for name, value, _, _ in check.rows())
        sections.append(Section("The export, proved", (
            f"{html.escape(check.folder)} ({check.n_layers_before} -> {check.n_layers_after} blocks) loaded fresh, its "
            f"logits against the original model with the same blocks zero-removed on {check.n_windows} held-out "
            f"windows: {html.escape(rows)} (tolerance {check.tolerance:.0e}): "
            f"<b>{'passed' if check.passed else 'FAILED'}</b>."), plots.export_differences(check)))
    if run.evaluation is not None:
        sections.append(evaluation_section(run.evaluation))
    if run.heal is not None:
        sections.append(heal_section(run.heal))
    return sections


def html_table(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> str:
    """A plain HTML table of `rows` (dicts) with the given columns, every cell escaped."""
    head = "".join(f"<th>{html.escape(name)}</th>" for name in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(cell(row[name]))}</td>" for name in columns) + "</tr>"
                   for row in rows)
    return f'<table class="facts" style="border:1px solid #ddd;font-size:13px"><tr>{head}</tr>{body}</table>'


def cell(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def evaluation_section(evaluation: PrunedComparison) -> Section:
    """The exported model against the full one: every metric with its CI, and the generations side by side."""
    rows = [{**row, "95% CI": "" if row["low"] == row["high"] else f"[{row['low']:.4g}, {row['high']:.4g}]"}
            for row in evaluation.to_dataframe().to_dict("records")]
    speed = evaluation.speed_settings
    return Section("The pruned model against the full one", (
        f"The exported folder, loaded back, and the full model on the same held-out windows ({html.escape(evaluation.data)}): "
        "means over windows with 95% bootstrap intervals; pruned - full by the paired bootstrap. Tokens/s: median of "
        f"{speed['repeats']} greedy runs of {speed['new_tokens']} tokens on {speed['threads']} thread(s), both models "
        f"timed in this run (speed-up x {evaluation.speedup:.2f})."
        + html_table(rows, ("metric", "model", "estimate", "95% CI", "unit"))
        + "<p>Greedy continuations, side by side:</p>"
        + html_table(evaluation.generations().to_dict("records"), ("prompt", "full", "pruned"))),
        plots.pruned_vs_full(evaluation))


def heal_section(heal: HealResult) -> Section:
    """The heal: settings, before / after with CIs, and the proof of the saved folder."""
    proof = "; ".join(f"{name}: {value:.1e}" for name, value in (heal.proof or {}).items())
    settings = ", ".join(f"{key} {value}" for key, value in heal.settings.items()
                         if key in ("steps", "mode", "loss", "lr", "batch_size", "train_windows", "window"))
    return Section("Healing", (
        f"Trained on {html.escape(heal.train_data)} ({html.escape(settings)}; {heal.cpu_seconds:.0f} s CPU), judged on "
        f"{html.escape(heal.data)}. Saved to {html.escape(heal.folder)}; the folder loaded back against the trained "
        f"model on {heal.proof_windows} held-out windows: {html.escape(proof or 'not measured')} (tolerance "
        f"{heal.proof_tolerance}" + (f"; GGUF {heal.gguf_tolerance}" if heal.gguf_tolerance is not None else "")
        + f"): <b>{'passed' if heal.proved else 'FAILED' if heal.proved is False else 'n/a'}</b>."
        + html_table(heal.to_dataframe().to_dict("records"), ("metric", "stage", "estimate", "low", "high"))),
        plots.heal_before_after(heal))


def prune_files(run: PruneRun, settings: dict[str, Any], seconds: float) -> dict[str, str]:
    """File name -> content for prune.csv, prune.json and prune.html."""
    provenance = run.comparison.provenance
    metadata = {**settings, **summary(run), "choice_data": run.choice.data, "eval_data": run.comparison.eval_data,
                "bootstrap": {"replicates": run.comparison.n_boot, "level": 0.95, "resampling_unit": "text"},
                "model": provenance.model, "weights_hash": provenance.weights_hash, "dtype": provenance.dtype,
                "versions": provenance.versions, "created": provenance.created, "total_seconds": round(seconds, 1)}
    facts = (("model", f"{provenance.model} ({run.choice.n_layers} blocks)"), ("choice data", run.choice.data),
             ("held-out data", run.comparison.eval_data), ("command", str(settings.get("command"))),
             ("made", f"{provenance.created}, {seconds:.1f} s"))
    files = {
        "prune.csv": run.comparison.to_dataframe().to_csv(index=False),
        "prune.json": json.dumps(metadata, indent=2, default=str),
        "prune.html": Report("streamlens prune: remove layers, ship the smaller model, prove it", facts,
                             tuple(prune_sections(run))).to_html(),
    }
    if run.evaluation is not None:
        files["evaluation.csv"] = run.evaluation.to_dataframe().to_csv(index=False)
        files["generations.csv"] = run.evaluation.generations().to_csv(index=False)
    if run.heal is not None:
        files["heal.csv"] = run.heal.to_dataframe().to_csv(index=False)
    return files
