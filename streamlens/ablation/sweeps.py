"""The sweeps built on the engine: evaluate a list of specs, every unit of a kind, or units removed one
after another, each summarised with bootstrap CIs over texts into a frozen result.

Each call makes one `engine.Engine`, runs its specs here or on a `Backend` (`run`), and summarises
the per-text values the same way (`bootstrap_mean_ci`, provenance). Greedy removal restarts each
candidate from the stream of the units already removed (`engine.Added`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import torch

from streamlens import metrics as M
from streamlens.stats import bootstrap_mean_ci
from streamlens.ablation.engine import Added, Backend, Engine, Spec
from streamlens.ablation.options import EvalOptions
from streamlens.ablation.spec import CUMULATIVE_MODES, Ablation, Progress, units
from streamlens.data import TokenBatch
from streamlens.limits import check_bootstrap_memory
from streamlens.model import Model
from streamlens.results import AblationResult, CumulativeAblation, Provenance, command_line
from streamlens.sites import Site


def run(engine: Engine, specs: Sequence[Spec], progress: Progress | None = None,
        backend: Backend | None = None) -> torch.Tensor:
    """`engine.per_text(specs, progress)` here (backend None) or on `backend`: [spec, metric, text]."""
    specs = list(specs)
    return engine.per_text(specs, progress) if backend is None else backend.per_text(engine, specs, progress)



# ----- public entry points ----------------------------------------------------------------------
def evaluate(
    model: Model,
    batch: TokenBatch,
    specs: Sequence[Spec],
    options: EvalOptions | None = None,
    *,
    progress: Progress | None = None,
    command: str | None = None,
    backend: Backend | None = None,
    **changes: Any,
) -> AblationResult:
    """Measure each ablation in `specs` on `batch`, with 95% bootstrap CIs over texts.

    Args:
        model: the model.
        batch: texts and the predictions to score (`streamlens.data.load_batch` and friends).
        specs: the ablations (each a unit or a set of units with a method and an effect), or other
            `Intervention`s such as `swap.Swap` (every spec gets the same batching, backends, progress).
        options: metrics, seed, batch size, bootstrap replicates, threads (`EvalOptions`);
            `changes` override single fields (`evaluate(..., n_boot=200)`).
        progress: called with the number of (spec, chunk of texts) evaluations just finished.
        command: recorded in the provenance (default: this process's command line).
        backend: where the forwards run (None: here, in one call). `backends.RayBackend` spreads
            shards of (specs x texts) over Ray workers, `backends.LocalBackend` runs them here;
            both can keep a resumable `Checkpoint`. The numbers are those of a run without one.

    Returns:
        `AblationResult` with values and CIs [unit, metric] and per-text values [unit, metric, text].
    """
    options = EvalOptions.of(options, **changes)
    started = time.perf_counter()
    engine = Engine.of(model, batch, options)
    check_bootstrap_memory(options.n_boot, len(specs) * len(engine.metrics), batch.n_texts)  # before any work
    with options.torch_threads():
        per_text = run(engine, specs, progress, backend)
    return AblationResult(
        **_summary(model, batch, engine, options, per_text, command, started, backend),
        sites=tuple(spec.sites for spec in specs),
        methods=tuple(spec.method for spec in specs),
        effects=tuple(spec.effect for spec in specs),
        clean_loss=engine.clean_loss,
    )


def sweep(
    model: Model,
    batch: TokenBatch,
    unit: str = "block",
    method: str = "zero",
    effect: str = "total",
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    options: EvalOptions | None = None,
    *,
    progress: Progress | None = None,
    command: str | None = None,
    backend: Backend | None = None,
    **changes: Any,
) -> AblationResult:
    """Remove every single unit of one kind in turn (progress, command, backend and the `EvalOptions`
    field `changes` as in `evaluate`)."""
    specs = [Ablation((site,), method, effect) for site in units(model, unit, layers, heads)]
    return evaluate(model, batch, specs, options, progress=progress, command=command, backend=backend, **changes)


def cumulative(
    model: Model,
    batch: TokenBatch,
    order: Sequence[Site],
    mode: str = "order",
    method: str = "zero",
    effect: str = "total",
    options: EvalOptions | None = None,
    *,
    steps: int | None = None,
    budget: float | None = None,
    progress: Progress | None = None,
    command: str | None = None,
    backend: Backend | None = None,
    **changes: Any,
) -> CumulativeAblation:
    """Remove units one after another and measure the damage after each removal.

    The other arguments are those of `evaluate`.

    Args:
        order: the units. mode "order": removed in this order. mode "greedy": at each step the
            remaining unit whose removal (together with those already removed) does the least
            damage on the first metric is removed next (U(U+1)/2 evaluations for U units; each
            candidate's forward restarts at its own layer from the stream of the units already
            removed, computed once per step).
        steps: stop after this many removals (None: every unit). Greedy's first `steps` steps are
            those of the full run: a step never looks ahead.
        budget: stop after the first step whose mean damage on the first metric passes this many
            units of it (that step is kept, so the caller sees where the budget broke).

    Returns:
        `CumulativeAblation`: step k (1-based) has the first k units of `units` removed.
    """
    if mode not in CUMULATIVE_MODES:
        raise ValueError(f"unknown cumulative mode {mode!r}: choose from {', '.join(CUMULATIVE_MODES)}")
    if not order:
        raise ValueError("cumulative removal needs at least one unit")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= len(order)):
        raise ValueError(f"steps {steps!r} must be a whole number from 1 to the {len(order)} units")
    options = EvalOptions.of(options, **changes)
    started = time.perf_counter()
    engine = Engine.of(model, batch, options)
    check_bootstrap_memory(options.n_boot, len(order) * len(engine.metrics), batch.n_texts)  # before any work
    with options.torch_threads():
        removed, per_text = _remove_one_after_another(engine, list(order), mode, method, effect, progress, backend,
                                                      steps or len(order), budget)
    return CumulativeAblation(
        **_summary(model, batch, engine, options, per_text, command, started, backend),
        mode=mode, sites=tuple(removed), method=method, effect=effect,
    )


def _remove_one_after_another(engine: Engine, order: list[Site], mode: str, method: str, effect: str,
                              progress: Progress | None, backend: Backend | None, steps: int,
                              budget: float | None) -> tuple[list[Site], torch.Tensor]:
    """The removal order and per-text metrics after each step [step, metric, text]."""
    if mode == "order":
        specs = [Ablation(tuple(order[: k + 1]), method, effect) for k in range(steps)]
        per_text = run(engine, specs, progress, backend)
        kept = _within_budget(engine, per_text, budget)
        return order[:kept], per_text[:kept]
    remaining, removed, done = list(order), [], []
    while remaining and len(removed) < steps:
        if removed and effect == "total":  # restart each candidate from the stream of the removed units
            base = Ablation(tuple(removed), method, effect)
            specs = [Added(base, site) for site in remaining]
        else:
            specs = [Ablation((*removed, site), method, effect) for site in remaining]
        per_text = run(engine, specs, progress, backend)
        damage = M.damage(engine.metrics[0], per_text[:, 0].mean(-1))
        best = int(torch.argmin(damage))
        removed.append(remaining.pop(best))
        done.append(per_text[best])
        if budget is not None and float(damage[best]) > budget:
            break
    return removed, torch.stack(done)


def _within_budget(engine: Engine, per_text: torch.Tensor, budget: float | None) -> int:
    """How many steps [step, metric, text] to keep: up to and including the first past the budget."""
    if budget is None:
        return per_text.shape[0]
    over = (M.damage(engine.metrics[0], per_text[:, 0].mean(-1)) > budget).nonzero()
    return int(over[0]) + 1 if len(over) else per_text.shape[0]


def _summary(model: Model, batch: TokenBatch, engine: Engine, options: EvalOptions, per_text: torch.Tensor,
             command: str | None, started: float, backend: Backend | None = None) -> dict[str, Any]:
    """The fields every ablation result shares: bootstrap CIs over texts, data, provenance."""
    estimate, low, high = bootstrap_mean_ci(per_text, n_boot=options.n_boot, seed=options.seed)
    provenance = Provenance.of(model, command or command_line(), options.seed)
    if backend is not None:
        provenance = dataclasses.replace(provenance, device=backend.device or provenance.device,
                                         backend=backend.description)
    return dict(
        provenance=provenance,
        metrics=engine.metrics, values=estimate, ci_low=low, ci_high=high, per_text=per_text,
        data=batch.description, n_texts=batch.n_texts, n_predictions=batch.n_scored, n_boot=options.n_boot,
        seconds=time.perf_counter() - started,
    )


def cumulative_evaluations(n_units: int, mode: str, steps: int | None = None) -> int:
    """How many (spec) evaluations `cumulative` runs per chunk of texts (for progress bars).

    "order" runs one per step; "greedy" runs every remaining unit at each step: n + (n - 1) + ...,
    `steps` terms (None: all n). A run stopped early by `budget` runs fewer.
    """
    steps = n_units if steps is None else min(steps, n_units)
    return steps if mode == "order" else sum(n_units - step for step in range(steps))


def by_damage(result: AblationResult, metric: str | None = None) -> list[int]:
    """Unit indices of `result` from least to most damaging on `metric` (default: the first)."""
    index = M.metric_index(result.metrics, metric)
    damage = M.damage(result.metrics[index], result.values[:, index])
    return [int(i) for i in torch.argsort(damage, stable=True)]
