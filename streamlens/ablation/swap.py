"""Swapping two adjacent blocks, and the ablated final streams themselves: the engine, extended.

A `Swap(L)` runs block L+1 before block L (Lad et al. 2024): the stream entering L goes through
block L+1, then block L, and the forward continues at L+2:

    resid_post' = B_L(B_{L+1}(resid_pre L)),   later blocks as usual.

A `Swap` is an `engine.Intervention`: `ablation.evaluate` takes it like any spec (chunks, cached
clean pass, scoring, bootstrap, backends and progress are the engine's); its final stream comes
from three `Model.run_to` calls: block L+1 alone, block L alone, then the rest. `ablated_finals`
hands out the engine's final streams of total-effect ablations, for analyses that decompose them
(self-repair), from the engine's one loop `Engine.passes`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float

from streamlens import sites
from streamlens.ablation import engine as E
from streamlens.ablation import sweeps
from streamlens.ablation.options import EvalOptions
from streamlens.ablation.replace import as_write
from streamlens.ablation.spec import Ablation, Progress, stream_order
from streamlens.data import TokenBatch
from streamlens.model import Model
from streamlens.sites import Site

SWAP = "swap"


@dataclass(frozen=True)
class Swap:
    """Run block `layer + 1` before block `layer` (the two blocks trade places; nothing is removed).

    An `engine.Intervention` (method "swap", effect "total"): each swap is its own group, its
    final stream `swapped_stream` of the clean stream entering `layer`.
    """

    layer: int
    method: str = SWAP
    effect: str = "total"

    @property
    def sites(self) -> tuple[Site, Site]:
        return (Site("block", self.layer), Site("block", self.layer + 1))

    @property
    def writes(self) -> tuple[Site, ...]:
        return ()  # nothing is replaced

    @property
    def label(self) -> str:
        return f"swap {self.layer}<->{self.layer + 1}"

    @property
    def first_layer(self) -> int:
        return self.layer

    def check(self, model: Model) -> "Swap":
        model.check_layer(self.layer)
        if self.layer + 1 >= model.n_layers:
            raise ValueError(f"cannot swap block {self.layer} with block {self.layer + 1}: model has "
                             f"{model.n_layers} layers (swap layers 0-{model.n_layers - 2})")
        return self

    def group_key(self) -> int:
        return self.layer

    def finals(self, engine: E.Engine, clean: E.Clean, group: Sequence["Swap"]) -> torch.Tensor:
        """[k, n, pos, d_model]: the swapped final stream, once per (equal) swap of the group."""
        final = swapped_stream(engine.model, clean.resid_pre[self.layer], self.layer)
        return final.expand(len(group), *final.shape)


def swapped_stream(model: Model, resid_pre: Float[torch.Tensor, "n pos d_model"], layer: int) -> torch.Tensor:
    """The final stream [n, pos, d_model] when blocks `layer` and `layer + 1` trade places, from the
    clean stream entering `layer`."""
    after_next = model.run_to(resid_pre, _after(model, layer + 1), start_at_layer=layer + 1)
    after_both = model.run_to(after_next, sites.resid_post(layer), start_at_layer=layer)
    if layer + 2 >= model.n_layers:
        return after_both
    return model.run_to(after_both, sites.FINAL_STREAM, start_at_layer=layer + 2)


def _after(model: Model, layer: int) -> str:
    return sites.FINAL_STREAM if layer == model.n_layers - 1 else sites.resid_post(layer)


# `ablation.evaluate` takes swaps like any spec; the name stays for the layer study's callers
evaluate = sweeps.evaluate


@dataclass(frozen=True)
class AblatedChunk:
    """One chunk of texts with the clean and the ablated final streams of some specs.

    Shapes: `clean_final` [n, pos, d_model]; `finals` [spec, n, pos, d_model]; `removed` and
    `replacement` [spec, n, pos, d_model]: the removed writes summed, and what took their place
    (as writes in the stream, heads projected through W_O).
    """

    rows: slice
    clean_final: torch.Tensor
    finals: torch.Tensor
    removed: torch.Tensor
    replacement: torch.Tensor


def ablated_finals(model: Model, batch: TokenBatch, specs: Sequence[Ablation], options: EvalOptions | None = None,
                   progress: Progress | None = None) -> Iterator[tuple[list[int], AblatedChunk]]:
    """The engine's final streams of total-effect `specs`, group by group, chunk by chunk of texts
    (self-repair decomposes them). Yields (indices into `specs`, `AblatedChunk` of those specs);
    variants restarting at the same layer share a forward, as in `evaluate`."""
    options = EvalOptions.of(options)
    for spec in specs:
        spec.check(model)
        if not isinstance(spec, Ablation) or spec.effect != "total" or not spec.sites:
            raise ValueError(f"ablated final streams need a total effect of some units, got {spec.label} "
                             f"({spec.effect})")
    engine = E.Engine(model, batch, ("loss_increase",), options.seed, options.batch_size)
    every = sorted({w for spec in specs for w in spec.writes}, key=stream_order)  # the removed clean writes
    with options.torch_threads():
        for group, clean, rows in engine.passes(specs, keep=every):
            chosen = [specs[i] for i in group]
            reps = [engine.replacements(clean, spec) for spec in chosen]
            finals = engine.finals(clean, chosen)
            removed = torch.stack([_summed(model, clean.writes, s.writes, clean.final) for s in chosen])
            replacement = torch.stack([_summed(model, r, s.writes, clean.final) for s, r in zip(chosen, reps)])
            yield group, AblatedChunk(rows, clean.final, finals, removed, replacement)
            if progress is not None:
                progress(len(group))


def _summed(model: Model, values: dict[Site, torch.Tensor], writes: Sequence[Site], like: torch.Tensor) -> torch.Tensor:
    """The writes `writes` (heads projected through W_O) summed, broadcast to `like` [n, pos, d_model]."""
    total = torch.zeros_like(like)
    for write in writes:
        total = total + as_write(model, write, values[write])
    return total
