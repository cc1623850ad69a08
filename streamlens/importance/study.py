"""The whole layer study on one model: removals, spans, swaps, sublayers, self-repair, verdicts.

Every damage number is the ablation engine's (`ablation.evaluate` for single units, spans and
`ablation.swap.Swap`s, `ablation.cumulative`), so all of them carry 95% bootstrap CIs over texts,
and all of them run on the given backend (Ray workers, a checkpoint); self-repair, which decomposes
the ablated streams themselves, runs in this process.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from streamlens import ablation as A
from streamlens.ablation.engine import Backend
from streamlens.ablation.swap import Swap
from streamlens.data import TokenBatch
from streamlens.model import Model
from streamlens.results import AblationResult, CumulativeAblation, command_line
from streamlens.results.layers import LayerStudy, StreamScores
from streamlens.sites import Site
from streamlens.importance.repair import self_repair
from streamlens.importance.scores import spearman_ci, stream_scores
from streamlens.importance.verdict import verdicts

METRICS = ("loss_increase", "top1_agreement")
Stage = Callable[[str, int], None]  # (what starts, how many evaluations it runs)


@dataclass(frozen=True)
class StudyConfig:
    """What the study measures beyond the defaults.

    Attributes:
        span_sizes: sizes n whose every contiguous span is measured (the truly cheapest span);
            None: ceil(L/8), ceil(L/4), floor(L/2). The span the angular distance picks is measured
            for every n = 1 .. L/2.
        greedy_pool: greedy cumulative removal per kind runs over this many units, the least
            damaging alone (U units cost U(U+1)/2 evaluations; He et al. rank once, one-shot).
        repair_layers: layers whose heads get the self-repair split (None: the last third);
            every attention and MLP sublayer always does.
        options: the engine's options (metrics are the study's own: loss increase, top-1 agreement).
    """

    span_sizes: tuple[int, ...] | None = None
    greedy_pool: int = 8
    repair_layers: tuple[int, ...] | None = None
    options: A.EvalOptions = field(default_factory=A.EvalOptions)

    def sizes(self, n_layers: int) -> tuple[int, ...]:
        if self.span_sizes is not None:
            return tuple(self.span_sizes)
        half = max(1, n_layers // 2)
        return tuple(sorted({min(half, math.ceil(n_layers / 8)), min(half, math.ceil(n_layers / 4)), half}))

    def heads_layers(self, n_layers: int) -> tuple[int, ...]:
        if self.repair_layers is not None:
            return tuple(self.repair_layers)
        return tuple(range(n_layers - math.ceil(n_layers / 3), n_layers))

    def check(self, model: Model) -> "StudyConfig":
        n = model.n_layers
        if n < 2:
            raise ValueError(f"the layer study needs at least 2 layers, model has {n}")
        for size in self.sizes(n):
            if not 1 <= size <= n:
                raise ValueError(f"span size {size} out of range: model has {n} layers (sizes 1-{n})")
        for layer in self.heads_layers(n):
            model.check_layer(layer)
        if self.greedy_pool < 1:
            raise ValueError(f"greedy pool {self.greedy_pool} must be at least 1")
        return self


def span_ablation(start: int, size: int) -> A.Ablation:
    """Remove blocks start .. start+size-1 (their writes zeroed: the stream skips the span)."""
    return A.Ablation(tuple(Site("block", layer) for layer in range(start, start + size)), "zero", "total")


def predicted_spans(scores: StreamScores, max_size: int | None = None) -> tuple[tuple[int, int], ...]:
    """(n, start) for n = 1 .. max_size (default L/2): the span whose input and output streams are
    closest in angular distance (mean over texts), Gromov et al.'s choice."""
    n_layers = scores.n_layers
    out = []
    for size in range(1, (max_size or max(1, n_layers // 2)) + 1):
        distance = scores.angular_distance[size - 1, : n_layers - size + 1].mean(-1)
        out.append((size, int(torch.argmin(distance))))
    return tuple(out)


def stage_sizes(model: Model, config: StudyConfig) -> dict[str, int]:
    """Evaluations per stage (per chunk of texts), for progress bars."""
    n = model.n_layers
    pool = min(config.greedy_pool, n)
    spans = len(_span_keys(tuple((size, 0) for size in range(1, n // 2 + 1)), config.sizes(n), n))
    return {"blocks, attention, MLP": 3 * n, "swaps": n - 1, "spans": spans,
            "greedy": 2 * A.cumulative_evaluations(pool, "greedy"),
            "self-repair": 2 * n + len(config.heads_layers(n)) * model.n_heads}


def layer_study(model: Model, batch: TokenBatch, config: StudyConfig | None = None, *,
                stage: Stage | None = None, progress: A.spec.Progress | None = None,
                command: str | None = None, backend: Backend | None = None) -> LayerStudy:
    """Run the study (see the package docstring); `stage(name, evaluations)` announces each part,
    `progress(k)` counts finished evaluations (per chunk of texts); `backend`: where the sweeps
    run (`ablation.placement.choose_backend`; None: here)."""
    config = (config or StudyConfig()).check(model)
    options = A.EvalOptions.of(config.options, metrics=METRICS)
    command = command or command_line()
    announce = stage or (lambda name, total: None)
    started = time.perf_counter()
    n = model.n_layers
    sizes = stage_sizes(model, config)

    with options.torch_threads():
        scores = stream_scores(model, batch, options.batch_size, command)
    announce("blocks, attention, MLP", sizes["blocks, attention, MLP"])
    single = {kind: [A.Ablation((site,), "zero", "total") for site in A.units(model, kind)] for kind in ("block", "attn", "mlp")}
    run = dict(progress=progress, command=command, backend=backend)
    every = A.evaluate(model, batch, [s for kind in single for s in single[kind]], options, **run)
    blocks, attn, mlp = (_rows(every, range(k * n, (k + 1) * n)) for k in range(3))

    announce("swaps", sizes["swaps"])
    swaps = A.evaluate(model, batch, [Swap(layer) for layer in range(n - 1)], options, **run)

    predicted = predicted_spans(scores)
    span_specs = [span_ablation(start, size) for size, start in _span_keys(predicted, config.sizes(n), n)]
    announce("spans", len(span_specs))
    spans = _join(blocks, A.evaluate(model, batch, span_specs, options, **run))

    announce("greedy", sizes["greedy"])
    greedy: dict[str, CumulativeAblation] = {}
    for kind, result in (("attn", attn), ("mlp", mlp)):
        pool = [Site(kind, layer) for layer in A.by_damage(result)[: config.greedy_pool]]
        greedy[kind] = A.cumulative(model, batch, pool, "greedy", "zero", "total", options, **run)

    announce("self-repair", sizes["self-repair"])
    units = [Site(kind, layer) for layer in range(n) for kind in ("attn", "mlp")]
    units += [Site("head", layer, head) for layer in config.heads_layers(n) for head in range(model.n_heads)]
    repair = self_repair(model, batch, units, options, progress=progress, command=command)

    loss = blocks.metrics.index("loss_increase")
    damage = blocks.per_text[:, loss]
    correlations = {
        "block influence": spearman_ci(scores.block_influence, damage, options.n_boot, options.seed),
        "angular distance (n=1)": spearman_ci(scores.angular_distance[0], damage, options.n_boot, options.seed),
        "relative norm": spearman_ci(scores.relative_norm[0], damage, options.n_boot, options.seed),
    }
    study = dict(model=model.info.name, n_layers=n, scores=scores, blocks=blocks, attn=attn, mlp=mlp, swaps=swaps,
                 spans=spans, predicted_spans=predicted, greedy=greedy, repair=repair, correlations=correlations)
    return LayerStudy(**study, verdicts=verdicts(study, options), seconds=time.perf_counter() - started)


def _span_keys(predicted: tuple[tuple[int, int], ...], sizes: tuple[int, ...], n_layers: int) -> list[tuple[int, int]]:
    """(size, start) of the spans to measure beyond single blocks: the predicted ones and every span of `sizes`."""
    keys = [(size, start) for size, start in predicted if size > 1]
    keys += [(size, start) for size in sizes if size > 1 for start in range(n_layers - size + 1)]
    return list(dict.fromkeys(keys))


def _rows(result: AblationResult, rows) -> AblationResult:
    """The rows `rows` of a result (same data, CIs and provenance)."""
    index = torch.as_tensor(list(rows))
    return AblationResult(
        provenance=result.provenance, metrics=result.metrics, values=result.values[index], ci_low=result.ci_low[index],
        ci_high=result.ci_high[index], per_text=result.per_text[index], data=result.data, n_texts=result.n_texts,
        n_predictions=result.n_predictions, n_boot=result.n_boot, seconds=result.seconds,
        sites=tuple(result.sites[i] for i in index.tolist()), methods=tuple(result.methods[i] for i in index.tolist()),
        effects=tuple(result.effects[i] for i in index.tolist()), clean_loss=result.clean_loss)


def _join(first: AblationResult, second: AblationResult) -> AblationResult:
    """Rows of `first` then `second` (same batch and options)."""
    return AblationResult(
        provenance=second.provenance, metrics=second.metrics, values=torch.cat([first.values, second.values]),
        ci_low=torch.cat([first.ci_low, second.ci_low]), ci_high=torch.cat([first.ci_high, second.ci_high]),
        per_text=torch.cat([first.per_text, second.per_text]), data=second.data, n_texts=second.n_texts,
        n_predictions=second.n_predictions, n_boot=second.n_boot, seconds=first.seconds + second.seconds,
        sites=first.sites + second.sites, methods=first.methods + second.methods, effects=first.effects + second.effects,
        clean_loss=second.clean_loss)
