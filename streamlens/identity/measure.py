"""Token identity per stage: does the stream at a position still say which token sits there (and before it)?

For the stream at every stage (0 = embeddings, s = after block s - 1) and every held-out token:
- probe: a ridge probe (`identity.probe`) fitted on the other texts (leave one text out), top-1 and
  top-5 accuracy over the tokens seen in training, next to the majority baseline;
- embedding read-out: the rank of the token when the stream is read through the final norm and the
  embedding matrix, `final_norm(stream) @ W_E.T` (log10(1 + rank) is averaged);
- cosine of the stream with the token's own embedding row.
The same for the previous token (positions >= 1). Tokens are split into word starts (the token begins
with a non-letter/digit, e.g. a space, or follows one) and continuations (a letter or digit glued to
a letter or digit before it).

Counterfactual: with the skip around block L removed (`ablation.apply.skip_removal_hooks`: the stream leaving
block L is attn_out L + mlp_out L alone) the stream after L and the final stream are measured again.
Intervals: 95% bootstrap over texts (resampling whole texts, pooled over their tokens).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import einops
import torch

from streamlens import sites
from streamlens.data import TextWindows
from streamlens.ablation.apply import skip_removal_hooks
from streamlens.identity.probe import fit_probe
from streamlens.model import Model
from streamlens.recording import record
from streamlens.results import Provenance, command_line
from streamlens.results.identity import MEASURES, SPLITS, TARGETS, TokenIdentity
from streamlens.stats import bootstrap_indices, percentile_interval


def word_starts(model: Model, tokens: torch.Tensor) -> torch.Tensor:
    """[window, pos] bool: True where a token starts a word (see the module docstring)."""
    strings = [[model.decode(t) for t in row] for row in tokens.tolist()]
    starts = torch.ones(tokens.shape, dtype=torch.bool)
    for w, row in enumerate(strings):
        for p in range(1, len(row)):
            glued = row[p][:1].isalnum() and row[p - 1][-1:].isalnum()
            starts[w, p] = not glued
    return starts


def stage_features(model: Model, tokens: torch.Tensor, removed: int | None) -> dict[int, torch.Tensor]:
    """Stage -> stream [window, pos, d_model]: every stage for the clean model; with the skip around
    block `removed` cut, the stage after it and the last stage."""
    if removed is None:
        writes = record(model, tokens)
        return {stage: (writes.final if stage == model.n_layers else writes.stream(stage - 1 if stage else None))
                for stage in range(model.n_layers + 1)}
    streams: dict[int, torch.Tensor] = {}
    kept: dict[str, torch.Tensor] = {}

    after = sites.resid_post(removed)
    hooks = skip_removal_hooks(model, [removed], streams) + [(name, sites.storing(kept, name, copy=True))
                                                             for name in (after, sites.FINAL_STREAM)]
    with torch.no_grad():
        model.run(tokens, hooks=hooks)
    return {removed + 1: kept[after], model.n_layers: kept[sites.FINAL_STREAM]}


def _read_out(model: Model, stream: torch.Tensor, labels: torch.Tensor, chunk: int = 256) -> tuple[torch.Tensor, ...]:
    """(log10(1 + rank) through the embedding, cosine with the embedding), each [target, n], for the
    labels [target, n] (-1: none, NaN out) of the tokens at stream [n, d_model]: one read-out for all targets.

    rank = #{vocab entries scoring above the label} on `final_norm(stream) @ W_E.T` [n, vocab]. The
    scores and the comparison reuse two [chunk, vocab] buffers (fresh ones each chunk cost more in
    page faults than the comparison itself), and the rank is counted on every row, the rows without
    a label dropped after: the same integers as counting on the labelled rows alone.
    """
    W_E = model.W_E
    log_ranks = torch.full(labels.shape, float("nan"), dtype=torch.float64)
    cosines = log_ranks.clone()
    with torch.inference_mode():
        size = min(chunk, labels.shape[1])
        buffer = torch.empty(size, W_E.shape[0], dtype=W_E.dtype, device=W_E.device)  # [chunk, vocab]
        above = torch.empty(size, W_E.shape[0], dtype=torch.bool, device=W_E.device)
        for start in range(0, labels.shape[1], chunk):
            piece = stream[start: start + chunk]
            rows = piece.shape[0]
            scores = torch.matmul(model.final_norm(piece), W_E.T, out=buffer[:rows])  # [n, vocab]
            for t, label in enumerate(labels[:, start: start + chunk].to(piece.device)):
                has = label >= 0
                own = scores.gather(-1, label.clamp_min(0)[:, None])  # [n, 1]
                ranks = torch.gt(scores, own, out=above[:rows]).sum(-1)  # [n]
                where = torch.arange(start, start + len(label))[has.cpu()]
                log_ranks[t, where] = torch.log10(1.0 + ranks[has].double()).cpu()
                cosines[t, where] = torch.nn.functional.cosine_similarity(piece[has], W_E[label[has]], dim=-1).double().cpu()
    return log_ranks, cosines


def _interval(values: torch.Tensor, mask: torch.Tensor, text: torch.Tensor, n_texts: int, picks: torch.Tensor
              ) -> tuple[float, float, float]:
    """Pooled mean of values[mask] and its 95% bootstrap interval over texts.

    text: [n] index of each token's text in 0..n_texts-1; picks: [n_boot, n_texts] resampled text indices.
    """
    sums = torch.zeros(n_texts, dtype=torch.float64).index_add_(0, text[mask], values[mask])
    counts = torch.zeros(n_texts, dtype=torch.float64).index_add_(0, text[mask], torch.ones_like(values[mask]))
    if counts.sum() == 0:
        return (float("nan"),) * 3
    boots = sums[picks].sum(-1) / counts[picks].sum(-1).clamp_min(1)
    low, high = percentile_interval(boots)
    return float(sums.sum() / counts.sum()), float(low), float(high)


MAX_ALPHA = 1e3  # per training token on standardised features: beyond this the probe is shrunk to the majority


def check_alpha(alpha: float) -> float:
    """The ridge penalty must be a finite number in (0, MAX_ALPHA]: inf and nan give a probe of 0 everywhere."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha <= MAX_ALPHA:
        raise ValueError(f"--alpha {alpha!r} out of range: the ridge penalty per training token must be a number "
                         f"above 0 and at most {MAX_ALPHA:g} (default 0.1)")
    return float(alpha)


def _check_texts(windows: TextWindows, alpha: float) -> torch.Tensor:
    """The windows' texts (at least two: the probe is scored on texts it was not fitted on); alpha > 0."""
    texts = windows.text_of.unique()
    if len(texts) < 2:
        raise ValueError(f"token identity needs at least 2 texts (the probe is scored on texts it was not fitted on), "
                         f"got {len(texts)}")
    check_alpha(alpha)
    return texts


def _labels(model: Model, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Per token of the windows [window * pos]: its id, the previous token's id (-1 at a window's first
    position), and the masks of each split (all, word start, continuation)."""
    flat = einops.rearrange
    starts = flat(word_starts(model, tokens.cpu()), "w p -> (w p)")
    current = flat(tokens.cpu(), "w p -> (w p)")
    previous = torch.full_like(tokens.cpu(), -1)
    previous[:, 1:] = tokens[:, :-1].cpu()
    split_masks = {"all": torch.ones_like(starts), "word start": starts, "continuation": ~starts}
    return current, flat(previous, "w p -> (w p)"), split_masks


def _held_out_hits(features: torch.Tensor, labels: torch.Tensor, text: torch.Tensor, texts: torch.Tensor,
                   alpha: float) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The probe fitted leaving one text out at a time, scored on that text: per token [token] the
    top-1, top-5 and majority hits (float64) and whether the token was scorable (bool)."""
    has = labels >= 0  # -1: no such token (the previous token of a window's first position)
    hits = {name: torch.zeros(len(labels), dtype=torch.float64) for name in MEASURES[:3]}
    scorable = torch.zeros(len(labels), dtype=torch.bool)
    for held in texts:
        train, test = has & (text != held), has & (text == held)
        probe = fit_probe(features[train].cpu(), labels[train], alpha)
        top1, top5, majority, ok = probe.hits(features[test].cpu(), labels[test])
        for name, hit in zip(MEASURES[:3], (top1, top5, majority)):
            hits[name][test] = hit.double()
        scorable[test] = ok
    return hits, scorable


def token_identity(
    model: Model,
    windows: TextWindows,
    removed: Sequence[int] = (),
    alpha: float = 0.1,
    n_boot: int = 1000,
    seed: int = 0,
    command: str | None = None,
    on_condition: Callable[[], None] | None = None,
) -> TokenIdentity:
    """Measure token identity at every stage, for the model as it is and with single skips removed.

    Args:
        windows: token windows with their texts; the probe is fitted leaving one text out at a time,
            so at least two texts are needed.
        removed: blocks whose skip is removed, one condition each.
        alpha: ridge penalty per training token (on standardised features).
        n_boot: bootstrap resamples over texts.
        seed: the seed of the resamples.
    """
    removed = tuple(model.check_layer(layer) for layer in removed)
    texts = _check_texts(windows, alpha)
    tokens = windows.tokens
    flat = einops.rearrange
    text = flat(windows.text_of[:, None].expand(*tokens.shape), "w p -> (w p)")
    text_index = text.unique(return_inverse=True)[1]  # texts numbered 0..len(texts)-1
    picks = bootstrap_indices(len(texts), n_boot, seed)
    current, previous, split_masks = _labels(model, tokens)
    conditions = [None, *removed]
    shape = (len(conditions), len(TARGETS), len(SPLITS), model.n_layers + 1, len(MEASURES))
    value, low, high = (torch.full(shape, float("nan"), dtype=torch.float64) for _ in range(3))
    n_tokens = torch.zeros(len(TARGETS), len(SPLITS), dtype=torch.float64)
    for c, cut in enumerate(conditions):
        for stage, stream in stage_features(model, tokens, cut).items():
            features = flat(stream, "w p d -> (w p) d")
            log_ranks, cosines = _read_out(model, features, torch.stack([current, previous]))
            for t, labels in enumerate((current, previous)):
                has = labels >= 0
                hits, scorable = _held_out_hits(features, labels, text, texts, alpha)
                per_measure = {**hits, "log10_rank": log_ranks[t], "cosine": cosines[t]}
                for s, split in enumerate(SPLITS):
                    for m, measure in enumerate(MEASURES):
                        mask = split_masks[split] & (scorable if m < 3 else has)
                        value[c, t, s, stage, m], low[c, t, s, stage, m], high[c, t, s, stage, m] = _interval(
                            per_measure[measure].nan_to_num(0.0), mask, text_index, len(texts), picks)
                    if c == 0 and stage == 0:
                        n_tokens[t, s] = float((split_masks[split] & scorable).sum())
        if on_condition is not None:
            on_condition()
    return TokenIdentity(
        provenance=Provenance.of(model, command or command_line(), seed),
        conditions=tuple("clean" if cut is None else f"no skip {cut}" for cut in conditions),
        removed=tuple(-1 if cut is None else cut for cut in conditions),
        layer_labels=("embed", *(str(layer) for layer in range(model.n_layers))),
        targets=TARGETS, splits=SPLITS, measures=MEASURES,
        value=value, low=low, high=high, n_tokens=n_tokens, text=windows.description, alpha=float(alpha),
    )
