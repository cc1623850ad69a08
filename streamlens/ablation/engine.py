"""The engine that evaluates many ablations fast, and the sweeps built on it.

See the package docstring for how it saves work while giving the naive loop's numbers. `Engine` is
the one loop every analysis goes through (`evaluate`, `sweep`, `cumulative`, the backends' shards,
`swap`'s swaps and ablated final streams); a spec is an `Ablation` or any `Intervention` (a swap,
greedy removal's `Added`), so each gets batching, Ray, checkpoints and progress from one place.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, Union, runtime_checkable

import einops
import torch

from streamlens import metrics as M
from streamlens import sites
from streamlens.stats import bootstrap_mean_ci
from streamlens.ablation import replace as R
from streamlens.ablation.apply import replacing_hooks
from streamlens.ablation.options import EvalOptions, check_bootstrap_memory
from streamlens.ablation.spec import CUMULATIVE_MODES, METHODS, Ablation, Progress, stream_order, units
from streamlens.data import TokenBatch
from streamlens.model import Model
from streamlens.results import AblationResult, CumulativeAblation, Provenance, command_line
from streamlens.sites import Site

# ----- the engine -------------------------------------------------------------------------------
@dataclass
class Clean:
    """The clean run of one chunk of texts `rows`: cached streams and the clean logit summaries.

    Shapes (n texts of the chunk): `resid_pre` {layer: [n, pos, d_model]} for every layer; `writes`
    {write: [n, pos, d_model] or head z [n, pos, d_head]} (those direct effects or a spec need);
    `final` [n, pos, d_model] (before the final norm); `scored` (text index [m], position [m]) of the
    m scored predictions, `labels` / `targets` [m]; `donor_writes` the resample donors' writes.
    """

    rows: slice
    resid_pre: dict[int, torch.Tensor]
    writes: dict[Site, torch.Tensor]
    final: torch.Tensor
    scored: tuple[torch.Tensor, torch.Tensor]
    labels: torch.Tensor
    targets: torch.Tensor | None
    stats: M.LogitStats
    reference: M.CleanReference
    donor_writes: dict[Site, torch.Tensor] = field(default_factory=dict)

    @property
    def n_texts(self) -> int:
        return self.final.shape[0]


@runtime_checkable
class Intervention(Protocol):
    """A spec the engine evaluates besides `Ablation` (e.g. `ablation.swap.Swap`).

    It names its rows in a result (`sites`, `method`, `effect`, `label`), the writes it replaces
    (`writes`: the engine prepares their means / donors for its method), which specs share a forward
    (`group_key`), and how its final stream follows from the clean cache (`finals`).
    """

    sites: tuple[Site, ...]
    method: str
    effect: str

    @property
    def label(self) -> str: ...

    @property
    def writes(self) -> tuple[Site, ...]: ...

    def check(self, model: Model) -> Any:
        """Raise ValueError if the model cannot run this spec."""
        ...

    def group_key(self) -> Hashable:
        """Specs with equal keys are evaluated together (`finals` gets them as one group)."""
        ...

    def finals(self, engine: "Engine", clean: Clean, group: Sequence[Any]) -> torch.Tensor:
        """Final streams [k, n, pos, d_model] of the k specs of `group` (this one first) on `clean`'s texts."""
        ...


Spec = Union[Ablation, Intervention]


class Engine:
    """Evaluates many specs (`Ablation`s or `Intervention`s) of one model on one `TokenBatch`.

    One clean pass per chunk of `batch_size` texts caches resid_pre of every layer; each group of
    specs that share a forward (`groups`) restarts from that cache. `passes` is the one loop over
    (group, clean chunk, rows) that `per_text`, the backends' shards and `swap.ablated_finals` all
    use; `finals` gives a group's final streams and `score` their metrics.

    Args:
        model: the model.
        batch: the texts with their scored predictions.
        metrics: metric names (`metrics.METRICS`) scored by `score`.
        seed: seeds the resample donors.
        batch_size: most sequences in one forward (texts x variants).
    """

    def __init__(self, model: Model, batch: TokenBatch, metrics: tuple[str, ...], seed: int, batch_size: int):
        if batch_size < 1:
            raise ValueError(f"batch size {batch_size} must be at least 1")
        self.model, self.batch, self.metrics, self.seed, self.batch_size = model, batch, metrics, seed, batch_size
        self.chunk = min(batch_size, batch.n_texts)
        self.variants_per_forward = max(1, batch_size // self.chunk)
        self.means: dict[Site, torch.Tensor] = {}  # mean of each write over the batch, filled on demand
        self.clean_loss = torch.full((batch.n_texts,), torch.nan, dtype=torch.float64)  # filled by clean runs
        self._cached: tuple[int, frozenset, frozenset, Clean] | None = None
        self._streams: tuple[Ablation, dict[int, torch.Tensor]] | None = None  # the last ablated_streams

    @classmethod
    def of(cls, model: Model, batch: TokenBatch, options: EvalOptions) -> "Engine":
        """An engine with the options' metrics (checked; default: all that apply), seed and batch size."""
        return cls(model, batch, metric_names(options.metrics, batch), options.seed, options.batch_size)

    @property
    def chunks(self) -> list[slice]:
        return [slice(start, min(start + self.chunk, self.batch.n_texts))
                for start in range(0, self.batch.n_texts, self.chunk)]

    # ----- the loop ------------------------------------------------------------------------------
    def passes(self, specs: Sequence[Spec], shard: tuple[Sequence[int], slice] | None = None,
               keep: Sequence[Site] = ()) -> Iterator[tuple[list[int], Clean, slice]]:
        """The one loop: (indices of a group of `specs` sharing a forward, clean chunk, its rows).

        shard (spec indices, one chunk of `chunks`): only those specs on those texts. Means, donors
        and the clean pass are still those of all `specs` on the whole batch, and a shard's specs form
        whole groups of `groups(specs)` (`checkpoint.plan` packs them so): a shard gives the numbers
        of the full call. keep: clean writes to keep in `Clean.writes` besides those direct effects
        need. Runs under `torch.inference_mode`.
        """
        for spec in specs:
            spec.check(self.model)
        by_method = {m: sorted({w for s in specs if s.method == m for w in s.writes}, key=stream_order)
                     for m in METHODS}
        keep = frozenset(keep) | {w for s in specs if s.effect == "direct" for w in s.writes}
        chosen = list(range(len(specs))) if shard is None else list(shard[0])
        with torch.inference_mode():
            missing = [w for w in by_method["mean"] if w not in self.means]
            if missing:
                self.means.update(R.means(self.model, self.batch, missing, self.chunk))
            for rows in self.chunks if shard is None else [shard[1]]:
                clean = self.clean(rows, keep, frozenset(by_method["resample"]))
                for group in self.groups([specs[i] for i in chosen]):
                    yield [chosen[i] for i in group], clean, rows

    def per_text(self, specs: Sequence[Spec], progress: Progress | None = None,
                 shard: tuple[Sequence[int], slice] | None = None) -> torch.Tensor:
        """Metrics of each spec, averaged per text: [spec, metric, text] (float64; outside a shard: 0)."""
        out = torch.zeros(len(specs), len(self.metrics), self.batch.n_texts, dtype=torch.float64)
        for group, clean, rows in self.passes(specs, shard):
            out[group, :, rows] = self.score(clean, self.finals(clean, [specs[i] for i in group])).cpu()
            if progress is not None:
                progress(len(group))
        return out

    def groups(self, specs: Sequence[Spec]) -> list[list[int]]:
        """Spec indices that share one forward (same `group_key`), at most `variants_per_forward` each."""
        keyed: dict[Hashable, list[int]] = {}
        for index, spec in enumerate(specs):
            keyed.setdefault(group_key(spec), []).append(index)
        size = self.variants_per_forward
        return [indices[i : i + size] for indices in keyed.values() for i in range(0, len(indices), size)]

    # ----- one chunk -----------------------------------------------------------------------------
    def clean(self, rows: slice, writes: frozenset = frozenset(), donor_writes: frozenset = frozenset()) -> Clean:
        """The clean pass of texts `rows`, keeping `writes` and the donors' `donor_writes` (cached: the
        last chunk is kept while later calls need no more than it has)."""
        if self._cached is not None:
            index, have, have_donors, clean = self._cached
            if index == rows.start and writes <= have and donor_writes <= have_donors:
                return clean
        self._cached, self._streams = None, None  # free the previous chunk's streams before computing these
        batch = self.batch.rows(rows)
        resid, captured, final = R.capture(self.model, batch.tokens, sorted(writes, key=stream_order),
                                          range(self.model.n_layers))
        text_index, position = batch.scored.nonzero(as_tuple=True)
        labels = batch.labels[text_index, position]
        targets = None if batch.targets is None else batch.targets[text_index]
        normed = self.model.final_norm(final[text_index, position])
        stats, reference = M.logit_stats(normed, self.model.W_U, self.model.b_U, labels, targets, None)
        clean = Clean(rows, resid, captured, final, (text_index, position), labels, targets, stats, reference)
        loss = stats.logsumexp - stats.label_logit
        self.clean_loss[rows] = M.per_text_means(loss, text_index, batch.n_texts).cpu()
        if donor_writes:
            clean.donor_writes = R.donor_writes(self.model, self.batch, rows, sorted(donor_writes, key=stream_order),
                                                R.donor_rows(self.batch.n_texts, self.seed))
        self._cached = (rows.start, writes, donor_writes, clean)  # for later calls and shards of this chunk
        return clean

    def replacements(self, clean: Clean, spec: Spec) -> dict[Site, torch.Tensor]:
        """What takes each of `spec`'s writes' place on `clean`'s texts (`replace.replacements`)."""
        return R.replacements(self.model, spec.method, spec.writes, self.means, clean.donor_writes)

    def finals(self, clean: Clean, specs: Sequence[Spec]) -> torch.Tensor:
        """Final streams [k, n, pos, d_model] of one group of k specs (see `groups`)."""
        if not isinstance(specs[0], Ablation):
            return specs[0].finals(self, clean, specs)
        replacements = [self.replacements(clean, spec) for spec in specs]
        if specs[0].effect == "direct" or not specs[0].sites:
            return torch.stack([self._direct_final(clean, reps) for reps in replacements])
        return self.restarted(clean, clean.resid_pre, specs[0], replacements)

    def _direct_final(self, clean: Clean, replacements: dict[Site, torch.Tensor]) -> torch.Tensor:
        final = clean.final
        for write, replacement in replacements.items():
            removed = R.as_write(self.model, write, clean.writes[write])
            final = final - removed + R.as_write(self.model, write, replacement)
        return final

    def restarted(self, clean: Clean, resid_pre: dict[int, torch.Tensor], first: Ablation,
                  replacements: list[dict[Site, torch.Tensor]], start: tuple[int, bool] | None = None) -> torch.Tensor:
        """Final streams [k, n, pos, d_model] of k variants run from `resid_pre[start]` with their
        replacements from there on; start (layer, whole block replaced) defaults to `first`'s restart."""
        start, skip_block = start or restart(first)
        n_texts = clean.n_texts
        stream = einops.repeat(resid_pre[start], "n pos d -> (k n) pos d", k=len(replacements)).clone()
        if skip_block:  # resid_post = (resid_pre + attn write) + mlp write, as the block would add them
            for index, reps in enumerate(replacements):
                rows = slice(index * n_texts, (index + 1) * n_texts)
                stream[rows] = stream[rows] + reps[Site("attn", start)] + reps[Site("mlp", start)]
            start += 1
        if start < self.model.n_layers:
            hooks = replacing_hooks(replacements, n_texts, from_layer=start)
            stream = self.model.run_to(stream, sites.FINAL_STREAM, hooks, start)
        return einops.rearrange(stream, "(k n) pos d -> k n pos d", k=len(replacements))

    def ablated_streams(self, clean: Clean, spec: Ablation) -> dict[int, torch.Tensor]:
        """resid_pre {layer: [n, pos, d_model]} of every layer with `spec` (total effect) applied, on
        `clean`'s texts: the clean streams up to its first layer, then one forward (the last spec's
        streams are kept for the cached chunk: greedy removal asks for one base per step)."""
        if self._streams is not None and self._streams[0] == spec:
            return self._streams[1]
        self._streams = None
        first, skip_block = restart(spec)
        streams = dict(clean.resid_pre)
        replacement = self.replacements(clean, spec)
        stream = clean.resid_pre[first]
        if skip_block:
            stream = stream + replacement[Site("attn", first)] + replacement[Site("mlp", first)]
            first += 1
            if first < self.model.n_layers:
                streams[first] = stream
        kept: dict[int, torch.Tensor] = {}

        def keep(layer: int):
            return lambda tensor, hook: kept.__setitem__(layer, tensor)

        if first < self.model.n_layers:
            hooks = replacing_hooks([replacement], None, from_layer=first)
            hooks += [(sites.resid_pre(layer), keep(layer)) for layer in range(first + 1, self.model.n_layers)]
            self.model.run_to(stream, sites.FINAL_STREAM, hooks, first)
        streams.update(kept)
        self._streams = (spec, streams)
        return streams

    def score(self, clean: Clean, finals: torch.Tensor) -> torch.Tensor:
        """Metrics per variant and text [k, metric, n] from final streams [k, n, pos, d_model]."""
        k, n_texts = finals.shape[0], clean.n_texts
        text_index, position = clean.scored
        normed = self.model.final_norm(einops.rearrange(finals[:, text_index, position], "k m d -> (k m) d"))
        reference = M.CleanReference(clean.reference.direction.repeat(k, 1), clean.reference.bias.repeat(k))
        targets = None if clean.targets is None else clean.targets.repeat(k)
        stats, _ = M.logit_stats(normed, self.model.W_U, self.model.b_U, clean.labels.repeat(k), targets, reference)
        n = len(text_index)
        out = []
        for index in range(k):
            part = M.LogitStats(*(None if value is None else value[index * n : (index + 1) * n] for value in
                                  (stats.logsumexp, stats.top1, stats.label_logit, stats.reference_mean_logit,
                                   stats.target_logit)))
            values = M.token_metrics(clean.stats, part, self.metrics)
            out.append(M.per_text_means(values, text_index, n_texts))
        return torch.stack(out)


def restart(spec: Ablation) -> tuple[int, bool]:
    """(first layer a total-effect ablation computes differently, whether that whole block is replaced)."""
    start = spec.first_layer
    return start, {Site("attn", start), Site("mlp", start)} <= set(spec.writes)


def group_key(spec: Spec) -> Hashable:
    """Specs with equal keys share a forward: direct effects; total effects restarting alike; or the
    intervention's own key."""
    if not isinstance(spec, Ablation):
        return ("intervention", type(spec).__name__, spec.group_key())
    return ("direct",) if spec.effect == "direct" or not spec.sites else ("total", *restart(spec))


@dataclass(frozen=True)
class Added:
    """`base` with one more unit removed (same method, total effect): greedy removal's candidates.

    Evaluated from the stream of `base` (`Engine.ablated_streams`, one forward per chunk), restarting
    at the added unit's layer instead of `base`'s first layer; the numbers are those of the
    `Ablation` of all the units.
    """

    base: Ablation
    unit: Site

    @property
    def full(self) -> Ablation:
        return Ablation((*self.base.sites, self.unit), self.base.method, "total")

    @property
    def sites(self) -> tuple[Site, ...]:
        return self.full.sites

    @property
    def method(self) -> str:
        return self.base.method

    @property
    def effect(self) -> str:
        return "total"

    @property
    def label(self) -> str:
        return self.full.label

    @property
    def writes(self) -> tuple[Site, ...]:
        return self.full.writes

    def check(self, model: Model) -> "Added":
        self.full.check(model)
        return self

    def _start(self) -> tuple[int, bool]:
        layer = self.unit.layer
        return layer, {Site("attn", layer), Site("mlp", layer)} <= set(self.full.writes)

    def group_key(self) -> Hashable:
        return (self.base, *self._start())

    def finals(self, engine: Engine, clean: Clean, group: Sequence["Added"]) -> torch.Tensor:
        streams = engine.ablated_streams(clean, self.base)
        replacements = [engine.replacements(clean, spec.full) for spec in group]
        return engine.restarted(clean, streams, self.full, replacements, self._start())


class Backend(Protocol):
    """Where an engine's (spec, text) evaluations run: `ablation.backends` has one in this process
    with a resumable checkpoint (`LocalBackend`) and one on Ray workers (`RayBackend`)."""

    description: str  # recorded in the provenance, e.g. "ray: 2 workers on cpu"
    device: str | None  # where the forwards run (None: the model's device)

    def per_text(self, engine: Engine, specs: list[Spec], progress: Progress | None) -> torch.Tensor:
        """`engine.per_text(specs, progress)`, computed elsewhere; fills `engine.clean_loss` too."""
        ...


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

    Returns:
        `CumulativeAblation`: step k (1-based) has the first k units of `units` removed.
    """
    if mode not in CUMULATIVE_MODES:
        raise ValueError(f"unknown cumulative mode {mode!r}: choose from {', '.join(CUMULATIVE_MODES)}")
    if not order:
        raise ValueError("cumulative removal needs at least one unit")
    options = EvalOptions.of(options, **changes)
    started = time.perf_counter()
    engine = Engine.of(model, batch, options)
    check_bootstrap_memory(options.n_boot, len(order) * len(engine.metrics), batch.n_texts)  # before any work
    with options.torch_threads():
        removed, per_text = _remove_one_after_another(engine, list(order), mode, method, effect, progress, backend)
    return CumulativeAblation(
        **_summary(model, batch, engine, options, per_text, command, started, backend),
        mode=mode, sites=tuple(removed), method=method, effect=effect,
    )


def _remove_one_after_another(engine: Engine, order: list[Site], mode: str, method: str, effect: str,
                              progress: Progress | None, backend: Backend | None) -> tuple[list[Site], torch.Tensor]:
    """The removal order and per-text metrics after each step [step, metric, text]."""
    if mode == "order":
        specs = [Ablation(tuple(order[: k + 1]), method, effect) for k in range(len(order))]
        return order, run(engine, specs, progress, backend)
    remaining, removed, steps = list(order), [], []
    while remaining:
        if removed and effect == "total":  # restart each candidate from the stream of the removed units
            base = Ablation(tuple(removed), method, effect)
            specs = [Added(base, site) for site in remaining]
        else:
            specs = [Ablation((*removed, site), method, effect) for site in remaining]
        per_text = run(engine, specs, progress, backend)
        damage = M.damage(engine.metrics[0], per_text[:, 0].mean(-1))
        best = int(torch.argmin(damage))
        removed.append(remaining.pop(best))
        steps.append(per_text[best])
    return removed, torch.stack(steps)


_engine = Engine.of  # the name tests/test_distributed.py uses


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


def cumulative_evaluations(n_units: int, mode: str) -> int:
    """How many (spec) evaluations `cumulative` runs per chunk of texts (for progress bars)."""
    return n_units if mode == "order" else n_units * (n_units + 1) // 2


def metric_names(metrics: Sequence[str] | None, batch: TokenBatch) -> tuple[str, ...]:
    """The checked metric names (None: every metric that applies to `batch`)."""
    has_targets = batch.targets is not None
    return M.check_metrics(tuple(metrics), has_targets) if metrics is not None else M.default_metrics(has_targets)


def by_damage(result: AblationResult, metric: str | None = None) -> list[int]:
    """Unit indices of `result` from least to most damaging on `metric` (default: the first)."""
    index = M.metric_index(result.metrics, metric)
    damage = M.damage(result.metrics[index], result.values[:, index])
    return [int(i) for i in torch.argsort(damage, stable=True)]
