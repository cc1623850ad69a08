"""How much an ablation hurts: per-prediction metrics, per-text means and bootstrap intervals.

Metrics (ablated model q against the clean model p, at each scored prediction):
- `loss_increase`: next-token cross-entropy of q minus that of p (nats);
- `kl`: KL(p || q) = sum_v p_v (log p_v - log q_v) (nats);
- `top1_agreement`: 1 where argmax q == argmax p, else 0;
- `target_logit_change`, `target_prob_change`: q's logit / probability of the target minus p's
  (prompt sets with targets only).

Two routes give the same numbers. `token_metrics_from_logits` is the textbook one (full logits of
both models). The engine never materialises the [N, d_vocab] logits of an ablated run: it passes
the normalised final stream to `logit_stats`, which unembeds in vocabulary chunks and keeps only
logsumexp, argmax, the label and target logits and E_p[logit] (= h . (W_U p) + b_U . p, so the
clean distribution p enters through one [N, d_model] vector). `token_metrics` turns two such
`LogitStats` into the metrics; identical inputs give exactly zero change and agreement one.

Uncertainty: `per_text_means` averages a metric over each text's scored predictions; the point
estimate is the mean over texts and `stats.bootstrap_mean_ci` resamples *texts* (windows or prompts) with
replacement, so predictions of one text are never treated as independent.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from streamlens import stats

TEXT_METRICS = ("loss_increase", "kl", "top1_agreement")
TARGET_METRICS = ("target_logit_change", "target_prob_change")
METRICS = TEXT_METRICS + TARGET_METRICS
UNITS = {"loss_increase": "nats", "kl": "nats", "top1_agreement": "fraction", "target_logit_change": "logit",
         "target_prob_change": "probability"}


# +1: larger is worse (more damage); -1: smaller is worse
DAMAGE_SIGN = {"loss_increase": 1, "kl": 1, "top1_agreement": -1, "target_logit_change": -1, "target_prob_change": -1}


def damage(name: str, values: torch.Tensor) -> torch.Tensor:
    """Values of metric `name` oriented so that larger always means more damage."""
    return DAMAGE_SIGN[name] * values


def check_metrics(names: list[str] | tuple[str, ...], has_targets: bool) -> tuple[str, ...]:
    """Validate metric names; target metrics need a prompt set with targets."""
    for name in names:
        if name not in METRICS:
            raise ValueError(f"unknown metric {name!r}: choose from {', '.join(METRICS)}")
        if name in TARGET_METRICS and not has_targets:
            raise ValueError(f"metric {name!r} needs a prompt set with targets (e.g. --data prompts)")
    if not names:
        raise ValueError(f"no metric chosen: choose from {', '.join(METRICS)}")
    return tuple(names)


def default_metrics(has_targets: bool) -> tuple[str, ...]:
    return METRICS if has_targets else TEXT_METRICS


@dataclass(frozen=True)
class LogitStats:
    """What the metrics need from the logits z at N predictions (all shapes [N], float64 but top1).

    `reference_mean_logit` is E_{v~p}[z_v] under the clean distribution p of the same prediction.
    """

    logsumexp: torch.Tensor
    top1: torch.Tensor
    label_logit: torch.Tensor
    reference_mean_logit: torch.Tensor
    target_logit: torch.Tensor | None


@dataclass(frozen=True)
class CleanReference:
    """The clean distribution p, reduced to what `logit_stats` needs: E_p over the unembedding.

    Shapes: direction [N, d_model] = W_U p (float64); bias [N] = b_U . p (float64).
    """

    direction: torch.Tensor
    bias: torch.Tensor


def logit_stats(
    normed: torch.Tensor,
    W_U: torch.Tensor,
    b_U: torch.Tensor,
    labels: torch.Tensor,
    targets: torch.Tensor | None,
    reference: CleanReference | None,
    chunk: int = 8192,
) -> tuple[LogitStats, CleanReference]:
    """Unembed `normed` [N, d_model] chunk by chunk and keep only the summaries.

    Args:
        normed: final stream after the final norm, [N, d_model].
        W_U, b_U: unembedding [d_model, d_vocab] and its bias [d_vocab].
        labels: next token of each prediction [N] (>= 0). targets: [N] or None.
        reference: the clean distribution; None when `normed` *is* the clean run (then p is built
            from these logits in a second pass and returned).
        chunk: vocabulary entries per matmul (bounds memory at N x chunk).

    Returns:
        (stats, reference): `reference` is the one given, or the new clean one.
    """
    n, vocab = normed.shape[0], W_U.shape[1]
    device = normed.device
    running_max = torch.full((n,), -torch.inf, dtype=torch.float64, device=device)
    running_sum = torch.zeros(n, dtype=torch.float64, device=device)
    top1 = torch.zeros(n, dtype=torch.long, device=device)
    label_logit = torch.zeros(n, dtype=torch.float64, device=device)
    target_logit = None if targets is None else torch.zeros(n, dtype=torch.float64, device=device)
    buffer = torch.empty(n, min(chunk, vocab), dtype=normed.dtype, device=device)
    rows = torch.arange(n, device=device)
    for start in range(0, vocab, chunk):
        stop = min(start + chunk, vocab)
        logits = torch.addmm(b_U[start:stop], normed, W_U[:, start:stop], out=_head(buffer, stop - start))
        _pick(logits, labels, start, stop, rows, label_logit)
        if targets is not None:
            _pick(logits, targets, start, stop, rows, target_logit)
        chunk_max, chunk_arg = logits.max(-1)
        chunk_max64 = chunk_max.double()
        # strictly greater: the first maximal id wins, as in torch.argmax over the whole vocabulary
        top1 = torch.where(chunk_max64 > running_max, chunk_arg + start, top1)
        new_max = torch.maximum(running_max, chunk_max64)
        chunk_sum = logits.sub_(chunk_max.unsqueeze(-1)).exp_().sum(-1).double()
        running_sum = running_sum * torch.exp(running_max - new_max) + chunk_sum * torch.exp(chunk_max64 - new_max)
        running_max = new_max
    logsumexp = running_max + running_sum.log()
    if reference is None:
        reference = _clean_reference(normed, W_U, b_U, logsumexp, chunk, buffer)
    mean_logit = (normed.double() * reference.direction).sum(-1) + reference.bias
    return LogitStats(logsumexp, top1, label_logit, mean_logit, target_logit), reference


def _head(buffer: torch.Tensor, width: int) -> torch.Tensor:
    """A contiguous [N, width] view on the start of `buffer` (reused: no new allocation)."""
    return buffer.view(-1)[: buffer.shape[0] * width].view(buffer.shape[0], width)


def _pick(logits: torch.Tensor, ids: torch.Tensor, start: int, stop: int, rows: torch.Tensor,
          into: torch.Tensor) -> None:
    inside = (ids >= start) & (ids < stop)
    into[inside] = logits[rows[inside], ids[inside] - start].double()


def _clean_reference(normed, W_U, b_U, logsumexp, chunk, buffer) -> CleanReference:
    """Second pass over the vocabulary: W_U p and b_U . p for the clean distribution p."""
    direction = torch.zeros(normed.shape[0], W_U.shape[0], dtype=torch.float64, device=normed.device)
    bias = torch.zeros(normed.shape[0], dtype=torch.float64, device=normed.device)
    lse = logsumexp.to(normed.dtype).unsqueeze(-1)
    for start in range(0, W_U.shape[1], chunk):
        stop = min(start + chunk, W_U.shape[1])
        logits = torch.addmm(b_U[start:stop], normed, W_U[:, start:stop], out=_head(buffer, stop - start))
        probs = logits.sub_(lse).exp_()
        direction += (probs @ W_U[:, start:stop].T).double()
        bias += (probs @ b_U[start:stop]).double()
    return CleanReference(direction, bias)


def token_metrics(clean: LogitStats, ablated: LogitStats, names: tuple[str, ...]) -> torch.Tensor:
    """Per-prediction metrics [metric, N] (float64) from clean and ablated `LogitStats`."""
    out = []
    for name in names:
        if name == "loss_increase":
            value = (ablated.logsumexp - ablated.label_logit) - (clean.logsumexp - clean.label_logit)
        elif name == "kl":  # E_p[log p] - E_p[log q], with log p = z_p - lse_p
            value = (clean.reference_mean_logit - clean.logsumexp) - (ablated.reference_mean_logit - ablated.logsumexp)
        elif name == "top1_agreement":
            value = (ablated.top1 == clean.top1).double()
        elif name == "target_logit_change":
            value = ablated.target_logit - clean.target_logit
        elif name == "target_prob_change":
            value = (ablated.target_logit - ablated.logsumexp).exp() - (clean.target_logit - clean.logsumexp).exp()
        else:
            raise ValueError(f"unknown metric {name!r}: choose from {', '.join(METRICS)}")
        out.append(value)
    return torch.stack(out)


def token_metrics_from_logits(clean_logits: torch.Tensor, ablated_logits: torch.Tensor, labels: torch.Tensor,
                              targets: torch.Tensor | None, names: tuple[str, ...]) -> torch.Tensor:
    """The same metrics [metric, N] straight from full logits [N, d_vocab] (reference route)."""
    log_p = clean_logits.double().log_softmax(-1)
    log_q = ablated_logits.double().log_softmax(-1)
    rows = torch.arange(labels.shape[0], device=labels.device)
    out = []
    for name in names:
        if name == "loss_increase":
            value = log_p[rows, labels] - log_q[rows, labels]
        elif name == "kl":
            value = (log_p.exp() * (log_p - log_q)).sum(-1)
        elif name == "top1_agreement":
            value = (ablated_logits.argmax(-1) == clean_logits.argmax(-1)).double()
        elif name == "target_logit_change":
            value = (ablated_logits[rows, targets] - clean_logits[rows, targets]).double()
        elif name == "target_prob_change":
            value = log_q[rows, targets].exp() - log_p[rows, targets].exp()
        else:
            raise ValueError(f"unknown metric {name!r}: choose from {', '.join(METRICS)}")
        out.append(value)
    return torch.stack(out)


# ----- per text and bootstrap -------------------------------------------------------------------
def per_text_means(values: torch.Tensor, text_index: torch.Tensor, n_texts: int) -> torch.Tensor:
    """Average [..., N] prediction values within each text -> [..., n_texts].

    `text_index` [N] says which text each prediction belongs to; every text needs one prediction.
    """
    counts = torch.bincount(text_index, minlength=n_texts).to(values.dtype)
    sums = torch.zeros(*values.shape[:-1], n_texts, dtype=values.dtype, device=values.device)
    sums.index_add_(-1, text_index, values)
    return sums / counts


def metric_index(metrics: tuple[str, ...], name: str | None) -> int:
    """Index of metric `name` (None: the first) in a result's `metrics`; a ValueError names the valid ones."""
    chosen = name or metrics[0]
    if chosen not in metrics:
        raise ValueError(f"metric {chosen!r} not in this result: choose from {', '.join(metrics)}")
    return metrics.index(chosen)


# the bootstrap over texts lives in `streamlens.stats`; these names stay for notebooks and the README
bootstrap_indices = stats.bootstrap_indices
bootstrap_ci = stats.bootstrap_mean_ci
