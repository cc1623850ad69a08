"""Judge a pruned model against the full one: held-out loss, KL, agreement, prompts, size, speed, text.

`compare(full, pruned, batch)` runs both models on the same held-out windows (a `TokenBatch`, e.g.
`data.window_batch(data.token_windows(full, texts, 64))` of texts the pruning never saw), on a prompt
set, times both in one run, and lets both continue the same prompts greedily. The models come in as
`Model` handles, so an exported folder is judged by loading it (`load_model(folder)`).

Per scored prediction (p: full, q: pruned, y: the next token):
    loss_m = -log m(y),  KL(p || q) = sum_v p_v (log p_v - log q_v),  agreement = [argmax q == argmax p],
each averaged within a window first (`metrics.per_text_means`), so a window is the resampling unit.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from streamlens.data import TokenBatch, load_prompts, prompt_batch
from streamlens.metrics import per_text_means
from streamlens.model import Model
from streamlens.model.generate import generate_texts, measure_speed
from streamlens.model.hf import parameter_count, plain_copy, weights_bytes
from streamlens.results.base import Provenance, command_line
from streamlens.results.pruned import PrunedComparison

GENERATION_PROMPTS = ("The capital of France is", "Once upon a time, there was a", "def fibonacci(n):")
SPEED_PROMPT = "The history of the printing press begins in the fifteenth century, when"


@dataclass(frozen=True)
class EvaluateSettings:
    """What `compare` measures besides the held-out windows.

    prompts: a prompt set ("prompts" for the built-in one, a .jsonl path, or None for none).
    new_tokens: length of the greedy generations; speed_new_tokens: of each timed run.
    repeats, threads: timed rounds (median kept) and torch threads for timing.
    chunk: windows per forward (bounds memory: chunk x pos x d_vocab logits per model).
    """

    prompts: str | None = "prompts"
    generation_prompts: tuple[str, ...] = GENERATION_PROMPTS
    new_tokens: int = 16
    speed_prompt: str = SPEED_PROMPT
    speed_new_tokens: int = 32
    repeats: int = 3
    threads: int = 1
    chunk: int = 4
    n_boot: int = 1000
    seed: int = 0
    level: float = 0.95


def check_pair(full: Model, pruned: Model) -> None:
    """The two models must read and write the same tokens (a pruned model keeps the tokenizer)."""
    if full.info.d_vocab != pruned.info.d_vocab or full.tokenizer.get_vocab() != pruned.tokenizer.get_vocab():
        raise ValueError(f"{pruned.info.name!r} does not share the tokenizer of {full.info.name!r}: "
                         f"a pruned model must keep its full model's vocabulary")


@torch.no_grad()
def prediction_metrics(full: Model, pruned: Model, batch: TokenBatch, chunk: int = 4) -> dict[str, torch.Tensor]:
    """Per-text means of each prediction metric on `batch` (see the module docstring).

    Returns:
        {"loss": [2, text] (full, pruned), "kl": [text], "agreement": [text], "top1": [2, text]}, float64.
    """
    if chunk < 1:
        raise ValueError(f"chunk {chunk} must be at least 1")
    names = ("loss_full", "loss_pruned", "kl", "agreement", "top1_full", "top1_pruned")
    values: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    text_of = []
    for start in range(0, batch.n_texts, chunk):
        rows = batch.rows(slice(start, start + chunk))
        scored = rows.scored & (rows.labels >= 0)
        log_p = full.run(rows.tokens)[scored].double().log_softmax(-1)  # [N, vocab]
        log_q = pruned.run(rows.tokens)[scored].double().log_softmax(-1)
        labels = rows.labels[scored]
        values["loss_full"].append(-log_p.gather(-1, labels[:, None])[:, 0])
        values["loss_pruned"].append(-log_q.gather(-1, labels[:, None])[:, 0])
        values["kl"].append((log_p.exp() * (log_p - log_q)).sum(-1))
        values["agreement"].append((log_q.argmax(-1) == log_p.argmax(-1)).double())
        values["top1_full"].append((log_p.argmax(-1) == labels).double())
        values["top1_pruned"].append((log_q.argmax(-1) == labels).double())
        text_of.append(torch.nonzero(scored)[:, 0] + start)
    index = torch.cat(text_of).cpu()
    means = {name: per_text_means(torch.cat(parts).cpu(), index, batch.n_texts) for name, parts in values.items()}
    return {"loss": torch.stack([means["loss_full"], means["loss_pruned"]]), "kl": means["kl"],
            "agreement": means["agreement"], "top1": torch.stack([means["top1_full"], means["top1_pruned"]])}


def compare(full: Model, pruned: Model, batch: TokenBatch, settings: EvaluateSettings = EvaluateSettings(),
            folders: tuple[str | Path | None, str | Path | None] = (None, None),
            command: str | None = None) -> PrunedComparison:
    """Full vs pruned on the same held-out windows; see `PrunedComparison` for every field.

    Args:
        full, pruned: loaded handles (the pruned one typically `load_model(exported folder)`).
        batch: held-out windows (or prompts), made with the full model's tokenizer.
        folders: where each model's weights are on disk, for their size; None takes the folder the
            model was loaded from (`info.source`) when it is one.
    """
    check_pair(full, pruned)
    metrics = prediction_metrics(full, pruned, batch, settings.chunk)
    prompt_correct = torch.zeros(2, 0, dtype=torch.float64)
    if settings.prompts is not None:
        prompts = prompt_batch(full, load_prompts(settings.prompts))
        prompt_correct = prediction_metrics(full, pruned, prompts, settings.chunk)["top1"]
    copies = [plain_copy(full), plain_copy(pruned)]
    speeds = measure_speed([full, pruned], settings.speed_prompt, settings.speed_new_tokens, settings.repeats,
                           settings.threads, hf_models=copies)
    generations = [generate_texts(model, settings.generation_prompts, settings.new_tokens, hf_model=copy)
                   for model, copy in zip((full, pruned), copies)]
    parameters = tuple(parameter_count(copy) for copy in copies)
    del copies
    return PrunedComparison(
        provenance=Provenance.of(pruned, command if command is not None else command_line(), settings.seed),
        models=(full.info.name, pruned.info.name), weights_hashes=(full.info.weights_hash, pruned.info.weights_hash),
        data=batch.description, n_predictions=batch.n_scored, loss=metrics["loss"], kl=metrics["kl"],
        agreement=metrics["agreement"], top1=metrics["top1"], prompt_correct=prompt_correct, parameters=parameters,
        file_bytes=file_sizes(full, pruned, folders),
        prefill_tokens_per_s=tuple(s.prefill_tokens_per_s for s in speeds),
        decode_tokens_per_s=tuple(s.decode_tokens_per_s for s in speeds),
        tokens_per_s=tuple(s.tokens_per_s for s in speeds),
        speed_settings={"prompt_tokens": speeds[0].prompt_tokens, "new_tokens": speeds[0].new_tokens,
                        "repeats": speeds[0].repeats, "threads": speeds[0].threads},
        generation_prompts=tuple(settings.generation_prompts), generations_full=generations[0],
        generations_pruned=generations[1], n_boot=settings.n_boot, seed=settings.seed, level=settings.level)


def file_sizes(full: Model, pruned: Model,
               folders: tuple[str | Path | None, str | Path | None]) -> tuple[int, ...] | None:
    """Bytes of each model's weights on disk, or None when either was loaded from no local folder or
    file (a hub name) and none was given; a given path that holds no weights raises."""
    paths = []
    for model, folder in zip((full, pruned), folders):
        if folder is None and not Path(model.info.source).exists():
            return None
        paths.append(Path(folder if folder is not None else model.info.source))
    return tuple(weights_bytes(path) for path in paths)
