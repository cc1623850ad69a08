"""The page and files of `streamlens residuals`: a tidy table, a JSON summary with the verdicts, and
the HTML page, composed from a `ResidualStudy` only."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

from streamlens.highway.verdicts import residual_verdicts
from streamlens.pages.html import Report, Section
from streamlens.plots import residuals as plots
from streamlens.plots.residuals import TESTBED_NAMES
from streamlens.results.residuals import ResidualStudy


def json_safe(value: Any) -> Any:
    """`value` with every non-finite float replaced by None (JSON has no NaN), tuples as lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def summary(study: ResidualStudy) -> dict[str, Any]:
    """Headline numbers per testbed, variant and depth (means over seeds), JSON-ready."""
    at_init, trained, params = study.first_to_last(0), study.first_to_last(-1), study.first_to_last(0, parameters=True)
    damage = study.lesion_damage().nanmean(-1)
    out: dict[str, Any] = {}
    for r in range(len(study.run_testbed)):
        key = study.run_variant[r] + (f"+warmup{study.run_warmup[r]}" if study.run_warmup[r] else "")
        entry = out.setdefault(study.run_testbed[r], {}).setdefault(key, {}).setdefault(str(study.run_depth[r]), {})
        values = {"final_heldout_loss": float(study.heldout_loss[r, -1]),
                  "final_train_loss": float(study.train_loss[r, -max(1, (study.steps + 1) // 10):].mean()),
                  "first_to_last_grad_ratio_at_init": float(at_init[r]),
                  "first_to_last_grad_ratio_trained": float(trained[r]),
                  "first_to_last_param_grad_ratio_at_init": float(params[r]),
                  "mean_lesion_loss_increase": float(damage[r]),
                  "saved_bytes": float(study.saved_bytes[r]), "step_seconds": float(study.step_seconds[r])}
        if study.run_variant[r] == "dense":
            values["reuse_share"] = float(study.reuse_share[r])
            values["reuse_loss_increase"] = float(study.reuse_loss[r] - study.heldout_loss[r, -1])
        if study.run_testbed[r] != "mlp":
            values["final_heldout_accuracy"] = float(study.heldout_accuracy[r, -1])
        for name, value in values.items():
            entry.setdefault(name, []).append(value)
    for per_variant in out.values():
        for per_depth in per_variant.values():
            for entry in per_depth.values():
                for name, values in list(entry.items()):
                    entry[name] = {"mean": sum(values) / len(values), "per_seed": values}
    return out


def residuals_report(study: ResidualStudy, facts: dict[str, str]) -> Report:
    """The verdict table, then per testbed: losses, gradients, lesions and costs at the deepest depth."""
    sections = [Section("Verdicts",
                        "Each claim against our number: mean over seeds with a 95% Student-t interval; holds / "
                        "differs / unclear by whether the interval clears the claim's threshold.",
                        plots.verdict_table(residual_verdicts(study)))]
    for testbed in study.testbeds:
        name, deepest = TESTBED_NAMES[testbed], max(study.config.depths(testbed))
        sections += [
            Section(f"{name}: loss curves", "Mini-batch training loss at every step (solid) and held-out loss at "
                    "the eval steps (dots); every variant starts from its own init, sees the same batches.",
                    plots.loss_curves(study, testbed, deepest)),
            Section(f"{name}: gradient norm by layer", "‖∂loss/∂h<sub>b</sub>‖ at the input of every block on "
                    "the "
                    "same mini-batch, at initialisation and after training, for each depth.",
                    plots.gradient_by_layer(study, testbed)),
            Section(f"{name}: the lesion test", "After training, each block in turn is deleted (its output := its "
                    "input) and the held-out set is scored again (Veit et al. 2016).",
                    plots.lesion_profile(study, testbed, deepest)),
            Section(f"{name}: memory and time", "Bytes of the distinct activation tensors autograd saves for one "
                    "backward pass (exact, parameters excluded) and the mean wall time of a training step "
                    "(one CPU thread; the machine may be shared).", plots.cost_bars(study, testbed, deepest)),
        ]
    return Report(title="streamlens residuals: the residual family, measured", facts=tuple(facts.items()),
                  sections=tuple(sections))


def residuals_files(study: ResidualStudy, command: str, seconds: float) -> dict[str, str]:
    """File name -> content for residuals.csv, residuals.json and residuals.html."""
    settings = {field.name: getattr(study.config, field.name) for field in dataclasses.fields(study.config)}
    verdicts = [dataclasses.asdict(row) for row in residual_verdicts(study)]
    facts = {"command": command, "seconds": f"{seconds:.1f}", **{k: str(v) for k, v in settings.items()}}
    meta = {"command": command, "settings": settings, "versions": study.provenance.versions,
            "seconds": {"total": seconds, "study": study.seconds}, "verdicts": verdicts, "summary": summary(study)}
    return {"residuals.csv": study.to_dataframe().to_csv(index=False),
            "residuals.json": json.dumps(json_safe(meta), indent=2, allow_nan=False) + "\n",
            "residuals.html": residuals_report(study, facts).to_html()}
