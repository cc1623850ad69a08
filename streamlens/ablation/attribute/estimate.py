"""`attribute`: estimate the removal of every unit of a kind at once, with one of the estimators.

Estimators (`estimate=`): "atp" (first order at the clean model), "atp-qk" and "atpstar" (AtP*'s
fixes: `atpstar.py`), "ig" (integrated gradients over `steps` points of the clean -> ablated path)
and "second-order" (the path's second-order Taylor term: `paths.py`). All return the same
`AblationResult` (`estimate` names the method, e.g. "ig-8"), with bootstrap CIs over texts, and
`error_bar` [unit, metric] where the estimator has a cheap diagnostic (ig with even N:
|IG_N - IG_{N/2}|; second-order: |second-order term|).

Memory: the texts go through the gradient forwards `batch_size` at a time (the graph of one chunk is
freed before the next), so the peak grows with `batch_size`, not with the number of texts; the
per-text estimates do not depend on the chunking.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from streamlens import metrics as M
from streamlens.ablation import replace as R
from streamlens.ablation.attribute.atpstar import AtpChunk
from streamlens.ablation.attribute.common import gradient_metrics
from streamlens.ablation.attribute.local import LocalChunk
from streamlens.ablation.attribute.paths import PathChunk
from streamlens.ablation.options import EvalOptions
from streamlens.ablation.spec import Ablation, Progress, stream_order, units
from streamlens.data import TokenBatch
from streamlens.model import Model
from streamlens.results import AblationResult, Provenance, command_line

ESTIMATES = ("atp", "atp-qk", "atpstar", "ig", "second-order", "local")
MAX_STEPS = 256


def method_label(estimate: str, steps: int = 1, depth: int = 0) -> str:
    """The name an estimate carries in its result: "ig-8" for 8 steps, "local-2" for depth 2, else the
    estimator's name."""
    return f"ig-{steps}" if estimate == "ig" else f"local-{depth}" if estimate == "local" else estimate


def check_estimate(estimate: str, steps: int, depth: int = 0) -> None:
    """Raise ValueError naming a bad estimator, step count or depth."""
    if estimate not in ESTIMATES:
        raise ValueError(f"unknown estimate {estimate!r}: choose from {', '.join(ESTIMATES)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"ig steps {steps!r} must be an integer from 1 to {MAX_STEPS}")
    if steps != 1 and estimate != "ig":
        raise ValueError(f"ig steps {steps} given with estimate {estimate!r}: steps apply to estimate 'ig' only")
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0:
        raise ValueError(f"local depth {depth!r} must be an integer of at least 0")
    if depth != 0 and estimate != "local":
        raise ValueError(f"depth {depth} given with estimate {estimate!r}: depth applies to estimate 'local' only")


def attribute(
    model: Model,
    batch: TokenBatch,
    unit: str = "head",
    method: str = "mean",
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    options: EvalOptions | None = None,
    *,
    estimate: str = "atp",
    steps: int = 1,
    depth: int = 0,
    progress: Progress | None = None,
    command: str | None = None,
    **changes: Any,
) -> AblationResult:
    """Estimate of removing each single unit of one kind (total effect), all at once.

    Args:
        model: the model.
        batch: the texts (or prompts) and the predictions to score.
        unit: block, attn, mlp or head (as in `ablation.sweep`).
        method: zero, mean or resample.
        layers: the layers whose units are estimated (None: all).
        heads: the heads of those layers (None: all; unit "head" only).
        options: as in `evaluate`; `metrics` may name only `GRADIENT_METRICS` (default: those that
            apply to the batch); `batch_size` is the most texts in one gradient forward (bounds memory).
        estimate: one of `ESTIMATES` (module docstring).
        steps: N for "ig" (1 = AtP).
        depth: for "local", the layers after the unit's own computed exactly (`local.py`).
        progress: called with 1 after each chunk of texts.

    Returns:
        `AblationResult` (estimate set) with values and CIs [unit, metric] and per-text values
        [unit, metric, text], rows in the order of `units(model, unit, layers, heads)`.
    """
    check_estimate(estimate, steps, depth)
    options = EvalOptions.of(options, **changes)
    names = gradient_metrics(options.metrics, batch)
    chosen = units(model, unit, layers, heads)
    specs = [Ablation((site,), method, "total").check(model) for site in chosen]
    started = time.perf_counter()
    writes = sorted({w for spec in specs for w in spec.writes}, key=stream_order)
    with options.torch_threads():
        per_text, error, dropped, clean_loss = _per_text(model, batch, chosen, writes, names, method,
                                                         (estimate, steps, depth), options, progress)
    values, low, high = M.bootstrap_ci(per_text, n_boot=options.n_boot, seed=options.seed)
    cancellation = dropped.mean(-1).abs().sum(0) / max(1, model.n_layers - 1) if estimate == "atpstar" else None
    has_bar = estimate == "second-order" or (estimate == "ig" and steps % 2 == 0)
    return AblationResult(
        provenance=Provenance.of(model, command or command_line(), options.seed), metrics=names,
        values=values, ci_low=low, ci_high=high, per_text=per_text, data=batch.description,
        n_texts=batch.n_texts, n_predictions=batch.n_scored, n_boot=options.n_boot,
        seconds=time.perf_counter() - started, sites=tuple(spec.sites for spec in specs),
        methods=(method,) * len(specs), effects=("total",) * len(specs), clean_loss=clean_loss,
        estimate=method_label(estimate, steps, depth), cancellation=cancellation,
        error_bar=error.mean(-1).abs() if has_bar else None,
    )


def _per_text(model: Model, batch: TokenBatch, chosen: list, writes: list, names: tuple[str, ...], method: str,
              estimator: tuple[str, int, int], options: EvalOptions, progress: Progress | None) -> tuple:
    """Chunk by chunk of texts: (estimate, signed diagnostic) [unit, metric, text], GradDrop's
    [layer, unit, metric, text] (zeros unless atpstar) and the clean loss [text]; estimator: (name,
    ig steps, local depth)."""
    estimate, steps, depth = estimator
    chunk = min(options.batch_size, batch.n_texts)
    shape = (len(chosen), len(names), batch.n_texts)
    per_text, error = torch.zeros(shape, dtype=torch.float64), torch.zeros(shape, dtype=torch.float64)
    dropped = torch.zeros(model.n_layers, *shape, dtype=torch.float64)
    clean_loss = torch.zeros(batch.n_texts, dtype=torch.float64)
    with torch.inference_mode():
        means = R.means(model, batch, writes, chunk) if method == "mean" else {}
    for start in range(0, batch.n_texts, chunk):
        rows = slice(start, min(start + chunk, batch.n_texts))
        with torch.inference_mode():
            donor = (R.donor_writes(model, batch, rows, writes, R.donor_rows(batch.n_texts, options.seed))
                     if method == "resample" else {})
        replacements = R.replacements(model, method, writes, means, donor)
        part = batch.rows(rows)
        if estimate == "local":
            local = LocalChunk(model, part, chosen, names, replacements, depth)
            per_text[:, :, rows], clean_loss[rows] = local.estimate(part.tokens, options.batch_size), local.clean_loss
        elif estimate in ("ig", "second-order"):
            path = PathChunk(model, part, chosen, names, replacements)
            per_text[:, :, rows], error[:, :, rows] = _along_path(path, estimate, steps)
            clean_loss[rows] = path.clean_loss
        else:
            atp = AtpChunk(model, part, chosen, writes, names, replacements, estimate)
            per_text[:, :, rows], clean_loss[rows] = atp.estimate(), atp.clean_loss
            if estimate == "atpstar":
                dropped[:, :, :, rows] = atp.grad_drop()
            if estimate != "atp":
                per_text[:, :, rows] += atp.qk_fix(options.batch_size)
        if progress is not None:
            progress(1)
    return per_text, error, dropped, clean_loss


def _along_path(path: PathChunk, estimate: str, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(estimate, signed diagnostic) per text [unit, metric, n]: the diagnostic is IG_N - IG_{N/2}, or
    the second-order term (zeros where there is none)."""
    if estimate == "ig":
        total, half = path.ig(steps)
        return total, (total - half if half is not None else torch.zeros_like(total))
    first, second = path.second_order()
    return first + second, second
