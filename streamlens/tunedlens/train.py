"""Training the tuned lens (Belrose et al. 2023): one affine translator per layer, identity-initialised.

For the stream h_s at stage s (0 = embeddings, s = after block s - 1) the translator is
T_s(h) = h + h @ A_s + b_s with A_s = 0, b_s = 0 at the start, so training starts from the logit lens.
The loss is the sum over stages of the mean KL(final || lens_s) over a mini-batch of tokens, where
lens_s = log_softmax(final_norm(T_s(h_s)) @ W_U + b_U) and final is the model's own output. The model
is frozen: its streams are recorded once and only the translators learn (Adam).

Reproducible: the mini-batches come from a generator seeded with `seed`; with the same seed, data,
thread count and torch build the weights are bit-identical.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import einops
import torch

from streamlens.model import Model
from streamlens.recording import record
from streamlens.results import Provenance, command_line
from streamlens.results.tunedlens import TunedLens


MAX_LR = 0.1  # Adam steps above this move identity-initialised translators far past the logit lens: divergence
DIVERGED = 1.5  # a run whose last losses average above this multiple of its first loss has diverged
ROWS_PER_PASS = 256  # stages x tokens read through one unembedding matmul ([256, vocab]: 50 MB for SmolLM2)


def stages_per_pass(n_tokens: int) -> int:
    """How many stages of `n_tokens` tokens each share one unembedding (at least one)."""
    return max(1, ROWS_PER_PASS // n_tokens)


class LensDivergedError(ValueError):
    """Training made the lens worse than the logit lens it started from (or the loss is not finite)."""


def check_lr(lr: float) -> float:
    """The Adam learning rate must be a number in (0, MAX_LR]."""
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr <= MAX_LR:
        raise ValueError(f"--lr {lr!r} out of range: the Adam learning rate must be above 0 and at most {MAX_LR:g} "
                         f"(default 3e-3)")
    return float(lr)


def check_converged(losses: list[float], lr: float) -> None:
    """Raise LensDivergedError when the loss is not finite or ends above DIVERGED x where it started.

    Training starts from the logit lens (identity translators), so a run that ends worse than its
    first step has made the lens worse than no training: it is no lens to save.
    """
    if not losses:
        return
    tail = losses[-max(1, len(losses) // 10):]
    end = sum(tail) / len(tail)
    if not all(map(math.isfinite, losses)) or end > DIVERGED * losses[0]:
        raise LensDivergedError(f"training diverged with --lr {lr:g}: the loss went from {losses[0]:.3g} at the first "
                                f"step to {end:.3g} at the end; nothing was written. Use a smaller --lr than {lr:g}")


def stage_streams(model: Model, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Streams at every stage, flattened over tokens: ([stage, token, d_model], final [token, d_model]).

    Stage 0 is the embeddings, stage s the stream after block s - 1 (s < n_layers); final is the stream
    after the last block (before the final norm).
    """
    writes = record(model, tokens)
    stages = [writes.stream(None if stage == 0 else stage - 1) for stage in range(model.n_layers)]
    flat = einops.rearrange(torch.stack(stages), "stage batch pos d_model -> stage (batch pos) d_model")
    final = einops.rearrange(writes.final, "batch pos d_model -> (batch pos) d_model")
    return flat.clone(), final.clone()  # clones are ordinary tensors that autograd may save


def kl_from_final(final_logprobs: torch.Tensor, lens_logprobs: torch.Tensor,
                  final_probs: torch.Tensor | None = None) -> torch.Tensor:
    """KL(final || lens) per token, [..., vocab] x2 -> [...] (nats); final_probs: final_logprobs.exp(),
    when the caller has it already (the same numbers)."""
    probs = final_logprobs.exp() if final_probs is None else final_probs
    return (probs * (final_logprobs - lens_logprobs)).sum(-1)


def train_tuned_lens(
    model: Model,
    tokens: torch.Tensor,
    steps: int = 80,
    lr: float = 3e-3,
    batch_tokens: int = 24,
    seed: int = 0,
    text: str = "",
    command: str | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> TunedLens:
    """Train one translator per stage on `tokens` [batch, pos] (every position is a training token).

    Args:
        steps: Adam updates; each sees `batch_tokens` tokens, the same tokens at every stage.
        lr: Adam learning rate, in (0, MAX_LR].
        seed: seeds the order of the mini-batches.
        on_step: called with (step, loss) after every update (progress bars).

    Raises:
        LensDivergedError: the loss is not finite, or ends above DIVERGED x its first value.
    """
    model.check_tokens(tokens)
    for name, value, low in (("steps", steps, 0), ("batch_tokens", batch_tokens, 1), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} {value!r} out of range: must be a whole number >= {low}")
    check_lr(lr)
    started = time.perf_counter()
    streams, final = stage_streams(model, tokens)
    n_tokens = streams.shape[1]
    weights, biases = _identity_translators(streams)
    optimiser = torch.optim.Adam([*weights, *biases], lr=lr)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(n_tokens, generator=generator)
    cursor, losses = 0, []
    for step in range(steps):
        if cursor + batch_tokens > n_tokens:  # a new pass over the tokens, in a new order
            order, cursor = torch.randperm(n_tokens, generator=generator), 0
        chosen = order[cursor: cursor + batch_tokens].to(streams.device)
        cursor += batch_tokens
        with torch.no_grad():
            final_logprobs = model.final_logits(final[chosen]).log_softmax(-1)
        optimiser.zero_grad(set_to_none=False)
        total = _backward(model, streams[:, chosen], final_logprobs, weights, biases)
        optimiser.step()
        losses.append(total)
        if on_step is not None:
            on_step(step, total)
    check_converged(losses, lr)
    return TunedLens(
        provenance=Provenance.of(model, command or command_line(), seed),
        weight=torch.stack(weights).detach().cpu(), bias=torch.stack(biases).detach().cpu(),
        layer_labels=("embed", *(str(layer) for layer in range(model.n_layers))),
        steps=steps, lr=float(lr), batch_tokens=batch_tokens, seed=seed, text=text, n_tokens=n_tokens,
        seconds=time.perf_counter() - started, threads=torch.get_num_threads(),
        train_loss=torch.tensor(losses, dtype=torch.float64),
    )


def _identity_translators(streams: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Zero weight [d_model, d_model] and bias [d_model] leaves, one of each per stage of streams [stage, token, d_model].

    One leaf per stage: a stage's backward touches its own gradient only (slices of one [stage, d_model,
    d_model] leaf each got a zero-filled gradient of the whole); Adam is elementwise, so the updates are
    those of a single leaf.
    """
    n_stages, _, d_model = streams.shape
    like = dict(dtype=streams.dtype, device=streams.device, requires_grad=True)
    return ([torch.zeros(d_model, d_model, **like) for _ in range(n_stages)],
            [torch.zeros(d_model, **like) for _ in range(n_stages)])


def _backward(model: Model, streams: torch.Tensor, final_logprobs: torch.Tensor, weights: list[torch.Tensor],
              biases: list[torch.Tensor]) -> float:
    """Accumulate the gradient of the loss on one mini-batch (streams [stage, token, d_model]); returns the loss.

    The loss is sum over stages of mean KL(final || lens_s). `stages_per_pass` stages at a time share one
    graph: their translated streams are stacked [(stage token), d_model] so the unembedding is one
    matmul (each row's numbers are those of its stage alone: rows of a matmul do not mix), and each
    stage's mean KL is taken on its own rows, as when the stages ran one by one.
    """
    n_stages, n_tokens = streams.shape[:2]
    final_probs = final_logprobs.exp()  # [token, vocab], the same for every stage
    losses: list[float] = []
    with torch.enable_grad():
        per_pass = stages_per_pass(n_tokens)
        for first in range(0, n_stages, per_pass):
            stages = range(first, min(first + per_pass, n_stages))
            translated = torch.cat([streams[s] + streams[s] @ weights[s] + biases[s] for s in stages])
            lens_logprobs = model.final_logits(translated).log_softmax(-1)  # [(stage token), vocab]
            lens_logprobs = einops.rearrange(lens_logprobs, "(stage token) vocab -> stage token vocab", token=n_tokens)
            kl = kl_from_final(final_logprobs, lens_logprobs, final_probs)  # [stage, token]
            per_stage = torch.stack([kl[index].mean() for index in range(len(stages))])
            per_stage.sum().backward()
            losses += per_stage.detach().tolist()
    total = 0.0
    for loss in losses:  # summed one stage after another, as the loss was always reported
        total += loss
    return total
