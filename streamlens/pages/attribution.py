"""What `streamlens ablate --estimate ...` writes: the estimate (marked), the exact re-measurement of
the top units side by side, the JSON of metadata and the offline HTML page.

Built only from results and settings (no model runs).
"""

from __future__ import annotations

import json
from typing import Any

from streamlens.data import TokenBatch
from streamlens.model import Model
from streamlens.pages.html import Report, Section
from streamlens.plots import ablation as damage_plots
from streamlens.plots import attribution as plots
from streamlens.results import AblationResult


def side_by_side_table(estimate: AblationResult, exact: AblationResult):
    """One row per (verified unit, metric): unit, kind, layer, head, method, metric, estimate and its
    CI, exact and its CI, estimate - exact (pandas DataFrame)."""
    import pandas as pd

    rows = []
    for index, unit in enumerate(exact.units):
        row = estimate.units.index(unit)
        for metric in exact.metrics:
            if metric not in estimate.metrics:
                continue
            e, x = estimate.metrics.index(metric), exact.metrics.index(metric)
            rows.append({"unit": unit, "kind": exact.kinds[index], "layer": exact.layers[index],
                         "head": exact.heads[index], "method": exact.methods[index], "metric": metric,
                         "estimate_method": estimate.estimate, "estimate": float(estimate.values[row, e]),
                         "estimate_ci_low": float(estimate.ci_low[row, e]),
                         "estimate_ci_high": float(estimate.ci_high[row, e]),
                         "exact": float(exact.values[index, x]), "exact_ci_low": float(exact.ci_low[index, x]),
                         "exact_ci_high": float(exact.ci_high[index, x]),
                         "error": float(estimate.values[row, e] - exact.values[index, x])})
    return pd.DataFrame(rows)


def attribution_files(
    estimate: AblationResult,
    exact: AblationResult | None,
    agreement: Any,
    batch: TokenBatch,
    model: Model,
    settings: dict[str, Any],
    seconds: dict[str, float],
) -> dict[str, str]:
    """File name -> content: ablation.csv (the estimate, with an `estimate` column), ablation.json,
    ablation.html, and with a verification ablation_verify.csv (estimate and exact side by side).

    Args:
        exact: the exact re-measurement of some units (`ablation.verify`), or None.
        agreement: `ablation.attribute.Agreement` of estimate and exact (None without 3+ verified units).
        seconds: {"estimate": ..., "verify": ..., "total": ...}.
    """
    info, provenance = model.info, estimate.provenance
    label = f"estimate ({estimate.estimate})"
    facts = (("model", f"{info.name} ({info.n_layers} layers, {info.dtype} on {info.device})"),
             ("weights sha256", info.weights_hash), ("data", batch.description),
             ("ablation", f"{settings.get('unit')} units, {settings.get('method')}, total effect, {label}"),
             ("command", str(settings.get("command"))), ("made", f"{provenance.created}, {seconds['total']:.1f} s"))
    files = {
        "ablation.csv": estimate.to_dataframe().to_csv(index=False),
        "ablation.json": json.dumps(metadata(estimate, exact, agreement, batch, model, settings, seconds), indent=2),
        "ablation.html": Report(f"streamlens ablate --estimate {estimate.estimate}: {info.name}", facts,
                                sections(estimate, exact, settings)).to_html(),
    }
    if exact is not None:
        files["ablation_verify.csv"] = side_by_side_table(estimate, exact).to_csv(index=False)
    return files


def sections(estimate: AblationResult, exact: AblationResult | None, settings: dict[str, Any]) -> tuple[Section, ...]:
    """The page: the estimated damage, how far to trust each row (with an error bar or measured rows),
    and with a verification the estimate and the exact numbers side by side and against each other."""
    metric = estimate.metrics[0]
    label = f"estimate ({estimate.estimate})"
    ci = "error bars: 95% bootstrap intervals over texts (windows or prompts)"
    out = [Section(f"Estimated damage of removing each unit ({label}, not measured)",
                   f"{metric} estimated from gradients ({estimate.estimate}: docs/estimates.md), per text; {ci}.",
                   damage_plots.damage(estimate, metric))]
    if estimate.error_bar is not None or estimate.measured is not None:
        top = settings.get("exact_top")
        done = "" if not top else (f" The exact top {top['k']} took {top['evaluations']} exact evaluations of "
                                   f"{top['units']} units" + (f" (settled by the conformal bound: q "
                                                              f"{top['quantile']:.3g}, alpha {top['alpha']:g})."
                                                              if top["settled"] else " (never settled)."))
        out.append(Section("How far to trust each row",
                           "Largest rows first: estimates (hatched) with the estimator's error bar "
                           "(ig: |IG(N) - IG(N/2)|; second-order: the second-order term), grey where it "
                           "exceeds half the value; rows measured exactly are solid." + done,
                           plots.reliability(estimate, metric)))
    if exact is not None:
        out.append(Section("Estimate and exact, side by side",
                           f"The {len(exact.units)} units with the largest {label}, re-measured with the exact "
                           f"engine; {ci}.", plots.side_by_side(estimate, exact, metric)))
        out.append(Section("Estimate vs exact", f"Each re-measured unit: exact (x) against {label} (y); {ci}.",
                           plots.estimate_vs_exact(estimate, exact, metric)))
    return tuple(out)


def metadata(estimate: AblationResult, exact: AblationResult | None, agreement: Any, batch: TokenBatch,
             model: Model, settings: dict[str, Any], seconds: dict[str, float]) -> dict[str, Any]:
    """ablation.json: the settings, the model, data and estimate, the agreement, versions and timings."""
    info, provenance = model.info, estimate.provenance
    agree = None
    if agreement is not None:
        agree = {"metric": agreement.metric, "units": agreement.n_units, "spearman": list(agreement.spearman),
                 "pearson": list(agreement.pearson), "recall": agreement.recall, "top": agreement.top,
                 "among": agreement.among, "max_abs_error": agreement.max_abs_error}
    return {
        **settings,
        "model": info.name, "architecture": info.architecture, "weights_hash": info.weights_hash,
        "dtype": info.dtype, "device": info.device, "data": batch.description, "n_texts": batch.n_texts,
        "n_tokens": int(batch.valid.sum()), "n_predictions": batch.n_scored, "metrics": list(estimate.metrics),
        "estimate": estimate.estimate, "verified_units": None if exact is None else list(exact.units),
        "agreement": agree, "bootstrap": {"replicates": settings.get("bootstrap"), "level": 0.95,
                                          "resampling_unit": "text (window or prompt)"},
        "versions": provenance.versions, "created": provenance.created,
        "seconds": {name: round(value, 2) for name, value in seconds.items()},
        "clean_loss": float(estimate.clean_loss.mean()),
    }
