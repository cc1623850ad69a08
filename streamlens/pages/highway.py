"""The page and files of `streamlens highway`: one tidy table, a JSON summary and the HTML page,
composed from `ToyHighway` and `RealHighway` results only."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from streamlens.pages.html import Report, Section
from streamlens.plots import highway as plots
from streamlens.results.highway import RealHighway, ToyConfig, ToyHighway

if TYPE_CHECKING:
    import pandas as pd


def tidy(toy: ToyHighway | None, real: RealHighway | None) -> "pd.DataFrame":
    """Both results in one long table: part (toy|real), kind, depth, step, layer, measure, value."""
    import pandas as pd

    frames = [result.to_dataframe() for result in (toy, real) if result is not None]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def summary(toy: ToyHighway | None, real: RealHighway | None) -> dict[str, Any]:
    """The headline numbers, JSON-ready (depths and kinds as keys)."""
    out: dict[str, Any] = {}
    if toy is not None:
        def per_depth(values):
            return {kind: {str(depth): float(values[k, d]) for d, depth in enumerate(toy.depths)}
                    for k, kind in enumerate(toy.kinds)}

        out["toy"] = {
            "first_to_last_grad_ratio_at_init": per_depth(toy.first_to_last(0)),
            "first_to_last_grad_ratio_after_training": per_depth(toy.first_to_last(-1)),
            "final_loss": per_depth(toy.final_loss),
            "zero_branch_max_error": toy.zero_branch_error,
            "zero_branch_grad_max_error": toy.zero_branch_grad_error,
            "seconds": toy.seconds,
        }
    if real is not None:
        out["real"] = {
            "text": real.text,
            "conditions": {
                condition: {
                    "removed_skips": list(real.removed[c]),
                    "loss": float(real.loss[c]),
                    "grad_norm_layer_0": float(real.grad_norm[c, 0]),
                    "grad_norm_last_layer": float(real.grad_norm[c, -1]),
                    "first_to_last_grad_ratio": float(real.first_to_last()[c]),
                }
                for c, condition in enumerate(real.conditions)
            },
        }
    return out


def highway_report(toy: ToyHighway | None, real: RealHighway | None, facts: dict[str, str]) -> "Report":
    """All figures on one page (see `streamlens.pages.html.Report`); `facts` head the page."""
    sections = []
    if toy is not None:
        deepest = max(toy.depths)
        sections += [
            Section("Gradient norm per layer during training",
                    f"‖∂loss/∂h<sub>l</sub>‖ at the input of each block of the depth-{deepest} stacks, before every "
                    f"update (log10, one colour scale). Plain: the gradient fades towards layer 0. Residual: it "
                    f"reaches every layer. Init: {toy.init}; norm: {toy.norm}; Adam, lr {toy.lr}.",
                    plots.gradient_heatmaps(toy, deepest)),
            Section("Final training loss against depth",
                    "Mean squared error on the whole training set after training (targets standardised: 1.0 "
                    "is no better than predicting the mean). Both kinds start from the same weights.",
                    plots.loss_vs_depth(toy)),
            Section("First-layer / last-layer gradient norm",
                    "Dashed: at initialisation; solid: after training. 1.0 means the first block gets as much "
                    "gradient as the last.",
                    plots.ratio_vs_depth(toy)),
        ]
    if real is not None:
        sections.append(Section(
            "Real model: gradient at the stream entering each block",
            f"‖∂loss/∂resid_pre L‖ of the next-token loss on {real.text}. Removing a block's skip makes "
            "the stream leaving it the block's writes alone (attn_out + mlp_out); dotted lines mark those blocks.",
            plots.real_gradients(real)))
    return Report(title="streamlens highway: the gradient highway", facts=tuple(facts.items()),
                  sections=tuple(sections))


def highway_files(toy: ToyHighway, real: RealHighway | None, config: ToyConfig, command: str,
                  seconds: float) -> dict[str, str]:
    """File name -> content for highway.csv, highway.json and highway.html."""
    settings: dict[str, Any] = {
        **{k: getattr(config, k) for k in ("depths", "steps", "seed", "width", "lr", "norm", "init", "batch",
                                           "n_train", "d_in")},
        "optimiser": "Adam", "toy_dtype": "float64", "skip_real": real is None}
    if real is not None:
        settings |= {"model": real.provenance.model, "weights_hash": real.provenance.weights_hash,
                     "removed_skips": [list(layers) for layers in real.removed], "text": real.text}
    facts = {"command": command, "seconds": f"{seconds:.1f}",
             **{key: str(value) for key, value in settings.items() if key != "weights_hash"}}
    meta = {"command": command, "seed": config.seed, "settings": settings,
            "versions": (real or toy).provenance.versions, "seconds": {"total": seconds, "toy": toy.seconds},
            "summary": summary(toy, real)}
    return {"highway.csv": tidy(toy, real).to_csv(index=False),
            "highway.json": json.dumps(meta, indent=2) + "\n",
            "highway.html": highway_report(toy, real, facts).to_html()}
