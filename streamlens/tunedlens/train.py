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


def kl_from_final(final_logprobs: torch.Tensor, lens_logprobs: torch.Tensor) -> torch.Tensor:
    """KL(final || lens) per token, [..., vocab] x2 -> [...] (nats)."""
    return (final_logprobs.exp() * (final_logprobs - lens_logprobs)).sum(-1)


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
    n_stages, n_tokens, d_model = streams.shape
    weight = torch.zeros(n_stages, d_model, d_model, dtype=streams.dtype, device=streams.device, requires_grad=True)
    bias = torch.zeros(n_stages, d_model, dtype=streams.dtype, device=streams.device, requires_grad=True)
    optimiser = torch.optim.Adam([weight, bias], lr=lr)
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
        total = _backward(model, streams[:, chosen], final_logprobs, weight, bias)
        optimiser.step()
        losses.append(total)
        if on_step is not None:
            on_step(step, total)
    check_converged(losses, lr)
    return TunedLens(
        provenance=Provenance.of(model, command or command_line(), seed),
        weight=weight.detach().cpu(), bias=bias.detach().cpu(),
        layer_labels=("embed", *(str(layer) for layer in range(model.n_layers))),
        steps=steps, lr=float(lr), batch_tokens=batch_tokens, seed=seed, text=text, n_tokens=n_tokens,
        seconds=time.perf_counter() - started, threads=torch.get_num_threads(),
        train_loss=torch.tensor(losses, dtype=torch.float64),
    )


def _backward(model: Model, streams: torch.Tensor, final_logprobs: torch.Tensor, weight: torch.Tensor,
              bias: torch.Tensor) -> float:
    """Accumulate the gradient of the loss on one mini-batch (streams [stage, token, d_model]); returns the loss."""
    total = 0.0
    with torch.enable_grad():
        for stage in range(streams.shape[0]):  # one stage at a time: only one [batch, vocab] graph alive
            stream = streams[stage]
            translated = stream + stream @ weight[stage] + bias[stage]
            loss = kl_from_final(final_logprobs, model.final_logits(translated).log_softmax(-1)).mean()
            loss.backward()
            total += float(loss.detach())
    return total
