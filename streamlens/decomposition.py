"""Exact logit decomposition and the logit lens.

Decomposition. With the final norm N(x) = w * (x - mean(x)) / scale + b (RMSNorm: no mean, no b) and
the stream x = sum_i c_i (embedding and every write), freezing the clean `scale` makes N linear in
the components, so for a target direction u in vocabulary space (one token, or token minus contrast):

    logit . u = sum_i ((w * centre(c_i) / scale) @ W_U) . u  +  (b @ W_U) . u  +  b_U . u

exactly. `decompose` returns each term; they sum to the model's real logit.

Logit lens. The final norm (recomputed, not frozen) and the unembedding applied to the stream after
each block: what the model "would say" if it stopped there.
"""

from __future__ import annotations

from collections.abc import Sequence

import einops
import torch
from jaxtyping import Float, Int

from streamlens.model import Model
from streamlens.recording import record
from streamlens.results import LogitDecomposition, LogitLens, Provenance, StreamWrites, command_line


def prompt_tokens(model: Model, prompt_or_tokens: str | torch.Tensor) -> Int[torch.Tensor, "1 pos"]:
    """One prompt as token ids [1, pos]: a string is tokenized, token ids are checked (a batch of more than one
    prompt is refused)."""
    if isinstance(prompt_or_tokens, str):
        return model.to_tokens(prompt_or_tokens)
    tokens = model.check_tokens(prompt_or_tokens)
    if tokens.shape[0] != 1:
        raise ValueError(f"decompose one prompt at a time: got a batch of {tokens.shape[0]}")
    return tokens


def _positions(positions: int | Sequence[int], n_pos: int) -> list[int]:
    wanted = [positions] if isinstance(positions, int) else list(positions)
    if not wanted:
        raise ValueError("positions is empty: give at least one position")
    resolved = []
    for position in wanted:
        if not -n_pos <= position < n_pos:
            raise ValueError(f"position {position} out of range: the prompt has {n_pos} tokens ({-n_pos} to {n_pos - 1})")
        resolved.append(position % n_pos)
    return resolved


def _label(model: Model, target: int, contrast: int) -> str:
    text = repr(model.decode(target))
    text = text if contrast < 0 else f"{text} - {model.decode(contrast)!r}"
    return f"{text} (pre-cap logit)" if model.info.logit_softcap else text


def _labels(model: Model, target_ids: torch.Tensor, contrast_ids: torch.Tensor) -> tuple[list[str], ...]:
    """Per position, the label of each target [pos][target] ("' Paris'" or "' Paris' - ' Rome'")."""
    return tuple([_label(model, int(t), int(c)) for t, c in zip(row_t, row_c)]
                 for row_t, row_c in zip(target_ids.tolist(), contrast_ids.tolist()))


def centre(stack: Float[torch.Tensor, "... d_model"], norm: str) -> Float[torch.Tensor, "... d_model"]:
    """Subtract the mean over d_model for LayerNorm (a linear map, so it applies per component)."""
    return stack - stack.mean(-1, keepdim=True) if norm == "layernorm" else stack


def _check_request(model: Model, prompt_or_tokens: str | torch.Tensor, positions: int | Sequence[int],
                   target: str | int | None, top_k: int | None) -> tuple[torch.Tensor, list[int]]:
    """(token ids [1, pos], the chosen positions as indices) after the checks that need no forward."""
    if model.info.dtype == "bfloat16":  # its 8-bit mantissa cannot keep the identity that is the point here
        raise ValueError("decompose needs a float32 or float64 model, got bfloat16: load with dtype='float32'")
    tokens = prompt_tokens(model, prompt_or_tokens)
    chosen = _positions(positions, tokens.shape[1])
    if top_k is not None and (target is not None or top_k < 1):
        raise ValueError(f"top_k={top_k}: use a positive top_k with target=None")
    return tokens, chosen


def _target_ids(model: Model, logits: Float[torch.Tensor, "pos vocab"], target: str | int | None,
                contrast: str | int | None, top_k: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(target ids [pos, n_targets], contrast ids [pos, n_targets], -1: no contrast); a contrast equal to
    its target is refused (the difference would be 0 by definition)."""
    if target is None:
        target_ids = logits.topk(top_k or 1, dim=-1).indices
    else:
        target_ids = torch.full((logits.shape[0], 1), model.token_id(target), dtype=torch.long)
    contrast_ids = torch.full_like(target_ids, -1 if contrast is None else model.token_id(contrast))
    if contrast is not None and bool((contrast_ids == target_ids).any()):
        raise ValueError(f"contrast {contrast!r} is the target itself ({_label(model, int(contrast_ids[0, 0]), -1)}):"
                         f" logit(target) - logit(contrast) is 0 by definition; choose another contrast token")
    return target_ids, contrast_ids


def decompose(
    model: Model,
    prompt_or_tokens: str | Int[torch.Tensor, "1 pos"],
    target: str | int | None = None,
    contrast: str | int | None = None,
    positions: int | Sequence[int] = -1,
    top_k: int | None = None,
    by_head: bool = False,
    writes: StreamWrites | None = None,
) -> LogitDecomposition:
    """Split the logit of a target at chosen positions into per-component contributions.

    Args:
        model: a loaded `Model`.
        prompt_or_tokens: a prompt, or token ids [1, pos].
        target: a single token (" Paris" or an id). None: the model's top prediction at each position
            (or its `top_k` predictions when `top_k` is set).
        contrast: a second token; the decomposed quantity becomes logit(target) - logit(contrast).
        positions: which positions (negative counts from the end).
        top_k: decompose the k most likely next tokens (only with target=None).
        by_head: split each attention write into heads plus the attention output bias.
        writes: reuse a `record(...)` of the same tokens (must have heads if by_head).

    Returns:
        `LogitDecomposition`; contributions [component, n_pos, n_targets] sum to `logits`
        [n_pos, n_targets], the model's real logits. A model with final logit soft-capping (loaded
        with strict=False) gets its pre-cap logits decomposed instead, and each target is labelled
        "(pre-cap logit)".
    """
    tokens, chosen = _check_request(model, prompt_or_tokens, positions, target, top_k)
    writes = writes if writes is not None else record(model, tokens, heads=by_head)
    logits = writes.logits[0, chosen]  # [n_pos, vocab]
    if model.info.logit_softcap:  # capped logits are not linear in the stream: explain the pre-cap logit
        logits = model.final_logits(writes.final[0, chosen])
    target_ids, contrast_ids = _target_ids(model, logits, target, contrast, top_k)
    directions = _directions(target_ids, contrast_ids, model.info.d_vocab, logits)
    with torch.inference_mode():
        comps = writes.components(by_head=by_head)
        contributions = _contributions(model, comps.stack[:, 0, chosen], writes.final_scale[0, chosen], directions)
        real = einops.einsum(logits, directions, "pos vocab, pos target vocab -> pos target")
        accumulated = _accumulate(contributions[:-2], comps.layers, model.n_layers)

    return LogitDecomposition(
        provenance=Provenance.of(model, command_line()),
        tokens=tokens.cpu(),
        token_strings=tuple(model.decode(t) for t in tokens[0].tolist()),
        positions=tuple(chosen),
        target_ids=target_ids.cpu(),
        contrast_ids=contrast_ids.cpu(),
        target_strings=_labels(model, target_ids, contrast_ids),
        labels=(*comps.labels, "norm bias", "unembed bias"),
        kinds=(*comps.kinds, "bias", "bias"),
        layers=(*comps.layers, None, None),
        heads=(*comps.heads, None, None),
        contributions=contributions.cpu(),
        logits=real.cpu(),
        accumulated=accumulated.cpu(),
        scale=writes.final_scale[0, chosen][:, 0].cpu(),
        norm=model.info.norm,
    )


def _directions(target_ids: Int[torch.Tensor, "pos target"], contrast_ids: Int[torch.Tensor, "pos target"],
                d_vocab: int, like: torch.Tensor) -> Float[torch.Tensor, "pos target vocab"]:
    """Direction in vocabulary space for each (position, target): one-hot target minus one-hot
    contrast (contrast id -1: none), in `like`'s dtype and device."""
    directions = torch.zeros(*target_ids.shape, d_vocab, dtype=like.dtype)
    directions.scatter_(-1, target_ids.unsqueeze(-1).cpu(), 1.0)
    has_contrast = contrast_ids >= 0
    directions[has_contrast] -= torch.nn.functional.one_hot(contrast_ids[has_contrast], d_vocab).to(like.dtype)
    return directions.to(like.device)


def _contributions(
    model: Model,
    stack: Float[torch.Tensor, "component pos d_model"],
    scale: Float[torch.Tensor, "pos 1"],
    directions: Float[torch.Tensor, "pos target vocab"],
) -> Float[torch.Tensor, "component+2 pos target"]:
    """Each component's term (w * centre(c) / scale) @ W_U . u, then the norm-bias and unembedding-bias
    terms as two more rows: with the clean `scale` frozen they sum to the real logit . u."""
    weighted = centre(stack, model.info.norm) * model.norm_weight / scale
    unembed = einops.einsum(model.W_U, directions, "d_model vocab, pos target vocab -> pos target d_model")
    contributions = einops.einsum(weighted, unembed, "comp pos d_model, pos target d_model -> comp pos target")
    norm_bias = einops.einsum(model.norm_bias, unembed, "d_model, pos target d_model -> pos target")
    unembed_bias = einops.einsum(model.b_U, directions, "vocab, pos target vocab -> pos target")
    return torch.cat([contributions, norm_bias[None], unembed_bias[None]])


def _accumulate(contributions: torch.Tensor, layers: Sequence[int | None], n_layers: int) -> torch.Tensor:
    """Running total after the embeddings and after each block, [n_layers + 1, n_pos, n_targets]."""
    per_stage = torch.zeros(n_layers + 1, *contributions.shape[1:], dtype=contributions.dtype,
                            device=contributions.device)
    for row, layer in zip(contributions, layers):
        per_stage[0 if layer is None else layer + 1] += row
    return per_stage.cumsum(0)


def logit_lens(
    model: Model,
    prompt_or_tokens: str | Int[torch.Tensor, "1 pos"],
    target: str | int | None = None,
    top_k: int = 5,
    writes: StreamWrites | None = None,
) -> LogitLens:
    """Read the stream after the embeddings and after every block through the final norm and unembedding.

    Args:
        target: the token whose probability and rank are tracked at every position; None: the model's
            final top prediction at each position.
        top_k: how many top tokens to keep per layer and position.

    Returns:
        `LogitLens` with arrays [n_layers + 1, pos, ...]; the last layer reproduces the model's output
        (KL to final 0 up to rounding).
    """
    tokens = prompt_tokens(model, prompt_or_tokens)
    if top_k < 1:
        raise ValueError(f"top_k={top_k}: must be at least 1")
    if writes is None:
        writes = record(model, tokens)
    with torch.inference_mode():
        final_logprobs = writes.logits[0].log_softmax(-1)  # [pos, vocab]
        if target is None:
            target_ids = final_logprobs.argmax(-1)
        else:
            target_ids = torch.full((tokens.shape[1],), model.token_id(target), dtype=torch.long,
                                    device=final_logprobs.device)
        top_ids, top_probs, target_probs, target_ranks, kls = [], [], [], [], []
        for stage in range(model.n_layers + 1):
            stream = writes.final if stage == model.n_layers else writes.stream(stage - 1 if stage else None)
            logprobs = model.final_logits(stream[0]).log_softmax(-1)  # [pos, vocab]
            top = logprobs.topk(top_k, dim=-1)
            target_logprob = logprobs.gather(-1, target_ids[:, None])[:, 0]
            top_ids.append(top.indices)
            top_probs.append(top.values.exp())
            target_probs.append(target_logprob.exp())
            target_ranks.append((logprobs > target_logprob[:, None]).sum(-1))
            kls.append((final_logprobs.exp() * (final_logprobs - logprobs)).sum(-1))
    return LogitLens(
        provenance=Provenance.of(model, command_line()),
        tokens=tokens.cpu(),
        token_strings=tuple(model.decode(t) for t in tokens[0].tolist()),
        layer_labels=("embed", *(str(layer) for layer in range(model.n_layers))),
        top_ids=torch.stack(top_ids).cpu(),
        top_probs=torch.stack(top_probs).cpu(),
        top_strings=tuple(
            [[model.decode(t) for t in row] for row in stage.tolist()] for stage in torch.stack(top_ids)
        ),
        target_ids=target_ids.cpu(),
        target_strings=tuple(model.decode(t) for t in target_ids.tolist()),
        target_probs=torch.stack(target_probs).cpu(),
        target_ranks=torch.stack(target_ranks).cpu(),
        kl_to_final=torch.stack(kls).cpu(),
    )
