"""What `streamlens ablate` writes: the tidy CSV, the JSON of metadata and the offline HTML page.

Built only from results and settings (no model runs), so the CLI just writes the returned texts.
"""

from __future__ import annotations

import json
from typing import Any

from streamlens.data import TokenBatch
from streamlens.model import Model
from streamlens.plots import ablation as plots
from streamlens.pages.html import Report, Section, fidelity_fact
from streamlens.results import AblationResult, CumulativeAblation


def ablation_files(
    results: dict[str, AblationResult],
    curve: CumulativeAblation | None,
    batch: TokenBatch,
    model: Model,
    settings: dict[str, Any],
    seconds: float,
) -> dict[str, str]:
    """File name -> content for ablation.csv, ablation.json, ablation.html (+ ablation_cumulative.csv).

    Args:
        results: one sweep per effect ("total" and/or "direct"); the last one is the main result.
        curve: the cumulative-removal result, if one was run.
        settings: the command line's choices (unit, method, effect, seed, ...), stored in the JSON.
        seconds: time taken so far.
    """
    import pandas as pd

    effects = list(results)
    main = results[effects[-1]]
    metric = main.metrics[0]
    ci = "error bars: 95% bootstrap intervals over texts (windows or prompts)"
    sections = [Section(f"Damage of removing each unit ({name} effect)",
                        f"{metric} when one unit is removed with {settings.get('method')}; {ci}.",
                        plots.damage(results[name], metric)) for name in effects[::-1]]
    if len(effects) == 2:
        sections.append(Section("Direct vs total effect",
                                "Direct: only the write's own path to the logits is removed; total: later "
                                f"layers react too; {ci}.",
                                plots.direct_vs_total(results["direct"], results["total"], metric)))
    if curve is not None:
        sections.append(Section("Removing units one after another",
                                f"{metric} after each cumulative removal, in the order shown; {ci}.",
                                plots.cumulative_curve(curve, metric)))
    info, provenance = model.info, main.provenance
    metadata = {
        **settings,
        "model": info.name, "architecture": info.architecture, "weights_hash": info.weights_hash,
        "dtype": info.dtype, "device": provenance.device, "data": batch.description, "n_texts": batch.n_texts,
        "n_tokens": int(batch.valid.sum()), "n_predictions": batch.n_scored, "metrics": list(main.metrics),
        "bootstrap": {"replicates": settings.get("bootstrap"), "level": 0.95,
                      "resampling_unit": "text (window or prompt)"},
        "versions": provenance.versions, "created": provenance.created, "seconds": round(seconds, 2),
        "threads": _threads(), "clean_loss": float(main.clean_loss.mean()),
        "cumulative_order": None if curve is None else list(curve.units),
        "bridge_vs_hf": info.bridge_vs_hf, "fidelity": info.fidelity or "exact",
    }
    facts = (("model", f"{info.name} ({info.n_layers} layers, {info.dtype} on {provenance.device})"),
             ("weights sha256", info.weights_hash), ("fidelity", fidelity_fact(info)), ("data", batch.description),
             ("ablation", f"{settings.get('unit')} units, {settings.get('method')}, {settings.get('effect')} effect"),
             ("command", str(settings.get("command"))), ("made", f"{provenance.created}, {seconds:.1f} s"))
    files = {
        "ablation.csv": pd.concat([results[name].to_dataframe() for name in effects], ignore_index=True)
        .to_csv(index=False),
        "ablation.json": json.dumps(metadata, indent=2),
        "ablation.html": Report(f"streamlens ablate: {info.name}", facts, tuple(sections)).to_html(),
    }
    if curve is not None:
        files["ablation_cumulative.csv"] = curve.to_dataframe().to_csv(index=False)
    return files


def _threads() -> int:
    import torch

    return torch.get_num_threads()
