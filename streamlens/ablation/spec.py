"""What an ablation is and how it is applied: specs, units, replacement hooks, `ablated`.

See the package docstring for the methods and effects.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from streamlens import sites
from streamlens.data import TokenBatch
from streamlens.model import Model
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
                entries.setdefault(write.hook_name, []).append((rows, write, replacement))

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

    return [*((w.hook_name, keep(w)) for w in replacements), (sites.FINAL_STREAM, patch)]


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

    names = sorted({w.hook_name for w in writes} | {sites.resid_pre(layer) for layer in resid_layers})
    final = _run_to_final_stream(model, tokens, [(name, keep(name)) for name in names], None)
    resid = {layer: kept[sites.resid_pre(layer)] for layer in resid_layers}
    return resid, {w: _part(w, kept[w.hook_name]) for w in writes}, final


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
