"""Ablation: remove writes into the residual stream and measure what the model loses.

Units are `sites.Site`s: "block L" (attention and MLP of layer L), "attn L", "mlp L", "head L.H"
("L3H2"), or any set of them (`Ablation(sites=...)`).

Methods (what takes the removed write's place; always computed from clean runs):
- zero: nothing;
- mean: the write's mean over the reference positions (every real position of the evaluated texts);
- resample: the same write on another text: a fixed, seeded derangement of the texts gives each text
  a donor, at the same position (for prompts, the donor's last position if the donor is shorter).
A head is ablated through its `hook_z` (z = 0, mean z, donor z), which removes exactly its write
z_h @ W_O[h]; the attention output bias b_O stays.

Effects:
- total: the write is replaced inside the forward and later layers react to it;
- direct: only the write's own path to the logits is removed: later layers see the clean stream and
  final stream = clean final stream - write + replacement, on which the model's final norm is
  recomputed (not frozen) before the unembedding.

Speed, with the numbers of one hooked full forward per unit (benchmarks/bench_ablation.py):
one clean pass caches `resid_pre` of every layer (and the writes a method needs); each ablated
forward restarts at its first ablated layer (`model.run(..., start_at_layer=L)` skips earlier
blocks); a unit that removes a whole block L starts at L+1 from resid_pre L + replacements (block
L's output is overwritten, so it is never computed); forwards stop at the final stream and
`metrics.logit_stats` unembeds only the scored positions, in vocabulary chunks; direct effects need
no forward at all; variants that restart at the same layer share one forward (`batch_size`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import einops
import torch

from streamlens import metrics as M
from streamlens import sites
from streamlens.data import TokenBatch
from streamlens.model import Model
from streamlens.results import AblationResult, CumulativeAblation, Provenance, command_line
from streamlens.sites import Site

METHODS = ("zero", "mean", "resample")
EFFECTS = ("total", "direct")
UNIT_KINDS = ("block", "attn", "mlp", "head")
CUMULATIVE_MODES = ("order", "greedy")
Progress = Callable[[int], None]


# ----- specs ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Ablation:
    """Remove the writes of `sites` with `method` ("zero" | "mean" | "resample"), measuring the
    `effect` ("total" | "direct"). No sites: nothing is removed (the clean model)."""

    sites: tuple[Site, ...] = ()
    method: str = "zero"
    effect: str = "total"

    def __post_init__(self) -> None:
        object.__setattr__(self, "sites", tuple(self.sites))
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}: choose from {', '.join(METHODS)}")
        if self.effect not in EFFECTS:
            raise ValueError(f"unknown effect {self.effect!r}: choose from {', '.join(EFFECTS)}")
        for site in self.sites:
            if site.kind not in UNIT_KINDS:
                raise ValueError(f"cannot ablate {site.label!r}: a unit is a block, attn, mlp or head site")
        self.writes  # noqa: B018 - raises on overlapping units

    @property
    def label(self) -> str:
        return " + ".join(site.label for site in self.sites) or "nothing"

    @property
    def writes(self) -> tuple[Site, ...]:
        """The single writes removed (block L -> attn L, mlp L), in stream order."""
        out: list[Site] = []
        for site in self.sites:
            for write in (Site("attn", site.layer), Site("mlp", site.layer)) if site.kind == "block" else (site,):
                clash = [w for w in out if w == write or (w.layer == write.layer and {w.kind, write.kind} == {"attn", "head"})]
                if clash:
                    raise ValueError(f"ablation units overlap: {write.label} and {clash[0].label} in {self.label!r}")
                out.append(write)
        return tuple(sorted(out, key=_stream_order))

    @property
    def first_layer(self) -> int | None:
        return min((site.layer for site in self.sites), default=None)

    def check(self, model: Model) -> "Ablation":
        """Raise ValueError naming a layer or head the model does not have."""
        for site in self.sites:
            model.check_layer(site.layer)
            if site.kind == "head":
                model.check_head(site.head)
        return self


def _stream_order(write: Site) -> tuple[int, int, int]:
    return (write.layer, 1 if write.kind == "mlp" else 0, -1 if write.head is None else write.head)


def units(model: Model, kind: str = "block", layers: Sequence[int] | None = None,
          heads: Sequence[int] | None = None) -> list[Site]:
    """Every single unit of one kind, layer by layer (heads: every head of every chosen layer)."""
    if kind not in UNIT_KINDS:
        raise ValueError(f"unknown unit {kind!r}: choose from {', '.join(UNIT_KINDS)}")
    chosen = range(model.n_layers) if layers is None else [model.check_layer(layer) for layer in layers]
    if kind == "head":
        chosen_heads = range(model.n_heads) if heads is None else [model.check_head(head) for head in heads]
        return [Site("head", layer, head) for layer in chosen for head in chosen_heads]
    if heads is not None:
        raise ValueError(f"heads {list(heads)} given for unit {kind!r}: heads apply only to unit 'head'")
    return [Site(kind, layer) for layer in chosen]


def donor_rows(n_texts: int, seed: int = 0) -> torch.Tensor:
    """For resampling: text i takes its writes from text donors[i] [n_texts]; a seeded random
    single cycle through all texts, so no text is its own donor."""
    if n_texts < 2:
        raise ValueError(f"resample ablation needs at least 2 texts to swap writes between, got {n_texts}")
    order = torch.randperm(n_texts, generator=torch.Generator().manual_seed(seed))
    donors = torch.empty(n_texts, dtype=torch.long)
    donors[order] = order.roll(-1)
    return donors


# ----- hooks ------------------------------------------------------------------------------------
def _hook_name(write: Site) -> str:
    if write.kind == "attn":
        return sites.attn_out(write.layer)
    if write.kind == "mlp":
        return sites.mlp_out(write.layer)
    return sites.attn_z(write.layer)


def _part(write: Site, tensor: torch.Tensor) -> torch.Tensor:
    """The write inside a captured tensor: [n, pos, d_model], or one head's z [n, pos, d_head]."""
    return tensor[:, :, write.head] if write.kind == "head" else tensor


def _replacing_hooks(variants: Sequence[dict[Site, torch.Tensor]], n_texts: int | None, from_layer: int = 0):
    """Hooks that put each variant's replacements into its rows [v*n, (v+1)*n) of the batch
    (`n_texts` None: one variant, all rows)."""
    entries: dict[str, list[tuple[slice, Site, torch.Tensor]]] = {}
    for index, replacements in enumerate(variants):
        rows = slice(None) if n_texts is None else slice(index * n_texts, (index + 1) * n_texts)
        for write, replacement in replacements.items():
            if write.layer >= from_layer:
                entries.setdefault(_hook_name(write), []).append((rows, write, replacement))

    def make(items):
        def hook(tensor: torch.Tensor, hook: Any) -> torch.Tensor:
            out = tensor.clone()
            for rows, write, replacement in items:
                _check_rows(replacement, out[rows], write)
                if write.kind == "head":
                    out[rows, :, write.head] = replacement
                else:
                    out[rows] = replacement
            return out

        return hook

    return [(name, make(items)) for name, items in entries.items()]


def _check_rows(replacement: torch.Tensor, target: torch.Tensor, write: Site) -> None:
    if replacement.ndim >= 3 and replacement.shape[:2] != target.shape[:2]:
        raise ValueError(f"resample replacement for {write.label} was prepared for {tuple(replacement.shape[:2])} "
                         f"[texts, positions], but this forward has {tuple(target.shape[:2])}")


class _ReachedFinalStream(Exception):
    """Raised by a hook to end a forward once the final stream is known (no unembedding)."""


def _run_to_final_stream(model: Model, tokens_or_resid: torch.Tensor, hooks: list, start_at_layer: int | None,
                         capture: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Forward up to the final norm's input; returns the final stream [batch, pos, d_model]."""
    kept = {} if capture is None else capture

    def stop(tensor: torch.Tensor, hook: Any) -> None:
        kept[sites.FINAL_STREAM] = tensor
        raise _ReachedFinalStream

    with contextlib.suppress(_ReachedFinalStream):
        model.run(tokens_or_resid, hooks=[*hooks, (sites.FINAL_STREAM, stop)], start_at_layer=start_at_layer)
    return kept[sites.FINAL_STREAM]


# ----- the context manager ----------------------------------------------------------------------
@contextlib.contextmanager
def ablated(model: Model, spec: Ablation, reference: torch.Tensor | TokenBatch | None = None,
            seed: int = 0) -> Iterator[None]:
    """Every forward of `model` inside the block runs with `spec` applied; hooks are always removed.

    Args:
        model: the model.
        spec: what to remove, how, and which effect (total: replaced in the forward; direct: the
            final stream gets `- write + replacement` and later layers see the clean stream).
        reference: the texts (token ids [n, pos] or a `TokenBatch`) that define the replacements:
            mean: the mean over all their (real) positions; resample: forwards inside the block
            must run on exactly these texts, each taking the writes of its donor (`donor_rows`).
            Not needed for zero.
        seed: the donor permutation's seed (resample).
    """
    spec.check(model)
    replacements: dict[Site, torch.Tensor] = {}
    if spec.writes:
        if spec.method != "zero" and reference is None:
            raise ValueError(f"method {spec.method!r} needs reference texts to take the replacement from")
        batch = reference if isinstance(reference, TokenBatch) or reference is None else _reference_batch(reference)
        with torch.inference_mode():
            replacements = _replacements(model, batch, spec.method, spec.writes, seed)
    if spec.effect == "total":
        hooks = _replacing_hooks([replacements], None) if replacements else []
    else:
        hooks = _direct_hooks(model, replacements)
    with model.hooks(hooks):
        yield


def _reference_batch(tokens: torch.Tensor) -> TokenBatch:
    """Plain token ids as a batch in which every position is real."""
    every = torch.ones_like(tokens, dtype=torch.bool)
    return TokenBatch(tokens, torch.full_like(tokens, -1), every, every, None, "reference texts")


def _direct_hooks(model: Model, replacements: dict[Site, torch.Tensor]) -> list:
    """Capture each clean write; at the final norm's input add (replacement - write)."""
    captured: dict[Site, torch.Tensor] = {}

    def keep(write: Site):
        def hook(tensor: torch.Tensor, hook: Any) -> None:
            captured[write] = _part(write, tensor)

        return hook

    def patch(stream: torch.Tensor, hook: Any) -> torch.Tensor:
        for write, replacement in replacements.items():
            stream = stream - _as_write(model, write, captured[write]) + _as_write(model, write, replacement)
        return stream

    return [*((_hook_name(w), keep(w)) for w in replacements), (sites.FINAL_STREAM, patch)]


def _as_write(model: Model, write: Site, value: torch.Tensor) -> torch.Tensor:
    """A head's z [..., d_head] -> its write z @ W_O[h] [..., d_model]; other writes (and a scalar
    zero, whose write is zero) unchanged."""
    return value @ model.W_O(write.layer)[write.head] if write.kind == "head" and value.ndim else value


# ----- replacements -----------------------------------------------------------------------------
def _capture(model: Model, tokens: torch.Tensor, writes: Sequence[Site], resid_layers: Sequence[int] = ()):
    """One clean forward to the final stream keeping resid_pre of `resid_layers` and `writes`.

    Returns (resid_pre {layer: [n, pos, d_model]}, writes {site: write or head z}, final stream).
    """
    kept: dict[str, torch.Tensor] = {}

    def keep(name: str):
        def hook(tensor: torch.Tensor, hook: Any) -> None:
            kept[name] = tensor

        return hook

    names = sorted({_hook_name(w) for w in writes} | {sites.resid_pre(layer) for layer in resid_layers})
    final = _run_to_final_stream(model, tokens, [(name, keep(name)) for name in names], None)
    resid = {layer: kept[sites.resid_pre(layer)] for layer in resid_layers}
    return resid, {w: _part(w, kept[_hook_name(w)]) for w in writes}, final


def _means(model: Model, batch: TokenBatch, writes: Sequence[Site], batch_size: int) -> dict[Site, torch.Tensor]:
    """Mean of each write over every real position of every text, [d_model] (heads: [d_head])."""
    sums: dict[Site, torch.Tensor] = {}
    count = int(batch.valid.sum())
    for start in range(0, batch.n_texts, batch_size):
        rows = slice(start, start + batch_size)
        _, captured, _ = _capture(model, batch.tokens[rows], writes)
        valid = batch.valid[rows]
        for write, value in captured.items():
            total = value[valid].double().sum(0)
            sums[write] = total if write not in sums else sums[write] + total
    return {write: (total / count).to(model.dtype) for write, total in sums.items()}


def _donor_writes(model: Model, batch: TokenBatch, rows: slice, writes: Sequence[Site],
                  donors: torch.Tensor) -> dict[Site, torch.Tensor]:
    """The clean writes of each text's donor [n, pos, ...] at the same position (clamped to the
    donor's last real position)."""
    donor_ids = donors[rows].to(batch.tokens.device)
    _, captured, _ = _capture(model, batch.tokens[donor_ids], writes)
    length = batch.tokens.shape[1]
    last = batch.valid[donor_ids].sum(-1, keepdim=True) - 1  # [n, 1]
    positions = torch.minimum(torch.arange(length, device=last.device).expand(len(donor_ids), length), last)
    out = {}
    for write, value in captured.items():
        index = positions.reshape(*positions.shape, *([1] * (value.ndim - 2))).expand_as(value)
        out[write] = value.gather(1, index)
    return out


def _replacements(model: Model, batch: TokenBatch | None, method: str, writes: Sequence[Site],
                  seed: int) -> dict[Site, torch.Tensor]:
    """Replacement of each write for the whole `batch`: a scalar 0, a mean vector, or the donors'
    writes [n, pos, ...]."""
    if method == "zero":
        return {w: torch.zeros((), dtype=model.dtype, device=model.device) for w in writes}
    assert batch is not None
    if method == "mean":
        return _means(model, batch, writes, batch.n_texts)
    return _donor_writes(model, batch, slice(0, batch.n_texts), writes, donor_rows(batch.n_texts, seed))


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

    def per_text(self, specs: Sequence[Ablation], progress: Progress | None = None) -> torch.Tensor:
        """Metrics of each spec, averaged per text: [spec, metric, text] (float64)."""
        for spec in specs:
            spec.check(self.model)
        out = torch.zeros(len(specs), len(self.names), self.batch.n_texts, dtype=torch.float64)
        by_method = {m: sorted({w for s in specs if s.method == m for w in s.writes}, key=_stream_order)
                     for m in METHODS}
        if by_method["mean"]:
            missing = [w for w in by_method["mean"] if w not in self._means]
            if missing:
                self._means.update(_means(self.model, self.batch, missing, self.chunk))
        keep_writes = frozenset(w for s in specs if s.effect == "direct" for w in s.writes)
        with torch.inference_mode():
            for rows in self.chunks:
                clean = self._clean(rows, keep_writes, frozenset(by_method["resample"]))
                for group in self._groups(specs):
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
        batch = self.batch.rows(rows)
        resid, captured, final = _capture(self.model, batch.tokens, sorted(writes, key=_stream_order),
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
            clean.donor_writes = _donor_writes(self.model, self.batch, rows, sorted(donor_writes, key=_stream_order),
                                               donor_rows(self.batch.n_texts, self.seed))
        if len(self.chunks) == 1:  # one chunk: keep it for later calls (greedy sweeps)
            self._cached = (rows.start, writes, donor_writes, clean)
        return clean

    def _groups(self, specs: Sequence[Ablation]) -> list[list[int]]:
        """Spec indices that share one forward: same effect, same restart layer, same block skip."""
        keyed: dict[tuple, list[int]] = {}
        for index, spec in enumerate(specs):
            key = ("direct",) if spec.effect == "direct" or not spec.sites else ("total", *_restart(spec))
            keyed.setdefault(key, []).append(index)
        size = self.variants_per_forward
        return [indices[i : i + size] for indices in keyed.values() for i in range(0, len(indices), size)]

    def _replacements(self, clean: _Clean, spec: Ablation) -> dict[Site, torch.Tensor]:
        if spec.method == "zero":
            zero = torch.zeros((), dtype=self.model.dtype, device=self.model.device)
            return {w: zero for w in spec.writes}
        if spec.method == "mean":
            return {w: self._means[w] for w in spec.writes}
        return {w: clean.donor_writes[w] for w in spec.writes}

    def _evaluate(self, clean: _Clean, rows: slice, specs: list[Ablation]) -> torch.Tensor:
        replacements = [self._replacements(clean, spec) for spec in specs]
        if specs[0].effect == "direct" or not specs[0].sites:
            finals = torch.stack([self._direct_final(clean, reps) for reps in replacements])
        else:
            finals = self._total_finals(clean, specs[0], replacements)
        return self._score(clean, finals, rows.stop - rows.start)

    def _direct_final(self, clean: _Clean, replacements: dict[Site, torch.Tensor]) -> torch.Tensor:
        final = clean.final
        for write, replacement in replacements.items():
            removed = _as_write(self.model, write, clean.writes[write])
            final = final - removed + _as_write(self.model, write, replacement)
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
            hooks = _replacing_hooks(replacements, n_texts, from_layer=start)
            stream = _run_to_final_stream(self.model, stream, hooks, start)
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


# ----- public entry points ----------------------------------------------------------------------
def evaluate(
    model: Model,
    batch: TokenBatch,
    specs: Sequence[Ablation],
    metrics: Sequence[str] | None = None,
    seed: int = 0,
    batch_size: int = 16,
    n_boot: int = 1000,
    progress: Progress | None = None,
    command: str | None = None,
) -> AblationResult:
    """Measure each ablation in `specs` on `batch`, with 95% bootstrap CIs over texts.

    Args:
        model: the model.
        batch: texts and the predictions to score (`streamlens.data.load_batch` and friends).
        specs: the ablations (each a unit or a set of units with a method and an effect).
        metrics: names from `metrics.METRICS` (default: all that apply to the batch).
        seed: seeds the resample donors and the bootstrap.
        batch_size: most sequences in one forward (texts x variants).
        n_boot: bootstrap replicates; the resampling unit is the text (window or prompt).
        progress: called with the number of (spec, chunk of texts) evaluations just finished.

    Returns:
        `AblationResult` with values and CIs [unit, metric] and per-text values [unit, metric, text].
    """
    started = time.perf_counter()
    names = _metric_names(metrics, batch)
    engine = _Engine(model, batch, names, seed, batch_size)
    per_text = engine.per_text(list(specs), progress)
    estimate, low, high = M.bootstrap_ci(per_text, n_boot=n_boot, seed=seed)
    first = [spec.sites[0] if len(spec.sites) == 1 else None for spec in specs]
    return AblationResult(
        provenance=Provenance.of(model, command or command_line(), seed),
        units=tuple(spec.label for spec in specs),
        kinds=tuple(site.kind if site else "set" for site in first),
        layers=tuple(spec.first_layer for spec in specs),
        heads=tuple(site.head if site else None for site in first),
        methods=tuple(spec.method for spec in specs),
        effects=tuple(spec.effect for spec in specs),
        metrics=names,
        values=estimate,
        ci_low=low,
        ci_high=high,
        per_text=per_text,
        clean_loss=engine.clean_loss,
        data=batch.description,
        n_texts=batch.n_texts,
        n_predictions=batch.n_scored,
        n_boot=n_boot,
        seconds=time.perf_counter() - started,
    )


def sweep(
    model: Model,
    batch: TokenBatch,
    unit: str = "block",
    method: str = "zero",
    effect: str = "total",
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    **options: Any,
) -> AblationResult:
    """Remove every single unit of one kind in turn (see `evaluate` for the options)."""
    specs = [Ablation((site,), method, effect) for site in units(model, unit, layers, heads)]
    return evaluate(model, batch, specs, **options)


def cumulative(
    model: Model,
    batch: TokenBatch,
    order: Sequence[Site],
    mode: str = "order",
    method: str = "zero",
    effect: str = "total",
    metrics: Sequence[str] | None = None,
    seed: int = 0,
    batch_size: int = 16,
    n_boot: int = 1000,
    progress: Progress | None = None,
    command: str | None = None,
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
    started = time.perf_counter()
    names = _metric_names(metrics, batch)
    engine = _Engine(model, batch, names, seed, batch_size)
    remaining, removed, steps = list(order), [], []
    if mode == "order":
        specs = [Ablation(tuple(order[: k + 1]), method, effect) for k in range(len(order))]
        steps = list(engine.per_text(specs, progress))
        removed = list(order)
    while mode == "greedy" and remaining:
        specs = [Ablation((*removed, site), method, effect) for site in remaining]
        per_text = engine.per_text(specs, progress)
        damage = M.damage(names[0], per_text[:, 0].mean(-1))
        best = int(torch.argmin(damage))
        removed.append(remaining.pop(best))
        steps.append(per_text[best])
    per_text = torch.stack(steps)
    estimate, low, high = M.bootstrap_ci(per_text, n_boot=n_boot, seed=seed)
    return CumulativeAblation(
        provenance=Provenance.of(model, command or command_line(), seed),
        mode=mode,
        units=tuple(site.label for site in removed),
        kinds=tuple(site.kind for site in removed),
        layers=tuple(site.layer for site in removed),
        heads=tuple(site.head for site in removed),
        method=method,
        effect=effect,
        metrics=names,
        values=estimate,
        ci_low=low,
        ci_high=high,
        per_text=per_text,
        data=batch.description,
        n_texts=batch.n_texts,
        n_predictions=batch.n_scored,
        n_boot=n_boot,
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
    name = metric or result.metrics[0]
    if name not in result.metrics:
        raise ValueError(f"metric {name!r} not in this result: choose from {', '.join(result.metrics)}")
    damage = M.damage(name, result.values[:, result.metrics.index(name)])
    return [int(i) for i in torch.argsort(damage, stable=True)]
