"""Greedy generation and measured tokens/s (prefill and decode) of plain HF copies of models.

One loop does both: the prompt runs once (prefill, filling the KV cache), then each new token is
the argmax of the last logits and is fed back alone (decode). Timing that loop on fixed threads,
several times with the models interleaved (A B A B ...), and keeping the median per model gives
speeds measured in one run under the same load: their ratio is what a user would see.
Identity: each generated token is the argmax of the full (uncached) forward over everything before it.
"""

from __future__ import annotations

import contextlib
import inspect
import statistics
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from streamlens.model.handle import Model
from streamlens.model.hf import hf_context, plain_copy


@dataclass(frozen=True)
class Speed:
    """Median timings of one model over `repeats` runs of the same prompt.

    prefill_tokens_per_s: prompt tokens / prefill seconds; decode_tokens_per_s: (new tokens - 1) /
    decode seconds (the first new token comes from the prefill); tokens_per_s: (prompt + new tokens) / total seconds.
    """

    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    tokens_per_s: float
    prompt_tokens: int
    new_tokens: int
    repeats: int
    threads: int


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run the block on `threads` intra-op threads, restoring the previous count after it."""
    if threads < 1:
        raise ValueError(f"threads {threads} must be at least 1")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@torch.no_grad()
def greedy(hf_model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, float, float]:
    """Greedy continuation of one prompt with the KV cache.

    Args:
        prompt: token ids [1, pos].
        new_tokens: how many tokens to generate (>= 1).

    Returns:
        (ids [new_tokens], prefill seconds, decode seconds).
    """
    if new_tokens < 1:
        raise ValueError(f"new tokens {new_tokens} must be at least 1")
    # transformers 5.24 renamed `past_key_values` to `cache` (the old name warns, then goes)
    name = "cache" if "cache" in inspect.signature(hf_model.forward).parameters else "past_key_values"
    started = time.perf_counter()
    out = hf_model(input_ids=prompt, use_cache=True)
    token = out.logits[:, -1].argmax(-1, keepdim=True)  # [1, 1]
    prefilled = time.perf_counter()
    generated = [token]
    for _ in range(new_tokens - 1):
        out = hf_model(input_ids=token, use_cache=True, **{name: getattr(out, name)})
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        generated.append(token)
    done = time.perf_counter()
    return torch.cat(generated, -1)[0], prefilled - started, done - prefilled


def generate_texts(model: Model, prompts: Sequence[str], new_tokens: int = 16,
                   hf_model: torch.nn.Module | None = None) -> tuple[str, ...]:
    """Greedy continuations (text only, prompt excluded) of each prompt by `model`.

    `hf_model`: a plain copy of `model` already made (`plain_copy`), to avoid loading another.
    """
    hf_model = plain_copy(model) if hf_model is None else hf_model
    texts = []
    with hf_context(model):
        for prompt in prompts:
            ids, _, _ = greedy(hf_model, model.to_tokens(prompt), new_tokens)
            texts.append(model.tokenizer.decode(ids.tolist()))
    return tuple(texts)


def measure_speed(models: Sequence[Model], prompt: str, new_tokens: int = 32, repeats: int = 5,
                  threads: int = 1, hf_models: Sequence[torch.nn.Module] | None = None) -> tuple[Speed, ...]:
    """tokens/s of each model on the same prompt, measured in one run, models interleaved.

    One untimed warm-up run per model, then `repeats` rounds each timing every model once; the
    median over rounds is kept. All models must share the tokenizer (the prompt is tokenised once).

    Returns:
        one `Speed` per model, in the order given.
    """
    if repeats < 1:
        raise ValueError(f"repeats {repeats} must be at least 1")
    if new_tokens < 2:
        raise ValueError(f"new tokens {new_tokens} must be at least 2 (the first comes out of the prefill)")
    if not models:
        raise ValueError("no model to time")
    hf_models = [plain_copy(model) for model in models] if hf_models is None else list(hf_models)
    tokens = models[0].to_tokens(prompt)
    times: list[list[tuple[float, float]]] = [[] for _ in models]
    with torch_threads(threads):
        for index, hf_model in enumerate(hf_models):
            with hf_context(models[index]):
                greedy(hf_model, tokens, new_tokens)  # warm-up: first-call allocations are not speed
        for _ in range(repeats):
            for index, hf_model in enumerate(hf_models):
                with hf_context(models[index]):
                    _, prefill, decode = greedy(hf_model, tokens, new_tokens)
                times[index].append((prefill, decode))
    n_prompt = tokens.shape[-1]
    speeds = []
    for runs in times:
        prefill = statistics.median(run[0] for run in runs)
        decode = statistics.median(run[1] for run in runs)
        total = statistics.median(run[0] + run[1] for run in runs)
        # the first new token comes out of the prefill: decode makes the other new_tokens - 1
        speeds.append(Speed(n_prompt / prefill, (new_tokens - 1) / decode, (n_prompt + new_tokens) / total,
                            n_prompt, new_tokens, repeats, threads))
    return tuple(speeds)
