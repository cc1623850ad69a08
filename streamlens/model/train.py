"""Fine-tune a plain HF copy of a model (full or LoRA; LM loss or distillation) and save it as a folder.

The loop reads top to bottom: seed, copy the student, wrap it with LoRA (peft) or train all its
weights, then per step draw `batch_size` windows (a seeded permutation, epoch after epoch), compute
the loss, step AdamW. Losses:
- "lm": mean next-token cross-entropy, -log q(token p+1 | tokens <= p), over all positions;
- "distill": mean KL(teacher || student) = sum_v p_v (log p_v - log q_v) at every position, the
  teacher's logits at temperature 1 (p: the full model, q: the student).
LoRA adapters are merged into the weights at the end (`merge`), so the result is a plain HF model
that saves as an ordinary folder; the merged model's logits equal the adapted model's.
On CPU with a fixed seed and thread count, two runs give bit-identical weights.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from streamlens.model.export import save_folder as save_hf_folder
from streamlens.model.generate import torch_threads
from streamlens.model.handle import Model
from streamlens.model.hf import hf_context, plain_copy

MODES = ("lora", "full")
LOSSES = ("lm", "distill")
DEFAULT_LR = {"lora": 1e-3, "full": 5e-5}


@dataclass(frozen=True)
class TrainSettings:
    """How to train. `lr` None takes `DEFAULT_LR[mode]`; `lora_rank`/`lora_alpha` apply to LoRA only."""

    steps: int
    mode: str = "lora"
    loss: str = "lm"
    lr: float | None = None
    batch_size: int = 4
    seed: int = 0
    lora_rank: int = 8
    lora_alpha: float = 16.0
    threads: int = 1

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown heal mode {self.mode!r}: choose {' or '.join(MODES)}")
        if self.loss not in LOSSES:
            raise ValueError(f"unknown heal loss {self.loss!r}: choose {' or '.join(LOSSES)}")
        if self.steps < 0:
            raise ValueError(f"steps {self.steps} must be 0 or more")
        if self.batch_size < 1:
            raise ValueError(f"batch size {self.batch_size} must be at least 1")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"learning rate {self.lr} must be positive")
        if self.lora_rank < 1:
            raise ValueError(f"LoRA rank {self.lora_rank} must be at least 1")

    @property
    def learning_rate(self) -> float:
        return DEFAULT_LR[self.mode] if self.lr is None else self.lr


@dataclass(frozen=True)
class Trained:
    """A trained plain HF model (LoRA merged), its loss per step [steps] and the time it took."""

    hf_model: torch.nn.Module
    losses: torch.Tensor
    seconds: float
    cpu_seconds: float


def train(student: Model, tokens: torch.Tensor, settings: TrainSettings, teacher: Model | None = None) -> Trained:
    """Train a fresh copy of `student` on token windows; the handle itself is not changed.

    Args:
        student: the model to heal (a fresh HF copy is trained, see `hf.plain_copy`).
        tokens: training windows [n_windows, pos] (texts disjoint from any evaluation set).
        settings: steps, mode, loss, learning rate, batch size, seed, LoRA rank.
        teacher: the model whose logits "distill" matches (required for it, unused for "lm").

    Returns:
        `Trained` with the merged plain HF model (frozen, eval mode) and the loss of each step.
    """
    if settings.loss == "distill" and teacher is None:
        raise ValueError("heal loss 'distill' needs the teacher (the full model)")
    student.check_tokens(tokens)
    if tokens.shape[-1] < 2:
        raise ValueError(f"training windows of {tokens.shape[-1]} token predict nothing: give at least 2 tokens")
    started, cpu_started = time.perf_counter(), time.process_time()
    torch.manual_seed(settings.seed)
    hf_model = plain_copy(student, trainable=settings.mode == "full")
    if settings.mode == "lora":
        hf_model = wrap_lora(hf_model, settings.lora_rank, settings.lora_alpha, settings.seed)
    with torch_threads(settings.threads), hf_context(student):
        losses = fit(hf_model, tokens, settings, teacher)
    hf_model = merge(hf_model) if settings.mode == "lora" else hf_model
    for parameter in hf_model.parameters():
        parameter.requires_grad_(False)
    return Trained(hf_model.eval(), losses, time.perf_counter() - started, time.process_time() - cpu_started)


def wrap_lora(hf_model: torch.nn.Module, rank: int, alpha: float, seed: int) -> torch.nn.Module:
    """The model with LoRA adapters (rank `rank`, scale alpha / rank) on every linear layer but the
    unembedding; only the adapters train. The adapters start at B = 0, so the wrapped model computes
    exactly the original's logits before the first step."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ImportError("LoRA healing needs peft: pip install 'streamlens[prune]' (or use mode='full')") from None

    torch.manual_seed(seed)  # the A matrices are drawn at random
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, bias="none", target_modules="all-linear")
    return get_peft_model(hf_model, config)


def merge(peft_model: torch.nn.Module) -> torch.nn.Module:
    """W <- W + (alpha / rank) B A in every adapted layer; returns the plain HF model (same logits)."""
    return peft_model.merge_and_unload()


def step_loss(hf_model: torch.nn.Module, batch: torch.Tensor, kind: str, teacher: Model | None) -> torch.Tensor:
    """The training loss of one batch [batch, pos] (a scalar; see the module docstring for both kinds)."""
    logits = hf_model(input_ids=batch).logits  # [batch, pos, vocab]
    if kind == "lm":
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten())
    assert teacher is not None
    with torch.no_grad():
        log_p = teacher.run(batch).to(logits.dtype).log_softmax(-1)
    log_q = logits.log_softmax(-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


def fit(hf_model: torch.nn.Module, tokens: torch.Tensor, settings: TrainSettings,
        teacher: Model | None = None) -> torch.Tensor:
    """`settings.steps` AdamW steps on windows drawn in a seeded order; returns the loss per step [steps]."""
    parameters = [parameter for parameter in hf_model.parameters() if parameter.requires_grad]
    if settings.steps and not parameters:
        raise ValueError("nothing to train: the model has no trainable parameter")
    optimizer = torch.optim.AdamW(parameters, lr=settings.learning_rate, weight_decay=0.0) if parameters else None
    generator = torch.Generator().manual_seed(settings.seed)
    order = torch.empty(0, dtype=torch.long)
    losses = []
    for _ in range(settings.steps):
        if len(order) < settings.batch_size:  # a new epoch: a fresh permutation of the windows
            order = torch.cat([order, torch.randperm(tokens.shape[0], generator=generator)])
        rows, order = order[: settings.batch_size], order[settings.batch_size :]
        loss = step_loss(hf_model, tokens[rows.to(tokens.device)], settings.loss, teacher)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach().double().cpu())
    return torch.stack(losses) if losses else torch.zeros(0, dtype=torch.float64)


def save_folder(hf_model: torch.nn.Module, tokenizer: object, folder: str | os.PathLike[str],
                facts: dict[str, Any] | None = None, gguf_name: str | None = None) -> Path:
    """Write `hf_model` and `tokenizer` as an HF folder (config, safetensors, tokenizer files; `facts` as
    streamlens-export.json; `gguf_name`: a float32 GGUF file too), atomically (`export.save_folder`: an
    interrupted save leaves no folder).

    Raises:
        ValueError: `folder` exists and is not empty.
    """
    return save_hf_folder(hf_model, tokenizer, folder, facts, gguf_name)
