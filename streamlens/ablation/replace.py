"""What takes a removed write's place: zero, the mean write, or a donor text's write.

`replacements` is the one switch over the methods; the engine and `ablated` both call it, with the
means and donor writes computed here from clean forwards (`capture`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from jaxtyping import Float

from streamlens import sites
from streamlens.ablation.spec import METHODS
from streamlens.data import TokenBatch
from streamlens.model import Model
from streamlens.sites import Site


def donor_rows(n_texts: int, seed: int = 0) -> torch.Tensor:
    """For resampling: text i takes its writes from text `donors[i]` [n_texts]; a seeded random
    single cycle through all texts, so no text is its own donor."""
    if n_texts < 2:
        raise ValueError(f"resample ablation needs at least 2 texts to swap writes between, got {n_texts}")
    order = torch.randperm(n_texts, generator=torch.Generator().manual_seed(seed))
    donors = torch.empty(n_texts, dtype=torch.long)
    donors[order] = order.roll(-1)
    return donors


def part(write: Site, tensor: torch.Tensor) -> torch.Tensor:
    """The write inside a captured tensor: [n, pos, d_model], or one head's z [n, pos, d_head]."""
    return tensor[:, :, write.head] if write.kind == "head" else tensor


def as_write(model: Model, write: Site, value: torch.Tensor) -> torch.Tensor:
    """A head's z [..., d_head] -> its write `z @ W_O[h]` [..., d_model]; other writes (and a scalar
    zero, whose write is zero) unchanged."""
    return value @ model.W_O(write.layer)[write.head] if write.kind == "head" and value.ndim else value


def capture(
    model: Model, tokens: torch.Tensor, writes: Sequence[Site], resid_layers: Sequence[int] = ()
) -> tuple[dict[int, torch.Tensor], dict[Site, torch.Tensor], Float[torch.Tensor, "n pos d_model"]]:
    """One clean forward to the final stream keeping resid_pre of `resid_layers` and `writes`.

    Returns (resid_pre {layer: [n, pos, d_model]}, writes {site: write or head z}, final stream).
    """
    kept: dict[str, torch.Tensor] = {}

    names = sorted({w.hook_name for w in writes} | {sites.resid_pre(layer) for layer in resid_layers})
    final = model.run_to(tokens, sites.FINAL_STREAM, [(name, sites.storing(kept, name)) for name in names])
    resid = {layer: kept[sites.resid_pre(layer)] for layer in resid_layers}
    return resid, {w: part(w, kept[w.hook_name]) for w in writes}, final


def means(model: Model, batch: TokenBatch, writes: Sequence[Site], batch_size: int) -> dict[Site, torch.Tensor]:
    """Mean of each write over every real position of every text, [d_model] (heads: [d_head])."""
    sums: dict[Site, torch.Tensor] = {}
    count = int(batch.valid.sum())
    for start in range(0, batch.n_texts, batch_size):
        rows = slice(start, start + batch_size)
        _, captured, _ = capture(model, batch.tokens[rows], writes)
        valid = batch.valid[rows]
        for write, value in captured.items():
            total = value[valid].double().sum(0)
            sums[write] = total if write not in sums else sums[write] + total
    return {write: (total / count).to(model.dtype) for write, total in sums.items()}


def donor_writes(model: Model, batch: TokenBatch, rows: slice, writes: Sequence[Site],
                 donors: torch.Tensor) -> dict[Site, torch.Tensor]:
    """The clean writes of each text's donor [n, pos, ...] at the same position (clamped to the
    donor's last real position)."""
    donor_ids = donors[rows].to(batch.tokens.device)
    _, captured, _ = capture(model, batch.tokens[donor_ids], writes)
    length = batch.tokens.shape[1]
    last = batch.valid[donor_ids].sum(-1, keepdim=True) - 1  # [n, 1]
    positions = torch.minimum(torch.arange(length, device=last.device).expand(len(donor_ids), length), last)
    out = {}
    for write, value in captured.items():
        index = positions.reshape(*positions.shape, *([1] * (value.ndim - 2))).expand_as(value)
        out[write] = value.gather(1, index)
    return out


def replacements(model: Model, method: str, writes: Sequence[Site], mean_writes: Mapping[Site, torch.Tensor] = {},
                 donor: Mapping[Site, torch.Tensor] = {}) -> dict[Site, torch.Tensor]:
    """The one switch over methods: each write's replacement.

    zero: a scalar 0; mean: `mean_writes[w]` [d_model] (heads: [d_head]); resample: `donor[w]`
    [n, pos, ...] (the donor texts' writes). The caller computes the means and donor writes it needs
    (`means`, `donor_writes`) and may cache them across calls.
    """
    if method == "zero":
        zero = torch.zeros((), dtype=model.dtype, device=model.device)
        return {write: zero for write in writes}
    if method == "mean":
        return {write: mean_writes[write] for write in writes}
    if method == "resample":
        return {write: donor[write] for write in writes}
    raise ValueError(f"unknown method {method!r}: choose from {', '.join(METHODS)}")
