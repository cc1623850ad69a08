"""Swapping two adjacent blocks, and the ablated final streams themselves: the engine, extended.

A `Swap(L)` runs block L+1 before block L (Lad et al. 2024): the stream entering L goes through
block L+1, then block L, and the forward continues at L+2:

    resid_post' = B_L(B_{L+1}(resid_pre L)),   later blocks as usual.

`evaluate` here is `engine.evaluate` that also accepts `Swap` specs (the engine's chunks, cached
clean pass, scoring and bootstrap are reused; a swap's final stream comes from three `Model.run_to`
calls: block L+1 alone, block L alone, then the rest). `ablated_finals` hands out the engine's final
streams of total-effect ablations, for analyses that decompose them (self-repair).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float

from streamlens import sites
from streamlens.ablation import engine as E
from streamlens.ablation.options import EvalOptions
from streamlens.ablation.replace import as_write, replacements
from streamlens.ablation.spec import Ablation, Progress
from streamlens.data import TokenBatch
from streamlens.model import Model
from streamlens.results import AblationResult
from streamlens.sites import Site

SWAP = "swap"


@dataclass(frozen=True)
class Swap:
    """Run block `layer + 1` before block `layer` (the two blocks trade places; nothing is removed).

    Quacks like an `Ablation` where the engine looks (`sites`, `method`, `effect`, `writes`, `check`),
    so a `Swap` rides through the engine's loop; method "swap", effect "total".
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


class _Engine(E._Engine):
    """The ablation engine, also scoring `Swap` specs (each in a forward of its own)."""

    def _groups(self, specs: Sequence[Any]) -> list[list[int]]:
        swaps = [index for index, spec in enumerate(specs) if isinstance(spec, Swap)]
        others = [index for index, spec in enumerate(specs) if not isinstance(spec, Swap)]
        grouped = super()._groups([specs[index] for index in others])
        return [[index] for index in swaps] + [[others[i] for i in group] for group in grouped]

    def _evaluate(self, clean: E._Clean, rows: slice, specs: list[Any]) -> torch.Tensor:
        if not isinstance(specs[0], Swap):
            return super()._evaluate(clean, rows, specs)
        final = swapped_stream(self.model, clean.resid_pre[specs[0].layer], specs[0].layer)
        return self._score(clean, final[None], rows.stop - rows.start)


def evaluate(
    model: Model,
    batch: TokenBatch,
    specs: Sequence[Ablation | Swap],
    options: EvalOptions | None = None,
    *,
    progress: Progress | None = None,
    command: str | None = None,
    **changes: Any,
) -> AblationResult:
    """`ablation.evaluate` that also takes `Swap` specs (row method "swap", sites the two blocks)."""
    options = EvalOptions.of(options, **changes)
    started = time.perf_counter()
    engine = _Engine(model, batch, E._metric_names(options.metrics, batch), options.seed, options.batch_size)
    with options.torch_threads():
        per_text = engine.per_text(list(specs), progress)
    return AblationResult(
        **E._summary(model, batch, engine, options, per_text, command, started),
        sites=tuple(spec.sites for spec in specs), methods=tuple(spec.method for spec in specs),
        effects=tuple(spec.effect for spec in specs), clean_loss=engine.clean_loss,
    )


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
    from streamlens.ablation import replace as R
    from streamlens.ablation.spec import stream_order

    options = EvalOptions.of(options)
    for spec in specs:
        spec.check(model)
        if spec.effect != "total" or not spec.sites:
            raise ValueError(f"ablated final streams need a total effect of some units, got {spec.label} "
                             f"({spec.effect})")
    engine = _Engine(model, batch, ("loss_increase",), options.seed, options.batch_size)
    every = sorted({w for spec in specs for w in spec.writes}, key=stream_order)
    resampled = frozenset(w for spec in specs if spec.method == "resample" for w in spec.writes)
    means = sorted({w for spec in specs if spec.method == "mean" for w in spec.writes}, key=stream_order)
    with options.torch_threads(), torch.inference_mode():
        if means:
            engine._means.update(R.means(model, batch, means, engine.chunk))
        for rows in engine.chunks:
            clean = engine._clean(rows, frozenset(every), resampled)
            for group in engine._groups(specs):
                chosen = [specs[i] for i in group]
                reps = [replacements(model, s.method, s.writes, engine._means, clean.donor_writes) for s in chosen]
                finals = engine._total_finals(clean, chosen[0], reps)
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
