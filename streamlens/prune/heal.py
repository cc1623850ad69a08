"""Heal a pruned model: a short fine-tune on texts the evaluation never sees, judged before and after.

`heal(pruned, train_tokens, eval_batch, folder, settings, teacher=full)` trains a fresh copy of the
pruned model (`model.train`: LoRA or full, LM loss or distillation from the full model), saves it
as a plain HF folder, loads that folder back as a `Model` (what a user would get) and measures both
on the same held-out windows: loss (and KL to the full model when it is given) per window, the mean
with 95% intervals before and after, and the paired difference after - before. With `proof_tokens`
it also proves the save: the folder, loaded fresh with transformers and with `load_model`, against
the trained model's logits in memory (`HealResult.proof`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from streamlens.data import TokenBatch
from streamlens.model import Model, load_model
from streamlens.model.export import GGUF_NAME, LOGIT_TOLERANCE, folder_logits, gguf_tolerance, relative_difference
from streamlens.model.hf import hf_context
from streamlens.model.train import TrainSettings, save_folder, train
from streamlens.prune.evaluate import prediction_metrics
from streamlens.results.base import Provenance, command_line
from streamlens.results.pruned import HealResult


def check_disjoint(train_tokens: torch.Tensor, eval_tokens: torch.Tensor) -> None:
    """Refuse training windows that repeat a held-out window (the heal would be judged on its own data).

    This catches the common mistake (the same windows passed twice); choosing texts that do not
    overlap at all is the caller's job (e.g. different files of a corpus).
    """
    held_out = {tuple(row): index for index, row in enumerate(eval_tokens.tolist())}
    repeated = [(row, held_out[tuple(window)]) for row, window in enumerate(train_tokens.tolist())
                if tuple(window) in held_out]
    if repeated:
        row, col = repeated[0]
        raise ValueError(f"training window {row} is held-out window {col} ({len(repeated)} training windows "
                         f"repeat held-out ones): heal on texts disjoint from the evaluation set")


def heal(pruned: Model, train_tokens: torch.Tensor, eval_batch: TokenBatch, folder: str | Path,
         settings: TrainSettings, teacher: Model | None = None, train_data: str = "",
         n_boot: int = 1000, seed: int = 0, level: float = 0.95, command: str | None = None,
         proof_tokens: torch.Tensor | None = None, run_id: str | None = None,
         gguf: bool = False) -> tuple[Model, HealResult]:
    """Fine-tune `pruned`, save it to `folder`, load it back, and measure before and after.

    Args:
        pruned: the model to heal (not changed).
        train_tokens: training windows [n, pos], from texts disjoint from `eval_batch`'s.
        eval_batch: held-out windows both models are judged on.
        folder: where the healed model is written (must not exist or be empty; written atomically).
        settings: steps, mode ("lora" | "full"), loss ("lm" | "distill"), lr, batch size, seed.
        teacher: the full model: the target of "distill", and the reference of the KL rows.
        proof_tokens: windows [n, pos] (keep n small) on which the saved folder is proved against
            the trained model (None: no proof).
        run_id: written into the folder's streamlens-export.json (a run finds its own folder by it).
        gguf: also write a float32 GGUF file (`GGUF_NAME`) into the folder; the proof reads it back too.

    Returns:
        (the healed model loaded from `folder`, the `HealResult`). With 0 steps, after == before.
    """
    check_disjoint(train_tokens, eval_batch.tokens)
    trained = train(pruned, train_tokens, settings, teacher)
    reference = None if proof_tokens is None else trained_logits(trained.hf_model, proof_tokens, pruned)
    save_folder(trained.hf_model, pruned.tokenizer, folder, {"healed_from": pruned.info.name, "steps": settings.steps,
                                                             "mode": settings.mode, "loss": settings.loss,
                                                             **({"run_id": run_id} if run_id else {})},
                gguf_name=GGUF_NAME if gguf else None)
    losses, seconds, cpu_seconds = trained.losses, trained.seconds, trained.cpu_seconds
    del trained  # frees the trained copy: the folder, loaded back, is what is judged
    healed = load_model(str(folder), dtype=pruned.info.dtype, device=pruned.info.device)
    proof = None if reference is None else prove_saved(healed, folder, proof_tokens, reference)
    before, after = (prediction_metrics(teacher or model, model, eval_batch) for model in (pruned, healed))
    empty = torch.zeros(0, dtype=torch.float64)
    result = HealResult(
        provenance=Provenance.of(healed, command if command is not None else command_line(), settings.seed),
        settings={"steps": settings.steps, "mode": settings.mode, "loss": settings.loss, "lr": settings.learning_rate,
                  "batch_size": settings.batch_size, "seed": settings.seed, "lora_rank": settings.lora_rank,
                  "lora_alpha": settings.lora_alpha, "threads": settings.threads,
                  "train_windows": int(train_tokens.shape[0]), "window": int(train_tokens.shape[-1]),
                  "pruned_model": pruned.info.name, "pruned_weights_hash": pruned.info.weights_hash},
        data=eval_batch.description, train_data=train_data, folder=str(folder),
        loss_before=before["loss"][1], loss_after=after["loss"][1],
        kl_before=before["kl"] if teacher is not None else empty,
        kl_after=after["kl"] if teacher is not None else empty,
        train_loss=losses, seconds=seconds, cpu_seconds=cpu_seconds,
        n_boot=n_boot, seed=seed, level=level, proof=proof,
        proof_tolerance=None if proof is None else LOGIT_TOLERANCE[pruned.info.dtype],
        gguf_tolerance=None if proof is None or "gguf" not in proof else gguf_tolerance(pruned.info.dtype),
        proof_windows=0 if proof_tokens is None else int(proof_tokens.shape[0]))
    return healed, result



@torch.inference_mode()
def trained_logits(hf_model: torch.nn.Module, tokens: torch.Tensor, model: Model, batch_size: int = 4) -> torch.Tensor:
    """Logits [n, pos, d_vocab] of the trained plain HF copy of `model`, `batch_size` windows a forward
    (a float64 model's softmax in float64, as `Model.run` computes it)."""
    device = next(hf_model.parameters()).device
    with hf_context(model):
        return torch.cat([hf_model(input_ids=tokens[start:start + batch_size].to(device)).logits.cpu()
                          for start in range(0, tokens.shape[0], batch_size)])


def prove_saved(healed: Model, folder: str | Path, tokens: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """The saved folder against the trained model's logits `reference` [n, pos, d_vocab]: relative max
    difference when loaded fresh with transformers, as the `healed` handle (`load_model`), and from
    its GGUF file (transformers' GGUF reader) when the folder has one."""
    from_hf = relative_difference(folder_logits(folder, tokens, healed.info.dtype), reference)
    with torch.inference_mode():
        logits = torch.cat([healed.run(tokens[start:start + 4]).cpu() for start in range(0, tokens.shape[0], 4)])
    proof = {"transformers": from_hf, "streamlens": relative_difference(logits, reference)}
    gguf_file = Path(folder) / GGUF_NAME
    if gguf_file.is_file():
        proof["gguf"] = relative_difference(folder_logits(gguf_file, tokens, healed.info.dtype), reference)
    return proof
