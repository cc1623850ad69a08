"""Self-repair (McGrath et al. 2023; Rushing & Nanda 2024): direct vs total effect of each unit.

Each unit is resample-ablated (its write replaced by the same write on another text); the change of
the clean label's logit is split exactly into the unit's direct effect (its own path, the final
norm's scale frozen), the reaction of later layers (downstream) and the final norm's rescaling
alone (norm); see `results.layers.SelfRepair`. The ablated runs are the engine's
(`ablation.swap.ablated_finals`); the scale s of the final norm on a stream x is read off the
model's own norm, s = ||w * centre(x)|| / ||norm(x) - b||, so no epsilon is assumed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from streamlens.ablation import Ablation, EvalOptions
from streamlens.ablation.spec import Progress
from streamlens.ablation.swap import ablated_finals
from streamlens.data import TokenBatch
from streamlens.metrics import per_text_means
from streamlens.model import Model
from streamlens.results import Provenance, command_line
from streamlens.results.layers import SelfRepair
from streamlens.sites import Site

METHOD = "resample"


def self_repair(model: Model, batch: TokenBatch, units: Sequence[Site], options: EvalOptions | None = None, *,
                progress: Progress | None = None, command: str | None = None, **changes) -> SelfRepair:
    """Direct, downstream, norm and total effect on the label logit of resample-ablating each unit.

    Args:
        units: heads, attention or MLP sublayers, or blocks (each ablated alone).
        options: seed (donors), batch size, threads (`EvalOptions`; `changes` override fields).

    Returns:
        `SelfRepair` with [unit, text] effects (mean over each text's scored predictions, logits).
    """
    options = EvalOptions.of(options, **changes)
    specs = [Ablation((site,), METHOD, "total") for site in units]
    n_texts = batch.n_texts
    parts = {name: torch.zeros(len(specs), n_texts, dtype=torch.float64) for name in ("direct", "downstream", "norm",
                                                                                      "total")}
    weight, bias = model.norm_weight, model.norm_bias
    for group, chunk in ablated_finals(model, batch, specs, options, progress):
        sub = batch.rows(chunk.rows)
        text_index, position = sub.scored.nonzero(as_tuple=True)
        labels = sub.labels[text_index, position]
        direction = model.W_U[:, labels].T  # [m, d_model]: the label's unembedding column per prediction
        clean = chunk.clean_final[text_index, position]  # [m, d_model]
        scale = _scale(model, clean, weight, bias)
        for index, spec_index in enumerate(group):
            ablated = chunk.finals[index][text_index, position]
            change = (chunk.replacement[index] - chunk.removed[index])[text_index, position]

            def frozen(stream: torch.Tensor, s: torch.Tensor = scale) -> torch.Tensor:
                return ((weight * _centre(model, stream) / s) * direction).sum(-1)

            values = {
                "total": ((model.final_norm(ablated) - model.final_norm(clean)) * direction).sum(-1),
                "direct": frozen(change),
                "downstream": frozen(ablated - clean - change),
                "norm": frozen(ablated, _scale(model, ablated, weight, bias)) - frozen(ablated),
            }
            for name, value in values.items():
                parts[name][spec_index, chunk.rows] = per_text_means(value[None], text_index, sub.n_texts)[0].cpu()
    return SelfRepair(Provenance.of(model, command or command_line(), options.seed), tuple(units), parts["direct"],
                      parts["downstream"], parts["norm"], parts["total"], model.n_layers, batch.description)


def _centre(model: Model, stream: torch.Tensor) -> torch.Tensor:
    return stream - stream.mean(-1, keepdim=True) if model.info.norm == "layernorm" else stream


def _scale(model: Model, stream: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The final norm's scale on each stream [m, 1]: norm(x) - b = w * centre(x) / scale."""
    return ((weight * _centre(model, stream)).norm(dim=-1, keepdim=True)
            / (model.final_norm(stream) - bias).norm(dim=-1, keepdim=True))
