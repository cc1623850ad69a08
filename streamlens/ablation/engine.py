"""The engine that evaluates many ablations fast, and the sweeps built on it.

See the package docstring for how it saves work while giving the naive loop's numbers.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import einops
import torch

from streamlens import metrics as M
from streamlens import sites
from streamlens.stats import bootstrap_mean_ci
from streamlens.ablation import replace as R
from streamlens.ablation.apply import replacing_hooks
from streamlens.ablation.options import EvalOptions
from streamlens.ablation.spec import CUMULATIVE_MODES, METHODS, Ablation, Progress, stream_order, units
from streamlens.data import TokenBatch
from streamlens.model import Model
from streamlens.results import AblationResult, CumulativeAblation, Provenance, command_line
from streamlens.sites import Site

# ----- the engine -------------------------------------------------------------------------------
@dataclass
class _Clean:
    """Clean run of one chunk of texts: cached streams and the clean logit summaries."""

    resid_pre: dict[int, torch.Tensor]
    writes: dict[Site, torch.Tensor]
    final: torch.Tensor
    scored: tuple[torch.Tensor, torch.Tensor]
    labels: torch.Tensor
    targets: torch.Tensor | None
    stats: M.LogitStats
    reference: M.CleanReference
    donor_writes: dict[Site, torch.Tensor] = field(default_factory=dict)


class _Engine:
    """Evaluates many ablations of one model on one `TokenBatch`, reusing clean passes."""

    def __init__(self, model: Model, batch: TokenBatch, names: tuple[str, ...], seed: int, batch_size: int):
        if batch_size < 1:
            raise ValueError(f"batch size {batch_size} must be at least 1")
        self.model, self.batch, self.names, self.seed = model, batch, names, seed
        self.chunk = min(batch_size, batch.n_texts)
        self.variants_per_forward = max(1, batch_size // self.chunk)
        self.W_U, self.b_U = model.W_U, model.b_U
        self._means: dict[Site, torch.Tensor] = {}
        self.clean_loss = torch.full((batch.n_texts,), torch.nan, dtype=torch.float64)  # filled by clean runs
        self._cached: tuple[int, frozenset, frozenset, _Clean] | None = None

    @property
    def chunks(self) -> list[slice]:
        return [slice(start, min(start + self.chunk, self.batch.n_texts))
                for start in range(0, self.batch.n_texts, self.chunk)]

    def per_text(self, specs: Sequence[Ablation], progress: Progress | None = None,
                 shard: tuple[Sequence[int], slice] | None = None) -> torch.Tensor:
        """Metrics of each spec, averaged per text: [spec, metric, text] (float64).

        shard (spec indices, one chunk of `chunks`): evaluate only those specs on those texts (the
        rest of the output stays zero). Means, donors and the clean pass are still those of all
        `specs` on the whole batch, and the shard's specs form whole groups of `_groups(specs)`
        (`ablation.backends` plans them so), so a shard gives the numbers of the full call.
        """
        for spec in specs:
            spec.check(self.model)
        out = torch.zeros(len(specs), len(self.names), self.batch.n_texts, dtype=torch.float64)
        by_method = {m: sorted({w for s in specs if s.method == m for w in s.writes}, key=stream_order)
                     for m in METHODS}
        if by_method["mean"]:
            missing = [w for w in by_method["mean"] if w not in self._means]
            if missing:
                self._means.update(R.means(self.model, self.batch, missing, self.chunk))
        keep_writes = frozenset(w for s in specs if s.effect == "direct" for w in s.writes)
        chosen = list(range(len(specs))) if shard is None else list(shard[0])
        with torch.inference_mode():
            for rows in self.chunks if shard is None else [shard[1]]:
                clean = self._clean(rows, keep_writes, frozenset(by_method["resample"]))
                for group in self._groups([specs[i] for i in chosen]):
                    group = [chosen[i] for i in group]
                    values = self._evaluate(clean, rows, [specs[i] for i in group])  # [k, metric, n]
                    out[group, :, rows] = values.cpu()
                    if progress is not None:
                        progress(len(group))
        return out

    def _clean(self, rows: slice, writes: frozenset, donor_writes: frozenset) -> _Clean:
        if self._cached is not None:
            index, have, have_donors, clean = self._cached
            if index == rows.start and writes <= have and donor_writes <= have_donors:
                return clean
        self._cached = None  # free the previous chunk's streams before computing these
        batch = self.batch.rows(rows)
        resid, captured, final = R.capture(self.model, batch.tokens, sorted(writes, key=stream_order),
                                          range(self.model.n_layers))
        text_index, position = batch.scored.nonzero(as_tuple=True)
        labels = batch.labels[text_index, position]
        targets = None if batch.targets is None else batch.targets[text_index]
        normed = self.model.final_norm(final[text_index, position])
        stats, reference = M.logit_stats(normed, self.W_U, self.b_U, labels, targets, None)
        clean = _Clean(resid, captured, final, (text_index, position), labels, targets, stats, reference)
        loss = stats.logsumexp - stats.label_logit
        self.clean_loss[rows] = M.per_text_means(loss, text_index, batch.n_texts).cpu()
        if donor_writes:
            clean.donor_writes = R.donor_writes(self.model, self.batch, rows, sorted(donor_writes, key=stream_order),
                                                R.donor_rows(self.batch.n_texts, self.seed))
        self._cached = (rows.start, writes, donor_writes, clean)  # for later calls and shards of this chunk
        return clean

    def _groups(self, specs: Sequence[Ablation]) -> list[list[int]]:
        """Spec indices that share one forward: same effect, same restart layer, same block skip."""
        keyed: dict[tuple, list[int]] = {}
        for index, spec in enumerate(specs):
            key = ("direct",) if spec.effect == "direct" or not spec.sites else ("total", *_restart(spec))
            keyed.setdefault(key, []).append(index)
        size = self.variants_per_forward
        return [indices[i : i + size] for indices in keyed.values() for i in range(0, len(indices), size)]

    def _evaluate(self, clean: _Clean, rows: slice, specs: list[Ablation]) -> torch.Tensor:
        replacements = [R.replacements(self.model, spec.method, spec.writes, self._means, clean.donor_writes)
                        for spec in specs]
        if specs[0].effect == "direct" or not specs[0].sites:
            finals = torch.stack([self._direct_final(clean, reps) for reps in replacements])
        else:
            finals = self._total_finals(clean, specs[0], replacements)
        return self._score(clean, finals, rows.stop - rows.start)

    def _direct_final(self, clean: _Clean, replacements: dict[Site, torch.Tensor]) -> torch.Tensor:
        final = clean.final
        for write, replacement in replacements.items():
            removed = R.as_write(self.model, write, clean.writes[write])
            final = final - removed + R.as_write(self.model, write, replacement)
        return final

    def _total_finals(self, clean: _Clean, first: Ablation, replacements: list[dict]) -> torch.Tensor:
        """Final streams [k, n, pos, d_model] of k variants restarting at the same layer."""
        start, skip_block = _restart(first)
        n_texts = clean.final.shape[0]
        stream = einops.repeat(clean.resid_pre[start], "n pos d -> (k n) pos d", k=len(replacements)).clone()
        if skip_block:  # resid_post = (resid_pre + attn write) + mlp write, as the block would add them
            for index, reps in enumerate(replacements):
                rows = slice(index * n_texts, (index + 1) * n_texts)
                stream[rows] = stream[rows] + reps[Site("attn", start)] + reps[Site("mlp", start)]
            start += 1
        if start < self.model.n_layers:
            hooks = replacing_hooks(replacements, n_texts, from_layer=start)
            stream = self.model.run_to(stream, sites.FINAL_STREAM, hooks, start)
        return einops.rearrange(stream, "(k n) pos d -> k n pos d", k=len(replacements))

    def _score(self, clean: _Clean, finals: torch.Tensor, n_texts: int) -> torch.Tensor:
        """Metrics per variant and text [k, metric, n] from final streams [k, n, pos, d_model]."""
        k = finals.shape[0]
        text_index, position = clean.scored
        normed = self.model.final_norm(einops.rearrange(finals[:, text_index, position], "k m d -> (k m) d"))
        reference = M.CleanReference(clean.reference.direction.repeat(k, 1), clean.reference.bias.repeat(k))
        targets = None if clean.targets is None else clean.targets.repeat(k)
        stats, _ = M.logit_stats(normed, self.W_U, self.b_U, clean.labels.repeat(k), targets, reference)
        n = len(text_index)
        out = []
        for index in range(k):
            part = M.LogitStats(*(None if value is None else value[index * n : (index + 1) * n] for value in
                                  (stats.logsumexp, stats.top1, stats.label_logit, stats.reference_mean_logit,
                                   stats.target_logit)))
            values = M.token_metrics(clean.stats, part, self.names)
            out.append(M.per_text_means(values, text_index, n_texts))
        return torch.stack(out)


def _restart(spec: Ablation) -> tuple[int, bool]:
    """(first layer computed differently, whether that whole block is replaced)."""
    start = spec.first_layer
    writes = set(spec.writes)
    return start, {Site("attn", start), Site("mlp", start)} <= writes


class Backend(Protocol):
    """Where an engine's (spec, text) evaluations run: `ablation.backends` has one in this process
    with a resumable checkpoint (`LocalBackend`) and one on Ray workers (`RayBackend`)."""

    description: str  # recorded in the provenance, e.g. "ray: 2 workers on cpu"
    device: str | None  # where the forwards run (None: the model's device)

    def per_text(self, engine: "_Engine", specs: list[Ablation], progress: Progress | None) -> torch.Tensor:
        """`engine.per_text(specs, progress)`, computed elsewhere; fills `engine.clean_loss` too."""
        ...


def _per_text(engine: "_Engine", specs: list[Ablation], progress: Progress | None,
              backend: Backend | None) -> torch.Tensor:
    return engine.per_text(specs, progress) if backend is None else backend.per_text(engine, specs, progress)


# ----- public entry points ----------------------------------------------------------------------
def evaluate(
    model: Model,
    batch: TokenBatch,
    specs: Sequence[Ablation],
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
        specs: the ablations (each a unit or a set of units with a method and an effect).
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
    engine = _engine(model, batch, options)
    with options.torch_threads():
        per_text = _per_text(engine, list(specs), progress, backend)
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
    **changes: Any,
) -> AblationResult:
    """Remove every single unit of one kind in turn (see `evaluate` for the options)."""
    specs = [Ablation((site,), method, effect) for site in units(model, unit, layers, heads)]
    return evaluate(model, batch, specs, options, **changes)


def cumulative(
    model: Model,
    batch: TokenBatch,
    order: Sequence[Site],
    mode: str = "order",
    method: str = "zero",
    effect: str = "total",
    options: EvalOptions | None = None,
    *,
    progress: Progress | None = None,
    command: str | None = None,
    backend: Backend | None = None,
    **changes: Any,
) -> CumulativeAblation:
    """Remove units one after another and measure the damage after each removal.

    Args:
        order: the units. mode "order": removed in this order. mode "greedy": at each step the
            remaining unit whose removal (together with those already removed) does the least
            damage on the first metric is removed next (U(U+1)/2 evaluations for U units).
        Other arguments as in `evaluate`.

    Returns:
        `CumulativeAblation`: step k (1-based) has the first k units of `units` removed.
    """
    if mode not in CUMULATIVE_MODES:
        raise ValueError(f"unknown cumulative mode {mode!r}: choose from {', '.join(CUMULATIVE_MODES)}")
    if not order:
        raise ValueError("cumulative removal needs at least one unit")
    options = EvalOptions.of(options, **changes)
    started = time.perf_counter()
    engine = _engine(model, batch, options)
    with options.torch_threads():
        removed, per_text = _remove_one_after_another(engine, list(order), mode, method, effect, progress, backend)
    return CumulativeAblation(
        **_summary(model, batch, engine, options, per_text, command, started, backend),
        mode=mode, sites=tuple(removed), method=method, effect=effect,
    )


def _remove_one_after_another(engine: "_Engine", order: list[Site], mode: str, method: str, effect: str,
                              progress: Progress | None, backend: Backend | None) -> tuple[list[Site], torch.Tensor]:
    """The removal order and per-text metrics after each step [step, metric, text]."""
    if mode == "order":
        specs = [Ablation(tuple(order[: k + 1]), method, effect) for k in range(len(order))]
        return order, _per_text(engine, specs, progress, backend)
    remaining, removed, steps = list(order), [], []
    while remaining:
        specs = [Ablation((*removed, site), method, effect) for site in remaining]
        per_text = _per_text(engine, specs, progress, backend)
        damage = M.damage(engine.names[0], per_text[:, 0].mean(-1))
        best = int(torch.argmin(damage))
        removed.append(remaining.pop(best))
        steps.append(per_text[best])
    return removed, torch.stack(steps)


def _engine(model: Model, batch: TokenBatch, options: EvalOptions) -> "_Engine":
    return _Engine(model, batch, _metric_names(options.metrics, batch), options.seed, options.batch_size)


def _summary(model: Model, batch: TokenBatch, engine: "_Engine", options: EvalOptions, per_text: torch.Tensor,
             command: str | None, started: float, backend: Backend | None = None) -> dict[str, Any]:
    """The fields every ablation result shares: bootstrap CIs over texts, data, provenance."""
    estimate, low, high = bootstrap_mean_ci(per_text, n_boot=options.n_boot, seed=options.seed)
    provenance = Provenance.of(model, command or command_line(), options.seed)
    if backend is not None:
        provenance = dataclasses.replace(provenance, device=backend.device or provenance.device,
                                         backend=backend.description)
    return dict(
        provenance=provenance,
        metrics=engine.names, values=estimate, ci_low=low, ci_high=high, per_text=per_text,
        data=batch.description, n_texts=batch.n_texts, n_predictions=batch.n_scored, n_boot=options.n_boot,
        seconds=time.perf_counter() - started,
    )


def cumulative_evaluations(n_units: int, mode: str) -> int:
    """How many (spec) evaluations `cumulative` runs per chunk of texts (for progress bars)."""
    return n_units if mode == "order" else n_units * (n_units + 1) // 2


def _metric_names(metrics: Sequence[str] | None, batch: TokenBatch) -> tuple[str, ...]:
    has_targets = batch.targets is not None
    return M.check_metrics(tuple(metrics), has_targets) if metrics is not None else M.default_metrics(has_targets)


def by_damage(result: AblationResult, metric: str | None = None) -> list[int]:
    """Unit indices of `result` from least to most damaging on `metric` (default: the first)."""
    index = M.metric_index(result.metrics, metric)
    damage = M.damage(result.metrics[index], result.values[:, index])
    return [int(i) for i in torch.argsort(damage, stable=True)]
