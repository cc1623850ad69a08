"""Put replacements into a forward: the hooks of total and direct effects, and `ablated`.

`ablated` is the general, slow path (any forward inside the block runs ablated); the engine reuses
`replacing_hooks` for its fast partial forwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from streamlens import sites
from streamlens.ablation import replace as R
from streamlens.ablation.spec import Ablation
from streamlens.data import TokenBatch
from streamlens.model import Hook, Model
from streamlens.sites import Site


def replacing_hooks(variants: Sequence[dict[Site, torch.Tensor]], n_texts: int | None,
                    from_layer: int = 0) -> list[Hook]:
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


def direct_hooks(model: Model, replacements: dict[Site, torch.Tensor]) -> list[Hook]:
    """Capture each clean write; at the final norm's input add (replacement - write)."""
    captured: dict[Site, torch.Tensor] = {}

    def keep(write: Site):
        def hook(tensor: torch.Tensor, hook: Any) -> None:
            captured[write] = R.part(write, tensor)

        return hook

    def patch(stream: torch.Tensor, hook: Any) -> torch.Tensor:
        for write, replacement in replacements.items():
            stream = stream - R.as_write(model, write, captured[write]) + R.as_write(model, write, replacement)
        return stream

    return [*((w.hook_name, keep(w)) for w in replacements), (sites.FINAL_STREAM, patch)]


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
            replacements = _replacements_for(model, batch, spec, seed)
    if spec.effect == "total":
        hooks = replacing_hooks([replacements], None) if replacements else []
    else:
        hooks = direct_hooks(model, replacements)
    with model.hooks(hooks):
        yield


def _replacements_for(model: Model, batch: TokenBatch | None, spec: Ablation, seed: int) -> dict[Site, torch.Tensor]:
    """Compute the means or donor writes `spec.method` needs on the whole `batch`, then switch."""
    mean_writes: dict[Site, torch.Tensor] = {}
    donor: dict[Site, torch.Tensor] = {}
    if spec.method == "mean":
        assert batch is not None
        mean_writes = R.means(model, batch, spec.writes, batch.n_texts)
    elif spec.method == "resample":
        assert batch is not None
        donor = R.donor_writes(model, batch, slice(0, batch.n_texts), spec.writes,
                               R.donor_rows(batch.n_texts, seed))
    return R.replacements(model, spec.method, spec.writes, mean_writes, donor)


def _reference_batch(tokens: torch.Tensor) -> TokenBatch:
    """Plain token ids as a batch in which every position is real."""
    every = torch.ones_like(tokens, dtype=torch.bool)
    return TokenBatch(tokens, torch.full_like(tokens, -1), every, every, None, "reference texts")


def skip_removal_hooks(model: Model, removed: Sequence[int], streams: dict[int, torch.Tensor]) -> list[tuple[str, Any]]:
    """Hooks that remove the skip connection around the blocks in `removed`.

    Each `resid_pre L` [batch, pos, d_model] is kept in `streams[L]` (still in the autograd graph; the
    embedding is made a leaf that requires grad, so the stream is differentiable), and the
    `resid_post L` of each removed block becomes `resid_post L - resid_pre L = attn_out L + mlp_out L`:
    the block's writes alone, without the stream that entered it. Used by the gradient highway and the
    token-identity counterfactual.
    """

    def leaf(embedding: torch.Tensor, hook: Any) -> torch.Tensor:
        return embedding.detach().requires_grad_(True)

    def cut_skip(layer: int):
        def hook(resid_post: torch.Tensor, hook: Any) -> torch.Tensor:
            return resid_post - streams[layer]  # = attn_out + mlp_out: the block's writes alone

        return hook

    hooks = [(sites.EMBED, leaf)] + [(sites.resid_pre(layer), sites.storing(streams, layer)) for layer in range(model.n_layers)]
    return hooks + [(sites.resid_post(layer), cut_skip(layer)) for layer in removed]
