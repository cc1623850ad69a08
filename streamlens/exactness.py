"""Is streamlens exact on this model? The checks behind `streamlens check`.

Each check compares two independent computations of the same number on a few token windows:

- bridge vs HF: the bridge's logits vs the HF model's own forward (measured at load, `ModelInfo`),
  and the logits vs the linear read-out of the final stream (soft-capping breaks it);
- identity: embedding + every attention and MLP write vs the final stream;
- decomposition: the sum of the contributions (per head) vs the model's logits;
- head sum: per-head writes + output bias write vs the attention write;
- ablation: the fast engine (partial forwards restarted from cached streams) vs full forwards with
  plain hooks that zero the write, text by text (loss increase in nats).

Tolerances scale with the dtype; float64 asks for rounding error only.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from streamlens.ablation import Ablation, evaluate
from streamlens.data import window_batch
from streamlens.decomposition import decompose
from streamlens.model import Model
from streamlens.model.fidelity import TOLERANCE as BRIDGE_TOLERANCE
from streamlens.recording import record
from streamlens.results import Provenance, command_line
from streamlens.results.check import ModelCheck
from streamlens.sites import Site

# check -> (what it compares, tolerance per dtype)
CHECKS: dict[str, tuple[str, dict[str, float]]] = {
    "bridge vs HF": ("bridge logits vs the HF model's own forward, relative", BRIDGE_TOLERANCE),
    "read-out": ("logits vs final_norm(final stream) @ W_U + b_U, relative", BRIDGE_TOLERANCE),
    "identity": ("embed + sum of writes vs final stream, relative",
                 {"float64": 1e-12, "float32": 1e-5, "bfloat16": 5e-2}),
    "decomposition": ("sum of per-head contributions vs the model's logits, relative",
                      {"float64": 1e-10, "float32": 1e-4, "bfloat16": 5e-2}),
    "head sum": ("per-head writes + output bias vs attention write, relative",
                 {"float64": 1e-12, "float32": 1e-5, "bfloat16": 5e-2}),
    "ablation": ("engine vs full forwards with plain hooks, |loss increase| nats",
                 {"float64": 1e-9, "float32": 1e-4, "bfloat16": 5e-2}),
}


def check_model(model: Model, n_texts: int = 3, length: int = 12, seed: int = 0) -> ModelCheck:
    """Run every exactness check on `n_texts` random token windows of `length` tokens.

    Returns:
        `ModelCheck` with one error and tolerance per check; `.passed` when all hold.
    """
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, model.info.d_vocab, (n_texts, min(length, model.info.n_ctx)),
                           generator=generator).to(model.device)
    writes = record(model, tokens, heads=True)
    final_scale = float(writes.final.abs().max())
    errors = {
        "bridge vs HF": model.info.bridge_vs_hf,
        "read-out": model.info.readout_error,
        "identity": writes.identity_error() / final_scale,
    }
    parts = decompose(model, tokens[:1], positions=range(tokens.shape[1]), top_k=2, by_head=True)
    errors["decomposition"] = parts.error / float(parts.logits.abs().max())
    errors["head sum"] = max(
        float((writes.head_writes(layer).sum(2) + writes.attn_bias_write(layer) - writes.attn[layer]).abs().max())
        / float(writes.attn[layer].abs().max())
        for layer in range(model.n_layers)
    )
    errors["ablation"] = _ablation_spot_check(model, tokens)
    names = tuple(CHECKS)
    return ModelCheck(
        provenance=Provenance.of(model, command_line(), seed),
        family=model.info.family or model.info.architecture,
        architecture=model.info.architecture,
        norm_kind=model.norm_kind,
        dtype=model.info.dtype,
        load_seconds=model.info.load_seconds,
        checks=names,
        descriptions=tuple(CHECKS[name][0] for name in names),
        errors=torch.tensor([errors[name] for name in names], dtype=torch.float64),
        tolerances=torch.tensor([CHECKS[name][1][model.info.dtype] for name in names], dtype=torch.float64),
    )


def _ablation_spot_check(model: Model, tokens: torch.Tensor) -> float:
    """Largest |engine - plain hooks| loss increase over texts, for a zeroed MLP and a zeroed head."""
    middle, last = model.n_layers // 2, model.n_layers - 1
    batch = window_batch(tokens)
    specs = [Ablation((Site("mlp", middle),), "zero", "total"), Ablation((Site("head", last, 0),), "zero", "total")]
    engine = evaluate(model, batch, specs, metrics=["loss_increase"], n_boot=40, batch_size=len(tokens))
    worst = 0.0
    for index, spec in enumerate(specs):
        hooked = _loss_with_plain_hook(model, tokens, spec.sites[0]) - _loss_with_plain_hook(model, tokens, None)
        worst = max(worst, float((engine.per_text[index, 0] - hooked).abs().max()))
    return worst


def _loss_with_plain_hook(model: Model, tokens: torch.Tensor, site: Site | None) -> torch.Tensor:
    """Mean next-token loss per text [n], one full forward per text, `site`'s write zeroed by a hook."""

    def zero(tensor: torch.Tensor, hook: Any) -> torch.Tensor:
        out = tensor.clone()
        if site is not None and site.kind == "head":
            out[:, :, site.head] = 0.0
        else:
            out.zero_()
        return out

    hooks = [] if site is None else [(site.hook_name, zero)]
    losses = []
    with torch.inference_mode():
        for text in tokens:
            logits = model.run(text[None], hooks=hooks)[0, :-1].double()
            losses.append(F.cross_entropy(logits, text[1:]))
    return torch.stack(losses).cpu()


def matrix_row(result: ModelCheck) -> dict[str, Any]:
    """The README's "Supported architectures" row of one check: family and the largest error of each kind."""
    return {"family": result.family, "norm": result.norm_kind, "dtype": result.dtype,
            **{name: result.error(name) for name in result.checks}}

