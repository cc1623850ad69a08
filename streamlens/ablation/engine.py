"""The engine that evaluates many ablations fast: one loop for every analysis.

See the package docstring for how it saves work while giving the naive loop's numbers. `Engine` is
the one loop every analysis goes through (`sweeps.evaluate`, `sweep`, `cumulative`, the backends'
shards, `swap`'s swaps and ablated final streams); a spec is an `Ablation` or any `Intervention` (a
swap, greedy removal's `Added`), so each gets batching, Ray, checkpoints and progress from one place.
`Backend` is what a backend offers the sweeps (`ablation.backends` has two).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, Union, runtime_checkable

import einops
import torch

from streamlens import metrics as M
from streamlens import sites
from streamlens.ablation import replace as R
from streamlens.ablation.apply import replacing_hooks
from streamlens.ablation.options import EvalOptions, metric_names
from streamlens.ablation.spec import METHODS, Ablation, Progress, stream_order
from streamlens.data import TokenBatch
from streamlens.model import Model
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
        if first < self.model.n_layers:
            hooks = replacing_hooks([replacement], None, from_layer=first)
            hooks += [(sites.resid_pre(layer), sites.storing(kept, layer)) for layer in range(first + 1, self.model.n_layers)]
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

